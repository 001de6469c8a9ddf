"""Write tests/fixtures/saelens/ with the real sae-lens package (SAELens interop fixtures).

Run by hand (never by the tests), in two steps, the second in a throwaway venv outside the project:

    # 1. featureatlas exports that SAELens will load, edit and re-save (the project's own venv)
    .venv/bin/python scripts/make_saelens_fixtures.py export /tmp/fa_exports
    # 2. the fixtures themselves, computed by sae-lens (torch CPU)
    python3.11 -m venv /tmp/saelens-venv
    /tmp/saelens-venv/bin/pip install torch==2.13.0 "sae-lens==6.54.*"
    /tmp/saelens-venv/bin/python scripts/make_saelens_fixtures.py saelens /tmp/fa_exports

Step 2 replaces tests/fixtures/saelens/ (or the folder given with --out). Each fixture is a folder

    cfg.json, sae_weights.safetensors   written by SAELens itself (SAE.save_model)
    reference.npz                       x [N, d_in] and SAELens's own outputs on it, in float32:
                                        codes = sae.encode(x), recon = sae.decode(codes)

and MANIFEST.json describes every case (kind, SAELens architecture, expected featureatlas
architecture and settings, L0s measured by SAELens) plus the sae-lens and torch versions. Kinds:

  inference   an inference SAE (standard, topk, topk with rescale_acts_by_decoder_norm, jumprelu,
              jumprelu with some negative thresholds, gated, transcoder, jumprelu_transcoder) with
              random weights (non-unit decoder rows, a b_dec that apply_b_dec_to_input subtracts).
  training    a training checkpoint (TrainingSAE.save_model) of topk, batchtopk and
              matryoshka_batchtopk at SAELens's defaults (rescale_acts_by_decoder_norm=True), the
              BatchTopK threshold learnt by SAELens's own EMA (update_topk_threshold) on random
              batches. The reference is SAELens's inference model of the checkpoint
              (save_inference_model, then SAE.load_from_disk); reference.npz also holds the
              training-mode encode of the same batch (codes_train: batch top-k for BatchTopK).
  resaved     a featureatlas export that SAELens loaded (SAE.load_from_disk), optionally edited
              (k, the thresholds, the hook) and saved again (save_model); the reference is the
              edited SAELens SAE.

Rows of x that sit within a 1e-4 relative perturbation of a selection boundary (a TopK tie, a
JumpReLU threshold, a gate at 0) are dropped, so float32 rounding on either side cannot flip a
latent. Everything is seeded; the folder stays well under 1 MB.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

D_IN, D_SAE, D_OUT, K, N_ROWS = 16, 32, 12, 4, 48
HOOK = "blocks.2.hook_resid_post"
HOOK_OUT = "blocks.2.hook_mlp_out"
MODEL = "tiny-model"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "saelens"

# The featureatlas exports of step 1, and what step 2 does with each of them.
FA_EXPORTS = {
    # name: (featureatlas architecture, extra SAEConfig fields)
    "fa_topk": ("topk", {}),
    "fa_batchtopk": ("batchtopk", {}),
    "fa_relu": ("relu", {}),
}
# name of the re-saved fixture: (export it comes from, edit applied in SAELens or None)
RESAVED = {
    "resaved_batchtopk_unedited": ("fa_batchtopk", None),
    "resaved_topk_k2": ("fa_topk", ("k", 2)),
    "resaved_batchtopk_threshold_x3": ("fa_batchtopk", ("threshold_scale", 3.0)),
    "resaved_relu_hook": ("fa_relu", ("hook_name", "blocks.5.hook_resid_pre")),
}


# ---------------------------------------------------------------------------------------------
# Step 1: featureatlas exports (project venv; no torch)
# ---------------------------------------------------------------------------------------------
def make_featureatlas_exports(out: Path) -> None:
    from featureatlas.saes.config import SAEConfig
    from featureatlas.saes.sae import param_names, sae_from_params
    from featureatlas.saes.saelens import export_saelens

    out.mkdir(parents=True, exist_ok=True)
    for i, (name, (arch, extra)) in enumerate(sorted(FA_EXPORTS.items())):
        rng = np.random.default_rng(100 + i)
        cfg = SAEConfig(architecture=arch, d_in=D_IN, width=D_SAE, k=5, hook_in="resid_post.2",
                        model_id=MODEL, store_fingerprint=f"fixture-{name}", normalisation_folded=True, **extra)
        shapes = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
        params = {n: rng.normal(size=shapes.get(n, (D_SAE,))).astype(np.float32) * 0.5 for n in param_names(cfg)}
        params["W_dec"] /= np.linalg.norm(params["W_dec"], axis=1, keepdims=True)
        if "threshold" in params:
            params["threshold"] = np.full(D_SAE, 0.4, np.float32)  # BatchTopK: one shared threshold
        export_saelens(sae_from_params(cfg, params), out / name)
        print(f"exported {out / name}")


# ---------------------------------------------------------------------------------------------
# Step 2: SAELens fixtures (sae-lens venv)
# ---------------------------------------------------------------------------------------------
def _metadata(transcoder: bool = False):
    from sae_lens.saes.sae import SAEMetadata

    extra = {"hook_name_out": HOOK_OUT} if transcoder else {}
    return SAEMetadata(model_name=MODEL, hook_name=HOOK, **extra)


def _randomise(sae, rng: np.random.Generator, negative_thresholds: bool = False,
               dec_norms: tuple[float, float] = (0.5, 2.0)) -> None:
    """Seeded random values for every parameter: decoder rows with norms drawn from `dec_norms`,
    biases that matter, JumpReLU thresholds in (0.05, 0.6) (or in (-0.5, 0.5) when asked)."""
    import torch

    with torch.no_grad():
        for name, p in sae.named_parameters():
            shape = tuple(p.shape)
            if name == "W_enc":
                v = rng.normal(size=shape) / np.sqrt(shape[0])
            elif name == "W_dec":
                v = rng.normal(size=shape)
                v = v / np.linalg.norm(v, axis=1, keepdims=True) * rng.uniform(*dec_norms, size=(shape[0], 1))
            elif name == "threshold":
                v = rng.uniform(-0.5, 0.5, size=shape) if negative_thresholds else rng.uniform(0.05, 0.6, size=shape)
            elif name == "r_mag":
                v = rng.normal(size=shape) * 0.3
            elif name == "b_dec":
                v = rng.normal(size=shape) * 0.5
            else:  # b_enc, b_gate, b_mag
                v = rng.normal(size=shape) * 0.2 - 0.1
            p.copy_(torch.as_tensor(v, dtype=p.dtype))


def _x(rng: np.random.Generator, n: int = 2 * N_ROWS) -> np.ndarray:
    return (rng.normal(size=(n, D_IN)) + rng.normal(size=D_IN) * 0.3).astype(np.float32)


def _stable_rows(encode, x: np.ndarray, n_keep: int, rng: np.random.Generator) -> np.ndarray:
    """The first n_keep rows of x whose active set survives four 1e-4 relative perturbations."""
    import torch

    with torch.no_grad():
        base = encode(torch.from_numpy(x)).numpy() != 0
        ok = np.ones(len(x), bool)
        for _ in range(4):
            xp = x * (1 + 1e-4 * rng.standard_normal(x.shape).astype(np.float32))
            ok &= np.all((encode(torch.from_numpy(xp)).numpy() != 0) == base, axis=1)
    keep = np.flatnonzero(ok)[:n_keep]
    if len(keep) < n_keep:
        raise RuntimeError(f"only {len(keep)} rows of {len(x)} are away from a selection boundary")
    return x[keep]


def _reference(sae, x: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(x))
        recon = sae.decode(codes)
    return {"x": x, "codes": codes.numpy().astype(np.float32), "recon": recon.numpy().astype(np.float32)}


def _l0(codes: np.ndarray) -> float:
    return float(np.mean(np.sum(codes != 0, axis=1)))


def _write(out: Path, name: str, sae, ref: dict[str, np.ndarray], manifest: dict, **info) -> None:
    d = out / name
    sae.save_model(d)
    np.savez_compressed(d / "reference.npz", **ref)
    manifest["cases"][name] = {**info, "l0": _l0(ref["codes"])}
    print(f"{name:36s} L0 {manifest['cases'][name]['l0']:.3f}")


def _inference_cases(out: Path, manifest: dict) -> None:
    from sae_lens import (GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, JumpReLUTranscoder,
                          JumpReLUTranscoderConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig,
                          Transcoder, TranscoderConfig)

    cases = [
        # name, class, config, expected featureatlas architecture, extra info
        ("standard", StandardSAE, StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_metadata()), "relu", {}),
        ("topk", TopKSAE, TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=_metadata()), "topk", {"k": K}),
        ("topk_rescaled", TopKSAE, TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True,
                                                  metadata=_metadata()), "topk", {"k": K}),
        ("jumprelu", JumpReLUSAE, JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_metadata()), "jumprelu", {}),
        ("jumprelu_negative_threshold", JumpReLUSAE, JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_metadata()),
         "jumprelu", {"negative_thresholds": True}),
        ("gated", GatedSAE, GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_metadata()), "gated", {}),
        ("transcoder", Transcoder, TranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False,
                                                    metadata=_metadata(True)), "relu", {"transcoder": True}),
        ("jumprelu_transcoder", JumpReLUTranscoder,
         JumpReLUTranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False,
                                  metadata=_metadata(True)), "jumprelu", {"transcoder": True}),
    ]
    for i, (name, cls, cfg, arch, info) in enumerate(cases):
        rng = np.random.default_rng(1000 + i)
        sae = cls(cfg)
        _randomise(sae, rng, negative_thresholds=info.get("negative_thresholds", False))
        sae.eval()
        x = _stable_rows(sae.encode, _x(rng), N_ROWS, rng)
        ref = _reference(sae, x)
        if name == "jumprelu_negative_threshold":
            import torch

            neg = int((sae.threshold < 0).sum())
            with torch.no_grad():  # what featureatlas's own h·1[h > θ] would give on these weights
                h = sae.process_sae_in(torch.from_numpy(x)) @ sae.W_enc + sae.b_enc
                signed = (h * (h > sae.threshold)).numpy()
            info = {**info, "n_negative_thresholds": neg, "negative_codes_without_relu": int((signed < 0).sum())}
        _write(out, name, sae, ref, manifest, kind="inference", saelens_architecture=cfg.architecture(),
               featureatlas_architecture=arch, **info)


def _training_cases(out: Path, manifest: dict, tmp: Path) -> None:
    import torch
    from sae_lens import (SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, MatryoshkaBatchTopKTrainingSAE,
                          MatryoshkaBatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig)

    cases = [
        ("topk_training", TopKTrainingSAE, TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=_metadata()),
         "topk"),
        ("batchtopk_training", BatchTopKTrainingSAE,
         BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, topk_threshold_lr=0.05, metadata=_metadata()),
         "jumprelu"),
        ("matryoshka_batchtopk_training", MatryoshkaBatchTopKTrainingSAE,
         MatryoshkaBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[8, 16, D_SAE],
                                              topk_threshold_lr=0.05, metadata=_metadata()), "jumprelu"),
    ]
    for i, (name, cls, cfg, arch) in enumerate(cases):
        assert cfg.rescale_acts_by_decoder_norm, "SAELens's training default changed; update the docstring"
        rng = np.random.default_rng(2000 + i)
        sae = cls(cfg)
        # Decoder norms as a run started at SAELens's decoder_init_norm=0.1 leaves them: below 1.
        _randomise(sae, rng, dec_norms=(0.1, 1.0))
        if hasattr(sae, "update_topk_threshold"):
            # SAELens's own EMA of the batch's smallest kept activation, on fresh random batches
            # (topk_threshold_lr 0.05 instead of 0.01 so 300 batches settle it).
            with torch.no_grad():
                for _ in range(300):
                    sae.update_topk_threshold(sae.encode(torch.from_numpy(_x(rng, 256))))
        # The reference is SAELens's inference model of this checkpoint.
        sae.save_inference_model(tmp / name)
        inference = SAE.load_from_disk(tmp / name)
        inference.eval()
        x = _stable_rows(inference.encode, _x(rng), N_ROWS, rng)
        ref = _reference(inference, x)
        with torch.no_grad():
            ref["codes_train"] = sae.encode(torch.from_numpy(x)).numpy().astype(np.float32)
        info = {"k": K, "rescale_acts_by_decoder_norm": True, "inference_architecture": inference.cfg.architecture(),
                "l0_train_encode": _l0(ref["codes_train"])}
        if hasattr(sae, "topk_threshold"):
            info["topk_threshold"] = float(sae.topk_threshold)
        _write(out, name, sae, ref, manifest, kind="training", saelens_architecture=cfg.architecture(),
               featureatlas_architecture=arch, **info)


def _resaved_cases(out: Path, manifest: dict, exports: Path) -> None:
    import torch
    from sae_lens import SAE

    for name, (source, edit) in RESAVED.items():
        src = exports / source
        if not (src / "cfg.json").exists():
            raise FileNotFoundError(f"{src}/cfg.json not found; run step 1 (`export {exports}`) first")
        sae = SAE.load_from_disk(src)
        original = json.loads((src / "cfg.json").read_text())["metadata"]["featureatlas"]
        info = {"source": source, "edit": list(edit) if edit else None, "featureatlas_config": original}
        if edit is None:
            info["featureatlas_architecture"] = original["architecture"]
        elif edit[0] == "k":
            sae.cfg.k = edit[1]
            sae.activation_fn = sae.get_activation_fn()  # TopKSAE builds its TopK(k) at construction
            info.update(featureatlas_architecture="topk", k=edit[1])
        elif edit[0] == "threshold_scale":
            with torch.no_grad():
                sae.threshold.mul_(edit[1])
            info["featureatlas_architecture"] = "jumprelu"
        elif edit[0] == "hook_name":
            sae.cfg.metadata.hook_name = edit[1]
            info.update(featureatlas_architecture=original["architecture"], hook_name=edit[1])
        sae.eval()
        rng = np.random.default_rng(3000 + len(manifest["cases"]))
        x = _stable_rows(sae.encode, _x(rng), N_ROWS, rng)
        _write(out, name, sae, _reference(sae, x), manifest, kind="resaved",
               saelens_architecture=sae.cfg.architecture(), **info)


def make_saelens_fixtures(exports: Path, out: Path) -> None:
    import tempfile
    from importlib.metadata import version

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest = {
        "generated_by": "scripts/make_saelens_fixtures.py",
        "sae_lens_version": version("sae-lens"),
        "torch_version": torch.__version__,
        "d_in": D_IN, "d_sae": D_SAE, "d_out_transcoder": D_OUT, "hook_name": HOOK, "model_name": MODEL,
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        _inference_cases(out, manifest)
        _training_cases(out, manifest, Path(tmp))
        _resaved_cases(out, manifest, exports)
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {len(manifest['cases'])} fixtures, {size / 1024:.0f} KiB, to {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="step", required=True)
    e = sub.add_parser("export", help="step 1 (project venv): write featureatlas exports into FOLDER")
    e.add_argument("folder", type=Path)
    s = sub.add_parser("saelens", help="step 2 (sae-lens venv): write the fixtures from FOLDER's exports")
    s.add_argument("folder", type=Path)
    s.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"fixture folder (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.step == "export":
        make_featureatlas_exports(args.folder)
    else:
        make_saelens_fixtures(args.folder, args.out)


if __name__ == "__main__":
    sys.exit(main())
