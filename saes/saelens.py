"""SAELens interop: export our SAEs to SAELens's on-disk format and import SAELens SAEs.

SAELens (v6) directory = `cfg.json` + `sae_weights.safetensors`:

  cfg.json      architecture ("standard" | "topk" | "jumprelu" | "gated" | "transcoder" |
                "jumprelu_transcoder"; a training checkpoint, TrainingSAE.save_model, may also say
                "batchtopk" | "matryoshka_batchtopk"), d_in, d_sae, dtype, device, apply_b_dec_to_input,
                normalize_activations ("none" | "expected_average_only_in" | "constant_norm_rescale"
                | "layer_norm" | "covariance_whitening"), reshape_activations ("none" | "hook_z"), k and
                rescale_acts_by_decoder_norm (topk and its training subclasses), d_out (transcoders), and `metadata`
                (sae_lens_version, model_name, hook_name, hook_head_index, prepend_bos, ...).
                Before v6 the metadata fields sat at the top level (with hook_layer,
                activation_fn_str, activation_fn_kwargs={"k": k} for TopK).
  weights       W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_dec [d_out], b_enc [d_sae];
                threshold [d_sae] (jumprelu); topk_threshold [] (batchtopk training checkpoints);
                gated has b_gate, b_mag, r_mag instead of b_enc.

SAELens forward (sae_lens/saes/*.py), with s = x - b_dec·[apply_b_dec_to_input]:
  standard  f = relu(s W_enc + b_enc)
  topk      h = s W_enc + b_enc (× ‖W_dec_i‖ if rescale_acts_by_decoder_norm);
            f = relu of the k largest h per token, 0 elsewhere
  jumprelu  h = s W_enc + b_enc;  f = relu(h) · 1[h > threshold]
  gated     f = 1[s W_enc + b_gate > 0] · relu(s (W_enc ⊙ exp(r_mag)) + b_mag)
  decode    x̂ = f W_dec + b_dec   (topk with rescale: (f / ‖W_dec_i‖) W_dec + b_dec)

Our SAEs (saes/sae.py) encode x W_enc + b_enc on raw activations, so an export writes
apply_b_dec_to_input=False and normalize_activations="none" (scales are folded), and an import
folds SAELens's variants into that form:
  apply_b_dec_to_input:  b_enc ← b_enc − b_dec W_enc  (gated: b_gate likewise, b_mag ← b_mag − (b_dec W_enc) ⊙ exp(r_mag))
  rescale_acts_by_decoder_norm:  W_enc ← W_enc·n, b_enc ← b_enc·n, W_dec ← W_dec / n  (n = ‖W_dec_i‖)
                 (for "topk" and for the training checkpoints "batchtopk" / "matryoshka_batchtopk",
                 whose rescale flag defaults to true; this is SAELens's own fold when it saves the
                 inference model, TopKTrainingSAE.process_state_dict_for_saving_inference)
  jumprelu:  threshold ← max(threshold, 0)  (makes our h·1[h > θ] equal relu(h)·1[h > θ])
  batchtopk / matryoshka_batchtopk training checkpoints:  threshold ← topk_threshold (one scalar, in
                 units of the rescaled h·n, so it is unchanged by the fold), run as JumpReLU.
The SAELens names on both sides come from the SavedForm records of saes/architectures.py
(saelens_architecture, saelens_transcoder); an import becomes the architecture named by its form.
BatchTopK and Matryoshka-BatchTopK run as JumpReLU at inference, so they export as "jumprelu"
(what SAELens itself does); our full config rides along in metadata["featureatlas"] and a digest
of the weights in metadata["featureatlas_weights_sha256"], so export → import restores the original
architecture and weights bit for bit. When SAELens loaded, edited and re-saved the directory (a
new `k`, another threshold, another hook), the fields that decide the forward pass (see
`_cfg_differs`) or the weight digest no longer agree with that embedded config, and the
directory is read as a plain SAELens SAE instead, so the edit is what gets imported.

JumpReLU sign: SAELens computes relu(h)·1[h > θ], we compute h·1[h > θ]; the two agree exactly
when θ ≥ 0. Our training keeps θ > 0 (exp of a log for JumpReLU, a batch threshold ≥ 0 for
BatchTopK); a hand-made SAE with a negative θ would give negative codes here and ReLU'd ones in
SAELens, so its export is refused (SAELensFormatError) rather than written with another meaning.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from featureatlas.activation_store.errors import FeatureAtlasError
from featureatlas.activation_store.models.config import from_transformerlens, to_transformerlens
from featureatlas.activation_store.runs import publish_files, published
from featureatlas.saes import architectures as A
from featureatlas.saes.config import SAEConfig
from featureatlas.saes.io import load_sae
from featureatlas.saes.sae import SAE, param_names, sae_from_params

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The cfg.json layout we write is SAELens 6's (config fields at the top, run facts in `metadata`).
SAELENS_FORMAT_VERSION = "6.0.0"
_DEFAULT_ARCHITECTURE = "standard"
"""SAELens's architecture when cfg.json names none (before v6, every SAE; TopK said so in activation_fn_str)."""


class SAELensFormatError(FeatureAtlasError, ValueError):
    """A SAELens directory we cannot represent exactly; the message says why and what to do."""


def to_transformerlens_hook(hook: str) -> tuple[str, int | None]:
    """("blocks.L.hook_…", L) for our `kind.L` hook names; unknown names pass through unchanged."""
    name = to_transformerlens(hook)
    return (name, int(hook.partition(".")[2])) if name else (hook, None)


def from_transformerlens_hook(name: str) -> str:
    """Our `kind.L` hook name for a TransformerLens name like blocks.15.hook_resid_post; others unchanged."""
    return from_transformerlens(name) or name


def _saelens_cfg(config: SAEConfig) -> dict:
    """The cfg.json (without the weight digest) that an export of an SAE with `config` writes."""
    arch = A.saelens_architecture(config)
    if arch is None:  # SavedForm.saelens_transcoder None: SAELens has no transcoder of that form
        exportable = ", ".join(f.name for f in A.SAVED_FORMS.values() if f.saelens_transcoder)
        raise SAELensFormatError(
            f"SAELens has no {A.saved_form(config).name} transcoder ({config.architecture}); only transcoders that "
            f"run as {exportable} at inference (BatchTopK runs as jumprelu) export")
    topk = A.saved_form(config) is A.TOPK_FORM
    hook_name, hook_layer = to_transformerlens_hook(config.hook_in)
    # exclude_special_tokens: our stores train without BOS.
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                "model_name": config.model_id, "hook_name": hook_name, "hook_head_index": None, "prepend_bos": True,
                "exclude_special_tokens": True, "dataset_path": "", "neuronpedia_id": None,
                "featureatlas": config.to_dict()}
    cfg = {"architecture": arch, "d_in": config.d_in, "d_sae": config.width, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": metadata,
           # Pre-6 readers (and tools such as SAEBench / SAEDashboard) look for these at the top level.
           "model_name": config.model_id, "hook_name": hook_name,
           "hook_layer": hook_layer if hook_layer is not None else 0, "hook_head_index": None,
           "activation_fn_str": "topk" if topk else "relu", "finetuning_scaling_factor": False, "prepend_bos": True}
    if topk:
        cfg.update(k=int(config.k), rescale_acts_by_decoder_norm=False, activation_fn_kwargs={"k": int(config.k)})
    if config.is_transcoder:
        hook_out, layer_out = to_transformerlens_hook(config.hook_out)
        cfg.update(d_out=config.d_out, hook_name_out=hook_out)
        metadata.update(hook_name_out=hook_out, hook_layer_out=layer_out)
    return cfg


def _weights_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over (name, shape, float32 little-endian bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name], dtype="<f4"))
        h.update(f"{name}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _check_jumprelu_sign(sae: SAE) -> None:
    """Refuse a JumpReLU whose codes SAELens would compute differently (a negative threshold)."""
    if A.saved_form(sae.config) is not A.JUMPRELU_FORM:
        return
    theta_F = np.asarray(sae.params["threshold"])
    neg = int(np.sum(theta_F < 0))
    if neg:
        raise SAELensFormatError(
            f"{neg} of {theta_F.size} JumpReLU thresholds are negative (min {float(theta_F.min()):.4g}): featureatlas "
            "encodes those latents as h·1[h > θ], which can be negative, while SAELens computes relu(h)·1[h > θ], "
            "so the exported SAE would mean something else. Set the thresholds to max(θ, 0) first "
            "(sae.params['threshold'] = jnp.maximum(sae.params['threshold'], 0): the codes then become "
            "relu(h) for those latents, in featureatlas and SAELens alike) and export again.")


def export_saelens(sae_or_dir: SAE | str | Path, out_dir: str | Path) -> Path:
    """Write `sae` (or the SAE saved in a directory) as a SAELens directory; returns out_dir.

    Raises SAELensFormatError, before anything is written, for an SAE that SAELens cannot run with
    the same meaning (a transcoder SAELens has no class for, a JumpReLU with a negative threshold).
    """
    sae = load_sae(sae_or_dir) if isinstance(sae_or_dir, (str, Path)) else sae_or_dir
    cfg = _saelens_cfg(sae.config)
    _check_jumprelu_sign(sae)
    tensors = {n: np.ascontiguousarray(np.asarray(v, np.float32)) for n, v in sae.params.items()}
    cfg["metadata"]["featureatlas_weights_sha256"] = _weights_digest(tensors)
    out = Path(out_dir)
    # Both files appear together (never new weights beside an old cfg.json).
    publish_files(out, {WEIGHTS_FILE: lambda p: save_file(tensors, str(p)), CFG_FILE: json.dumps(cfg, indent=2)})
    return out


# Fields of cfg.json that decide SAELens's forward pass (top level) or what the SAE is attached to
# (metadata), with the value SAELens assumes when a field is absent.
_TOP_FIELDS = {"architecture": _DEFAULT_ARCHITECTURE, "d_in": None, "d_sae": None, "d_out": None,
               "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none", "k": None,
               "rescale_acts_by_decoder_norm": False}
_META_FIELDS = ("hook_name", "hook_name_out", "model_name")


def _cfg_differs(found: dict, expected: dict) -> bool:
    """Whether a cfg.json differs from `expected` (what our export of the embedded config writes) in any
    deciding field; fields `expected` lacks count only when `found` sets them to something other than
    SAELens's default."""
    meta_f, meta_e = found.get("metadata") or {}, expected.get("metadata") or {}
    return (any(found.get(key, default) != expected.get(key, default) for key, default in _TOP_FIELDS.items())
            or any(meta_f.get(key) != meta_e.get(key) for key in _META_FIELDS))


def _restore_featureatlas(cfg: dict, weights: dict) -> SAE | None:
    """Our own export, untouched: rebuild its exact config. None (read it as a plain SAELens SAE)
    when any deciding field of cfg.json or the weights differ from what that export wrote, e.g.
    after SAELens loaded the directory, changed `k` or a threshold, and saved it again."""
    meta = cfg.get("metadata") or {}
    ours = meta.get("featureatlas")
    if not ours:
        return None
    try:
        config = SAEConfig.from_dict(ours)
    except ValueError:  # written by a version with other config fields: read the plain SAELens form
        return None
    if set(param_names(config)) != set(weights):
        return None
    try:
        expected = _saelens_cfg(config)
    except SAELensFormatError:
        return None
    digest = meta.get("featureatlas_weights_sha256")
    if _cfg_differs(cfg, expected) or (digest is not None and digest != _weights_digest(weights)):
        return None
    return sae_from_params(config, weights)


# SAELens training checkpoints (TrainingSAE.save_model) name the training architecture; they run as
# JumpReLU at inference (SAELens saves that form as "jumprelu"), as our BatchTopK record is saved.
_TRAINING_CHECKPOINTS = {"batchtopk": A.BatchTopK.form, "matryoshka_batchtopk": A.BatchTopK.form}
_SAELENS_FORMS: dict[str, tuple[A.SavedForm, bool]] = {
    **{name: (form, False) for name, form in _TRAINING_CHECKPOINTS.items()},
    **{f.saelens_architecture: (f, False) for f in A.SAVED_FORMS.values()},
    **{f.saelens_transcoder: (f, True) for f in A.SAVED_FORMS.values() if f.saelens_transcoder},
}
"""{SAELens architecture: (the saved form it runs as, is_transcoder)}, from the SavedForm records."""
# SAELens architectures whose encoder may scale h by the decoder row norms (TopK and its training
# subclasses; the flag defaults to true in TopKTrainingSAEConfig and so in BatchTopK / Matryoshka).
_RESCALED_ARCHITECTURES = (A.TOPK_FORM.saelens_architecture, *_TRAINING_CHECKPOINTS)


def _saelens_form(cfg: dict) -> tuple[str, A.SavedForm, bool]:
    """(SAELens architecture, the saved form it runs as, is_transcoder) of a cfg.json (v6, or pre-6 with
    activation_fn_str)."""
    name = cfg.get("architecture", _DEFAULT_ARCHITECTURE)
    if name == _DEFAULT_ARCHITECTURE and cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk":
        name = A.TOPK_FORM.saelens_architecture
    if name not in _SAELENS_FORMS:
        raise SAELensFormatError(
            f"SAELens architecture {name!r} is not supported; supported: {', '.join(sorted(_SAELENS_FORMS))}")
    return (name, *_SAELENS_FORMS[name])


def import_saelens(path: str | Path) -> SAE:
    """Load a SAELens directory (cfg.json + sae_weights.safetensors) as our SAE.

    The SAELens forward pass is folded into our raw-space form (see the module docstring), so
    encode/decode compute what SAELens computes. Per-token normalisations (layer_norm,
    constant_norm_rescale), an unfolded dataset scale (expected_average_only_in) and hook_z
    reshaping have no exact equivalent and raise SAELensFormatError.
    """
    path = Path(path)
    cfile, wfile = path / CFG_FILE, path / WEIGHTS_FILE
    if path.is_dir():
        published(path)  # completes an export that a crash interrupted
    if not cfile.exists():
        raise FileNotFoundError(f"{cfile} not found; a SAELens SAE directory holds cfg.json and {WEIGHTS_FILE}")
    if not wfile.exists():
        raise FileNotFoundError(f"{wfile} not found next to {cfile}; the SAELens directory is incomplete")
    cfg, w = json.loads(cfile.read_text()), {k: np.asarray(v, np.float32) for k, v in load_file(str(wfile)).items()}
    restored = _restore_featureatlas(cfg, w)
    if restored is not None:
        return restored

    meta = cfg.get("metadata") or {}
    norm = cfg.get("normalize_activations", "none")
    if norm is True:
        norm = "expected_average_only_in"
    if norm not in ("none", False, None):
        raise SAELensFormatError(
            f"normalize_activations={norm!r}: the SAE expects rescaled inputs; fold the scale into the "
            "weights first (SAELens: sae.fold_activation_norm_scaling_factor(s); sae.save_model(dir))"
            if norm == "expected_average_only_in"
            else f"normalize_activations={norm!r} is a per-token normalisation with no linear equivalent; not supported"
        )
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise SAELensFormatError("reshape_activations='hook_z' (per-head attention SAEs) is not supported")

    name, form, transcoder = _saelens_form(cfg)
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    d_out = int(cfg.get("d_out", d_in)) if transcoder else d_in
    W_enc, W_dec, b_dec = w["W_enc"], w["W_dec"], w["b_dec"]
    if "finetuning_scaling_factor" in w:  # decode(f · s) = f (s ⊙ W_dec)
        W_dec = W_dec * w["finetuning_scaling_factor"][:, None]
    shift_F = b_dec @ W_enc if (cfg.get("apply_b_dec_to_input", True) and not transcoder) else None

    params: dict[str, np.ndarray] = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec}
    if "b_gate" in form.param_names:
        b_gate, b_mag, r_mag = w["b_gate"], w["b_mag"], w["r_mag"]
        if shift_F is not None:
            b_gate = b_gate - shift_F
            b_mag = b_mag - shift_F * np.exp(r_mag)
        params.update(b_gate=b_gate, b_mag=b_mag, r_mag=r_mag)
    else:
        params["b_enc"] = w["b_enc"] if shift_F is None else w["b_enc"] - shift_F
    if "threshold" in form.param_names:
        if "threshold" in w:
            threshold = w["threshold"]
        elif "log_threshold" in w:
            threshold = np.exp(w["log_threshold"])
        elif "topk_threshold" in w:
            threshold = np.full(d_sae, float(np.asarray(w["topk_threshold"]).reshape(-1)[0]), np.float32)
        else:
            raise SAELensFormatError(f"{path}: a {name} SAE needs a 'threshold' tensor; found {sorted(w)}")
        params["threshold"] = np.maximum(threshold, 0).astype(np.float32)
    k = max(1, round(float(cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k", 32)))))
    if cfg.get("rescale_acts_by_decoder_norm", False):
        if name not in _RESCALED_ARCHITECTURES:
            raise SAELensFormatError(
                f"rescale_acts_by_decoder_norm is set for architecture {cfg.get('architecture')!r}, which SAELens "
                f"only defines for {', '.join(_RESCALED_ARCHITECTURES)}; this cfg.json is not one SAELens wrote")
        # SAELens's fold_W_dec_norm: W_enc·n, b_enc·n, W_dec / n with n = max(‖W_dec_i‖, 1e-8). The codes become
        # h·n (what a rescaled encoder selects and thresholds) and decode((h·n)/n · W_dec) is unchanged, so the
        # saved SAE needs no rescale at run time.
        n_F = np.maximum(np.linalg.norm(params["W_dec"], axis=1), 1e-8)
        params.update(W_enc=params["W_enc"] * n_F[None, :], b_enc=params["b_enc"] * n_F,
                      W_dec=params["W_dec"] / n_F[:, None])

    hook_in = from_transformerlens_hook(meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point") or "")
    hook_out_tl = meta.get("hook_name_out") or cfg.get("hook_name_out") or ""
    hook_out = from_transformerlens_hook(hook_out_tl) if transcoder and hook_out_tl else hook_in
    if not hook_in:
        raise SAELensFormatError(f"{path / CFG_FILE} names no hook (metadata.hook_name / hook_name)")
    if transcoder and hook_out == hook_in:
        raise SAELensFormatError(f"{path / CFG_FILE} is a transcoder but names no distinct metadata.hook_name_out")
    # Each saved form is also the architecture that trains into it.
    config = SAEConfig(architecture=form.name, d_in=d_in, width=d_sae, k=k, hook_in=hook_in, hook_out=hook_out,
                       d_out=d_out, model_id=str(meta.get("model_name") or cfg.get("model_name") or ""),
                       normalisation_folded=True)
    return sae_from_params(config, {n: np.asarray(v, np.float32) for n, v in params.items()})
