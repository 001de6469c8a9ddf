"""The feature catalog: `features.jsonl`, `catalog.json`, a static `index.html` and a Neuronpedia export.

    from featureatlas.eval.catalog import write_catalog, read_features, load_catalog
    result = write_catalog("runs/demo/catalog", records, meta)    # records: any iterable of feature dicts
    print(result.index_html)                                      # open it from file://, no server needed

Layout of `out_dir` after `write_catalog`:

    features.jsonl            one validated record per line (schema: featureatlas.eval.schema, SCHEMA_VERSION)
    catalog.json              "featureatlas-catalog/1": model, store, dictionaries, counts, build id, file list
    index.html                the browsable page: one self-contained file (CSS and code inlined, no network)
    data/<build>/index.js     featureAtlasIndex({...}): one small summary row per feature (the list view)
    data/<build>/shard-NNNN.js  featureAtlasShard(N, [...]): the full records of features N*S .. N*S+S-1
    neuronpedia/              the Neuronpedia export (below)

The page loads its data with dynamically inserted `<script src=...>` tags that call a global callback:
browsers refuse fetch()/XHR of local files on file://, but allow scripts. A feature page loads only its
shard (S = 256 features by default), and the list view renders one page of rows, so 16k features stay fast.
Data files are JSON (ensure_ascii) with "<", ">", "&", U+2028 and U+2029 written as \\uXXXX escapes, so no
corpus string can close a script element; the page builds its DOM with createElement/textContent only and
carries a Content-Security-Policy that allows just its own inline code (by hash) and local script files.

Crash safety (the run layer, featureatlas.activation_store.runs): every file is first written, streaming,
into a hidden staging folder `.catalog-<build>/` beside the catalog; a kill there leaves the previous
catalog untouched (the stale folder is removed by the next write). The shard folder is then moved to
`data/<build>/`, where nothing refers to it yet. The commit point is one `publish_files` of `features.jsonl`,
`catalog.json` and `index.html` together; only then does the staged `neuronpedia/` folder replace the old one,
an idempotent step that `recover_catalog` (run by `write_catalog` and `load_catalog`) rolls forward after a
kill, as `recover_publish` does for the three files. Older `data/<build>` folders are removed last. One
writer per catalog directory at a time.

Memory: records are consumed once, as a stream. The writer holds one shard's records (S features), one
Neuronpedia batch's rows and a small summary row per feature; never all examples at once.

Neuronpedia export (`neuronpedia/`), the bulk-import layout of Neuronpedia's `neuronpedia-utils` and of
SAEDashboard's converter, with their field names. Every row carries modelId and layer, so the features of
several dictionaries share one folder:

    model.jsonl, sourceset.jsonl, source.jsonl       one Model row; one SourceSet and one Source row per dictionary
    features/batch-K.jsonl.gz      one row per feature (dead ones too)
    activations/batch-K.jsonl.gz   one row per top and quantile example of the features of batch K
    explanations/batch-K.jsonl.gz  one row per description

  Identifiers
    modelId        meta.neuronpedia.model_id, else the last path part of meta.model_id, lowercased, [a-z0-9.-]
    sourceSetName  meta.neuronpedia.source_sets[dictionary], else the dictionary name made slug-safe
    layer          "<L>-<sourceSetName>" with L the layer number of the dictionary's hook (Neuronpedia's source
                   id, e.g. "15-sae-topk"); just the set name when the hook has no layer number
    index          the feature index, as a string (Neuronpedia stores indices as text)
    creatorId / authorId   meta.neuronpedia.creator_id, else "" (set it to your Neuronpedia user id before upload)
    id (activations, explanations)  "c" + 24 hex digits of sha1(modelId|layer|index|kind|k): deterministic
    createdAt      catalog.json "created"
  features rows
    hookName       our hook in TransformerLens form (activation_store.models.config.to_transformerlens:
                   resid_post.L -> blocks.L.hook_resid_post, mlp_hidden.L -> blocks.L.mlp.hook_post, ...)
    maxActApprox   stats.max
    frac_nonzero   stats.density
    pos_str / pos_values   vocab_proj.top tokens / logits (most positive first); [] without vocab_proj
    neg_str / neg_values   vocab_proj.bottom tokens / logits (most negative first)
    freq_hist_data_bar_heights  stats.hist.counts
    freq_hist_data_bar_values   bin centres of stats.hist: geometric mean of the two edges (the bins are
                                log-spaced), arithmetic mean where an edge is <= 0
    topkCosSimIndices / topkCosSimValues  weights.nearest (decoder cosine)
    logits_hist_data_bar_heights/values, neuron_alignment_*, correlated_neurons_*, correlated_features_*,
    decoder_weights_dist, vector: [] -- not computed by featureatlas (co-occurrence counts are not Pearson
    correlations, so they are not passed off as correlated_features_*); hasVector false, vectorLabel null
  activations rows
    tokens, values        an example window's tokens and activations
    maxValue, maxValueTokenIndex, minValue   max / argmax / min of values
    qualifyingTokenIndex  the example's max_pos;  dataIndex  the store context id, as text;  dataSource null
    binMin, binMax        quantile examples: the smallest and largest max activation among the exported
                          examples of that bin (the record does not carry the cache's bin edges); top examples: null
    binContains           null (the share of activations in a bin is not in the record)
    dfaValues [], dfaTargetIndex null, dfaMaxValue null, lossValues [], logitContributions null
    (random, non-activating windows are not exported)
  explanations rows
    description           the description text;  typeName "featureatlas-<method>-<explainer>"
    explanationModelName  the description's model, else its explainer ("template")
"""
from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import html
import json
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from featureatlas.activation_store.models.config import to_transformerlens
from featureatlas.activation_store.runs import (atomic_write, check_output_path, fsync_dir,
                                                publish_files, read_json, recover_publish)
from featureatlas.eval.schema import (CATALOG_SCHEMA_VERSION, SCHEMA_VERSION, SchemaError, validate_meta,
                                      validate_record)

SHARD_SIZE = 256
NP_BATCH_SIZE = 1024
FEATURES = "features.jsonl"
CATALOG = "catalog.json"
INDEX_HTML = "index.html"
DATA = "data"
NEURONPEDIA = "neuronpedia"
STAGING_PREFIX = ".catalog-"
_BUILD_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")


@dataclass(frozen=True)
class CatalogResult:
    """What `write_catalog` wrote."""

    out_dir: Path
    "the catalog directory"
    index_html: Path
    "the page to open in a browser (file://)"
    features_jsonl: Path
    "one record per feature"
    catalog_json: Path
    "catalog metadata and counts"
    neuronpedia_dir: Path
    "the Neuronpedia export folder"
    build: str
    "this write's id (names the data/<build> folder)"
    n_features: int
    "records written"
    n_dead: int
    "records with dead = true"
    n_shards: int
    "data/<build>/shard-NNNN.js files"


# ---------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """json `default`: numpy scalars and arrays (anything with .tolist()) become plain Python values."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def json_line(obj: Any) -> str:
    """Compact JSON of one record on one line (no NaN: JSON has none). UTF-8 kept as is, except U+2028 and
    U+2029, written as escapes because line-splitting readers (str.splitlines, JavaScript) break lines there."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_jsonable)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


_JS_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def js_literal(obj: Any) -> str:
    """`obj` as a JavaScript expression that no data string can break out of.

    JSON with ensure_ascii (so U+2028/U+2029 are escaped), and "<", ">", "&" written as \\u003c, \\u003e,
    \\u0026: these characters occur only inside JSON strings, where the escapes mean the same character, so a
    token like `</script><script>...` stays a string wherever the text is embedded.
    """
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"), default=_jsonable)
    return re.sub(r"[<>&\u2028\u2029]", lambda m: _JS_ESCAPES[m.group(0)], text)


def _escape_char(m: re.Match) -> str:
    c = m.group(0)
    if c in _JS_ESCAPES:
        return _JS_ESCAPES[c]
    o = ord(c)
    if o > 0xFFFF:  # outside the BMP: a UTF-16 surrogate pair, as json's ensure_ascii writes it
        o -= 0x10000
        return f"\\u{0xD800 + (o >> 10):04x}\\u{0xDC00 + (o & 0x3FF):04x}"
    return f"\\u{o:04x}"


_UNSAFE_RE = re.compile(r"[<>&]|[^\x00-\x7f]")


def js_safe_json(json_text: str) -> str:
    """JSON text (e.g. a `json_line`) made as safe as `js_literal`: non-ASCII and "<", ">", "&" escaped.
    Valid because outside strings JSON holds only ASCII punctuation, digits and literals."""
    return _UNSAFE_RE.sub(_escape_char, json_text)


def js_callback(name: str, *args: Any) -> str:
    """A data file's text: `name(arg, ...);` with every argument through `js_literal`."""
    return f"{name}({','.join(js_literal(a) for a in args)});\n"


def parse_js_callback(text: str, name: str) -> list:
    """Inverse of `js_callback` (for tests and tools): the list of arguments."""
    text = text.strip()
    if not (text.startswith(name + "(") and text.endswith(");")):
        raise SchemaError(f"not a {name}(...) data file; regenerate the catalog")
    return json.loads("[" + text[len(name) + 1:-2] + "]")


# ---------------------------------------------------------------------------------------------
# Summary rows (the list view) and shards (the feature pages)
# ---------------------------------------------------------------------------------------------
def _best_scores(rec: Mapping) -> dict[str, float]:
    """{score method: best (highest) value} over the record's scores; failed ones (value null) skipped."""
    best: dict[str, float] = {}
    for s in rec["scores"]:
        v = s.get("value")
        if v is not None and (s["method"] not in best or v > best[s["method"]]):
            best[s["method"]] = float(v)
    return best


def summary_row(rec: Mapping, shard: int) -> dict:
    """The small per-feature row that data/<build>/index.js carries (searched, filtered, sorted by the page)."""
    texts = []
    for d in rec["descriptions"]:
        t = d["text"].strip()
        if t and t not in texts:
            texts.append(t[:400])
    s = rec["stats"]
    return {"id": rec["id"], "d": rec["dictionary"], "x": int(rec["index"]), "dead": bool(rec["dead"]),
            "den": float(s["density"]), "max": float(s["max"]), "ma": float(s["mean_active"]),
            "desc": texts, "sc": _best_scores(rec), "s": shard}


# ---------------------------------------------------------------------------------------------
# Neuronpedia rows
# ---------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-") or "x"


def _layer_of(hook: str) -> int | None:
    m = re.search(r"\.(\d+)$", hook)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class NeuronpediaIds:
    """How one catalog maps onto Neuronpedia's identifiers (see the module docstring)."""

    model_id: str
    "Neuronpedia modelId"
    creator_id: str
    "creatorId / authorId of every row"
    created: str
    "createdAt of every row"
    source_sets: dict
    "{dictionary name: Neuronpedia source set name}"
    layers: dict
    "{dictionary name: Neuronpedia layer (source id)}"
    hooks: dict
    "{dictionary name: TransformerLens hook name or None}"

    @classmethod
    def from_meta(cls, meta: Mapping, created: str) -> "NeuronpediaIds":
        np_meta = meta.get("neuronpedia") or {}
        model_id = np_meta.get("model_id") or _slug(str(meta["model_id"]).rstrip("/").split("/")[-1])
        sets, layers, hooks = {}, {}, {}
        for d in meta["dictionaries"]:
            name = d["name"]
            sets[name] = (np_meta.get("source_sets") or {}).get(name) or _slug(name)
            layer = _layer_of(d["hook"])
            layers[name] = sets[name] if layer is None else f"{layer}-{sets[name]}"
            hooks[name] = to_transformerlens(d["hook"])
        return cls(model_id, str(np_meta.get("creator_id") or ""), created, sets, layers, hooks)

    def row_id(self, rec: Mapping, kind: str, k: int) -> str:
        key = f"{self.model_id}|{self.layers[rec['dictionary']]}|{rec['index']}|{kind}|{k}"
        return "c" + hashlib.sha1(key.encode()).hexdigest()[:24]


def _bin_centres(edges: list) -> list[float]:
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        out.append(math.sqrt(lo * hi) if lo > 0 and hi > 0 else (lo + hi) / 2)
    return out


def neuronpedia_feature(rec: Mapping, ids: NeuronpediaIds) -> dict:
    """The Neuronpedia `features` row of one record."""
    vp = rec.get("vocab_proj") or {"top": [], "bottom": []}
    nearest = (rec.get("weights") or {}).get("nearest") or []
    hist = rec["stats"]["hist"]
    name = rec["dictionary"]
    return {
        "modelId": ids.model_id, "layer": ids.layers[name], "index": str(rec["index"]),
        "creatorId": ids.creator_id, "createdAt": ids.created,
        "maxActApprox": rec["stats"]["max"], "hasVector": False, "vector": [], "vectorLabel": None,
        "hookName": ids.hooks[name], "sourceSetName": ids.source_sets[name],
        "topkCosSimIndices": [int(i) for i, _ in nearest], "topkCosSimValues": [v for _, v in nearest],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
        "neg_str": [t for t, _ in vp["bottom"]], "neg_values": [v for _, v in vp["bottom"]],
        "pos_str": [t for t, _ in vp["top"]], "pos_values": [v for _, v in vp["top"]],
        "frac_nonzero": rec["stats"]["density"],
        "freq_hist_data_bar_heights": list(hist["counts"]),
        "freq_hist_data_bar_values": _bin_centres(list(hist["edges"])) if hist["counts"] else [],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [],
    }


def _activation_row(rec, ex, ids, k, bin_range) -> dict:
    values = ex["acts"]
    mx = max(values) if values else 0.0
    return {
        "id": ids.row_id(rec, "act", k), "tokens": ex["tokens"], "values": values,
        "modelId": ids.model_id, "layer": ids.layers[rec["dictionary"]], "index": str(rec["index"]),
        "maxValue": mx, "maxValueTokenIndex": list(values).index(mx) if values else 0,
        "minValue": min(values) if values else 0.0,
        "creatorId": ids.creator_id, "createdAt": ids.created,
        "binMin": bin_range[0] if bin_range else None, "binMax": bin_range[1] if bin_range else None,
        "binContains": None, "qualifyingTokenIndex": ex["max_pos"],
        "dataIndex": str(ex["context"]), "dataSource": None,
        "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None, "lossValues": [], "logitContributions": None,
    }


def neuronpedia_activations(rec: Mapping, ids: NeuronpediaIds) -> Iterator[dict]:
    """The Neuronpedia `activations` rows of one record: its top examples, then each quantile bin's."""
    k = 0
    for ex in rec["examples"]["top"]:
        yield _activation_row(rec, ex, ids, k, None)
        k += 1
    for bin_ in rec["examples"]["quantiles"]:
        maxes = [max(ex["acts"]) for ex in bin_ if ex["acts"]]
        rng = (min(maxes), max(maxes)) if maxes else None
        for ex in bin_:
            yield _activation_row(rec, ex, ids, k, rng)
            k += 1


def neuronpedia_explanations(rec: Mapping, ids: NeuronpediaIds) -> Iterator[dict]:
    """The Neuronpedia `explanations` rows of one record: one per description."""
    for k, d in enumerate(rec["descriptions"]):
        yield {"id": ids.row_id(rec, "expl", k), "modelId": ids.model_id, "layer": ids.layers[rec["dictionary"]],
               "index": str(rec["index"]), "description": d["text"],
               "typeName": f"featureatlas-{d['method']}-{d['explainer']}",
               "explanationModelName": d.get("model") or d["explainer"],
               "authorId": ids.creator_id, "createdAt": ids.created}


def neuronpedia_metadata(meta: Mapping, ids: NeuronpediaIds) -> dict[str, str]:
    """model.jsonl, sourceset.jsonl and source.jsonl (JSONL texts)."""
    model = {"id": ids.model_id, "displayName": str(meta["model_id"]), "displayNameShort": ids.model_id,
             "instruct": False, "creatorId": ids.creator_id, "createdAt": ids.created, "updatedAt": ids.created}
    sets, sources = [], []
    for d in meta["dictionaries"]:
        name = d["name"]
        sets.append({"modelId": ids.model_id, "name": ids.source_sets[name], "creatorId": ids.creator_id,
                     "description": f"featureatlas {d['kind']} {name} at {d['hook']}", "type": d["kind"],
                     "hasDashboards": True, "visibility": "PRIVATE", "createdAt": ids.created})
        sources.append({"id": ids.layers[name], "modelId": ids.model_id, "setName": ids.source_sets[name],
                        "creatorId": ids.creator_id, "hasDashboards": True, "visibility": "PRIVATE",
                        "createdAt": ids.created})
    lines = lambda rows: "".join(json_line(r) + "\n" for r in rows)  # noqa: E731
    return {"model.jsonl": lines([model]), "sourceset.jsonl": lines(sets), "source.jsonl": lines(sources)}


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------
def _asset(name: str) -> str:
    return (resources.files("featureatlas.eval") / "catalog_assets" / name).read_text(encoding="utf-8")


def render_index_html(title: str, data_dir: str) -> str:
    """index.html: the template with its CSS and script inlined, and a CSP allowing only that script (by its
    sha256) and local script files (the data), no network."""
    script = _asset("catalog.js")
    style = _asset("catalog.css")
    if re.search(r"</(script|style)", script + style, re.I):
        raise AssertionError("catalog assets must not contain a closing script/style tag")
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = (f"default-src 'none'; script-src 'sha256-{digest}' file:; style-src 'unsafe-inline'; "
           "img-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'")
    values = {"TITLE": html.escape(title), "CSP": html.escape(csp), "DATA_DIR": html.escape(data_dir),
              "STYLE": style, "SCRIPT": script}
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], _asset("index.html"))


def page_title(meta: Mapping) -> str:
    return f"featureatlas catalog: {meta['model_id']}"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
class _GzipJsonl:
    """Rotating gzip JSONL writer: batch-0.jsonl.gz, batch-1.jsonl.gz, ... one per `rotate()`."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.batch = -1
        self._f = None

    def rotate(self) -> None:
        self.close()
        self.batch += 1
        raw = open(self.dir / f"batch-{self.batch}.jsonl.gz", "wb")
        self._f = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3, mtime=0)  # 5 is 1.5x slower, 10% smaller
        self._raw = raw

    def write(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self._f.write((json_line(row) + "\n").encode())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            self._f = None


def _shard_text(n: int, safe_lines: list[str]) -> str:
    """data/<build>/shard-NNNN.js: featureAtlasShard(n, [records]) from records already in `js_safe_json` form."""
    return f"featureAtlasShard({n},[" + ",".join(safe_lines) + "]);\n"


def _new_build() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _check_record_in_meta(rec: Mapping, dicts: Mapping[str, Mapping], seen: set) -> None:
    name = rec["dictionary"]
    if name not in dicts:
        raise SchemaError(f"feature record {rec['id']!r}: dictionary {name!r} is not in the catalog metadata "
                          f"(known: {', '.join(dicts)}); add it to meta['dictionaries']")
    n = dicts[name]["n_features"]
    if rec["index"] >= n:
        raise SchemaError(f"feature record {rec['id']!r}: index {rec['index']} is out of range for dictionary "
                          f"{name!r} with {n} features; use an index in 0..{n - 1}")
    if rec["hook"] != dicts[name]["hook"]:
        raise SchemaError(f"feature record {rec['id']!r}: hook {rec['hook']!r} differs from dictionary {name!r}'s "
                          f"hook {dicts[name]['hook']!r}; fix the record or the metadata")
    if rec["id"] in seen:
        raise SchemaError(f"feature record {rec['id']!r} appears twice; give each feature one record")
    seen.add(rec["id"])


def write_catalog(out_dir: str | os.PathLike, records: Iterable[Mapping], meta: Mapping, *,
                  shard_size: int = SHARD_SIZE, np_batch_size: int = NP_BATCH_SIZE) -> CatalogResult:
    """Write the catalog of `records` (feature dicts, see featureatlas.eval.schema) into `out_dir`.

    records: consumed once, streaming; each is validated (a bad one raises SchemaError naming the record and
      field, and the previous catalog in `out_dir` stays as it was).
    meta: {model_id, dictionaries: [{name, kind, hook, n_features, hook_out?, path?}], store?: {path,
      fingerprint}, created?, neuronpedia?: {model_id, creator_id, source_sets}} (schema.validate_meta).
    shard_size: features per data/<build>/shard-NNNN.js file. np_batch_size: features per Neuronpedia batch file.
    Files other than the catalog's own in `out_dir` (e.g. a run manifest) are left alone.
    """
    out = Path(out_dir)
    validate_meta(meta)
    for name, v in (("shard_size", shard_size), ("np_batch_size", np_batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SchemaError(f"{name} must be a positive integer, got {v!r}")
    check_output_path(out, "catalog directory")
    dicts = {d["name"]: d for d in meta["dictionaries"]}
    created = str(meta.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    ids = NeuronpediaIds.from_meta(meta, created)

    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    recover_catalog(out)
    build = _new_build()
    stage = out / f"{STAGING_PREFIX}{build}"
    stage.mkdir()
    np_dirs: dict[str, _GzipJsonl] = {}
    try:
        (stage / DATA).mkdir()
        np_dirs = {k: _GzipJsonl(stage / NEURONPEDIA / k) for k in ("features", "activations", "explanations")}
        rows, shard, seen, score_methods = [], [], set(), set()
        n = n_dead = n_shards = 0
        with open(stage / FEATURES, "w", encoding="utf-8") as features:
            for rec in records:
                validate_record(rec)
                _check_record_in_meta(rec, dicts, seen)
                line = json_line(rec)
                features.write(line + "\n")
                if n % np_batch_size == 0:
                    for w in np_dirs.values():
                        w.rotate()
                np_dirs["features"].write([neuronpedia_feature(rec, ids)])
                np_dirs["activations"].write(neuronpedia_activations(rec, ids))
                np_dirs["explanations"].write(neuronpedia_explanations(rec, ids))
                rows.append(summary_row(rec, n_shards))
                score_methods.update(rows[-1]["sc"])
                shard.append(js_safe_json(line))  # the record's text, not the record: one encode
                n += 1
                n_dead += bool(rec["dead"])
                if len(shard) == shard_size:
                    atomic_write(stage / DATA / f"shard-{n_shards:04d}.js", _shard_text(n_shards, shard))
                    shard, n_shards = [], n_shards + 1
            features.flush()
            os.fsync(features.fileno())
        if shard:
            atomic_write(stage / DATA / f"shard-{n_shards:04d}.js", _shard_text(n_shards, shard))
            n_shards += 1
        del shard
        for w in np_dirs.values():
            w.close()
        if n == 0:
            raise SchemaError("no feature records to catalog; describe at least one feature first")
        for name, text in neuronpedia_metadata(meta, ids).items():
            atomic_write(stage / NEURONPEDIA / name, text)

        catalog = {k: v for k, v in meta.items() if k not in ("n_features", "n_dead", "schema")}
        catalog.update({
            "schema": CATALOG_SCHEMA_VERSION, "features_schema": SCHEMA_VERSION, "created": created,
            "n_features": n, "n_dead": n_dead, "build": build, "shard_size": shard_size, "n_shards": n_shards,
            "score_methods": sorted(score_methods),
            "files": {"features": FEATURES, "index_html": INDEX_HTML, "data": f"{DATA}/{build}",
                      "neuronpedia": NEURONPEDIA},
            "neuronpedia_ids": {"model_id": ids.model_id, "layers": ids.layers, "source_sets": ids.source_sets},
        })
        page_meta = {k: catalog[k] for k in ("model_id", "dictionaries", "n_features", "n_dead", "created",
                                              "score_methods", "shard_size", "n_shards", "build")}
        page_meta["store"] = catalog.get("store")
        atomic_write(stage / DATA / "index.js", js_callback("featureAtlasIndex", {"meta": page_meta, "rows": rows}))
        del rows
        index_html = render_index_html(page_title(meta), f"{DATA}/{build}")
        catalog_text = json.dumps(catalog, indent=2, sort_keys=True, default=_jsonable) + "\n"
        fsync_dir(stage / DATA)

        # Visible from here on: the data folder under its new name (nothing refers to it yet) ...
        (out / DATA).mkdir(exist_ok=True)
        os.rename(stage / DATA, out / DATA / build)
        fsync_dir(out / DATA)
    except BaseException:
        for w in np_dirs.values():
            with contextlib.suppress(Exception):
                w.close()
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(out / DATA / build, ignore_errors=True)
        if created_out:
            shutil.rmtree(out, ignore_errors=True)  # we made it, so all of it is ours
        raise

    # ... then the commit point: the three top-level files together ...
    staged_features = stage / FEATURES
    publish_files(out, {FEATURES: lambda tmp: os.replace(staged_features, tmp),
                        CATALOG: catalog_text, INDEX_HTML: index_html})
    # ... then the idempotent roll-forward: neuronpedia/ swapped in, old data folders removed.
    recover_catalog(out)
    return CatalogResult(out, out / INDEX_HTML, out / FEATURES, out / CATALOG, out / NEURONPEDIA, build,
                         n, n_dead, n_shards)


def recover_catalog(out_dir: str | os.PathLike) -> None:
    """Finish or undo an interrupted `write_catalog` in `out_dir` (idempotent; cheap when nothing is pending).

    Before the commit (catalog.json names another build, or none): the staging folder and the new data folder
    are removed. After it: the staged neuronpedia/ folder replaces the old one, then leftovers are removed.
    """
    out = Path(out_dir)
    if not out.is_dir() or not os.access(out, os.W_OK):
        return  # a read-only copy (e.g. a published catalog) is read as it is
    recover_publish(out)
    build = None
    if (out / CATALOG).exists():
        with contextlib.suppress(ValueError, OSError):
            build = read_json(out / CATALOG).get("build")
    committed = out / f"{STAGING_PREFIX}{build}" if build else None
    if committed is not None and committed.is_dir():
        new_np, old_np = committed / NEURONPEDIA, committed / f"{NEURONPEDIA}.old"
        if new_np.is_dir():
            if (out / NEURONPEDIA).exists():
                os.rename(out / NEURONPEDIA, old_np)
            os.rename(new_np, out / NEURONPEDIA)
            fsync_dir(out)
    for stale in out.glob(f"{STAGING_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    if (out / DATA).is_dir():  # no committed build: every build folder is a leftover
        for old in (out / DATA).iterdir():
            if old.is_dir() and old.name != build and _BUILD_RE.match(old.name):
                shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def load_catalog(out_dir: str | os.PathLike) -> dict:
    """catalog.json of the catalog in `out_dir` (after finishing any interrupted write)."""
    out = Path(out_dir)
    if not (out / CATALOG).exists() and not (out / ".publish.json").exists():
        raise SchemaError(f"{out} holds no catalog ({CATALOG} missing); write one with `featureatlas catalog`")
    recover_catalog(out)
    return read_json(out / CATALOG)


def read_features(path: str | os.PathLike, *, validate: bool = True) -> Iterator[dict]:
    """The records of a features.jsonl file (or of the catalog directory holding one), one at a time."""
    path = Path(path)
    if path.is_dir():
        recover_catalog(path)
        path = path / FEATURES
    if not path.exists():
        raise SchemaError(f"{path} does not exist; point at a catalog directory or its {FEATURES}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise SchemaError(f"{path}:{lineno} is not valid JSON ({e}); regenerate the catalog") from None
            yield validate_record(rec) if validate else rec


__all__ = ["CatalogResult", "NeuronpediaIds", "js_callback", "js_literal", "js_safe_json", "load_catalog", "neuronpedia_activations",
           "neuronpedia_explanations", "neuronpedia_feature", "parse_js_callback", "read_features",
           "recover_catalog", "render_index_html", "summary_row", "write_catalog"]
