/* featureatlas catalog page (inlined into index.html by featureatlas.eval.catalog).

   Data: data/<build>/index.js calls featureAtlasIndex({meta, rows}) with one summary row per feature;
   data/<build>/shard-NNNN.js calls featureAtlasShard(N, [records]) with the full records of one shard.
   Both are loaded with <script> elements, which browsers allow on file:// (fetch of local files is not).

   Safety: every string from the corpus or a model goes into the page through textContent, createTextNode
   or setAttribute (never innerHTML, never a constructed HTML string), so a token like "<script>" or
   '" onmouseover=' is shown as text. The page never changes document.title. */
(function () {
  "use strict";

  var DATA = document.querySelector('meta[name="featureatlas-data"]').getAttribute("content");
  var SVGNS = "http://www.w3.org/2000/svg";
  var PAGE_SIZES = [25, 50, 100, 250];

  var S = {
    meta: null, rows: [], byId: Object.create(null), dicts: Object.create(null),
    shards: Object.create(null), waiting: Object.create(null), failed: Object.create(null),
    tab: "live", page: 0, pageSize: 50, sortKey: "x", sortDir: 1,
    f: { q: "", dict: "", denMin: "", denMax: "", maxMin: "", maxMax: "", scoreMethod: "", scoreMin: "", scoreMax: "" },
    filtered: null, listNode: null, scrollY: 0
  };

  // ------------------------------------------------------------------------------------------
  // DOM helpers: the only way this page creates nodes
  // ------------------------------------------------------------------------------------------
  function el(tag, props, children) {
    var e = document.createElement(tag);
    if (props) {
      Object.keys(props).forEach(function (k) {
        var v = props[k];
        if (v === undefined || v === null) return;
        if (k === "text") e.textContent = String(v);
        else if (k === "cls") e.className = v;
        else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), v);
        else e.setAttribute(k, String(v));
      });
    }
    append(e, children);
    return e;
  }
  function append(parent, children) {
    if (children === undefined || children === null) return parent;
    if (!Array.isArray(children)) children = [children];
    children.forEach(function (c) {
      if (c === undefined || c === null || c === false) return;
      parent.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    });
    return parent;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function app() { return document.getElementById("app"); }

  // ------------------------------------------------------------------------------------------
  // Formatting
  // ------------------------------------------------------------------------------------------
  function fmt(v, digits) {
    if (v === undefined || v === null || v === "") return "\u2013";
    if (typeof v !== "number") return String(v);
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
    var s = v.toPrecision(digits || 4);
    return s.indexOf(".") >= 0 && s.indexOf("e") < 0 ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
  }
  function pct(v) { return v === null || v === undefined ? "\u2013" : fmt(100 * v, 3) + "%"; }
  /* A token as shown inline: whitespace kept (white-space: pre), line breaks and tabs made visible. */
  function visible(tok) {
    return String(tok).replace(/\r\n|\n|\r/g, "\u21b5").replace(/\t/g, "\u21e5") || "\u2205";
  }
  function featureHref(id) { return "#f=" + encodeURIComponent(id); }
  function pad4(n) { var s = String(n); while (s.length < 4) s = "0" + s; return s; }

  // ------------------------------------------------------------------------------------------
  // Data loading (script elements + global callbacks)
  // ------------------------------------------------------------------------------------------
  window.featureAtlasIndex = function (data) {
    S.meta = data.meta;
    S.rows = data.rows;
    S.rows.forEach(function (r, i) { r.pos = i; S.byId[r.id] = r; });
    (S.meta.dictionaries || []).forEach(function (d) { S.dicts[d.name] = d; });
    if (S.meta.score_methods && S.meta.score_methods.length) S.f.scoreMethod = S.meta.score_methods[0];
    var live = S.rows.filter(function (r) { return !r.dead; }).length;
    document.getElementById("summary").textContent =
      S.meta.model_id + " \u00b7 " + S.rows.length + " features (" + live + " live, " + (S.rows.length - live) +
      " dead) \u00b7 " + (S.meta.dictionaries || []).map(function (d) { return d.name; }).join(", ");
    route();
  };

  window.featureAtlasShard = function (n, records) {
    var map = Object.create(null);
    records.forEach(function (r) { map[r.id] = r; });
    S.shards[n] = map;
    var cbs = S.waiting[n] || [];
    delete S.waiting[n];
    cbs.forEach(function (cb) { cb(); });
  };

  function loadShard(n, cb) {
    if (S.shards[n]) { cb(); return; }
    if (S.waiting[n]) { S.waiting[n].push(cb); return; }
    S.waiting[n] = [cb];
    var s = document.createElement("script");
    s.src = DATA + "/shard-" + pad4(n) + ".js";
    s.onerror = function () {
      S.failed[n] = true;
      delete S.waiting[n];
      clear(app()).appendChild(el("p", { cls: "error", text: "Could not load " + s.src +
        ": the catalog's data folder is incomplete. Regenerate the catalog." }));
    };
    document.head.appendChild(s);
  }

  // ------------------------------------------------------------------------------------------
  // Routing: #f=<id> shows a feature, anything else the list
  // ------------------------------------------------------------------------------------------
  function route() {
    if (!S.meta) return;
    var h = location.hash || "";
    if (h.indexOf("#f=") === 0) {
      var id;
      try { id = decodeURIComponent(h.slice(3)); } catch (e) { id = h.slice(3); }
      showFeature(id);
    } else {
      if (h.indexOf("#list?") === 0 && applyListParams(h.slice(6))) S.listNode = null;
      showList();
    }
  }
  window.addEventListener("hashchange", route);

  /* The list's state lives in the hash (#list?q=cat&tab=dead&sort=-max&page=2...), so links and the back
     button keep it. Written with history.replaceState: typing does not add history entries. */
  var PARAMS = { q: "q", dict: "dict", denMin: "den0", denMax: "den1", maxMin: "max0", maxMax: "max1",
                 scoreMethod: "sm", scoreMin: "s0", scoreMax: "s1" };
  function listHash() {
    var p = [];
    Object.keys(PARAMS).forEach(function (k) {
      if (S.f[k] !== "" && !(k === "scoreMethod" && S.f[k] === defaultScoreMethod())) {
        p.push(PARAMS[k] + "=" + encodeURIComponent(S.f[k]));
      }
    });
    if (S.tab !== "live") p.push("tab=" + S.tab);
    if (S.sortKey !== "x" || S.sortDir !== 1) p.push("sort=" + (S.sortDir < 0 ? "-" : "") + S.sortKey);
    if (S.page) p.push("page=" + (S.page + 1));
    if (S.pageSize !== 50) p.push("n=" + S.pageSize);
    return "#list" + (p.length ? "?" + p.join("&") : "");
  }
  function defaultScoreMethod() { return (S.meta.score_methods || [])[0] || ""; }
  function saveListState() {
    var h = listHash();
    if (h === location.hash || (h === "#list" && (location.hash === "" || location.hash === "#"))) return;
    try { history.replaceState(null, "", h); } catch (e) { /* some file:// setups refuse: state stays in memory */ }
  }
  function applyListParams(query) {
    var before = listHash();
    var f = { q: "", dict: "", denMin: "", denMax: "", maxMin: "", maxMax: "", scoreMethod: defaultScoreMethod(),
              scoreMin: "", scoreMax: "" };
    var tab = "live", sortKey = "x", sortDir = 1, page = 0, size = 50;
    query.split("&").forEach(function (kv) {
      var i = kv.indexOf("="), k = i < 0 ? kv : kv.slice(0, i), v = "";
      try { v = i < 0 ? "" : decodeURIComponent(kv.slice(i + 1).replace(/\+/g, " ")); } catch (e) { return; }
      Object.keys(PARAMS).forEach(function (name) { if (PARAMS[name] === k) f[name] = v; });
      if (k === "tab" && (v === "live" || v === "dead")) tab = v;
      if (k === "sort" && v) {
        var key = v.replace(/^-/, "");
        if (COLUMNS.some(function (c) { return c.key === key; })) { sortKey = key; sortDir = v[0] === "-" ? -1 : 1; }
      }
      if (k === "page") page = Math.max(0, (parseInt(v, 10) || 1) - 1);
      if (k === "n") size = Math.min(1000, Math.max(1, parseInt(v, 10) || 50));
    });
    S.f = f; S.tab = tab; S.sortKey = sortKey; S.sortDir = sortDir; S.page = page; S.pageSize = size;
    S.filtered = null;
    return listHash() !== before || !S.listNode;
  }

  // ------------------------------------------------------------------------------------------
  // List view
  // ------------------------------------------------------------------------------------------
  var COLUMNS = [
    { key: "id", label: "feature" },
    { key: "d", label: "dictionary" },
    { key: "x", label: "index", num: true },
    { key: "den", label: "density", num: true, show: pct },
    { key: "max", label: "max act", num: true },
    { key: "ma", label: "mean active", num: true },
    { key: "score", label: "score", num: true },
    { key: "desc", label: "description" }
  ];

  function scoreOf(r) {
    var m = S.f.scoreMethod;
    return m && r.sc && Object.prototype.hasOwnProperty.call(r.sc, m) ? r.sc[m] : null;
  }
  function valueOf(r, key) {
    if (key === "score") return scoreOf(r);
    if (key === "desc") return r.desc.length ? r.desc[0].toLowerCase() : null;
    return r[key];
  }
  function num(s) { var v = parseFloat(s); return isNaN(v) ? null : v; }

  function applyFilters() {
    var f = S.f, q = f.q.trim().toLowerCase();
    var terms = q ? q.split(/\s+/) : [];
    var denMin = num(f.denMin), denMax = num(f.denMax), maxMin = num(f.maxMin), maxMax = num(f.maxMax);
    var scMin = num(f.scoreMin), scMax = num(f.scoreMax);
    var dead = S.tab === "dead";
    var out = S.rows.filter(function (r) {
      if (r.dead !== dead) return false;
      if (f.dict && r.d !== f.dict) return false;
      if (denMin !== null && r.den * 100 < denMin) return false;
      if (denMax !== null && r.den * 100 > denMax) return false;
      if (maxMin !== null && r.max < maxMin) return false;
      if (maxMax !== null && r.max > maxMax) return false;
      if (scMin !== null || scMax !== null) {
        var sc = scoreOf(r);
        if (sc === null) return false;
        if (scMin !== null && sc < scMin) return false;
        if (scMax !== null && sc > scMax) return false;
      }
      if (terms.length) {
        if (!r._hay) r._hay = (r.id + " " + r.desc.join(" ")).toLowerCase();
        for (var i = 0; i < terms.length; i++) if (r._hay.indexOf(terms[i]) < 0) return false;
      }
      return true;
    });
    var key = S.sortKey, dir = S.sortDir;
    out.sort(function (a, b) {
      var va = valueOf(a, key), vb = valueOf(b, key);
      if (va === null && vb === null) return a.pos - b.pos;
      if (va === null) return 1;   // missing values last in either direction
      if (vb === null) return -1;
      if (va < vb) return -dir;
      if (va > vb) return dir;
      return a.pos - b.pos;
    });
    S.filtered = out;
  }

  function showList() {
    if (S.listNode) {  // keep the filters' state and focus: re-attach the built list
      clear(app()).appendChild(S.listNode);
      renderRows();
      window.scrollTo(0, S.scrollY);
      return;
    }
    var root = el("div", { id: "list" });
    S.listNode = root;
    var nLive = S.rows.filter(function (r) { return !r.dead; }).length, nDead = S.rows.length - nLive;
    var tabs = el("div", { cls: "tabs" });
    [["live", "Live features (" + nLive + ")"], ["dead", "Dead features (" + nDead + ")"]].forEach(function (t) {
      tabs.appendChild(el("button", { id: "tab-" + t[0], cls: S.tab === t[0] ? "active" : "", text: t[1],
        onclick: function () {
          S.tab = t[0]; S.page = 0;
          Array.prototype.forEach.call(tabs.children, function (b) { b.className = b.id === "tab-" + S.tab ? "active" : ""; });
          renderRows(true);
        } }));
    });
    root.appendChild(tabs);
    root.appendChild(buildFilters());
    root.appendChild(el("div", { id: "list-count", cls: "note" }));
    var table = el("table", { cls: "list", id: "list-table" });
    var head = el("tr");
    COLUMNS.forEach(function (c) {
      head.appendChild(el("th", { cls: c.num ? "num" : "", "data-key": c.key, title: "sort by " + c.label,
        onclick: function () {
          if (S.sortKey === c.key) S.sortDir = -S.sortDir;
          else { S.sortKey = c.key; S.sortDir = c.num && c.key !== "x" ? -1 : 1; }
          S.page = 0; renderRows(true);
        } }, [c.label, el("span", { cls: "arrow" })]));
    });
    table.appendChild(el("thead", null, head));
    table.appendChild(el("tbody", { id: "list-body" }));
    root.appendChild(table);
    root.appendChild(el("div", { cls: "pager", id: "pager" }));
    clear(app()).appendChild(root);
    renderRows(true);
  }

  function buildFilters() {
    var box = el("div", { cls: "filters" });
    var timer = null;
    function bind(input, key) {
      input.value = S.f[key];
      input.addEventListener("input", function () {
        S.f[key] = input.value;
        clearTimeout(timer);
        timer = setTimeout(function () { S.page = 0; renderRows(true); }, 120);
      });
      return input;
    }
    function numInput(key, placeholder) {
      return bind(el("input", { type: "number", step: "any", placeholder: placeholder, id: "filter-" + key }), key);
    }
    box.appendChild(el("label", null, ["search descriptions / ids",
      bind(el("input", { cls: "search", type: "search", placeholder: "e.g. numbers", id: "filter-q" }), "q")]));
    var dsel = el("select", { id: "filter-dict" }, el("option", { value: "", text: "all" }));
    (S.meta.dictionaries || []).forEach(function (d) {
      dsel.appendChild(el("option", { value: d.name, text: d.name + " (" + d.kind + ", " + d.hook + ")" }));
    });
    dsel.addEventListener("change", function () { S.f.dict = dsel.value; S.page = 0; renderRows(true); });
    box.appendChild(el("label", null, ["dictionary", dsel]));
    box.appendChild(el("label", null, ["density % \u2265", numInput("denMin", "min")]));
    box.appendChild(el("label", null, ["density % \u2264", numInput("denMax", "max")]));
    box.appendChild(el("label", null, ["max act \u2265", numInput("maxMin", "min")]));
    box.appendChild(el("label", null, ["max act \u2264", numInput("maxMax", "max")]));
    var methods = S.meta.score_methods || [];
    var ssel = el("select", { id: "filter-score-method" });
    if (!methods.length) ssel.appendChild(el("option", { value: "", text: "(no scores yet)" }));
    methods.forEach(function (m) { ssel.appendChild(el("option", { value: m, text: m })); });
    ssel.value = S.f.scoreMethod;
    ssel.addEventListener("change", function () { S.f.scoreMethod = ssel.value; S.page = 0; renderRows(true); });
    box.appendChild(el("label", null, ["score", ssel]));
    box.appendChild(el("label", null, ["score \u2265", numInput("scoreMin", "min")]));
    box.appendChild(el("label", null, ["score \u2264", numInput("scoreMax", "max")]));
    var sizeSel = el("select", { id: "page-size" });
    PAGE_SIZES.concat(PAGE_SIZES.indexOf(S.pageSize) < 0 ? [S.pageSize] : []).forEach(function (n) {
      sizeSel.appendChild(el("option", { value: n, text: n + " per page" }));
    });
    sizeSel.value = String(S.pageSize);
    sizeSel.addEventListener("change", function () { S.pageSize = +sizeSel.value; S.page = 0; renderRows(); });
    box.appendChild(el("label", null, ["rows", sizeSel]));
    return box;
  }

  /* Render one page of rows: the DOM never holds more than pageSize rows, whatever the catalog's size. */
  function renderRows(refilter) {
    if (refilter || !S.filtered) applyFilters();
    var rows = S.filtered, nPages = Math.max(1, Math.ceil(rows.length / S.pageSize));
    S.page = Math.min(Math.max(0, S.page), nPages - 1);
    var body = clear(document.getElementById("list-body"));
    var start = S.page * S.pageSize;
    rows.slice(start, start + S.pageSize).forEach(function (r) {
      var tr = el("tr", { "data-id": r.id });
      COLUMNS.forEach(function (c) {
        var td;
        if (c.key === "id") td = el("td", null, el("a", { href: featureHref(r.id), text: r.id }));
        else if (c.key === "desc") {
          td = el("td", { cls: "desc" }, r.desc.length ? r.desc[0] : (r.dead ? "dead: not described" : "\u2013"));
          if (r.desc.length > 1) td.appendChild(el("span", { cls: "note", text: "  (+" + (r.desc.length - 1) + " more)" }));
        } else {
          var v = valueOf(r, c.key);
          td = el("td", { cls: c.num ? "num" : "", title: v === null ? null : String(v) }, c.show ? c.show(v) : (c.num ? fmt(v) : v));
        }
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    Array.prototype.forEach.call(document.querySelectorAll("#list-table th"), function (th) {
      th.lastChild.textContent = th.getAttribute("data-key") === S.sortKey ? (S.sortDir > 0 ? " \u25b2" : " \u25bc") : "";
    });
    document.getElementById("list-count").textContent = rows.length + " of " +
      S.rows.filter(function (r) { return r.dead === (S.tab === "dead"); }).length + " " + S.tab + " features match";
    var pager = clear(document.getElementById("pager"));
    pager.appendChild(el("button", { text: "\u2190 prev", disabled: S.page === 0 ? "" : null,
      onclick: function () { S.page--; renderRows(); } }));
    pager.appendChild(el("span", { text: "page " + (S.page + 1) + " of " + nPages }));
    pager.appendChild(el("button", { text: "next \u2192", disabled: S.page >= nPages - 1 ? "" : null,
      onclick: function () { S.page++; renderRows(); } }));
    saveListState();
  }

  // ------------------------------------------------------------------------------------------
  // Feature page
  // ------------------------------------------------------------------------------------------
  function showFeature(id) {
    if (S.listNode && S.listNode.parentNode) S.scrollY = window.scrollY;
    var row = S.byId[id];
    if (!row) {
      clear(app()).appendChild(el("div", null, [el("p", { cls: "error", text: "No feature " + JSON.stringify(id) +
        " in this catalog." }), el("a", { href: "#", text: "\u2190 all features" })]));
      return;
    }
    clear(app()).appendChild(el("p", { cls: "note", text: "Loading " + id + "\u2026" }));
    loadShard(row.s, function () {
      if (decodeHash() !== id) return;  // the user moved on while the shard loaded
      renderFeature(S.shards[row.s][id], row);
      window.scrollTo(0, 0);
    });
  }
  function decodeHash() {
    var h = location.hash || "";
    try { return decodeURIComponent(h.slice(3)); } catch (e) { return h.slice(3); }
  }

  function renderFeature(rec, row) {
    var root = el("div", { id: "feature", "data-id": rec.id });
    var dict = S.dicts[rec.dictionary] || {};
    var prev = S.rows[row.pos - 1], next = S.rows[row.pos + 1];
    root.appendChild(el("div", { cls: "crumbs" }, [
      el("a", { href: listHash(), text: "\u2190 all features" }),
      prev ? el("a", { href: featureHref(prev.id), text: "\u2039 " + prev.id }) : null,
      next ? el("a", { href: featureHref(next.id), text: next.id + " \u203a" }) : null
    ]));
    var h1 = el("h1", null, rec.id);
    if (rec.dead) h1.appendChild(el("span", { cls: "badge", text: "dead" }));
    root.appendChild(h1);
    root.appendChild(el("div", { cls: "note" }, [
      (dict.kind || "dictionary") + " " + rec.dictionary + " \u00b7 feature " + rec.index + " \u00b7 reads " + rec.hook +
      (dict.hook_out ? " \u00b7 writes " + dict.hook_out : "")
    ]));

    root.appendChild(section("descriptions", "Descriptions", descriptionsTable(rec)));

    var grid = el("div", { cls: "grid" });
    grid.appendChild(el("div", null, [el("h3", { text: "Activation statistics" }), statsTable(rec.stats)]));
    grid.appendChild(el("div", { id: "histogram" }, [el("h3", { text: "Histogram of positive activations" }),
      histogram(rec.stats.hist)]));
    grid.appendChild(el("div", { id: "weights" }, [el("h3", { text: "Weight statistics" }), weightsTable(rec)]));
    root.appendChild(section("stats", "Statistics", grid));

    var ex = rec.examples || { top: [], quantiles: [], random: [] };
    var scale = rec.stats.max > 0 ? rec.stats.max : maxAbsOf(ex);
    root.appendChild(el("p", { cls: "legend", text: "Token backgrounds: activation / max activation (" + fmt(scale) +
      "); hover a token for its exact value. The outlined token is the window's maximum." }));
    root.appendChild(section("examples-top", "Top activations (" + ex.top.length + ")", examplesBlock(ex.top, scale)));

    var outs = el("div", { cls: "twocol" });
    if (rec.vocab_proj) {
      outs.appendChild(el("div", { id: "vocab-proj" }, [el("h3", { text: "VocabProj: top tokens" }),
        pairTable(rec.vocab_proj.top, "logit"), ]));
      outs.appendChild(el("div", { id: "vocab-proj-bottom" }, [el("h3", { text: "VocabProj: bottom tokens" }),
        pairTable(rec.vocab_proj.bottom, "logit")]));
    }
    if (rec.token_change) {
      var tc = rec.token_change;
      [["pos", "+"], ["neg", "\u2212"]].forEach(function (s) {
        ["up", "down"].forEach(function (d) {
          outs.appendChild(el("div", { cls: "token-change", id: "token-change-" + s[0] + "-" + d }, [
            el("h3", { text: "TokenChange: clamp " + s[1] + fmt(tc.clamp) + ", logits " + d }),
            pairTable(tc[s[0]][d], "\u0394 logit")]));
        });
      });
    }
    root.appendChild(section("output", "Output-centric evidence (VocabProj, TokenChange)",
      outs.childNodes.length ? outs : el("p", { cls: "note", text: "not computed for this feature" })));

    var qbox = el("div");
    (ex.quantiles || []).forEach(function (bin, b) {
      if (!bin.length) return;
      qbox.appendChild(el("h3", { text: "Quantile bin " + b + (b === 0 ? " (lowest)" : "") +
        (b === ex.quantiles.length - 1 ? " (highest)" : "") + ": " + bin.length + (bin.length === 1 ? " example" : " examples") }));
      qbox.appendChild(examplesBlock(bin, scale));
    });
    root.appendChild(section("examples-quantiles", "Quantile examples", qbox.childNodes.length ? qbox :
      el("p", { cls: "note", text: "none" })));
    root.appendChild(section("examples-random", "Random non-activating windows (" + (ex.random || []).length + ")",
      examplesBlock(ex.random || [], scale)));

    var rel = el("div", { cls: "twocol" });
    var w = rec.weights || {};
    rel.appendChild(el("div", { id: "nearest" }, [el("h3", { text: "Nearest features (decoder cosine)" }),
      linkTable(rec.dictionary, w.nearest || [], "cosine")]));
    rel.appendChild(el("div", { id: "cooccurrence" }, [el("h3", { text: "Co-occurring features (tokens)" }),
      linkTable(rec.dictionary, rec.cooccurrence || [], "tokens")]));
    if (w.read_tokens && w.read_tokens.length) {
      rel.appendChild(el("div", { id: "read-tokens" }, [el("h3", { text: "LM-head decoding of the read direction" }),
        pairTable(w.read_tokens, "weight")]));
    }
    root.appendChild(section("related", "Related features", rel));
    root.appendChild(section("scores", "Scores", scoresTable(rec.scores || [])));
    clear(app()).appendChild(root);
  }

  function section(id, title, body) {
    return el("section", { id: id }, [el("h2", { text: title }), body]);
  }

  function kvTable(pairs) {
    var t = el("table", { cls: "kv" });
    pairs.forEach(function (p) {
      t.appendChild(el("tr", null, [el("td", { text: p[0] }), el("td", { cls: "num", title: p[2] }, p[1])]));
    });
    return t;
  }

  function statsTable(s) {
    return kvTable([
      ["density", pct(s.density), String(s.density)],
      ["max activation", fmt(s.max), String(s.max)],
      ["mean activation (all tokens)", fmt(s.mean), String(s.mean)],
      ["mean activation (where active)", fmt(s.mean_active), String(s.mean_active)],
      ["tokens cached", String(s.n_tokens)],
      ["log10 density", s.density > 0 ? fmt(Math.log(s.density) / Math.LN10, 3) : "\u2212\u221e"]
    ]);
  }

  function weightsTable(rec) {
    var w = rec.weights;
    if (!w) return el("p", { cls: "note", text: "not computed" });
    return kvTable([
      ["write-direction norm", fmt(w.norm), w.norm === undefined ? null : String(w.norm)],
      ["null-space fraction", fmt(w.null_space_frac), w.null_space_frac === undefined ? null : String(w.null_space_frac)],
      ["unigram alignment", fmt(w.unigram_alignment), w.unigram_alignment === undefined ? null : String(w.unigram_alignment)]
    ]);
  }

  function descriptionsTable(rec) {
    var ds = rec.descriptions || [];
    if (!ds.length) return el("p", { cls: "note", text: rec.dead ? "Dead feature: not described." : "No descriptions yet." });
    var t = el("table", { cls: "descs" });
    t.appendChild(el("tr", null, ["description", "method", "explainer", "model", "prompt", "evidence", "cost"].map(function (h) {
      return el("th", { text: h });
    })));
    ds.forEach(function (d) {
      var cost = [];
      if (d.seconds !== undefined && d.seconds !== null) cost.push(fmt(d.seconds, 3) + " s");
      if (d.tokens_in !== undefined && d.tokens_in !== null) cost.push(d.tokens_in + " in");
      if (d.tokens_out !== undefined && d.tokens_out !== null) cost.push(d.tokens_out + " out");
      t.appendChild(el("tr", null, [
        el("td", { cls: "desc-text", text: d.text }),
        el("td", { text: d.method }),
        el("td", { text: d.explainer + (d.sample ? " #" + d.sample : "") }),
        el("td", { text: d.model || "" }),
        el("td", { text: d.prompt_method || "" }),
        el("td", { cls: "mono", text: d.evidence ? JSON.stringify(d.evidence) : "" }),
        el("td", { text: cost.join(", ") })
      ]));
    });
    return t;
  }

  function scoresTable(scores) {
    if (!scores.length) return el("p", { cls: "note", text: "No scores yet." });
    var t = el("table", { cls: "scores" });
    t.appendChild(el("tr", null, ["method", "value", "judge", "n", "95% CI", "failed"].map(function (h) {
      return el("th", { text: h });
    })));
    scores.forEach(function (s) {
      t.appendChild(el("tr", null, [el("td", { text: s.method }),
        el("td", { cls: "num", title: String(s.value) }, fmt(s.value, 3)), el("td", { text: s.judge || "" }),
        el("td", { cls: "num", text: s.n === undefined ? "" : s.n }),
        el("td", { text: s.ci ? "[" + fmt(s.ci[0], 3) + ", " + fmt(s.ci[1], 3) + "]" : "" }),
        el("td", { cls: "num", text: s.failed === undefined ? "" : s.failed })]));
    });
    return t;
  }

  function pairTable(pairs, valueLabel) {
    var t = el("table", { cls: "toks" });
    t.appendChild(el("tr", null, [el("th", { text: "token" }), el("th", { cls: "num", text: valueLabel })]));
    (pairs || []).forEach(function (p) {
      t.appendChild(el("tr", null, [el("td", { cls: "tokcell", title: JSON.stringify(p[0]) }, visible(p[0])),
        el("td", { cls: "num", title: String(p[1]) }, fmt(p[1]))]));
    });
    return t;
  }

  function linkTable(dictionary, pairs, valueLabel) {
    if (!pairs.length) return el("p", { cls: "note", text: "not computed" });
    var t = el("table", { cls: "links" });
    t.appendChild(el("tr", null, [el("th", { text: "feature" }), el("th", { text: "description" }),
      el("th", { cls: "num", text: valueLabel })]));
    pairs.forEach(function (p) {
      var id = dictionary + "/" + p[0], other = S.byId[id];
      t.appendChild(el("tr", null, [
        el("td", null, other ? el("a", { href: featureHref(id), text: id }) : id),
        el("td", { text: other && other.desc.length ? other.desc[0] : "" }),
        el("td", { cls: "num", title: String(p[1]) }, fmt(p[1]))]));
    });
    return t;
  }

  function maxAbsOf(ex) {
    var m = 0;
    [ex.top || [], ex.random || []].concat(ex.quantiles || []).forEach(function (list) {
      list.forEach(function (e) { e.acts.forEach(function (a) { m = Math.max(m, Math.abs(a)); }); });
    });
    return m;
  }

  function examplesBlock(list, scale) {
    var box = el("div", { cls: "examples" });
    if (!list.length) { box.appendChild(el("p", { cls: "note", text: "none" })); return box; }
    list.forEach(function (e) {
      var mx = e.acts.length ? e.acts[e.max_pos] : 0;
      var toks = el("div", { cls: "extoks" });
      e.tokens.forEach(function (tok, i) {
        var v = e.acts[i], a = scale > 0 ? Math.min(1, Math.abs(v) / scale) : 0;
        var span = el("span", { cls: "tok" + (i === e.max_pos && v !== 0 ? " maxtok" : "") +
          (/[\r\n\t]/.test(tok) ? " nl" : ""),
          title: JSON.stringify(tok) + "  activation " + String(v) + "  (context " + e.context + ", position " +
            (e.start + i) + ")" }, visible(tok));
        if (v !== 0) span.style.backgroundColor = "rgba(" + (v > 0 ? "255, 128, 0" : "50, 110, 235") + ", " + a.toFixed(3) + ")";
        toks.appendChild(span);
      });
      box.appendChild(el("div", { cls: "ex" }, [el("div", { cls: "exlabel", title: String(mx) },
        ["max " + fmt(mx), el("br"), "ctx " + e.context + ":" + e.start]), toks]));
    });
    return box;
  }

  /* Bars of hist.counts over hist.edges: log-scaled x axis when all edges are > 0 (the cache's bins are
     log-spaced), linear otherwise. Drawn as inline SVG; each bar's <title> gives its range and count. */
  function histogram(hist) {
    var edges = (hist && hist.edges) || [], counts = (hist && hist.counts) || [];
    var total = counts.reduce(function (a, b) { return a + b; }, 0);
    if (!counts.length || !total) return el("p", { cls: "note", text: "no positive activations" });
    var W = 440, H = 170, L = 44, B = 26, T = 8, R = 8;
    var logx = edges[0] > 0;
    var tx = function (v) { return logx ? Math.log(v) : v; };
    var x0 = tx(edges[0]), x1 = tx(edges[edges.length - 1]);
    var X = function (v) { return L + (W - L - R) * (x1 === x0 ? 0 : (tx(v) - x0) / (x1 - x0)); };
    var cmax = Math.max.apply(null, counts);
    var Y = function (c) { return T + (H - T - B) * (1 - c / cmax); };
    var s = svg("svg", { "class": "hist", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img" });
    s.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B }));
    s.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B }));
    counts.forEach(function (c, i) {
      if (!c) return;
      var xa = X(edges[i]), xb = X(edges[i + 1]);
      var r = svg("rect", { "class": "bar", x: xa.toFixed(2), y: Y(c).toFixed(2), width: Math.max(0.8, xb - xa - 0.6).toFixed(2),
        height: (H - B - Y(c)).toFixed(2) });
      var title = svg("title");
      title.textContent = "[" + fmt(edges[i]) + ", " + fmt(edges[i + 1]) + "): " + c;
      r.appendChild(title);
      s.appendChild(r);
    });
    var ticks = [edges[0], logx ? Math.sqrt(edges[0] * edges[edges.length - 1]) : (edges[0] + edges[edges.length - 1]) / 2,
      edges[edges.length - 1]];
    ticks.forEach(function (v, i) {
      var t = svg("text", { x: X(v).toFixed(1), y: H - 8, "text-anchor": i === 0 ? "start" : i === 2 ? "end" : "middle" });
      t.textContent = fmt(v, 3);
      s.appendChild(t);
    });
    [[cmax, T + 8], [0, H - B]].forEach(function (p) {
      var t = svg("text", { x: L - 4, y: p[1], "text-anchor": "end" });
      t.textContent = String(p[0]);
      s.appendChild(t);
    });
    var wrap = el("div", null, s);
    wrap.appendChild(el("div", { cls: "legend", text: total + " active tokens; " + (logx ? "log" : "linear") +
      "-scaled activation axis" }));
    return wrap;
  }
})();
