import hashlib
import os
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


# ---------------------------------------------------------------------------------------------
# The command line with bad inputs: non-zero exit, one line naming the problem and the fix, no
# traceback, and the files on disk unchanged (checksums before and after).


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from harvest_kill_helper import tiny_hf_dir

    return tiny_hf_dir(tmp_path_factory.mktemp("model") / "tiny-llama")


def _argv(hf_model, corpus_path, out, *extra):
    return ["harvest", "--model", str(hf_model), "--corpus", str(corpus_path), "--hooks", *HOOKS,
            "--context-length", "32", "--min-tokens", "4", "--batch-size", "4", "--commit-contexts", "8",
            "--max-tokens", "100000", "--out", str(out), "--no-progress", *extra]


def _cli_subprocess(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "featureatlas.scripts.cli", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def _tree(path):
    """{relative path: sha256} of every file below `path` (directories as None)."""
    path = Path(path)
    return {str(p.relative_to(path)): (_sha(p) if p.is_file() else None) for p in sorted(path.rglob("*"))}


def _one_line_error(err: str, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def cli_store(tmp_path, hf_model, corpus_path, capsys):
    """A complete store written by the CLI, and the tree of its folder."""
    out = tmp_path / "runs" / "store.h5"
    assert cli(_argv(hf_model, corpus_path, out)) == 0
    capsys.readouterr()
    return out


def test_cli_full_disk_stops_before_writing_with_the_space_needed(tmp_path, hf_model, corpus_path, cli_store, capsys,
                                                                  monkeypatch):
    import h5py

    from featureatlas.activation_store import store_writer

    # (1) a fresh harvest: refused before anything is created
    monkeypatch.setattr(store_writer, "free_bytes", lambda path: 1 << 20)
    fresh = tmp_path / "new" / "store.h5"
    assert cli(_argv(hf_model, corpus_path, fresh)) == 2
    _one_line_error(capsys.readouterr().err, "not enough disk space", "MB free", "free some space")
    assert not (tmp_path / "new").exists()
    # (2) a resumed harvest whose disk fills up after the start: the commit is refused, nothing written
    with h5py.File(cli_store, "r+") as f:
        f["n_committed"][()] = 8
    before = _tree(cli_store.parent)
    calls = iter([1 << 40])
    monkeypatch.setattr(store_writer, "free_bytes", lambda path: next(calls, 0))
    assert cli(_argv(hf_model, corpus_path, cli_store)) == 2
    line = _one_line_error(capsys.readouterr().err, "committing contexts [8, 16) needs", "resumes")
    assert "the whole remaining store needs" in line
    assert _tree(cli_store.parent) == before


def test_cli_refuses_utf16_and_latin1_text_naming_the_file(tmp_path, hf_model):
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("The cat sat on the mat, a long enough document.".encode("utf-16"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 au lait, twenty words of text\nand a second line with \xa3 in it".encode("latin-1"))
    before = _tree(tmp_path)
    for corpus, needles in ((utf16, ["is UTF-16 text", "byte-order mark", "iconv -f UTF-16 -t UTF-8"]),
                            (latin1, ["is not valid UTF-8 at line 1: byte 0xE9 at byte offset 3", "convert it"])):
        proc = _cli_subprocess(*_argv(hf_model, corpus, tmp_path / "out" / "s.h5"))
        assert proc.returncode == 2
        _one_line_error(proc.stderr, str(corpus), *needles)
    assert _tree(tmp_path) == before  # no output folder, nothing changed


def test_cli_overwrite_while_another_harvest_writes_is_refused(tmp_path, hf_model, corpus_path, cli_store, capsys):
    from featureatlas.activation_store.store import StoreBusyError, store_lock

    before = _tree(cli_store.parent)
    with store_lock(cli_store):  # what a running harvest holds
        proc = _cli_subprocess(*_argv(hf_model, corpus_path, cli_store, "--overwrite"))
    assert proc.returncode == 2
    _one_line_error(proc.stderr, "is being written by another harvest", "wait for it to finish")
    assert _tree(cli_store.parent) == before
    # and a running harvest does hold it
    seen = []

    def on_phase(name, index):
        if name == "committed" and index == 0:
            with pytest.raises(StoreBusyError):
                with store_lock(tmp_path / "s.h5"):
                    pass
            seen.append(index)

    harvest(tiny_config(corpus_path), tmp_path / "s.h5", lm=tiny_model(), progress=False, on_phase=on_phase)
    assert seen == [0] and not (tmp_path / "s.h5.lock").exists()


def test_cli_ctrl_c_says_the_store_is_safe_and_resumes_to_the_same_bytes(tmp_path, hf_model, corpus_path, cli_store,
                                                                          capsys, monkeypatch):
    from featureatlas.activation_store.store import ActivationStore, StoreWriter

    commit = StoreWriter.commit

    def interrupted_after_one(self, c0, c1, acts):
        if c0 > 0:
            raise KeyboardInterrupt  # Ctrl-C arrives while the second chunk is being committed
        commit(self, c0, c1, acts)

    out = tmp_path / "s.h5"
    monkeypatch.setattr(StoreWriter, "commit", interrupted_after_one)
    assert cli(_argv(hf_model, corpus_path, out)) == 130
    _one_line_error(capsys.readouterr().err, "interrupted", f"{out} is safe with 8 of", "run the same command again")
    partial = ActivationStore.open(out)
    assert partial.n_contexts == 8 and partial.verify() == []
    monkeypatch.setattr(StoreWriter, "commit", commit)
    assert cli(_argv(hf_model, corpus_path, out)) == 0
    assert _sha(out) == _sha(cli_store)


@pytest.mark.parametrize("case", ["directory", "parent-is-a-file", "unwritable"])
def test_cli_invalid_out_paths_get_their_own_message(tmp_path, hf_model, corpus_path, case):
    if case == "unwritable" and os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    if case == "directory":
        (tmp_path / "dir").mkdir()
        out, needles = tmp_path / "dir", ["is a directory; give a file path such as", "store.h5"]
    elif case == "parent-is-a-file":
        (tmp_path / "file.txt").write_text("x")
        out, needles = tmp_path / "file.txt" / "store.h5", ["is not a directory"]
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out, needles = tmp_path / "ro" / "store.h5", ["no permission to write in"]
    before = _tree(tmp_path)
    proc = _cli_subprocess(*_argv(hf_model, corpus_path, out))
    assert proc.returncode == 2
    _one_line_error(proc.stderr, str(out), *needles)
    assert _tree(tmp_path) == before


def test_cli_a_directory_or_a_foreign_hdf5_file_is_not_called_corrupted(tmp_path, hf_model, corpus_path, capsys):
    import h5py

    (tmp_path / "d").mkdir()
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["weights"] = np.zeros(3)
    before = _tree(tmp_path)
    cases = [(["store", "info", str(tmp_path / "d")], ["is a directory, not an activation store file"]),
             (["store", "info", str(other)], ["is an HDF5 file but not a featureatlas store (no /tokens", "/weights"]),
             (_argv(hf_model, corpus_path, other), ["is an HDF5 file but not a featureatlas store",
                                                    "choose another --out"])]
    for argv, needles in cases:
        assert cli(argv) == 2
        line = _one_line_error(capsys.readouterr().err, *needles)
        assert "corrupted" not in line and "delete it" not in line
    assert _tree(tmp_path) == before


def test_cli_checks_arguments_before_loading_the_model(tmp_path, hf_model, corpus_path, capsys, monkeypatch):
    import featureatlas.activation_store.models as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    out = tmp_path / "new" / "s.h5"
    cases = [(["--hooks", "resid_post.5"], ["unknown hook 'resid_post.5'", "valid hooks: resid_pre.0-1"]),
             (["--context-length", "128"], ["context_length 128 exceeds the model's maximum context 64",
                                            "--context-length 64"]),
             (["--max-tokens", "0"], ["--max-tokens must be > 0"]),
             (["--batch-size", "0"], ["--batch-size must be > 0"]),
             (["--commit-contexts", "6"], ["must be a multiple of batch_size"]),
             (["--val-fraction", "1"], ["--val-fraction must be < 1"])]
    for extra, needles in cases:
        assert cli(_argv(hf_model, corpus_path, out) + extra) == 2, extra
        _one_line_error(capsys.readouterr().err, *needles)
    assert list(tmp_path.iterdir()) == []


def test_cli_jsonl_errors_name_file_and_line_and_leave_no_output_folder(tmp_path, hf_model, corpus_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine text here"}\n{"text": "broken\n')
    assert cli(_argv(hf_model, bad, tmp_path / "a" / "s.h5")) == 2
    _one_line_error(capsys.readouterr().err, f"{bad}:2 is not valid JSON")
    # a failure after the output folder was made (no document long enough) removes the folder again
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "tiny"}\n')
    assert cli(_argv(hf_model, short, tmp_path / "b" / "c" / "s.h5") + ["--min-tokens", "20"]) == 2
    _one_line_error(capsys.readouterr().err, "gives no context", "lower --min-tokens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "short.jsonl"]


def test_cli_help_shows_every_flag_with_help_and_default_and_the_whole_corpus_notice(tmp_path, hf_model,
                                                                                      corpus_path, capsys):
    from featureatlas.scripts.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["harvest"]
    for action in sub._actions:
        if action.dest in ("help",):
            continue
        assert action.help, action.dest
        assert action.dest == "out" or "default" in action.help, (action.dest, action.help)
    argv = [a for a in _argv(hf_model, corpus_path, tmp_path / "s.h5") if a not in ("--max-tokens", "100000")]
    assert cli(argv) == 0
    err = capsys.readouterr().err
    assert "note: no --max-tokens given, so the whole corpus is harvested:" in err
    assert "tokens/s" in err and "pass --max-tokens N" in err
