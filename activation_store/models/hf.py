"""Local Hugging Face checkpoint directories: config.json + *.safetensors + tokenizer.json.

Reads Llama-family (model_type llama / mistral / qwen2) and GPT-2 checkpoints as written by
`transformers` `save_pretrained`, and writes the same layout, so a model we load from a GGUF can
be saved once and then opened by us or by transformers. Tensor names are the HF ones without the
task-head wrapper prefix for GPT-2 (`wte.weight`, `h.0.attn.c_attn.weight`, ...) and with `model.`
for Llama (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .gguf_loader import CorruptModelError, ModelContents
from .tokenizer import BPETokenizer

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
GPT2_MODEL_TYPES = ("gpt2",)


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ValueError(f"config.json asks for RoPE scaling {scaling!r}, which this model core does not implement")
    return float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))


def config_from_hf(cfg: dict) -> ModelConfig:
    """ModelConfig from a HF config.json dict; CorruptModelError naming a required field it lacks."""
    try:
        return _config_from_hf(cfg)
    except KeyError as e:
        raise CorruptModelError(f"config.json has no {e.args[0]!r} field, which a {cfg.get('model_type')} model "
                                "needs; the file is damaged or was not written by transformers.") from e


def _config_from_hf(cfg: dict) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type in GPT2_MODEL_TYPES:
        d_model = cfg["n_embd"]
        return ModelConfig(
            arch="gpt2", n_layers=cfg["n_layer"], d_model=d_model, d_mlp=cfg.get("n_inner") or 4 * d_model,
            n_heads=cfg["n_head"], n_kv_heads=cfg["n_head"], head_dim=d_model // cfg["n_head"],
            vocab_size=cfg["vocab_size"], max_ctx=cfg.get("n_positions", 1024),
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5), tied_embeddings=True, qkv_bias=True,
            activation=cfg.get("activation_function", "gelu_new"),
            bos_id=cfg.get("bos_token_id"), eos_id=cfg.get("eos_token_id"), pad_id=cfg.get("pad_token_id"))
    if model_type not in LLAMA_MODEL_TYPES:
        raise ValueError(f"config.json model_type {model_type!r} is not supported; supported: "
                         f"{list(LLAMA_MODEL_TYPES + GPT2_MODEL_TYPES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported for llama-family models (silu only)")
    n_heads = cfg["num_attention_heads"]
    max_ctx = cfg.get("max_position_embeddings", 8192)
    window, eos = cfg.get("sliding_window"), cfg.get("eos_token_id")  # eos: an id or a list of ids
    if window and cfg.get("use_sliding_window", model_type == "mistral"):
        # Full attention equals sliding-window attention only on contexts that fit in the window.
        max_ctx = min(max_ctx, window)
    return ModelConfig(
        arch="llama", n_layers=cfg["num_hidden_layers"], d_model=cfg["hidden_size"],
        d_mlp=cfg["intermediate_size"], n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads, vocab_size=cfg["vocab_size"],
        max_ctx=max_ctx, rope_base=_rope_theta(cfg), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")), activation="silu",
        bos_id=cfg.get("bos_token_id"), eos_id=eos[0] if isinstance(eos, list) else eos, pad_id=cfg.get("pad_token_id"))


def config_to_hf(config: ModelConfig) -> dict:
    """HF config.json dict for a ModelConfig (the inverse of `config_from_hf`)."""
    ids = {"bos_token_id": config.bos_id, "eos_token_id": config.eos_id, "pad_token_id": config.pad_id}
    if config.arch == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": config.n_layers,
                "n_embd": config.d_model, "n_inner": config.d_mlp, "n_head": config.n_heads,
                "n_positions": config.max_ctx, "vocab_size": config.vocab_size,
                "layer_norm_epsilon": config.norm_eps, "activation_function": config.activation,
                "tie_word_embeddings": True, **ids}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": config.d_model,
            "intermediate_size": config.d_mlp, "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
            "head_dim": config.head_dim, "hidden_act": config.activation, "rope_theta": config.rope_base,
            "rms_norm_eps": config.norm_eps, "vocab_size": config.vocab_size,
            "tie_word_embeddings": config.tied_embeddings, "attention_bias": config.qkv_bias,
            "mlp_bias": False, "max_position_embeddings": config.max_ctx, "torch_dtype": "float32", **ids}


def _canonical_names(config: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop wrapper prefixes and non-weight buffers so names match the model core's HF naming."""
    if config.arch == "gpt2":
        # GPT-2's causal-mask buffers (attn.bias / attn.masked_bias) and its tied head are not weights.
        renamed = {name.removeprefix("transformer."): w for name, w in tensors.items()}
        return {name: w for name, w in renamed.items()
                if not name.endswith((".attn.bias", ".attn.masked_bias")) and name != "lm_head.weight"}
    return {name: w for name, w in tensors.items() if not name.endswith(".rotary_emb.inv_freq")
            and not (config.tied_embeddings and name == "lm_head.weight")}


def read_safetensors(files) -> dict[str, np.ndarray]:
    """All tensors of the given safetensors files as float32 numpy (bf16/fp16 upcast)."""
    from safetensors import safe_open

    tensors = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                tensors[name] = np.asarray(st.get_tensor(name), dtype=np.float32)
    return tensors


def _read_tokenizer(path: Path, config: ModelConfig) -> BPETokenizer:
    tok_file = path / "tokenizer.json"
    if not tok_file.exists():
        raise FileNotFoundError(f"{path} has no tokenizer.json; save the tokenizer there "
                                "(transformers: tokenizer.save_pretrained(path)).")
    tok_cfg_file = path / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_file.read_text()) if tok_cfg_file.exists() else {}
    return BPETokenizer.from_file(tok_file, bos_id=config.bos_id, eos_id=config.eos_id, pad_id=config.pad_id,
                                  chat_template=tok_cfg.get("chat_template"))


def read_hf_dir(path) -> ModelContents:
    """Parse a local HF checkpoint directory into (ModelConfig, HF-named float32 tensors, tokenizer)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} is not a HF checkpoint directory: it has no config.json")
    files = tuple(sorted(path.glob("*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (PyTorch .bin files are not read; "
                                "convert with transformers: model.save_pretrained(path, safe_serialization=True))")
    config = config_from_hf(json.loads(cfg_file.read_text()))
    try:
        tensors = _canonical_names(config, read_safetensors(files))
    except Exception as e:  # safetensors raises its own error types on damaged files
        raise ValueError(f"could not read weights in {path} ({type(e).__name__}: {e}); "
                         "the safetensors files may be truncated or corrupted") from e
    return ModelContents(config, tensors, _read_tokenizer(path, config), files)


def write_hf_dir(path, config: ModelConfig, tensors: dict[str, np.ndarray], tokenizer) -> None:
    """Write config.json, model.safetensors (float32, HF names) and tokenizer.json (+ chat template)."""
    from safetensors.numpy import save_file

    if not isinstance(tokenizer, BPETokenizer):
        raise TypeError(f"only BPE tokenizers can be saved as tokenizer.json, got {type(tokenizer).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()}
    save_file(arrays, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(path / "tokenizer.json")
    tok_cfg = {"bos_token": _tok(tokenizer, tokenizer.bos_id), "eos_token": _tok(tokenizer, tokenizer.eos_id),
               "pad_token": _tok(tokenizer, tokenizer.pad_id), "add_bos_token": False,
               "tokenizer_class": "PreTrainedTokenizerFast"}
    if tokenizer.chat_template:
        tok_cfg["chat_template"] = tokenizer.chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")


def _tok(tokenizer, token_id):
    return None if token_id is None else tokenizer.token_str(token_id)


def save_hf_dir(lm, path) -> None:
    """Save a LanguageModel as a local HF checkpoint directory (loadable by `load_hf_dir` and transformers)."""
    write_hf_dir(path, lm.config, lm.to_hf_tensors(), lm.tokenizer)


def load_hf_dir(path):
    """Load a local HF checkpoint directory as a LanguageModel (same as `registry.load_model(path)`)."""
    from .registry import load_model

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    return load_model(path)
