import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from featureatlas.activation_store.corpus import CorpusConfig, CorpusError, build_corpus
from featureatlas.activation_store.harvest import Float16OverflowError, HarvestConfig, HarvestError, harvest
from featureatlas.activation_store.store import ActivationStore, StoreCorruptedError, StoreMismatchError
from harvest_kill_helper import HOOKS, tiny_config, tiny_model
from featureatlas.scripts.cli import main as cli

HELPER = Path(__file__).with_name("harvest_kill_helper.py")
ROOT = HELPER.parent.parent


@pytest.fixture(scope="module")
def lm():
    return tiny_model()


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
    """~40 contexts of 32 byte-tokens from documents of varied length (so some contexts are padded)."""
    rng = np.random.default_rng(0)
    words = "the a model store reads writes every token of text and keeps its label on disk".split()
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as fh:
        for i in range(14):
            text = " ".join(rng.choice(words, size=int(rng.integers(3, 40))))
            fh.write(json.dumps({"text": text, "label": ["odd", "even"][i % 2]}) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, lm, corpus_path):
    """An uninterrupted harvest and its sha256."""
    out = tmp_path_factory.mktemp("ref") / "store.h5"
    harvest(tiny_config(corpus_path), out, lm=lm, progress=False)
    return out, _sha(out)


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_harvest_equals_the_models_forward_row_for_row(tmp_path, lm, corpus_path):
    cfg = tiny_config(corpus_path, dtype="float32")
    store = harvest(cfg, tmp_path / "s.h5", lm=lm, progress=False).store
    corpus = build_corpus(cfg.corpus, lm.tokenizer, max_ctx=lm.config.max_ctx)
    assert store.n_contexts == corpus.n_contexts and store.complete
    assert (store.n_valid < 32).any(), "the corpus should exercise padding"
    assert np.array_equal(store.tokens, corpus.tokens_NxT) and store.fingerprint == corpus.fingerprint
    assert store.label_names == ("even", "odd")
    assert np.array_equal(store.labels, np.where(store.doc_ids % 2, 0, 1))
    assert store.attrs["model_id"] == lm.model_id and store.attrs["weights_hash"] == lm.weights_hash
    T = store.context_length
    # One independent forward over every context at once (a different batch than the harvest's).
    mask = np.arange(T)[None] < store.n_valid[:, None]
    _, caps = lm.forward(lm.params, store.tokens, attention_mask_BxT=mask, capture=HOOKS)
    for hook in HOOKS:
        got = store.read_rows(hook, np.arange(store.n_contexts * T)).reshape(store.n_contexts, T, -1)
        np.testing.assert_allclose(got[mask], np.asarray(caps[hook])[mask], rtol=1e-5, atol=1e-5)
        assert not got[~mask].any()  # padding rows are zero
    # and a padded context equals its unpadded sequence run alone
    c = int(np.argmin(store.n_valid))
    n = int(store.n_valid[c])
    _, alone = lm.forward(lm.params, store.tokens[c:c + 1, :n], capture=HOOKS)
    for hook in HOOKS:
        np.testing.assert_allclose(store.read_rows(hook, np.arange(c * T, c * T + n)), np.asarray(alone[hook])[0],
                                   rtol=1e-5, atol=1e-5)
    assert store.verify() == []


def test_float16_store_holds_the_rounded_float32_values(tmp_path, lm, corpus_path):
    s32 = harvest(tiny_config(corpus_path, dtype="float32"), tmp_path / "a.h5", lm=lm, progress=False).store
    s16 = harvest(tiny_config(corpus_path), tmp_path / "b.h5", lm=lm, progress=False).store
    rows = np.arange(s32.n_contexts * s32.context_length)
    for hook in HOOKS:
        assert np.array_equal(s16.read_rows(hook, rows),
                              s32.read_rows(hook, rows).astype(np.float16).astype(np.float32))


def test_rerun_of_a_complete_store_changes_nothing(tmp_path, lm, corpus_path, reference):
    out, sha = reference
    result = harvest(tiny_config(corpus_path), out, lm=lm, progress=False)
    assert result.new_contexts == 0 and result.store.complete and _sha(out) == sha


KILL_POINTS = [("created", -1), ("committed", 0), ("hook_written", 1), ("rows_flushed", 2), ("rows_flushed", 4),
               ("after", 0.002), ("after", 0.02)]


@pytest.mark.parametrize("phase,arg", KILL_POINTS, ids=[f"{p}-{a}" for p, a in KILL_POINTS])
def test_sigkill_then_resume_gives_a_bit_identical_store(tmp_path, lm, corpus_path, reference, phase, arg):
    out = tmp_path / "store.h5"
    proc = subprocess.run([sys.executable, str(HELPER), str(corpus_path), str(out), phase, str(arg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if phase != "after":
        assert proc.returncode == -9, proc.stderr  # really killed
    if phase in ("rows_flushed", "hook_written", "committed"):
        # a killed store is a valid, shorter store
        partial = ActivationStore.open(out)
        committed = arg + 1 if phase == "committed" else arg
        assert partial.n_contexts == committed * 8
        assert partial.verify() == []
    result = harvest(tiny_config(corpus_path), out, lm=lm, progress=False)
    assert result.store.complete
    assert _sha(out) == reference[1]


def test_float16_overflow_is_refused_before_writing(tmp_path, lm, corpus_path):
    big = tiny_model()
    big.params = jax.tree.map(lambda a: a, big.params)
    big.params["embed"] = big.params["embed"] * 1e7  # resid_pre.0 = embeddings, far beyond 65504
    cfg = tiny_config(corpus_path, hooks=("resid_pre.0",))
    out = tmp_path / "s.h5"
    with pytest.raises(Float16OverflowError, match=r"resid_pre\.0: row \d+ .*float16 max 65504.*--dtype float32"):
        harvest(cfg, out, lm=big, progress=False)
    s = ActivationStore.open(out)
    assert s.n_contexts == 0 and s.verify() == []  # nothing bad became visible
    s32 = harvest(tiny_config(corpus_path, hooks=("resid_pre.0",), dtype="float32"), out, lm=big,
                  overwrite=True, progress=False).store
    assert s32.complete and np.abs(s32.read_rows("resid_pre.0", s32.token_rows())).max() > 65504


def test_bad_inputs_raise_clear_errors_and_leave_the_store_intact(tmp_path, lm, corpus_path, reference, capsys):
    out = tmp_path / "store.h5"
    out.write_bytes(reference[0].read_bytes())
    sha = _sha(out)
    base = tiny_config(corpus_path)
    cases = [
        (dict(hooks=("resid_post.7",)), lm, ValueError, r"unknown hook 'resid_post.7'.*valid hooks: resid_pre\.0-1"),
        (dict(hooks=("resid_post.0", "resid_post.0")), lm, HarvestError, "hooks listed twice"),
        (dict(corpus=CorpusConfig(source=str(tmp_path / "empty"), context_length=32)), lm, CorpusError, "no .txt files"),
        (dict(corpus=CorpusConfig(source=str(corpus_path), context_length=128)), lm, CorpusError,
         "exceeds the model's maximum context 64"),
        (dict(commit_contexts=6), lm, HarvestError, "must be a multiple of batch_size"),
        (dict(hooks=("resid_post.0",)), lm, StoreMismatchError, r"hooks: store has \['resid_post.0', 'mlp_hidden.1'\]"),
        (dict(dtype="float32"), lm, StoreMismatchError, "dtype: store has 'float16', this run asks for 'float32'"),
        (dict(corpus=CorpusConfig(source=str(corpus_path), context_length=16, min_tokens=4)), lm,
         StoreMismatchError, "context_length: store has 32, this run asks for 16"),
        ({}, tiny_model_seed(1), StoreMismatchError, "weights_hash: store has"),
        ({}, tiny_model_layers(3), StoreMismatchError, "model_id: store has 'random-llama-2x32-s0'"),
    ]
    (tmp_path / "empty").mkdir()
    for overrides, model, error, pattern in cases:
        cfg = HarvestConfig(**{**base.__dict__, **overrides})
        with pytest.raises(error, match=pattern):
            harvest(cfg, out, lm=model, progress=False)
        assert _sha(out) == sha, overrides
    code = cli(["harvest", "--model", "no-such-model", "--hooks", "resid_post.0", "--out", str(out), "--no-progress"])
    assert code == 2 and "unknown model 'no-such-model'" in capsys.readouterr().err
    assert _sha(out) == sha


def tiny_model_seed(seed):
    from featureatlas.activation_store.models import random_model

    return random_model("llama", n_layers=2, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, max_ctx=64, seed=seed)


def tiny_model_layers(n_layers):
    from featureatlas.activation_store.models import random_model

    return random_model("llama", n_layers=n_layers, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, max_ctx=64)


def test_a_corrupted_store_is_not_resumed(tmp_path, lm, corpus_path, reference):
    out = tmp_path / "store.h5"
    out.write_bytes(reference[0].read_bytes()[:5000])
    with pytest.raises(StoreCorruptedError, match="truncated or corrupted.*--overwrite"):
        harvest(tiny_config(corpus_path), out, lm=lm, progress=False)
    harvest(tiny_config(corpus_path), out, lm=lm, overwrite=True, progress=False)
    assert _sha(out) == reference[1]


@pytest.mark.slow
def test_smollm2_bbc_harvest_equals_direct_forward(tmp_path, smollm2):
    hooks = ("resid_post.3", "mlp_hidden.3")
    cfg = HarvestConfig(model="smollm2-135m", hooks=hooks, corpus=CorpusConfig(source="bbc", max_contexts=6),
                        dtype="float32", batch_size=2, commit_contexts=4)
    store = harvest(cfg, tmp_path / "s.h5", lm=smollm2, progress=False).store
    assert store.n_contexts == 6 and store.context_length == 128
    assert set(store.labels.tolist()) <= set(range(5)) and store.label_names[0] == "business"
    assert (store.tokens[:, 0] == smollm2.tokenizer.bos_id).all()
    _, caps = smollm2.forward(smollm2.params, store.tokens, attention_mask_BxT=(
        np.arange(128)[None] < store.n_valid[:, None]), capture=hooks)
    for hook in hooks:
        got = store.read_rows(hook, store.token_rows("all", exclude_bos=False))
        want = np.asarray(caps[hook]).reshape(-1, got.shape[1])[store.token_rows("all", exclude_bos=False)]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_cli_flags_map_onto_the_harvest_config():
    from featureatlas.scripts.cli import build_parser
    from featureatlas.scripts.cmd_harvest import config_from_args

    args = build_parser().parse_args([
        "harvest", "--model", "smollm2-135m", "--corpus", "data.jsonl", "--hooks", "resid_post.15", "mlp_hidden.15",
        "--max-tokens", "100000", "--out", "runs/x/store.h5", "--dtype", "float32", "--context-length", "64",
        "--batch-size", "8", "--commit-contexts", "32", "--text-field", "body", "--no-shuffle-documents",
        "--val-fraction", "0.1"])
    cfg = config_from_args(args)
    assert cfg.hooks == ("resid_post.15", "mlp_hidden.15") and cfg.dtype == "float32"
    assert (cfg.batch_size, cfg.commit_contexts, cfg.val_fraction) == (8, 32, 0.1)
    assert cfg.corpus == CorpusConfig(source="data.jsonl", context_length=64, max_tokens=100000,
                                      shuffle_documents=False, text_field="body")
    assert HarvestConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
