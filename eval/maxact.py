"""MaxAct: the input-centric evidence of a feature, as token windows with per-token activations.

Each cached example is a context and its max activation. Its window is `width` tokens of that
context, centred on the context's max token (found here, by re-encoding the context) (start = pos − width//2, shifted to stay inside the
context's real tokens), so the max token has context before it. Activations of every token in the
window are recomputed by encoding the context once (all examples that need a context share one
encode). Negatives (contexts where the feature never fires) show their first `width` real tokens.

Explainers see activations as integers 0–10: floor(10·relu(a)/max_a) (Gur-Arieh et al. 2025; the max
over the examples shown), see `normalise`.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np

from featureatlas.eval.cache import EXPLAIN, FeatureCache


def window_bounds(pos: int, first: int, n_valid: int, width: int) -> tuple[int, int]:
    """[start, stop) of a `width`-token window centred on `pos` inside the real tokens [first, n_valid)."""
    start = min(max(pos - width // 2, first), max(n_valid - width, first))
    return start, min(start + width, n_valid)


def normalise(acts, max_act: float) -> list[int]:
    """Integer activations 0..10: floor(10·relu(a)/max_act)."""
    if max_act <= 0:
        return [0 for _ in acts]
    return [int(min(10, max(0, np.floor(10.0 * a / max_act)))) for a in acts]


def _needed(cache: FeatureCache, features: Iterable[int], split: int) -> dict[int, list]:
    """{context: [(feature, kind, quantile, order)]} for every example window of the features."""
    need: dict[int, list] = defaultdict(list)
    for f in features:
        ex = cache.examples(f, split)
        for i, (c, _) in enumerate(ex["top"]):
            need[c].append((f, "top", -1, i))
        for q, items in enumerate(ex["quantiles"]):
            for i, (c, _) in enumerate(items):
                need[c].append((f, "quantiles", q, i))
        for i, c in enumerate(ex["negative"]):
            need[c].append((f, "random", -1, i))
    return need


def example_windows(store, dictionary, cache: FeatureCache, features, decode_token, *, split: int = EXPLAIN,
                    width: int = 32, contexts_per_batch: int = 64, exclude_bos: bool = True) -> dict[int, dict]:
    """{feature: {"top": [Example], "quantiles": [[Example]], "random": [Example]}} (schema: features.jsonl).

    decode_token(id) -> str gives each token's text (e.g. lambda i: tokenizer.decode([i])).
    """
    features = [int(f) for f in cache.check_features(features)]
    n_q = cache["bin_ctx"].shape[2]
    out = {f: {"top": [], "quantiles": [[] for _ in range(n_q)], "random": []} for f in features}
    need = _needed(cache, features, split)
    T, first = store.context_length, 1 if exclude_bos else 0
    contexts = sorted(need)
    token_text: dict[int, str] = {}
    for b in range(0, len(contexts), contexts_per_batch):
        batch = contexts[b:b + contexts_per_batch]
        rows = (np.asarray(batch)[:, None] * T + np.arange(T)[None, :]).ravel()
        codes = np.asarray(dictionary.encode(store.read_rows(dictionary.hook, rows))).reshape(len(batch), T, -1)
        for j, c in enumerate(batch):
            n_valid = int(store.n_valid[c])
            toks = store.tokens[c]
            for f, kind, q, i in need[c]:
                if kind == "random":
                    start, stop = first, min(first + width, n_valid)
                else:  # the context's max position (the cache keeps the value, not the position)
                    pos = first + int(np.argmax(codes[j, first:n_valid, f]))
                    start, stop = window_bounds(pos, first, n_valid, width)
                ids = [int(t) for t in toks[start:stop]]
                for t in ids:
                    if t not in token_text:
                        token_text[t] = decode_token(t)
                acts = [float(a) for a in np.maximum(codes[j, start:stop, f], 0.0)]
                example = {"context": int(c), "start": int(start), "tokens": [token_text[t] for t in ids],
                           "acts": acts, "max_pos": int(np.argmax(acts)) if acts else 0}
                target = out[f][kind][q] if kind == "quantiles" else out[f][kind]
                target.append((i, example))
    for f in features:
        for kind in ("top", "random"):
            out[f][kind] = [e for _, e in sorted(out[f][kind], key=lambda x: x[0])]
        out[f]["quantiles"] = [[e for _, e in sorted(items, key=lambda x: x[0])] for items in out[f]["quantiles"]]
    return out
