import json

import numpy as np
import pytest

from featureatlas.activation_store.corpus import (CorpusConfig, CorpusError, build_corpus, pack_documents, read_documents,
                                     split_document)
from featureatlas.activation_store.models.tokenizer import ByteTokenizer

BYTES = ByteTokenizer(300)


def test_bbc_has_2225_documents_and_5_labels():
    docs = read_documents(CorpusConfig(source="bbc"))
    assert len(docs.texts) == 2225
    assert docs.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert np.bincount(docs.labels).tolist() == [510, 386, 417, 511, 401]
    assert docs.texts[0].startswith("Ad sales boost Time Warner profit")
    assert all(t.strip() for t in docs.texts)
    # The one non-UTF-8 file (a Latin-1 pound sign) is decoded, not dropped or mangled.
    assert any("£15.8m signing" in t for t in docs.texts)


def test_pack_puts_bos_first_pads_right_and_keeps_doc_ids():
    docs = [(7, 2, list(range(10, 25))),  # 15 tokens -> pieces of 7, 7, 1 (tail dropped)
            (8, -1, [50, 51]),  # 2 tokens < min_tokens: dropped
            (9, 0, list(range(100, 104)))]  # 4 tokens -> one padded context
    tokens, n_valid, doc_ids, labels = pack_documents(docs, context_length=8, bos_id=1, pad_id=0, min_tokens=3)
    assert tokens.tolist() == [[1, 10, 11, 12, 13, 14, 15, 16],
                               [1, 17, 18, 19, 20, 21, 22, 23],
                               [1, 100, 101, 102, 103, 0, 0, 0]]
    assert n_valid.tolist() == [8, 8, 5]
    assert doc_ids.tolist() == [7, 7, 9]
    assert labels.tolist() == [2, 2, 0]
    assert tokens.dtype == np.int32 and doc_ids.dtype == np.int64


def test_split_document_never_drops_a_full_piece():
    assert [len(p) for p in split_document(list(range(30)), 11, 100)] == [10, 10, 10]
    assert [len(p) for p in split_document(list(range(23)), 11, 4)] == [10, 10]
    assert [len(p) for p in split_document(list(range(24)), 11, 4)] == [10, 10, 4]


def test_caps_keep_a_prefix():
    docs = [(i, -1, list(range(3, 23))) for i in range(10)]  # 20 tokens each -> pieces of 9, 9, 2
    kw = dict(context_length=10, bos_id=1, pad_id=0, min_tokens=2)
    full = pack_documents(docs, **kw)
    assert len(full[0]) == 30
    by_ctx = pack_documents(docs, max_contexts=7, **kw)
    assert np.array_equal(by_ctx[0], full[0][:7])
    by_tok = pack_documents(docs, max_tokens=25, **kw)  # 10 + 10 + 3 = 23 fits, +10 does not
    assert by_tok[1].tolist() == [10, 10, 3]
    assert np.array_equal(by_tok[0], full[0][:3])


def _write_tree(root):
    for label, texts in {"cats": ["The cat sat on the mat. " * 3, "Cats purr loudly all day."],
                         "dogs": ["Dogs bark at the mailman every morning."]}.items():
        (root / label).mkdir()
        for i, t in enumerate(texts):
            (root / label / f"{i:02d}.txt").write_text(t)
    (root / "loose.txt").write_text("A document without a label, long enough.")


def test_directory_corpus_labels_from_subdirectories(tmp_path):
    _write_tree(tmp_path)
    corpus = build_corpus(CorpusConfig(source=str(tmp_path), context_length=16, min_tokens=4,
                                       shuffle_documents=False), BYTES)
    assert corpus.label_names == ("cats", "dogs")
    # sorted paths: cats/00, cats/01, dogs/00, loose.txt
    first = {int(d): int(l) for d, l in zip(corpus.doc_id_N, corpus.label_N)}
    assert first == {0: 0, 1: 0, 2: 1, 3: -1}
    assert (corpus.tokens_NxT[:, 0] == BYTES.bos_id).all()
    text = "".join(BYTES.decode(corpus.tokens_NxT[c, 1:corpus.n_valid_N[c]])
                   for c in range(corpus.n_contexts) if corpus.doc_id_N[c] == 1)
    assert text == "Cats purr loudly all day."
    # padding beyond n_valid
    for c in range(corpus.n_contexts):
        assert (corpus.tokens_NxT[c, corpus.n_valid_N[c]:] == BYTES.pad_id).all()


def test_jsonl_corpus_with_labels_and_custom_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"body": "first document text here", "topic": "b"}, {"body": "second one, no topic"},
            {"body": "third document text", "topic": "a"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = build_corpus(CorpusConfig(source=str(path), context_length=64, min_tokens=1, shuffle_documents=False,
                                       text_field="body", label_field="topic"), BYTES)
    assert corpus.label_names == ("a", "b")
    assert corpus.doc_id_N.tolist() == [0, 1, 2]
    assert corpus.label_N.tolist() == [1, -1, 0]
    assert BYTES.decode(corpus.tokens_NxT[1, 1:corpus.n_valid_N[1]]) == "second one, no topic"
    with pytest.raises(CorpusError, match="no string field 'text'"):
        build_corpus(CorpusConfig(source=str(path)), BYTES)


def test_shuffled_order_is_deterministic_and_fingerprint_tracks_content(tmp_path):
    for i in range(12):
        (tmp_path / f"{i:02d}.txt").write_text(f"document number {i} " * 5)
    cfg = CorpusConfig(source=str(tmp_path), context_length=32, seed=3)
    a, b = build_corpus(cfg, BYTES), build_corpus(cfg, BYTES)
    assert np.array_equal(a.tokens_NxT, b.tokens_NxT) and a.fingerprint == b.fingerprint
    assert sorted(set(a.doc_id_N.tolist())) == list(range(12))
    assert a.doc_id_N.tolist() != sorted(a.doc_id_N.tolist())  # visited in a shuffled order
    c = build_corpus(CorpusConfig(source=str(tmp_path), context_length=32, seed=4), BYTES)
    assert c.fingerprint != a.fingerprint
    d = build_corpus(cfg, ByteTokenizer(301))  # same ids, different tokenizer name
    assert np.array_equal(d.tokens_NxT, a.tokens_NxT) and d.fingerprint != a.fingerprint
    capped = build_corpus(CorpusConfig(source=str(tmp_path), context_length=32, seed=3, max_documents=4), BYTES)
    assert len(set(capped.doc_id_N.tolist())) == 4


def test_bad_corpora_give_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        build_corpus(CorpusConfig(source=str(tmp_path / "missing")), BYTES)
    with pytest.raises(CorpusError, match="no .txt files"):
        build_corpus(CorpusConfig(source=str(tmp_path)), BYTES)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(CorpusError, match="no document has 16 tokens.*lower --min-tokens"):
        build_corpus(CorpusConfig(source=str(tmp_path)), BYTES)
    with pytest.raises(CorpusError, match="exceeds the model's maximum context 64"):
        build_corpus(CorpusConfig(source=str(tmp_path), context_length=128), BYTES, max_ctx=64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok ok ok ok ok ok ok ok ok ok ok ok"}\nnot json\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2 is not valid JSON"):
        build_corpus(CorpusConfig(source=str(bad)), BYTES)


def test_text_must_be_utf8_with_errors_naming_file_offset_and_fix(tmp_path):
    good = tmp_path / "bom.txt"
    good.write_bytes("\ufeffA UTF-8 file with a byte-order mark, café.".encode("utf-8"))
    docs = read_documents(CorpusConfig(source=str(good)))
    assert docs.texts == ("A UTF-8 file with a byte-order mark, café.",)  # the BOM is dropped
    cases = {
        "utf16.txt": ("Some text".encode("utf-16"), r"utf16.txt is UTF-16 text .*iconv -f UTF-16 -t UTF-8"),
        "utf16be.txt": ("Some text".encode("utf-16-be"), r"holds NUL bytes \(first at byte offset 0\).*UTF-16"),
        "latin1.txt": ("line one\nna\xefve\n".encode("latin-1"),
                       r"latin1.txt is not valid UTF-8 at line 2: byte 0xEF at byte offset 11.*iconv"),
    }
    for name, (data, pattern) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorpusError, match=pattern):
            read_documents(CorpusConfig(source=str(tmp_path / name)))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl is not valid UTF-8 at line 2: byte 0xE9 at byte offset 28"):
        read_documents(CorpusConfig(source=str(jsonl)))
    # a directory corpus is checked file by file
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("fine")
    (tmp_path / "d" / "b.txt").write_bytes(b"\xff\xfeb\x00")
    with pytest.raises(CorpusError, match=r"b.txt is UTF-16 text"):
        read_documents(CorpusConfig(source=str(tmp_path / "d")))


def test_corpus_config_round_trips_and_checks_its_ranges():
    from featureatlas.activation_store.errors import ConfigError

    cfg = CorpusConfig(source="x.jsonl", max_tokens=5000, shuffle_documents=False)
    assert CorpusConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown setting 'max_token'.*did you mean 'max_tokens'"):
        CorpusConfig.from_dict({"max_token": 5})
    for bad, pattern in ((dict(context_length=1), "--context-length must be >= 2"),
                         (dict(max_contexts=0), "--max-contexts must be > 0"),
                         (dict(min_tokens=0), "--min-tokens must be >= 1")):
        with pytest.raises(ConfigError, match=pattern):
            build_corpus(CorpusConfig(**bad), BYTES)
