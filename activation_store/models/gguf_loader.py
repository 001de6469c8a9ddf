"""Read a llama-family GGUF (llama.cpp's file format) into Hugging Face-named float32 tensors.

GGUF stores metadata as typed key/values (`{arch}.block_count`, `tokenizer.ggml.tokens`, ...)
and each tensor in a (possibly block-quantized) ggml type. We dequantize with `gguf.quants`,
rename the tensors to the HF layout the model core consumes, and rebuild the BPE tokenizer from
the metadata.

llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel) permutes the rows of the Q and K
projections of "llama" models so that RoPE rotates adjacent pairs (x[2i], x[2i+1]); HF rotates
the two halves of each head (x[i], x[i + head_dim/2]). Per head the converter maps rows as
    gguf[h, 2i + j] = hf[h, j * head_dim/2 + i]   (j in {0, 1}, i < head_dim/2),
i.e. W.reshape(H, 2, hd/2, in).swapaxes(1, 2); `unpermute_rope_rows` applies the inverse.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from featureatlas.activation_store.errors import FeatureAtlasError

from .config import ModelConfig
from .tokenizer import BPETokenizer


class CorruptModelError(FeatureAtlasError, ValueError):
    """A weights file that cannot be parsed (truncated download, wrong format, a required field missing)."""


# GGUF architectures we map onto ModelConfig(arch="llama"). Only "llama" has permuted Q/K rows:
# llama.cpp runs Qwen2 with NeoX-style (half-split) RoPE, as HF does, so its converter leaves them.
SUPPORTED_ARCHS = ("llama", "qwen2")
_PERMUTED_ARCHS = ("llama",)

# GGUF tensor name (within block N) -> HF name suffix within `model.layers.N.`.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class ModelContents:
    """What a loader read (GGUF here, a HF directory in hf.py), before it becomes a LanguageModel."""

    config: ModelConfig
    tensors: dict[str, np.ndarray]  # HF names, float32
    tokenizer: BPETokenizer
    files: tuple = ()  # HF directories: the safetensors files the tensors came from (their hashes name the weights)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (see module docstring). w: [n_heads*head_dim, ...]."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


REQUIRED = object()  # `_field`'s default for metadata a model cannot be built without


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None and default is REQUIRED:
        raise CorruptModelError(f"GGUF has no {key!r} metadata field, which the model needs; the file is "
                                "damaged or was not written by llama.cpp's converter.")
    return default if field is None else field.contents()


def _int_field(reader, key: str) -> int | None:
    value = _field(reader, key)
    return None if value is None else int(value)


def _short_float(x: float) -> float:
    # GGUF stores float32; the shortest decimal of the float32 (1e-05, not 9.99999974e-06) is what the
    # model card states and what config.json round trips.
    return float(str(np.float32(x)))


def _open_reader(path: str):
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises assorted errors on bad input; all mean the same to a user
        raise CorruptModelError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}). It may be truncated "
                                "or corrupted: re-download it or reinstall the package that ships it.") from e
    size = os.path.getsize(path)
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size or any(t.data.nbytes != int(t.n_bytes) for t in reader.tensors):
        raise CorruptModelError(f"{path} is truncated: its tensors need {end} bytes but the file has {size}. "
                                "Re-download it or reinstall the package that ships it.")
    return reader


def read_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {list(SUPPORTED_ARCHS)} "
                         "(Llama-family decoders: Llama, SmolLM, Mistral, Qwen2).")
    names = {t.name for t in reader.tensors}
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in names:
        raise ValueError(
            f"GGUF uses RoPE scaling ({scaling!r} / rope_freqs), which this model core does not implement.")
    n_heads = int(_field(reader, f"{arch}.attention.head_count", REQUIRED))
    d_model = int(_field(reader, f"{arch}.embedding_length", REQUIRED))
    return ModelConfig(
        arch="llama", n_layers=int(_field(reader, f"{arch}.block_count", REQUIRED)), d_model=d_model,
        d_mlp=int(_field(reader, f"{arch}.feed_forward_length", REQUIRED)), n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", d_model // n_heads)),
        vocab_size=int(_field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", REQUIRED))),
        max_ctx=int(_field(reader, f"{arch}.context_length", 8192)),
        rope_base=_short_float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=_short_float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", REQUIRED)),
        tied_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names, activation="silu",
        bos_id=_int_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_int_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_id=_int_field(reader, "tokenizer.ggml.padding_token_id"))


def read_tokenizer(reader, config: ModelConfig) -> BPETokenizer:
    """The GGUF's byte-level BPE tokenizer, with the special ids `read_config` read into config."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, tokenizer.ggml.model"
            " = 'gpt2'); SentencePiece GGUFs ('llama') need a HF directory with tokenizer.json instead.")
    return BPETokenizer.from_gguf_fields(
        tokens=_field(reader, "tokenizer.ggml.tokens", REQUIRED), pre=_field(reader, "tokenizer.ggml.pre"),
        merges=_field(reader, "tokenizer.ggml.merges", REQUIRED),
        token_types=_field(reader, "tokenizer.ggml.token_type"), bos_id=config.bos_id, eos_id=config.eos_id,
        pad_id=config.pad_id, chat_template=_field(reader, "tokenizer.chat_template"))


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF name, e.g. blk.3.ffn_up.weight -> model.layers.3.mlp.up_proj.weight."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    elif stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a llama-family model")


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in HF (numpy, row-major [out, in]) layout.

    ggml lists dims fastest-first ([in, out]); the reader's raw array is already [out, bytes-per-row],
    so dequantizing gives [out, in] with no transpose.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        out = np.asarray(tensor.data, dtype=np.float32)
    else:
        out = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    return out.reshape(shape)


def read_gguf(path) -> ModelContents:
    """Parse a GGUF into (ModelConfig, HF-named float32 tensors, tokenizer). Missing or misshapen tensors
    are refused where the tensors are used, by `LanguageModel.from_hf_tensors` (CorruptModelError)."""
    path = os.fspath(path)
    reader = _open_reader(path)
    config = read_config(reader)
    arch = _field(reader, "general.architecture")
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        w = dequantize_tensor(t)
        if arch in _PERMUTED_ARCHS and (".q_proj." in name or ".k_proj." in name):
            w = unpermute_rope_rows(w, config.n_heads if ".q_proj." in name else config.n_kv_heads)
        tensors[name] = w
    return ModelContents(config, tensors, read_tokenizer(reader, config))
