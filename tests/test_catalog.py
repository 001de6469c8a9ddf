"""The catalog: features.jsonl schema, JSONL round trip, data shards, Neuronpedia export, crash safety,
and the page itself in headless Chromium from file:// (rendering, and no injection from corpus strings)."""
from __future__ import annotations

import copy
import gzip
import html
import html.parser
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from featureatlas.activation_store.errors import FeatureAtlasError
from featureatlas.eval import catalog as cat
from featureatlas.eval.catalog import load_catalog, parse_js_callback, read_features, write_catalog
from featureatlas.eval.schema import SCHEMA_VERSION, SchemaError, validate_meta, validate_record

SCRIPT_TOKEN = "</script><script>document.title='pwned'</script>"
ATTR_TOKEN = "\" onmouseover=\"document.title='x'"
IMG_DESC = "<img src=x onerror=\"document.title='desc'\"> quotes & ampersands \u2028 line sep"
TITLE = "featureatlas catalog: HuggingFaceTB/SmolLM2-135M"


# ---------------------------------------------------------------------------------------------
# Synthetic catalog: 3 features, one dead, one carrying hostile strings
# ---------------------------------------------------------------------------------------------
def example(context, tokens, acts, start=0):
    return {"context": context, "start": start, "tokens": list(tokens), "acts": list(acts),
            "max_pos": max(range(len(acts)), key=lambda i: acts[i])}


def hist(counts):
    edges = [0.01 * 2 ** (i / 2) for i in range(len(counts) + 1)]
    return {"edges": edges, "counts": counts}


def base_record(index, **over):
    rec = {
        "schema": SCHEMA_VERSION, "id": f"sae-topk/{index}", "dictionary": "sae-topk", "index": index,
        "hook": "resid_post.3", "dead": False,
        "stats": {"density": 0.0125, "max": 7.5, "mean": 0.05, "mean_active": 2.25, "n_tokens": 4096,
                  "hist": hist([0, 3, 9, 14, 11, 6, 2, 1])},
        "examples": {
            "top": [example(12, ["The", " cat", " sat", " on", " the", " mat"], [0.0, 7.5, 1.25, 0.0, 0.0, 0.5], 4),
                    example(40, ["A", " cat", "nip", " toy"], [0.0, 6.0, 2.5, 0.0])],
            "quantiles": [[example(7, ["my", " kitten"], [0.0, 0.75])],
                          [example(9, ["two", " cats", "!"], [0.0, 3.5, 0.0]),
                           example(11, ["cat", "alog"], [4.25, 0.0])]],
            "random": [example(3, ["the", " weather", " today"], [0.0, 0.0, 0.0])],
        },
        "vocab_proj": {"top": [[" cats", 3.25], [" kitten", 2.75], [" feline", 2.5]],
                       "bottom": [[" dog", -2.0], [" bark", -1.5]]},
        "token_change": {"clamp": 10.0,
                         "pos": {"up": [[" meow", 1.25], [" purr", 0.75]], "down": [[" woof", -0.5]]},
                         "neg": {"up": [[" woof", 0.5]], "down": [[" meow", -1.0]]}},
        "weights": {"norm": 1.0, "null_space_frac": 0.0625, "unigram_alignment": 0.125,
                    "nearest": [[2, 0.625], [1, 0.25]]},
        "cooccurrence": [[2, 17]],
        "descriptions": [
            {"text": "the word cat and cat-like animals", "method": "maxact", "explainer": "template", "model": "",
             "prompt_method": "maxact-v1", "evidence": {"n_examples": 2, "split": "explain"}, "seconds": 0.0,
             "tokens_in": 0, "tokens_out": 0, "sample": 0},
            {"text": "promotes cat words", "method": "vocabproj", "explainer": "local",
             "model": "smollm2-135m-instruct", "prompt_method": "vocabproj-v1", "evidence": {"n_tokens": 50},
             "seconds": 0.75, "tokens_in": 212, "tokens_out": 9, "sample": 0}],
        "scores": [{"method": "detection", "value": 0.75, "judge": "embedding", "n": 40, "ci": [0.625, 0.875],
                    "failed": 0}],
    }
    rec.update(over)
    return rec


def dead_record(index):
    return base_record(index, dead=True, vocab_proj=None, token_change=None, cooccurrence=None,
                       stats={"density": 0.0, "max": 0.0, "mean": 0.0, "mean_active": 0.0, "n_tokens": 4096,
                              "hist": hist([0] * 8)},
                       examples={"top": [], "quantiles": [[], []], "random": []},
                       weights={"norm": 0.5, "nearest": [[0, 0.25]]}, descriptions=[], scores=[])


def hostile_record(index):
    rec = base_record(index)
    rec["examples"]["top"] = [
        example(21, ["Hello", SCRIPT_TOKEN, ATTR_TOKEN, " world", "\n", "&amp;"], [0.0, 5.0, 2.5, 0.0, 0.25, 1.0]),
        example(22, ["x", ATTR_TOKEN], [0.0, 4.0])]
    rec["vocab_proj"] = {"top": [[SCRIPT_TOKEN, 2.0], ["<b>bold</b>", 1.5]], "bottom": [[ATTR_TOKEN, -1.0]]}
    rec["descriptions"] = [dict(rec["descriptions"][0], text=IMG_DESC)]
    rec["weights"]["nearest"] = [[0, 0.625]]
    rec["cooccurrence"] = [[0, 17]]
    return rec


def records():
    return [base_record(0), dead_record(1), hostile_record(2)]


META = {"model_id": "HuggingFaceTB/SmolLM2-135M", "store": {"path": "store.h5", "fingerprint": "abc123"},
        "dictionaries": [{"name": "sae-topk", "kind": "sae", "hook": "resid_post.3", "hook_out": None,
                          "n_features": 3, "path": "saes/topk"}],
        "created": "2025-01-01T00:00:00+0000"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog")
    return write_catalog(out, iter(records()), META, shard_size=2, np_batch_size=2)


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.pop("stats"), "stats is missing"),
    (lambda r: r["stats"].__setitem__("density", 1.5), "stats.density"),
    (lambda r: r["stats"].__setitem__("max", float("nan")), "stats.max"),
    (lambda r: r.__setitem__("desription", []), "did you mean 'descriptions'"),
    (lambda r: r.__setitem__("id", "sae-topk/9"), "field id"),
    (lambda r: r.__setitem__("index", -1), "field index"),
    (lambda r: r.__setitem__("dead", "no"), "field dead"),
    (lambda r: r.__setitem__("schema", "featureatlas-features/0"), "field schema"),
    (lambda r: r["examples"]["top"][1]["acts"].pop(), "examples.top[1].acts"),
    (lambda r: r["examples"]["top"][0]["acts"].__setitem__(2, math.inf), "examples.top[0].acts[2]"),
    (lambda r: r["examples"]["top"][0]["tokens"].__setitem__(1, 5), "examples.top[0].tokens[1]"),
    (lambda r: r["examples"]["quantiles"][1][0].__setitem__("max_pos", 3), "examples.quantiles[1][0].max_pos"),
    (lambda r: r["stats"]["hist"]["edges"].pop(), "stats.hist.edges"),
    (lambda r: r["descriptions"][1].__setitem__("method", "magic"), "descriptions[1].method"),
    (lambda r: r["descriptions"][0].__setitem__("explainer", "gpt"), "descriptions[0].explainer"),
    (lambda r: r["vocab_proj"]["top"].append([" x"]), "vocab_proj.top[3]"),
    (lambda r: r["token_change"]["neg"].pop("up"), "token_change.neg.up is missing"),
    (lambda r: r["weights"].__setitem__("nearst", []), "weights.nearst"),
    (lambda r: r["scores"][0].__setitem__("ci", [0.1]), "scores[0].ci"),
])
def test_validate_record_names_the_bad_field(mutate, field):
    rec = base_record(0)
    validate_record(rec)
    mutate(rec)
    with pytest.raises(SchemaError, match="feature record") as e:
        validate_record(rec)
    assert field in str(e.value)
    assert isinstance(e.value, FeatureAtlasError) and isinstance(e.value, ValueError)


def test_validate_accepts_all_three_and_numpy_values():
    np = pytest.importorskip("numpy")
    for rec in records():
        assert validate_record(rec) is rec
    rec = base_record(0)
    rec["stats"]["max"] = np.float32(7.5)
    rec["index"] = np.int64(0)
    validate_record(rec)
    assert json.loads(cat.json_line(rec))["stats"]["max"] == 7.5


def test_meta_and_catalog_level_errors_leave_nothing(tmp_path):
    bad = copy.deepcopy(META)
    bad["dictionaries"][0]["kind"] = "autoencoder"
    with pytest.raises(SchemaError, match=r"dictionaries\[0\].kind"):
        validate_meta(bad)
    out = tmp_path / "c"
    cases = [
        ([base_record(0), base_record(0)], "appears twice"),
        ([base_record(0), base_record(5, id="sae-topk/5")], "out of range"),
        ([base_record(0, dictionary="snmf", id="snmf/0")], "not in the catalog metadata"),
        ([base_record(0, hook="resid_post.4")], "differs from dictionary"),
        ([], "no feature records"),
    ]
    for recs, msg in cases:
        with pytest.raises(SchemaError, match=msg):
            write_catalog(out, iter(recs), META)
        assert not out.exists(), msg  # a new directory is removed again, nothing half-written


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def test_jsonl_round_trip_and_catalog_json(built):
    got = list(read_features(built.out_dir))
    assert got == json.loads(json.dumps(records()))
    lines = built.features_jsonl.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["schema"] == SCHEMA_VERSION for line in lines)
    meta = load_catalog(built.out_dir)
    assert meta["n_features"] == 3 and meta["n_dead"] == 1 and meta["n_shards"] == 2
    assert meta["schema"] == "featureatlas-catalog/1" and meta["features_schema"] == SCHEMA_VERSION
    assert meta["score_methods"] == ["detection"] and meta["build"] == built.build
    assert meta["dictionaries"] == META["dictionaries"] and meta["store"] == META["store"]
    assert not list(built.out_dir.glob(".catalog-*")) and not list(built.out_dir.glob(".*.tmp"))


def test_shards_parse_back_to_the_records(built):
    data = built.out_dir / "data" / built.build
    shards = sorted(data.glob("shard-*.js"))
    assert [p.name for p in shards] == ["shard-0000.js", "shard-0001.js"]
    got = []
    for n, p in enumerate(shards):
        text = p.read_text()
        assert text.isascii()
        for bad in ("<", ">", "&", "\u2028", "\u2029"):
            assert bad not in text, bad  # written as \u003c, \u003e, \u0026, \u2028, \u2029
        num, recs = parse_js_callback(text, "featureAtlasShard")
        assert num == n
        got += recs
    assert got == json.loads(json.dumps(records()))
    (index,) = parse_js_callback((data / "index.js").read_text(), "featureAtlasIndex")
    rows = index["rows"]
    assert [r["id"] for r in rows] == ["sae-topk/0", "sae-topk/1", "sae-topk/2"]
    assert [r["s"] for r in rows] == [0, 0, 1] and [r["dead"] for r in rows] == [False, True, False]
    assert rows[0]["sc"] == {"detection": 0.75} and rows[0]["desc"][0] == "the word cat and cat-like animals"
    assert rows[2]["desc"] == [IMG_DESC] and index["meta"]["n_features"] == 3


def test_js_literal_escapes():
    obj = {"t": SCRIPT_TOKEN + "&\u2028\u2029é😀", "x": [1.5, -2, None, True]}
    text = cat.js_literal(obj)
    assert "<" not in text and ">" not in text and "&" not in text and text.isascii()
    assert json.loads(text) == obj
    assert cat.js_safe_json(cat.json_line(obj)) == text  # the shards' one-encode path writes the same text
    assert "\u2028" not in cat.json_line(obj) and json.loads(cat.json_line(obj)) == obj


def _gz_rows(path: Path) -> list[dict]:
    rows = []
    for f in sorted(path.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as g:
            rows += [json.loads(line) for line in g if line.strip()]
    return rows


def test_neuronpedia_export(built):
    np_dir = built.neuronpedia_dir
    assert sorted(p.name for p in (np_dir / "features").iterdir()) == ["batch-0.jsonl.gz", "batch-1.jsonl.gz"]
    feats = _gz_rows(np_dir / "features")
    assert [f["index"] for f in feats] == ["0", "1", "2"]
    f0 = feats[0]
    for key in ("modelId", "layer", "index", "hookName", "sourceSetName", "maxActApprox", "frac_nonzero", "pos_str",
                "pos_values", "neg_str", "neg_values", "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
                "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "topkCosSimIndices",
                "topkCosSimValues", "neuron_alignment_indices", "correlated_features_indices", "creatorId",
                "createdAt", "hasVector", "vector", "decoder_weights_dist"):
        assert key in f0, key
    assert f0["modelId"] == "smollm2-135m" and f0["layer"] == "3-sae-topk" and f0["sourceSetName"] == "sae-topk"
    assert f0["hookName"] == "blocks.3.hook_resid_post"
    assert f0["maxActApprox"] == 7.5 and f0["frac_nonzero"] == 0.0125
    assert f0["pos_str"] == [" cats", " kitten", " feline"] and f0["pos_values"] == [3.25, 2.75, 2.5]
    assert f0["neg_str"] == [" dog", " bark"] and f0["neg_values"] == [-2.0, -1.5]
    assert f0["freq_hist_data_bar_heights"] == [0, 3, 9, 14, 11, 6, 2, 1]
    e = hist([0] * 8)["edges"]
    assert f0["freq_hist_data_bar_values"] == pytest.approx([math.sqrt(a * b) for a, b in zip(e[:-1], e[1:])])
    assert f0["topkCosSimIndices"] == [2, 1] and f0["topkCosSimValues"] == [0.625, 0.25]
    assert feats[1]["frac_nonzero"] == 0.0 and feats[1]["pos_str"] == []

    acts = _gz_rows(np_dir / "activations")
    assert len(acts) == 5 + 0 + 5  # top 2 + quantile 3 per live feature; dead: none
    a0 = acts[0]
    for key in ("id", "tokens", "values", "maxValue", "maxValueTokenIndex", "minValue", "binMin", "binMax",
                "binContains", "modelId", "layer", "index", "qualifyingTokenIndex", "dataIndex", "creatorId",
                "dfaValues", "lossValues"):
        assert key in a0, key
    assert a0["tokens"] == ["The", " cat", " sat", " on", " the", " mat"]
    assert a0["values"] == [0.0, 7.5, 1.25, 0.0, 0.0, 0.5]
    assert (a0["maxValue"], a0["maxValueTokenIndex"], a0["minValue"]) == (7.5, 1, 0.0)
    assert a0["binMin"] is None and a0["dataIndex"] == "12" and a0["index"] == "0"
    q = [a for a in acts if a["index"] == "0" and a["binMin"] is not None]
    assert [(a["binMin"], a["binMax"]) for a in q] == [(0.75, 0.75), (3.5, 4.25), (3.5, 4.25)]
    assert acts[5]["tokens"][1] == SCRIPT_TOKEN and len({a["id"] for a in acts}) == len(acts)

    expl = _gz_rows(np_dir / "explanations")
    assert [(x["index"], x["description"]) for x in expl] == [
        ("0", "the word cat and cat-like animals"), ("0", "promotes cat words"), ("2", IMG_DESC)]
    assert expl[0]["typeName"] == "featureatlas-maxact-template" and expl[0]["explanationModelName"] == "template"
    assert expl[1]["explanationModelName"] == "smollm2-135m-instruct"
    assert all(x["modelId"] == "smollm2-135m" and x["layer"] == "3-sae-topk" for x in expl)
    sources = [json.loads(line) for line in (np_dir / "source.jsonl").read_text().splitlines()]
    assert sources[0]["id"] == "3-sae-topk" and sources[0]["setName"] == "sae-topk"


def test_failed_write_keeps_the_previous_catalog(tmp_path):
    out = tmp_path / "c"
    first = write_catalog(out, iter(records()), META, shard_size=2)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken():
        yield base_record(0)
        yield base_record(1, stats={"density": 2.0})

    with pytest.raises(SchemaError, match="stats"):
        write_catalog(out, broken(), META, shard_size=2)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not list(out.glob(".catalog-*")) and load_catalog(out)["build"] == first.build


def test_kill_after_commit_is_rolled_forward(tmp_path, monkeypatch):
    out = tmp_path / "c"
    (out).mkdir()
    (out / "run.json").write_text("{}")  # a run manifest beside the catalog is left alone
    first = write_catalog(out, iter(records()), META, shard_size=2)
    real = cat.recover_catalog
    calls = []

    def killed_after_commit(d):
        calls.append(d)
        if len(calls) == 2:  # the roll-forward step right after publish_files
            raise KeyboardInterrupt
        real(d)

    monkeypatch.setattr(cat, "recover_catalog", killed_after_commit)
    recs = records()
    recs[0]["descriptions"][0]["text"] = "second version"
    with pytest.raises(KeyboardInterrupt):
        write_catalog(out, iter(recs), META, shard_size=2)
    monkeypatch.setattr(cat, "recover_catalog", real)
    meta = json.loads((out / "catalog.json").read_text())
    assert meta["build"] != first.build  # committed
    assert (out / f".catalog-{meta['build']}" / "neuronpedia").is_dir()  # staged export not yet swapped in
    assert _gz_rows(out / "neuronpedia" / "explanations")[0]["description"] != "second version"
    real(out)
    assert _gz_rows(out / "neuronpedia" / "explanations")[0]["description"] == "second version"
    assert sorted(p.name for p in (out / "data").iterdir()) == [meta["build"]]
    assert not list(out.glob(".catalog-*")) and (out / "run.json").read_text() == "{}"
    assert next(read_features(out))["descriptions"][0]["text"] == "second version"


def test_index_html_is_self_contained(built):
    text = built.index_html.read_text()
    assert f'src="data/{built.build}/index.js"' in text
    no_ns = text.replace('"http://www.w3.org/2000/svg"', "")  # the SVG namespace name, not a resource
    assert "http://" not in no_ns and "https://" not in no_ns and "fetch(" not in text
    assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write\(|\beval\(", text)
    assert "Content-Security-Policy" in text and "connect-src 'none'" in html.unescape(text)
    assert "<title>featureatlas catalog: HuggingFaceTB/SmolLM2-135M</title>" in text


# ---------------------------------------------------------------------------------------------
# The page in headless Chromium
# ---------------------------------------------------------------------------------------------
def chromium_binary() -> str:
    """Path of Chromium, installing Debian's package when absent (skips when that is impossible)."""
    for name in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if name and os.path.exists(name):
            return name
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it needs root (apt-get install -y chromium)")
    try:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, capture_output=True, timeout=1200,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"could not install chromium with apt-get ({e}); install it to run the browser test")
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("apt-get install chromium did not provide /usr/bin/chromium")
    return "/usr/bin/chromium"


def run_chromium(binary: str, url: str, tmp: Path, *extra: str) -> str:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--virtual-time-budget=5000", *extra, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class DomScan(html.parser.HTMLParser):
    """Collects what the injection checks need from a dumped DOM."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.stack: list[str] = []
        self.attrs: list[tuple[str, dict]] = []
        self.script_text = ""
        self.token_texts: list[str] = []
        self.cell_texts: list[str] = []
        self._tok = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs.append((tag, a))
        if tag not in ("br", "meta", "link", "input", "img"):
            self.stack.append(tag)
        self._tok = "" if tag == "span" and "tok" in (a.get("class") or "").split() else self._tok
        self._cell = "" if tag == "td" and "tokcell" in (a.get("class") or "") else getattr(self, "_cell", None)

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()
        if tag == "span" and self._tok is not None:
            self.token_texts.append(self._tok)
            self._tok = None
        if tag == "td" and getattr(self, "_cell", None) is not None:
            self.cell_texts.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        top = self.stack[-1] if self.stack else ""
        if top == "title" and "head" in self.stack:  # the document's title, not an SVG <title>
            self.title += data
        if top == "script":
            self.script_text += data
        if self._tok is not None:
            self._tok += data
        if getattr(self, "_cell", None) is not None:
            self._cell += data


def scan(dom: str) -> DomScan:
    s = DomScan()
    s.feed(dom)
    return s


def test_page_in_headless_chromium(built, tmp_path):
    chrome = chromium_binary()
    url = built.index_html.resolve().as_uri()

    # The hostile feature: every corpus/model string shows as text, nothing runs.
    dom = run_chromium(chrome, url + "#f=sae-topk/2", tmp_path, "--dump-dom")
    s = scan(dom)
    assert 'id="feature"' in dom and 'data-id="sae-topk/2"' in dom, dom[-3000:]
    assert s.title == TITLE  # no injected script changed it
    assert SCRIPT_TOKEN in s.token_texts and ATTR_TOKEN in s.token_texts
    assert SCRIPT_TOKEN in s.cell_texts and "<b>bold</b>" in s.cell_texts  # VocabProj table
    assert "&lt;/script&gt;&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom
    assert "&lt;img src=x onerror=\"document.title='desc'\"&gt;" in dom  # the description, as text
    for tag, attrs in s.attrs:
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        assert tag not in ("img", "b"), (tag, attrs)
    assert "pwned" not in s.script_text and "document.title='x'" not in s.script_text
    assert s.token_texts.count("\u21b5") == 1  # the newline token, made visible
    titles = [a.get("title", "") for t, a in s.attrs if t == "span"]
    assert any(t.startswith(json.dumps(SCRIPT_TOKEN)) and "activation 5" in t for t in titles), titles[:5]

    # A normal feature page: examples, tables, histogram; and a screenshot of it.
    shot = tmp_path / "shot.png"
    dom = run_chromium(chrome, url + "#f=sae-topk%2F0", tmp_path, "--dump-dom")
    s = scan(dom)
    for section in ("descriptions", "examples-top", "examples-quantiles", "examples-random", "vocab-proj",
                    "vocab-proj-bottom", "token-change-pos-up", "token-change-neg-down", "histogram", "weights",
                    "nearest", "scores"):
        assert f'id="{section}"' in dom, section
    assert " sat" in s.token_texts and " cats" in s.cell_texts and " meow" in s.cell_texts
    assert "the word cat and cat-like animals" in dom and "smollm2-135m-instruct" in dom
    assert dom.count('class="bar"') == 7  # 7 non-empty histogram bins
    assert 'href="#f=sae-topk%2F2"' in dom  # nearest feature as a link
    tok_titles = [a["title"] for t, a in s.attrs if t == "span" and "title" in a]
    assert any("activation 7.5" in t for t in tok_titles)
    backgrounds = [a.get("style", "") for t, a in s.attrs if t == "span" and "tok" in a.get("class", "")]
    assert any("rgba(255, 128, 0" in b for b in backgrounds)
    run_chromium(chrome, url + "#f=sae-topk%2F0", tmp_path, f"--screenshot={shot}", "--window-size=1280,1600")
    assert shot.exists() and shot.stat().st_size > 10_000

    # The list view: live and dead features apart, one page of rows; search, filters, sort and paging
    # (the list's state is in the hash, so a URL drives it).
    def list_rows(fragment=""):
        dom = run_chromium(chrome, url + fragment, tmp_path, "--dump-dom")
        s = scan(dom)
        assert s.title == TITLE
        return [a["data-id"] for t, a in s.attrs if t == "tr" and "data-id" in a], dom

    rows, dom = list_rows()
    assert rows == ["sae-topk/0", "sae-topk/2"]
    assert "Live features (2)" in dom and "Dead features (1)" in dom and "page 1 of 1" in dom
    assert list_rows("#list?tab=dead")[0] == ["sae-topk/1"]
    assert list_rows("#list?q=ampersands")[0] == ["sae-topk/2"]  # description text search
    assert list_rows("#list?q=CAT%20words")[0] == ["sae-topk/0"]  # all terms, any description, any case
    assert list_rows("#list?sort=-x")[0] == ["sae-topk/2", "sae-topk/0"]
    assert list_rows("#list?den0=1.3")[0] == []  # density in percent
    assert list_rows("#list?den0=1&den1=1.3&max0=7.5&max1=8&sm=detection&s0=0.7&s1=0.8")[0] == rows
    rows, dom = list_rows("#list?n=1&page=2")
    assert rows == ["sae-topk/2"] and "page 2 of 2" in dom
