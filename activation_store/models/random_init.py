"""Tiny random-weight models for tests and benchmarks (no files, no downloads).

Weights are drawn in Hugging Face naming and go through `LanguageModel.from_hf_tensors`, the
same path the real loaders use. Scales keep activations O(1) and logits spread out (so greedy
decoding is not a coin toss between near-ties) without letting each token's own embedding
dominate the tied unembedding (which makes every model repeat its last token): matrices ~
N(0, 1/fan_in), embeddings ~ N(0, 1/d_model), norm gains 1 + N(0, 0.1²), biases ~ N(0, 0.1²).
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .lm import LanguageModel, params_hash
from .tokenizer import ByteTokenizer
from .transformer import ARCHS


def random_hf_tensors(config: ModelConfig, seed: int = 0) -> dict:
    """Random HF-named fp32 tensors for `config` (deterministic in seed)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, role) in ARCHS[config.arch].hf_spec(config).items():
        z = rng.standard_normal(shape, dtype=np.float32)
        if role == "embed":
            out[name] = z / np.float32(np.sqrt(config.d_model))
        elif role == "norm":
            out[name] = 1.0 + 0.1 * z
        elif role == "bias":
            out[name] = 0.1 * z
        else:
            out[name] = z / np.float32(np.sqrt(role))
    return out


def random_model(arch: str, *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
                 d_mlp: int = 128, vocab_size: int = 300, max_ctx: int = 256, seed: int = 0,
                 **config_overrides) -> LanguageModel:
    """A random-weight LanguageModel with a ByteTokenizer(vocab_size); model_id 'random-{arch}-{L}x{D}-s{seed}'.
    GPT-2 is multi-head, so n_kv_heads is set to n_heads there."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; supported: {sorted(ARCHS)}")
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    tok = ByteTokenizer(vocab_size)
    config = ModelConfig(**(dict(
        arch=arch, n_layers=n_layers, d_model=d_model, d_mlp=d_mlp, n_heads=n_heads,
        n_kv_heads=n_heads if arch == "gpt2" else n_kv_heads, head_dim=d_model // n_heads,
        vocab_size=vocab_size, max_ctx=max_ctx, activation="gelu_new" if arch == "gpt2" else "silu",
        bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id) | config_overrides))
    tensors = random_hf_tensors(config, seed)
    return LanguageModel.from_hf_tensors(config, tensors, tok, model_id=f"random-{arch}-{n_layers}x{d_model}-s{seed}",
                                         weights_hash=params_hash(tensors))
