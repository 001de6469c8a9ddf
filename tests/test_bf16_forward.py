"""The bfloat16 model forward (`compute_dtype="bfloat16"`) against transformers' bfloat16 forward, against our
own float32 forward, and through a harvest into float16 and float32 stores.

Golden values: tests/golden/smollm2_bf16.json (scripts/make_bf16_golden.py: transformers LlamaForCausalLM,
bfloat16 parameters as from_pretrained makes them, eager attention, torch CPU; 3 texts of 17-37 tokens).
bfloat16 keeps 8 significand bits (relative rounding ~2e-3 per op), so two correct bfloat16 forwards agree
exactly only as long as their inputs do: one differently rounded element changes the rounding of
everything after it, and by a few layers the two runs are as far apart as either is from float32. What
the golden values allow to test, and the tolerances (measured on this machine, jax 0.10.2 CPU):
  * layer 0 (resid_post.0), before rounding differences can compound: ours vs transformers 1.4-1.7e-4
    relative (the golden's 4 significant digits alone are ~3e-5), against 4.7-5.2e-3 between bfloat16 and
    float32 there. Bound 1e-3: it holds only if every op rounds where torch's does (with XLA's excess
    precision on it was 4e-3, with RoPE's inv_freq rounded to bfloat16 1e-2).
  * deeper hooks (mlp_hidden.14, resid_post.14, resid_post.29): ours vs transformers 0.48-0.98 times
    transformers' own bfloat16-vs-float32 distance (`hf_float32_vs_bf16_rel`); bound 2x (two independent
    roundings of the same float32 values are ~1.4x apart).
  * logits: top-1 agreement 94-100% per position, last position's top 20 overlap 90-100% and within
    0.375 (3 bfloat16 steps at |logit| 16-32); bounds 90%, 85% and 0.75.
  * ours bfloat16 vs ours float32 (hooks over positions 1..): resid_post.0 4.7e-3, mlp_hidden.14 3.0-3.8e-2,
    resid_post.14 1.3-2.6e-2, resid_post.29 1.7-2.3e-2 relative, logits 1.9-2.4e-2, i.e. 0.9-1.1 times
    transformers' own bfloat16-vs-float32 distance; bound 1.5x and 6e-2.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featureatlas.activation_store.corpus import CorpusConfig
from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.harvest import HarvestConfig, harvest
from featureatlas.activation_store.models import add, random_model, transformer
from featureatlas.activation_store.store import ActivationStore, StoreMismatchError

GOLDEN = json.loads((Path(__file__).parent / "golden" / "smollm2_bf16.json").read_text())
F32_GOLDEN = json.loads((Path(__file__).parent / "golden" / "smollm2_logits.json").read_text())
HOOKS = tuple(GOLDEN["hooks"])


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def bf16_exact(a) -> bool:
    """Every value of a float32 array is a bfloat16 number (it was computed in bfloat16)."""
    a = np.asarray(a, np.float32)
    return bool(np.array_equal(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32), a))


@pytest.fixture(scope="module")
def smollm2_runs(smollm2):
    """Both dtypes over the three golden texts, right-padded into one batch (one compile per dtype):
    {dtype: (logits [3, T, V], {hook: [3, T, d]})}, float32 numpy."""
    texts = GOLDEN["texts"]
    T = max(len(t["ids"]) for t in texts)
    tokens = np.zeros((len(texts), T), np.int32)
    mask = np.zeros((len(texts), T), np.int32)
    for i, t in enumerate(texts):
        tokens[i, :len(t["ids"])], mask[i, :len(t["ids"])] = t["ids"], 1
    runs = {}
    for dtype in ("float32", "bfloat16"):
        logits, acts = smollm2.forward(smollm2.params_in(dtype), tokens, attention_mask_BxT=mask, capture=HOOKS,
                                       compute_dtype=dtype)
        assert logits.dtype == jnp.float32 and all(a.dtype == jnp.float32 for a in acts.values())
        runs[dtype] = (np.asarray(logits), {h: np.asarray(a) for h, a in acts.items()})
    return runs


# ---- SmolLM2-135M against transformers' bfloat16 forward -------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("k", range(len(GOLDEN["texts"])))
def test_bf16_hooks_match_transformers_bf16(smollm2_runs, k):
    g = GOLDEN["texts"][k]
    T = len(g["ids"])
    _, acts = smollm2_runs["bfloat16"]
    for hook in HOOKS:
        ref = g["hooks"][hook]
        ours = acts[hook][k, :T]
        assert bf16_exact(ours), f"{hook} was not computed in bfloat16"
        want_rows = np.array([ref["rows"][str(r)] for r in g["rows"]])
        err_rows = rel(ours[g["rows"]], want_rows)
        norms = np.array(ref["row_norms"])
        err_norms = float(np.max(np.abs(np.linalg.norm(ours, axis=-1) - norms) / norms))
        if hook == "resid_post.0":
            assert err_rows < 1e-3 and err_norms < 1e-3, (hook, err_rows, err_norms)
        else:
            bound = 2 * ref["hf_float32_vs_bf16_rel"]
            assert err_rows < bound and err_norms < bound, (hook, err_rows, err_norms, bound)


@pytest.mark.slow
@pytest.mark.parametrize("k", range(len(GOLDEN["texts"])))
def test_bf16_logits_match_transformers_bf16(smollm2_runs, k):
    g = GOLDEN["texts"][k]
    T = len(g["ids"])
    logits = smollm2_runs["bfloat16"][0][k, :T]
    top5 = np.asarray(g["top5_ids"])
    assert np.mean(logits.argmax(-1) == top5[:, 0]) >= 0.9
    last20 = np.argsort(-logits[-1], kind="stable")[:20]
    assert len(set(last20.tolist()) & set(g["last_top20_ids"])) >= 17
    assert np.abs(logits[-1, g["last_top20_ids"]] - g["last_top20_logits"]).max() <= 0.75
    m = logits.max(-1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(-1))
    assert np.abs(lse - g["logsumexp"]).max() <= 0.75


@pytest.mark.slow
@pytest.mark.parametrize("k", range(len(GOLDEN["texts"])))
def test_bf16_is_as_close_to_float32_as_transformers_own(smollm2_runs, k):
    g = GOLDEN["texts"][k]
    T = len(g["ids"])
    lg16, a16 = smollm2_runs["bfloat16"]
    lg32, a32 = smollm2_runs["float32"]
    for hook in HOOKS:
        err = rel(a16[hook][k, 1:T], a32[hook][k, 1:T])  # BOS rows carry the massive activations
        assert err < min(1.5 * g["hooks"][hook]["hf_float32_vs_bf16_rel"], 6e-2), (hook, err)
    assert rel(lg16[k, :T], lg32[k, :T]) < min(1.5 * g["logits_hf_float32_vs_bf16_rel"], 6e-2)
    assert np.mean(lg16[k, :T].argmax(-1) == lg32[k, :T].argmax(-1)) >= 0.9


@pytest.mark.slow
def test_float32_default_is_unchanged(smollm2, smollm2_runs):
    """compute_dtype defaults to float32, params_in("float32") is the params themselves, the float32 program
    has no bfloat16 in it, and the float32 logits still match transformers' float32 golden."""
    assert smollm2.params_in("float32") is smollm2.params
    golden = F32_GOLDEN["prompts"][1]
    ids = np.asarray([golden["ids"]], np.int32)
    default, _ = smollm2.forward(smollm2.params, ids)
    explicit, _ = smollm2.forward(smollm2.params, ids, compute_dtype="float32")
    assert np.array_equal(np.asarray(default), np.asarray(explicit))
    logits = np.asarray(default[0], np.float64)
    top = np.asarray(golden["top_ids"])
    np.testing.assert_allclose(np.take_along_axis(logits, top, -1), golden["top_logits"], atol=1e-3, rtol=0)


def test_float32_program_has_no_bfloat16():
    lm = random_model("llama", n_layers=2, d_model=64, seed=1)
    toks = np.ones((2, 8), np.int32)
    progs = {}
    for dtype in ("float32", "bfloat16"):
        f = lambda p, t, m, dt=dtype: transformer.forward(  # noqa: E731
            lm.config, transformer.Sites(("resid_post.1",), ()), 2, True, p, t, m, [], compute_dtype=dt)
        progs[dtype] = str(jax.make_jaxpr(f)(lm.params, toks, toks))
    assert "bf16" not in progs["float32"]
    assert "bf16" in progs["bfloat16"]
    assert transformer.JIT_OPTIONS["float32"] == {}  # float32 compiles exactly as before the dtype existed
    assert transformer.JIT_OPTIONS["bfloat16"]["compiler_options"] == {"xla_allow_excess_precision": False}


# ---- the code path on small random models ---------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_forward_on_random_models(arch):
    lm = random_model(arch, n_layers=2, d_model=64, seed=3)
    rng = np.random.default_rng(0)
    toks = rng.integers(3, lm.config.vocab_size, size=(2, 12))
    mask = np.ones_like(toks)
    mask[1, :3] = 0  # left padding still computes the unpadded row
    hooks = lm.config.hook_names()
    lg32, a32 = lm.forward(lm.params, toks, attention_mask_BxT=mask, capture=hooks)
    lg16, a16 = lm.forward(lm.params, toks, attention_mask_BxT=mask, capture=hooks, compute_dtype=jnp.bfloat16)
    assert lg16.dtype == jnp.float32
    for h in hooks:
        assert a16[h].dtype == jnp.float32 and bf16_exact(a16[h]), h
        # measured: at most 1.85e-2 (llama, mlp_hidden.1) and 1.1e-2 (gpt2); random weights round worse
        # than trained ones (SmolLM2's layer 0: 4.7e-3)
        assert rel(a16[h][mask == 1], np.asarray(a32[h])[mask == 1]) < 4e-2, h
    # float32 params cast inside the call or cast once by params_in: the same numbers
    lg16b, _ = lm.forward(lm.params_in("bfloat16"), toks, attention_mask_BxT=mask, compute_dtype="bfloat16")
    assert np.array_equal(np.asarray(lg16), np.asarray(lg16b))
    assert lm.params_in("bfloat16") is lm.params_in("bfloat16")  # cached


def test_bf16_edits_keep_the_stream_bfloat16():
    lm = random_model("llama", n_layers=2, d_model=64, seed=4)
    toks = np.arange(3, 13)[None]
    v = np.random.default_rng(1).normal(size=64).astype(np.float32)
    _, plain = lm.forward(lm.params, toks, capture=("resid_pre.1", "resid_post.1"), compute_dtype="bfloat16")
    _, edited = lm.forward(lm.params, toks, capture=("resid_pre.1", "resid_post.1"), compute_dtype="bfloat16",
                           edits=[add("resid_pre.1", v, 3.0, positions=[2])])
    for h in ("resid_pre.1", "resid_post.1"):
        assert bf16_exact(edited[h])
    want = np.asarray(jnp.asarray(np.asarray(plain["resid_pre.1"])[0, 2] + 3.0 * v, jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(np.asarray(edited["resid_pre.1"])[0, 2], want)


def test_unknown_compute_dtype_is_a_config_error():
    lm = random_model("llama", n_layers=1, d_model=32, seed=0)
    with pytest.raises(ConfigError, match="compute_dtype must be one of float32, bfloat16, got 'float16'"):
        lm.forward(lm.params, np.ones((1, 4), np.int32), compute_dtype="float16")
    with pytest.raises(ConfigError, match="--compute-dtype 'bf16' is not one of float32, bfloat16"):
        HarvestConfig(compute_dtype="bf16").validate()
    choices = HarvestConfig.__dataclass_fields__["compute_dtype"].metadata["choices"]
    assert choices == transformer.COMPUTE_DTYPES  # harvest keeps its own copy (it imports no jax)


# ---- harvesting with --compute-dtype bfloat16 ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, corpus path): the tiny model and byte-level corpus shape of tests/test_harvest.py."""
    from harvest_kill_helper import tiny_model

    rng = np.random.default_rng(0)
    words = "the a model store reads writes every token of text and keeps its label on disk".split()
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as fh:
        for i in range(10):
            fh.write(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(3, 40))))}) + "\n")
    return tiny_model(), path


def _config(corpus_path, **kw) -> HarvestConfig:
    corpus = CorpusConfig(source=str(corpus_path), context_length=32, min_tokens=4, seed=0)
    return HarvestConfig(**{"model": "tiny", "hooks": ("resid_post.0", "mlp_hidden.1"), "corpus": corpus,
                            "batch_size": 4, "commit_contexts": 8, **kw})


def test_bf16_harvest_into_float16_and_float32_stores(tmp_path, tiny):
    lm, corpus_path = tiny
    ref = harvest(_config(corpus_path, dtype="float32"), tmp_path / "ref.h5", lm=lm, progress=False).store
    s32 = harvest(_config(corpus_path, dtype="float32", compute_dtype="bfloat16"), tmp_path / "b32.h5", lm=lm,
                  progress=False).store
    s16 = harvest(_config(corpus_path, dtype="float16", compute_dtype="bfloat16"), tmp_path / "b16.h5", lm=lm,
                  progress=False).store
    assert s32.n_contexts == ref.n_contexts == s16.n_contexts and s32.complete and s16.complete
    assert s32.harvest_config["compute_dtype"] == "bfloat16" and ref.harvest_config["compute_dtype"] == "float32"
    rows = ref.token_rows("all", exclude_bos=False)
    for hook in ("resid_post.0", "mlp_hidden.1"):
        for store, dtype in ((s32, np.float32), (s16, np.float16)):
            with h5py.File(store.path, "r", locking=False) as f:  # the layout: /acts/<hook> [n_ctx·T, d]
                assert f["acts"][hook].dtype == dtype
            assert store.attrs["dtype"] == np.dtype(dtype).name
        want = ref.read_rows(hook, rows)
        got32, got16 = s32.read_rows(hook, rows), s16.read_rows(hook, rows)
        assert bf16_exact(got32), "the float32 store should hold the bfloat16 forward's values"
        np.testing.assert_array_equal(got16, got32.astype(np.float16).astype(np.float32))
        # measured 1.1e-2 (resid_post.0) and 1.95e-2 (mlp_hidden.1) for both stores; float32 rows rounded
        # once to bfloat16 are 1.7e-3 away, the rest is the rounding of every op before
        assert rel(got32, want) < 4e-2, hook
        assert rel(got16, want) < 4e-2, hook
    # a resume must repeat the compute dtype
    with pytest.raises(StoreMismatchError, match="compute_dtype: store has 'bfloat16', this run asks for 'float32'"):
        harvest(_config(corpus_path, dtype="float32"), tmp_path / "b32.h5", lm=lm, progress=False)
    assert ActivationStore.open(tmp_path / "b32.h5").harvest_config["compute_dtype"] == "bfloat16"


def test_cli_compute_dtype_flag():
    from featureatlas.scripts.cli import build_parser
    from featureatlas.scripts.cmd_harvest import config_from_args

    base = ["harvest", "--corpus", "data.jsonl", "--out", "x.h5"]
    assert config_from_args(build_parser().parse_args(base)).compute_dtype == "float32"
    cfg = config_from_args(build_parser().parse_args(base + ["--compute-dtype", "bfloat16"]))
    assert cfg.compute_dtype == "bfloat16"
