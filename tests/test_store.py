import hashlib
import os
import subprocess
import sys
import textwrap

import h5py
import jax
import numpy as np
import pytest

from featureatlas.activation_store.store import (ActivationStore, StoreCorruptedError, StoreError, create_store, val_context_mask,
                                    write_store)
from featureatlas.scripts.cli import main as cli

N, T = 60, 16


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 250, (N, T)).astype(np.int32)
    tokens[:, 0] = 1
    n_valid = np.full(N, T, np.int32)
    n_valid[::3] = rng.integers(2, T, len(n_valid[::3]))  # every third context padded
    for c in range(N):
        tokens[c, n_valid[c]:] = 0
    a = rng.standard_normal((N * T, 8)).astype(np.float32)
    a[:, 0] = np.arange(N * T)  # column 0 names the row, so batches can be traced back
    b = rng.standard_normal((N * T, 3)).astype(np.float32) * 5
    return dict(acts={"resid_post.0": a, "mlp_hidden.1": b}, tokens=tokens, n_valid=n_valid,
                doc_ids=np.arange(N) // 2, labels=rng.integers(-1, 3, N))


@pytest.fixture
def arrays():
    return _arrays()


@pytest.fixture
def store(tmp_path, arrays):
    # 4 contexts per chunk (64 rows) so that shuffling has many blocks to permute
    return write_store(tmp_path / "s.h5", arrays["acts"], arrays["tokens"], arrays["doc_ids"], arrays["labels"],
                       ("x", "y", "z"), {"model_id": "synthetic"}, n_valid=arrays["n_valid"], commit_contexts=8,
                       bos_id=1, chunk_bytes=4 * T * 8 * 4)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _real_rows(arrays, exclude_bos=True, contexts=None):
    t = np.arange(T)[None]
    mask = (t >= (1 if exclude_bos else 0)) & (t < arrays["n_valid"][:, None])
    if contexts is not None:
        mask &= contexts[:, None]
    return np.flatnonzero(mask.ravel())


def test_round_trip_every_array(tmp_path, arrays, store):
    assert store.hooks == ("resid_post.0", "mlp_hidden.1")
    assert store.n_contexts == N and store.complete and store.context_length == T
    assert store.dim("resid_post.0") == 8 and store.dim("mlp_hidden.1") == 3
    assert np.array_equal(store.tokens, arrays["tokens"])
    assert np.array_equal(store.n_valid, arrays["n_valid"])
    assert np.array_equal(store.doc_ids, arrays["doc_ids"])
    assert np.array_equal(store.labels, arrays["labels"])
    assert store.label_names == ("x", "y", "z")
    assert store.attrs["model_id"] == "synthetic" and store.attrs["n_committed"] == N
    for hook, a in arrays["acts"].items():
        assert np.array_equal(store.read_rows(hook, np.arange(N * T)), a)
    assert store.verify() == []
    # float16 storage keeps exactly the float16-rounded values
    s16 = write_store(tmp_path / "h.h5", {k: v.astype(np.float16) for k, v in arrays["acts"].items()},
                      arrays["tokens"])
    assert s16.dtype == "float16"
    assert np.array_equal(s16.read_rows("mlp_hidden.1", np.arange(N * T)),
                          arrays["acts"]["mlp_hidden.1"].astype(np.float16).astype(np.float32))


def test_writing_the_same_store_twice_gives_identical_bytes(tmp_path, arrays):
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for p in paths:
        write_store(p, arrays["acts"], arrays["tokens"], n_valid=arrays["n_valid"])
    assert _sha(paths[0]) == _sha(paths[1])


def test_token_rows_skip_padding_and_bos_and_split_is_a_partition(arrays, store):
    val = val_context_mask(N, 0.05)
    assert np.array_equal(store.context_split("val"), val)
    assert np.array_equal(store.token_rows("all", exclude_bos=False), _real_rows(arrays, False))
    assert np.array_equal(store.token_rows("all"), _real_rows(arrays, True))
    train, valr = store.token_rows("train"), store.token_rows("val")
    assert np.intersect1d(train, valr).size == 0
    assert np.array_equal(np.union1d(train, valr), store.token_rows("all"))
    assert np.array_equal(train, _real_rows(arrays, True, ~val))
    assert not np.isin(np.arange(0, N * T, T), train).any()  # no BOS rows
    big = val_context_mask(200_000, 0.05)
    assert abs(big.mean() - 0.05) < 0.003


def test_read_rows_any_order_and_iter_chunks_streams_in_order(arrays, store):
    a = arrays["acts"]["resid_post.0"]
    rows = np.array([900, 3, 3, 512, 64, 63, 0])
    assert np.array_equal(store.read_rows("resid_post.0", rows), a[rows])
    with pytest.raises(StoreError, match="row indices must lie in"):
        store.read_rows("resid_post.0", [N * T])
    chunks = list(store.iter_chunks("resid_post.0", 100))
    assert all(len(c) == 100 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 100
    assert np.array_equal(np.concatenate(chunks), a[store.token_rows("train")])
    val = np.concatenate(list(store.iter_chunks("mlp_hidden.1", 7, split="val", exclude_bos=False)))
    assert np.array_equal(val, arrays["acts"]["mlp_hidden.1"][store.token_rows("val", exclude_bos=False)])


def _take(it, n):
    out = [np.asarray(next(it)) for _ in range(n)]
    it.close()
    return out


def test_shuffled_batches_cover_each_train_row_once_per_epoch(store):
    train = store.token_rows("train")
    B = 37
    n_batches = 2 * len(train) // B + 1
    it = store.batches("resid_post.0", B, seed=5, shuffle_buffer_rows=128)
    batches = _take(it, n_batches)
    assert all(b.shape == (B, 8) and b.dtype == np.float32 for b in batches)
    ids = np.concatenate(batches)[:, 0].astype(np.int64)
    epoch0, epoch1 = ids[:len(train)], ids[len(train):2 * len(train)]
    assert np.array_equal(np.sort(epoch0), train) and np.array_equal(np.sort(epoch1), train)
    assert not np.array_equal(epoch0, train)  # actually shuffled
    assert not np.array_equal(epoch0, epoch1)  # reshuffled per epoch


def test_batches_are_deterministic_by_seed_and_resume_exactly(store):
    kw = dict(seed=11, shuffle_buffer_rows=128)
    ref = _take(store.batches("resid_post.0", 50, **kw), 40)  # > 2 epochs
    again = _take(store.batches("resid_post.0", 50, **kw), 40)
    assert all(np.array_equal(x, y) for x, y in zip(ref, again))
    other = _take(store.batches("resid_post.0", 50, seed=12, shuffle_buffer_rows=128), 40)
    assert not all(np.array_equal(x, y) for x, y in zip(ref, other))
    for start in (1, 17, 33):
        resumed = _take(store.batches("resid_post.0", 50, start_step=start, **kw), 40 - start)
        assert all(np.array_equal(x, y) for x, y in zip(ref[start:], resumed))


def test_unshuffled_val_batches_follow_store_order_with_bos(arrays, store):
    rows = store.token_rows("val", exclude_bos=False)
    got = np.concatenate(_take(store.batches("mlp_hidden.1", 5, shuffle=False, split="val", exclude_bos=False),
                               len(rows) // 5))
    assert np.array_equal(got, arrays["acts"]["mlp_hidden.1"][rows[:len(got)]])


def test_batches_place_data_with_a_sharding(store):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    it = store.batches("resid_post.0", 16, sharding=sharding, dtype=np.float16)
    x = next(it)
    it.close()
    assert x.sharding == sharding and x.dtype == np.float16 and x.shape == (16, 8)


def test_batches_split_across_two_devices(store):
    code = textwrap.dedent(f"""
        import jax, numpy as np
        from featureatlas.activation_store.store import ActivationStore
        s = ActivationStore.open({str(store.path)!r})
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        it = s.batches("resid_post.0", 32, sharding=sh, seed=3)
        x = next(it); it.close()
        ref = next(s.batches("resid_post.0", 32, seed=3))
        assert len(x.addressable_shards) == 2 and x.addressable_shards[0].data.shape == (16, 8)
        assert np.array_equal(np.asarray(x), np.asarray(ref))
        print("ok")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_stats_equal_numpy_and_are_cached_beside_the_store_never_in_it(arrays, store):
    from featureatlas.activation_store.store import stats_path

    before = _sha(store.path)
    x = arrays["acts"]["mlp_hidden.1"][store.token_rows("train")].astype(np.float64)
    mean, msn = store.stats("mlp_hidden.1")
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(msn, (x ** 2).sum(1).mean(), rtol=1e-12)
    assert _sha(store.path) == before  # reading never changes the store's bytes
    import json
    record = json.loads(stats_path(store.path).read_text())
    entry = record["hooks"]["mlp_hidden.1"]
    assert entry["n_rows"] == len(x) and entry["key"]["n_committed"] == N
    again = ActivationStore.open(store.path).stats("mlp_hidden.1")  # read back from the sidecar, exactly
    assert np.array_equal(again[0], mean) and again[1] == msn
    # a sidecar that no longer matches the store's rows is ignored, not trusted
    entry["mean"] = [0.0] * len(entry["mean"])
    entry["key"]["commit_crc"] += 1
    stats_path(store.path).write_text(json.dumps(record))
    np.testing.assert_allclose(ActivationStore.open(store.path).stats("mlp_hidden.1")[0], mean, rtol=1e-12)


def test_stats_fall_back_to_memory_when_the_file_cannot_be_written(arrays, store):
    # Another open read handle in this process makes HDF5 refuse a read-write open.
    with h5py.File(store.path, "r", locking=False):
        before = _sha(store.path)
        s = ActivationStore.open(store.path)
        mean, _ = s.stats("resid_post.0")
        x = arrays["acts"]["resid_post.0"][s.token_rows("train")].astype(np.float64)
        np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
        assert _sha(store.path) == before
        assert s.stats("resid_post.0")[0] is mean  # cached in memory


def test_partial_store_shows_only_committed_contexts(tmp_path, arrays):
    path = tmp_path / "p.h5"
    full = write_store(path, arrays["acts"], arrays["tokens"], n_valid=arrays["n_valid"], commit_contexts=8)
    with h5py.File(path, "r+") as f:
        f["n_committed"][()] = 24
    s = ActivationStore.open(path)
    assert s.n_contexts == 24 and not s.complete and s.tokens.shape == (24, T)
    assert s.token_rows("all").max() < 24 * T
    it = s.batches("resid_post.0", 64)
    ids = np.concatenate(_take(it, 3))[:, 0]
    assert ids.max() < 24 * T
    assert s.verify() == []
    assert s.summary()["committed_fraction"] == pytest.approx(0.4)
    assert full.n_contexts == N


def test_missing_truncated_and_corrupted_files_are_reported(tmp_path, arrays, store):
    with pytest.raises(FileNotFoundError, match="no activation store at"):
        ActivationStore.open(tmp_path / "nope.h5")
    data = open(store.path, "rb").read()
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreCorruptedError, match="truncated or corrupted.*--overwrite"):
        ActivationStore.open(trunc)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\0" * 64 + data[64:])  # superblock destroyed
    with pytest.raises(StoreCorruptedError, match="truncated or corrupted"):
        ActivationStore.open(garbage)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreCorruptedError, match="not a featureatlas store"):
        ActivationStore.open(plain)
    # A flipped byte inside the activations is caught by verify's per-commit CRC.
    with h5py.File(store.path, "r") as f:
        offset = f["acts/mlp_hidden.1"].id.get_chunk_info(0).byte_offset
    flipped = tmp_path / "flipped.h5"
    buf = bytearray(data)
    buf[offset + 5] ^= 0xFF
    flipped.write_bytes(bytes(buf))
    problems = ActivationStore.open(flipped).verify()
    assert any("mlp_hidden.1: contexts [0, 8) fail their CRC" in p for p in problems)


def test_verify_reports_nan_and_tampered_tokens(tmp_path, arrays):
    acts = {k: v.copy() for k, v in arrays["acts"].items()}
    acts["resid_post.0"][40, 3] = np.nan
    s = write_store(tmp_path / "n.h5", acts, arrays["tokens"], n_valid=arrays["n_valid"])
    assert any("1 committed rows hold NaN or Inf" in p for p in s.verify())
    with h5py.File(s.path, "r+") as f:
        f["tokens"][0, 1] += 1
    assert any("corpus_fingerprint" in p for p in ActivationStore.open(s.path).verify())


def test_create_store_leaves_no_partial_file_and_rejects_bad_shapes(tmp_path, arrays):
    with pytest.raises(StoreError, match="n_valid must have shape"):
        create_store(tmp_path / "x.h5", tokens_NxT=arrays["tokens"], n_valid_N=arrays["n_valid"][:5],
                     doc_id_N=arrays["doc_ids"], label_N=arrays["labels"], label_names=(), dims={"h": 4},
                     dtype="float32", attrs={})
    with pytest.raises(StoreError, match="dtype must be one of"):
        write_store(tmp_path / "y.h5", arrays["acts"], arrays["tokens"], dtype="bfloat16")
    assert list(tmp_path.iterdir()) == []


def test_cli_store_info_and_verify(tmp_path, store, capsys):
    assert cli(["store", "info", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "resid_post.0: 8, mlp_hidden.1: 3" in out and "committed_fraction  1" in out
    assert cli(["store", "info", "--json", str(store.path)]) == 0
    import json
    info = json.loads(capsys.readouterr().out)
    assert info["contexts"] == N and info["tokens"] == int(store.n_valid.sum()) and info["dtype"] == "float32"
    assert cli(["store", "verify", str(store.path)]) == 0
    assert capsys.readouterr().out.startswith("OK")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(open(store.path, "rb").read()[:2000])
    assert cli(["store", "verify", str(bad)]) == 1
    assert "truncated or corrupted" in capsys.readouterr().out
    assert cli(["store", "info", str(bad)]) == 2


def test_a_second_writer_is_refused_while_one_holds_the_store(store):
    from featureatlas.activation_store.store import StoreWriter

    writer = StoreWriter(store.path, fsync=False)
    try:
        code = f"from activation_store.store import StoreWriter; StoreWriter({str(store.path)!r})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
        assert out.returncode != 0 and "open for writing in another process" in out.stderr
    finally:
        writer.close()


def test_several_hooks_give_aligned_batches_that_cover_each_row_once_per_epoch(arrays, store):
    # the two hooks have different chunk layouts (64 and 128 rows): the plan uses whole chunks of both
    assert store.block_rows("resid_post.0") != store.block_rows("mlp_hidden.1")
    train = store.token_rows("train")
    B = 29
    n = 2 * len(train) // B + 1
    with store.batches(["resid_post.0", "mlp_hidden.1"], B, seed=3, shuffle_buffer_rows=128) as it:
        batches = [next(it) for _ in range(n)]
    assert all(set(b) == {"resid_post.0", "mlp_hidden.1"} for b in batches)
    ids = np.concatenate([np.asarray(b["resid_post.0"])[:, 0] for b in batches]).astype(np.int64)
    mlp = np.concatenate([np.asarray(b["mlp_hidden.1"]) for b in batches])
    np.testing.assert_array_equal(mlp, arrays["acts"]["mlp_hidden.1"][ids])  # same token rows in every hook
    assert np.array_equal(np.sort(ids[:len(train)]), train)
    assert np.array_equal(np.sort(ids[len(train):2 * len(train)]), train)
    # resuming at a step gives the same aligned batches
    with store.batches(["resid_post.0", "mlp_hidden.1"], B, seed=3, shuffle_buffer_rows=128, start_step=7) as it:
        again = [next(it) for _ in range(5)]
    for x, y in zip(batches[7:12], again):
        for h in x:
            assert np.array_equal(np.asarray(x[h]), np.asarray(y[h]))
    # one hook by name yields arrays; the same hook in a list yields the same rows as a dict
    with store.batches("mlp_hidden.1", B, seed=3) as a, store.batches(["mlp_hidden.1"], B, seed=3) as b:
        for _ in range(4):
            assert np.array_equal(np.asarray(next(a)), np.asarray(next(b)["mlp_hidden.1"]))


def test_an_explicit_row_subset_is_the_only_thing_visited(arrays, store):
    train = store.token_rows("train")
    keep = train[train % 5 != 0]  # e.g. leaving massive-norm tokens out
    with store.batches("resid_post.0", 50, seed=1, rows=keep) as it:
        ids = np.concatenate([np.asarray(next(it))[:, 0] for _ in range(-(-len(keep) // 50))]).astype(np.int64)
    assert np.array_equal(np.sort(ids[:len(keep)]), keep)
    with pytest.raises(StoreError, match="not real tokens of split 'train'"):
        store.batches("resid_post.0", 50, rows=np.array([0, 1]))  # BOS row 0 is not in the selection
    with pytest.raises(StoreError, match="has no hook 'nope'"):
        store.batches(["resid_post.0", "nope"], 8)
    with pytest.raises(StoreError, match="batch_size must be positive"):
        store.batches("resid_post.0", 0)


def test_sample_is_seeded_sorted_and_aligned(arrays, store):
    x = store.sample("resid_post.0", 100, seed=4)
    assert x.shape == (100, 8) and np.array_equal(x, store.sample("resid_post.0", 100, seed=4))
    rows = x[:, 0].astype(np.int64)
    assert np.all(np.diff(rows) > 0) and np.isin(rows, store.token_rows("train")).all()
    both = store.sample(["resid_post.0", "mlp_hidden.1"], 100, seed=4)
    assert np.array_equal(both["resid_post.0"], x)
    np.testing.assert_array_equal(both["mlp_hidden.1"], arrays["acts"]["mlp_hidden.1"][rows])
    assert len(store.sample("resid_post.0", 10**6)) == len(store.token_rows("train"))


def test_reading_never_changes_the_store_file(store):
    before = _sha(store.path)
    s = ActivationStore.open(store.path)
    s.stats("resid_post.0")
    s.sample("mlp_hidden.1", 10)
    with s.batches(["resid_post.0", "mlp_hidden.1"], 16) as it:
        next(it)
    list(s.iter_chunks("resid_post.0", 100))
    assert s.verify() == [] and s.summary()["contexts"] == N
    s.close()
    assert _sha(store.path) == before


def test_things_that_are_not_stores_are_named_not_called_corrupted(tmp_path, store):
    from featureatlas.activation_store.errors import FeatureAtlasError
    from featureatlas.activation_store.store import NotAStoreError

    (tmp_path / "dir").mkdir()
    (tmp_path / "empty.h5").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello\n" * 100)
    with h5py.File(tmp_path / "weights.h5", "w") as f:
        f["W"] = np.zeros((2, 2))
        f.attrs["format"] = "something-else"
    cases = {"dir": (NotAStoreError, r"is a directory, not an activation store file; pass the store's \.h5 file "
                                     r"path \(it holds s\.h5\)"),
             "empty.h5": (NotAStoreError, "is an empty file, not an activation store"),
             "notes.txt": (StoreCorruptedError, "is not an HDF5 file .*otherwise pass the .h5 file"),
             "weights.h5": (NotAStoreError, r"is an HDF5 file but not a featureatlas store \(no /tokens, its format "
                                            r"attribute is 'something-else'; it holds /W\)")}
    (tmp_path / "dir" / "s.h5").write_bytes(store.path.read_bytes())
    for name, (error, pattern) in cases.items():
        with pytest.raises(error, match=pattern) as info:
            ActivationStore.open(tmp_path / name)
        assert isinstance(info.value, FeatureAtlasError)
        if error is NotAStoreError:
            assert "corrupted" not in str(info.value) and "delete it" not in str(info.value)
    with pytest.raises(FeatureAtlasError, match="no activation store at"):
        ActivationStore.open(tmp_path / "missing.h5")
