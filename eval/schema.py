"""The `features.jsonl` record format, "featureatlas-features/1": the contract between the feature cache,
the describers, the explainers, the scorers and the catalog.

One JSON object per line, one line per feature. Every string that came from the corpus or a model (tokens,
descriptions, generated text) is raw data: every renderer escapes it. Fields (`FIELDS` holds the same list
for programs; `validate_record` checks it):

    schema          "featureatlas-features/1"
    id              "<dictionary>/<index>", unique in a catalog (e.g. "sae-topk/123")
    dictionary      dictionary name (an entry of catalog.json "dictionaries")
    index           feature index in the dictionary, 0-based
    hook            hook the feature reads (a transcoder's output hook is in catalog.json)
    dead            true: never fired on the cached tokens (listed apart, not described)
    stats           {density: fraction of cached tokens with code > 0, in [0, 1];
                     max: max activation; mean: mean over ALL cached tokens; mean_active: mean where > 0;
                     n_tokens: tokens the cache saw;
                     hist: {edges: [B+1 log-spaced floats], counts: [B ints]} of the positive activations}
    examples        {top: [Example] by max activation, descending;
                     quantiles: [[Example], ...] one list per activation-quantile bin, bin 0 lowest;
                     random: [Example] windows where the feature does not fire}. EXPLAIN split only.
    vocab_proj      optional {top: [[token, logit]], bottom: [[token, logit]]}: final norm then W_U of the
                    feature's residual write direction, most positive / most negative first
    token_change    optional {clamp: c, mode: clamp|add, pos: {up: [[token, dlogit]], down: [...]}, neg: {up: [...], down: [...]}}:
                    mean logit change when the feature is clamped to +c (pos) or -c (neg) at every position
    weights         optional {norm, null_space_frac, unigram_alignment: floats;
                     nearest: [[other index, decoder cosine]]; read_tokens: [[token, weight]] (neurons)}
    cooccurrence    optional [[other index, tokens where both fire]] (top features only)
    descriptions    [Description]
    scores          [Score] (filled by the scoring stage; [] until then)

    Example      {context: row of the store's /tokens, start: first token's offset in that context,
                  tokens: [decoded token strings], acts: [raw activations, same length], max_pos: index of the max}
    Description  {text, method: maxact|vocabproj|tokenchange|ensemble-raw|ensemble-concat,
                  explainer: template|local|openai, model, prompt_method, evidence: {...}, seconds,
                  tokens_in, tokens_out, sample (index among best-of-k samples)}; extra provenance keys allowed
    Score        {method, value (null when every trial failed), judge, n, ci: [lo, hi], failed};
                 extra keys allowed

catalog.json (beside features.jsonl) is "featureatlas-catalog/1"; see `validate_meta`.

Numbers must be finite (JSON has no NaN); numpy scalars are accepted (the writer converts them).
"""
from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Mapping, Sequence

from featureatlas.activation_store.errors import FeatureAtlasError

SCHEMA_VERSION = "featureatlas-features/1"
CATALOG_SCHEMA_VERSION = "featureatlas-catalog/1"

DESCRIPTION_METHODS = ("maxact", "vocabproj", "tokenchange", "ensemble-raw", "ensemble-concat")
EXPLAINERS = ("template", "local", "openai")
DICTIONARY_KINDS = ("sae", "transcoder", "snmf", "neurons", "diffmeans", "pca")

FIELDS: dict[str, str] = {
    "schema": f'the record format, "{SCHEMA_VERSION}"',
    "id": '"<dictionary>/<index>", unique in a catalog',
    "dictionary": "dictionary name (an entry of catalog.json dictionaries)",
    "index": "feature index in the dictionary, 0-based",
    "hook": "hook the feature reads",
    "dead": "true when the feature never fired on the cached tokens",
    "stats": "density, max, mean, mean_active, n_tokens, hist {edges, counts}",
    "examples": "top, quantiles (one list per bin, lowest first), random: token windows with activations",
    "vocab_proj": "optional: top / bottom [token, logit] pairs of the unembedded write direction",
    "token_change": "optional: clamp c; pos / neg: up / down [token, logit change] pairs",
    "weights": "optional: norm, null_space_frac, unigram_alignment, nearest, read_tokens",
    "cooccurrence": "optional: [other index, co-firing token count] pairs",
    "descriptions": "descriptions with provenance (text, method, explainer, model, prompt_method, ...)",
    "scores": "scores of the descriptions (method, value, judge, n, ci, failed)",
}
REQUIRED = ("schema", "id", "dictionary", "index", "hook", "dead", "stats", "examples", "descriptions", "scores")
STATS_FIELDS = ("density", "max", "mean", "mean_active", "n_tokens", "hist")
EXAMPLE_FIELDS = ("context", "start", "tokens", "acts", "max_pos")
WEIGHT_FIELDS = ("norm", "null_space_frac", "unigram_alignment", "nearest", "read_tokens")
DESCRIPTION_FIELDS = ("text", "method", "explainer", "model", "prompt_method", "evidence", "seconds",
                      "tokens_in", "tokens_out", "sample")
SCORE_FIELDS = ("method", "value", "judge", "n", "ci", "failed")


class SchemaError(FeatureAtlasError, ValueError):
    """A features.jsonl record or catalog metadata does not follow the documented schema."""


# ---------------------------------------------------------------------------------------------
# Small checkers: each raises SchemaError naming the field path
# ---------------------------------------------------------------------------------------------
def _fail(where: str, field: str, problem: str) -> None:
    raise SchemaError(f"{where}: field {field} {problem}; fix the producer of this record "
                      f"(the schema is documented in featureatlas.eval.schema)")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _num(where, field, v, lo=None, hi=None, optional=False):
    if v is None and optional:
        return
    if not _is_num(v):
        _fail(where, field, f"must be a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        _fail(where, field, f"must lie in [{lo}, {hi}], got {v!r}")


def _int(where, field, v, lo=None, optional=False):
    if v is None and optional:
        return
    if not _is_int(v):
        _fail(where, field, f"must be an integer, got {v!r}")
    if lo is not None and v < lo:
        _fail(where, field, f"must be >= {lo}, got {v!r}")


def _str(where, field, v, nonempty=False):
    if not isinstance(v, str):
        _fail(where, field, f"must be a string, got {type(v).__name__}")
    if nonempty and not v:
        _fail(where, field, "must not be empty")


def _dict(where, field, v, known: tuple[str, ...] | None = None, required: tuple[str, ...] = ()):
    if not isinstance(v, Mapping):
        _fail(where, field, f"must be an object, got {type(v).__name__}")
    for key in required:
        if key not in v:
            _fail(where, f"{field}.{key}", "is missing")
    if known is not None:
        for key in v:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
                _fail(where, f"{field}.{key}", f"is not part of the schema{hint}")


def _list(where, field, v):
    if not isinstance(v, (list, tuple)):
        _fail(where, field, f"must be a list, got {type(v).__name__}")


def _pairs(where, field, v, key_type: str):
    """A list of [key, number] pairs; key_type "str" (token) or "int" (feature index)."""
    _list(where, field, v)
    for i, pair in enumerate(v):
        f = f"{field}[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            _fail(where, f, f"must be a [{'token' if key_type == 'str' else 'index'}, value] pair, got {pair!r}")
        if key_type == "str":
            _str(where, f + "[0]", pair[0])
        else:
            _int(where, f + "[0]", pair[0], lo=0)
        _num(where, f + "[1]", pair[1])


_EXAMPLE_KEYS = frozenset(EXAMPLE_FIELDS)
_STR = frozenset([str])


def _example_ok(ex: Any) -> bool:
    """The common case, checked fast (a catalog holds millions of tokens); False sends it to the slow checks,
    which name the first bad field."""
    try:
        if type(ex) is not dict or ex.keys() != _EXAMPLE_KEYS:
            return False
        toks, acts, c, st, mp = ex["tokens"], ex["acts"], ex["context"], ex["start"], ex["max_pos"]
        return (type(c) is int and c >= 0 and type(st) is int and st >= 0 and type(mp) is int
                and type(toks) is list and type(acts) is list and len(toks) == len(acts)
                and (0 <= mp < len(toks) or (mp == 0 and not toks))
                and set(map(type, toks)) <= _STR and all(map(math.isfinite, acts)))
    except TypeError:
        return False


def validate_example(ex: Any, where: str, field: str) -> None:
    if _example_ok(ex):
        return
    _dict(where, field, ex, known=EXAMPLE_FIELDS, required=EXAMPLE_FIELDS)
    _int(where, f"{field}.context", ex["context"], lo=0)
    _int(where, f"{field}.start", ex["start"], lo=0)
    _list(where, f"{field}.tokens", ex["tokens"])
    _list(where, f"{field}.acts", ex["acts"])
    if len(ex["tokens"]) != len(ex["acts"]):
        _fail(where, f"{field}.acts", f"must have one value per token ({len(ex['tokens'])} tokens, "
                                      f"{len(ex['acts'])} values)")
    # fast paths (a catalog holds millions of tokens); the slow loops only locate the first bad entry
    if not all(type(t) is str for t in ex["tokens"]):
        for i, tok in enumerate(ex["tokens"]):
            _str(where, f"{field}.tokens[{i}]", tok)
    try:
        finite = all(map(math.isfinite, ex["acts"]))
    except TypeError:
        finite = False
    if not finite:
        for i, a in enumerate(ex["acts"]):
            _num(where, f"{field}.acts[{i}]", a)
    n = len(ex["tokens"])
    _int(where, f"{field}.max_pos", ex["max_pos"], lo=0)
    if n and ex["max_pos"] >= n:
        _fail(where, f"{field}.max_pos", f"must index the window ({n} tokens), got {ex['max_pos']}")


def _validate_stats(s: Any, where: str) -> None:
    _dict(where, "stats", s, known=STATS_FIELDS, required=STATS_FIELDS)
    _num(where, "stats.density", s["density"], 0, 1)
    _num(where, "stats.max", s["max"])
    _num(where, "stats.mean", s["mean"])
    _num(where, "stats.mean_active", s["mean_active"])
    _int(where, "stats.n_tokens", s["n_tokens"], lo=0)
    h = s["hist"]
    _dict(where, "stats.hist", h, known=("edges", "counts"), required=("edges", "counts"))
    _list(where, "stats.hist.edges", h["edges"])
    _list(where, "stats.hist.counts", h["counts"])
    if h["counts"] and len(h["edges"]) != len(h["counts"]) + 1:
        _fail(where, "stats.hist.edges", f"must have one more entry than counts ({len(h['counts']) + 1}), "
                                         f"got {len(h['edges'])}")
    for i, e in enumerate(h["edges"]):
        _num(where, f"stats.hist.edges[{i}]", e)
    for i, c in enumerate(h["counts"]):
        _int(where, f"stats.hist.counts[{i}]", c, lo=0)


def _validate_examples(ex: Any, where: str) -> None:
    _dict(where, "examples", ex, known=("top", "quantiles", "random"), required=("top", "quantiles", "random"))
    for name in ("top", "random"):
        _list(where, f"examples.{name}", ex[name])
        for i, e in enumerate(ex[name]):
            validate_example(e, where, f"examples.{name}[{i}]")
    _list(where, "examples.quantiles", ex["quantiles"])
    for b, bin_ in enumerate(ex["quantiles"]):
        _list(where, f"examples.quantiles[{b}]", bin_)
        for i, e in enumerate(bin_):
            validate_example(e, where, f"examples.quantiles[{b}][{i}]")


def _validate_vocab_proj(v: Any, where: str) -> None:
    _dict(where, "vocab_proj", v, known=("top", "bottom"), required=("top", "bottom"))
    _pairs(where, "vocab_proj.top", v["top"], "str")
    _pairs(where, "vocab_proj.bottom", v["bottom"], "str")


def _validate_token_change(t: Any, where: str) -> None:
    _dict(where, "token_change", t, known=("clamp", "mode", "pos", "neg"), required=("clamp", "pos", "neg"))
    _num(where, "token_change.clamp", t["clamp"])
    for sign in ("pos", "neg"):
        _dict(where, f"token_change.{sign}", t[sign], known=("up", "down"), required=("up", "down"))
        for d in ("up", "down"):
            _pairs(where, f"token_change.{sign}.{d}", t[sign][d], "str")


def _validate_weights(w: Any, where: str) -> None:
    _dict(where, "weights", w, known=WEIGHT_FIELDS)
    for key in ("norm", "null_space_frac", "unigram_alignment"):
        if key in w:
            _num(where, f"weights.{key}", w[key], optional=True)
    if w.get("nearest") is not None:
        _pairs(where, "weights.nearest", w["nearest"], "int")
    if w.get("read_tokens") is not None:
        _pairs(where, "weights.read_tokens", w["read_tokens"], "str")


def validate_description(d: Any, where: str, field: str) -> None:
    _dict(where, field, d, required=("text", "method", "explainer"))
    _str(where, f"{field}.text", d["text"])
    if d["method"] not in DESCRIPTION_METHODS:
        _fail(where, f"{field}.method", f"must be one of {', '.join(DESCRIPTION_METHODS)}, got {d['method']!r}")
    if d["explainer"] not in EXPLAINERS:
        _fail(where, f"{field}.explainer", f"must be one of {', '.join(EXPLAINERS)}, got {d['explainer']!r}")
    for key in ("model", "prompt_method"):
        if key in d and d[key] is not None:
            _str(where, f"{field}.{key}", d[key])
    if d.get("evidence") is not None:
        _dict(where, f"{field}.evidence", d["evidence"])
    if "seconds" in d:
        _num(where, f"{field}.seconds", d["seconds"], lo=0, optional=True)
    for key in ("tokens_in", "tokens_out", "sample"):
        if key in d:
            _int(where, f"{field}.{key}", d[key], lo=0, optional=True)


def validate_score(s: Any, where: str, field: str) -> None:
    _dict(where, field, s, required=("method", "value"))
    _str(where, f"{field}.method", s["method"], nonempty=True)
    _num(where, f"{field}.value", s["value"], optional=True)
    if s.get("judge") is not None:
        _str(where, f"{field}.judge", s["judge"])
    for key in ("n", "failed"):
        if key in s:
            _int(where, f"{field}.{key}", s[key], lo=0, optional=True)
    if s.get("ci") is not None:
        _list(where, f"{field}.ci", s["ci"])
        if len(s["ci"]) != 2:
            _fail(where, f"{field}.ci", f"must be [low, high], got {s['ci']!r}")
        for i, c in enumerate(s["ci"]):
            _num(where, f"{field}.ci[{i}]", c)


def validate_record(rec: Any) -> dict:
    """Check one features.jsonl record against the schema; return it unchanged.

    Raises SchemaError whose message names the record and the first bad field (e.g. `stats.density`).
    """
    if not isinstance(rec, Mapping):
        raise SchemaError(f"a features.jsonl record must be a JSON object, got {type(rec).__name__}; "
                          "fix the producer of this record")
    where = f"feature record {rec.get('id')!r}" if isinstance(rec.get("id"), str) else "feature record"
    for key in rec:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(where, str(key), f"is not part of the schema{hint}")
    for key in REQUIRED:
        if key not in rec:
            _fail(where, key, "is missing")
    if rec["schema"] != SCHEMA_VERSION:
        _fail(where, "schema", f"must be {SCHEMA_VERSION!r}, got {rec['schema']!r}")
    _str(where, "dictionary", rec["dictionary"], nonempty=True)
    _int(where, "index", rec["index"], lo=0)
    _str(where, "id", rec["id"], nonempty=True)
    expected = f"{rec['dictionary']}/{rec['index']}"
    if rec["id"] != expected:
        _fail(where, "id", f"must be '<dictionary>/<index>' = {expected!r}, got {rec['id']!r}")
    _str(where, "hook", rec["hook"], nonempty=True)
    if not isinstance(rec["dead"], bool):
        _fail(where, "dead", f"must be true or false, got {rec['dead']!r}")
    _validate_stats(rec["stats"], where)
    _validate_examples(rec["examples"], where)
    if rec.get("vocab_proj") is not None:
        _validate_vocab_proj(rec["vocab_proj"], where)
    if rec.get("token_change") is not None:
        _validate_token_change(rec["token_change"], where)
    if rec.get("weights") is not None:
        _validate_weights(rec["weights"], where)
    if rec.get("cooccurrence") is not None:
        _pairs(where, "cooccurrence", rec["cooccurrence"], "int")
    _list(where, "descriptions", rec["descriptions"])
    for i, d in enumerate(rec["descriptions"]):
        validate_description(d, where, f"descriptions[{i}]")
    _list(where, "scores", rec["scores"])
    for i, s in enumerate(rec["scores"]):
        validate_score(s, where, f"scores[{i}]")
    return rec  # type: ignore[return-value]


META_FIELDS = ("schema", "model_id", "store", "dictionaries", "created", "n_features", "n_dead", "neuronpedia")
DICTIONARY_FIELDS = ("name", "kind", "hook", "hook_out", "n_features", "path")


def catalog_meta(model_id: str, infos: Sequence[Mapping]) -> dict:
    """The catalog metadata of dictionaries described by `infos` (their describe runs' dictionary.json)."""
    return {"model_id": model_id, "store": infos[0].get("store"),
            "dictionaries": [{k: i[k] for k in DICTIONARY_FIELDS if k in i} for i in infos]}


def validate_meta(meta: Any) -> dict:
    """Check the caller's catalog metadata (what catalog.json records besides the counts the writer adds).

    meta: {model_id: str, store: {path, fingerprint} (optional), dictionaries: [{name, kind, hook,
    hook_out (optional), n_features, path (optional)}], created (optional, ISO time),
    neuronpedia (optional): {model_id, creator_id, source_sets: {dictionary: set name}}}.
    n_features / n_dead / schema are computed by the writer and may be absent.
    """
    where = "catalog metadata"
    _dict(where, "meta", meta, known=META_FIELDS, required=("model_id", "dictionaries"))
    _str(where, "model_id", meta["model_id"], nonempty=True)
    if meta.get("store") is not None:
        _dict(where, "store", meta["store"])
    _list(where, "dictionaries", meta["dictionaries"])
    if not meta["dictionaries"]:
        _fail(where, "dictionaries", "must name at least one dictionary")
    seen = set()
    for i, d in enumerate(meta["dictionaries"]):
        f = f"dictionaries[{i}]"
        _dict(where, f, d, known=DICTIONARY_FIELDS, required=("name", "kind", "hook", "n_features"))
        _str(where, f"{f}.name", d["name"], nonempty=True)
        if "/" in d["name"]:
            _fail(where, f"{f}.name", f"must not contain '/' (feature ids are '<name>/<index>'), got {d['name']!r}")
        if d["name"] in seen:
            _fail(where, f"{f}.name", f"repeats {d['name']!r}; give each dictionary its own name")
        seen.add(d["name"])
        if d["kind"] not in DICTIONARY_KINDS:
            _fail(where, f"{f}.kind", f"must be one of {', '.join(DICTIONARY_KINDS)}, got {d['kind']!r}")
        _str(where, f"{f}.hook", d["hook"], nonempty=True)
        _int(where, f"{f}.n_features", d["n_features"], lo=0)
    if meta.get("neuronpedia") is not None:
        _dict(where, "neuronpedia", meta["neuronpedia"], known=("model_id", "creator_id", "source_sets"))
    return meta  # type: ignore[return-value]


__all__ = ["CATALOG_SCHEMA_VERSION", "DESCRIPTION_METHODS", "DICTIONARY_KINDS", "EXPLAINERS", "FIELDS", "REQUIRED",
           "SCHEMA_VERSION", "SchemaError", "validate_description", "validate_example", "validate_meta",
           "validate_record", "validate_score"]
