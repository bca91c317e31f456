"""The atlas page (:mod:`featstudy.analysis.atlas`): one HTML file, its style and script inline, no network.

The data arrive as JSON in ``<script type="application/json" id="atlas-data">`` (at :data:`DATA_MARK`); the script
builds every view with ``createElement``/``textContent`` (names are data, never markup) and routes on the hash:
``#/``, ``#/class/<i>``, ``#/layer/<name>``, ``#/feature/<j>``. Images load relative to the page, or through the
MLflow server's ``get-artifact`` endpoint when the page runs from a ``blob:`` URL (the MLflow UI's artifact view).
"""

DATA_MARK = "@@ATLAS_DATA@@"

TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>featstudy atlas</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{position:sticky;top:0;background:#263238;color:#fff;padding:6px 12px;display:flex;gap:12px;align-items:center;z-index:2}
header a{color:#fff}header input{flex:0 1 320px;padding:3px 6px}
main{padding:8px 16px}#results{padding:4px 16px;background:#fff;border-bottom:1px solid #ddd}
#results:empty{display:none}
.banner{background:#ffecb3;border:1px solid #ffb300;padding:6px 10px;margin:8px 0}
table{border-collapse:collapse;margin:6px 0}td,th{border-bottom:1px solid #e0e0e0;padding:2px 8px;text-align:left;vertical-align:middle}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.crops{white-space:nowrap}td.num{white-space:nowrap}
.crops img{width:64px;height:64px;margin-right:2px;vertical-align:middle;background:#ddd}
.bigcrops img{width:128px;height:128px;margin:2px}
.pos{color:#1b5e20}.neg{color:#b71c1c}.muted{color:#777}
ul.cols{columns:4 220px;padding-left:18px}svg{background:#fff;border:1px solid #ddd}
</style></head>
<body>
<header><a href="#/" id="home">featstudy atlas</a><a href="#" id="back" title="back">&#9664; back</a><span id="crumb"></span>
<input id="search" type="search" placeholder="search class, layer, feature" aria-label="search"></header>
<div id="results"></div>
<main id="view"></main>
<script type="application/json" id="atlas-data">@@ATLAS_DATA@@</script>
<script>
"use strict";
(function () {
var A = JSON.parse(document.getElementById("atlas-data").textContent);
var C = A.classes.length, F = A.features.length;
var raw = atob(A.strips), STRIP = new Int8Array(raw.length);
for (var i = 0; i < raw.length; i++) { STRIP[i] = raw.charCodeAt(i) << 24 >> 24; }
var BASE = artifactBase();
var view = document.getElementById("view");

function artifactBase() {
  // the MLflow UI shows an HTML artifact from a blob: URL in a sandboxed iframe: relative URLs do not resolve
  if (location.protocol !== "blob:" || !A.run_id) { return null; }
  var origin = null;
  try { origin = new URL(location.href.slice(5)).origin; } catch (e) { origin = null; }
  if (!origin || origin === "null") {
    try { origin = new URL(document.referrer).origin; } catch (e) { return null; }
  }
  var base = origin + "/";
  if (document.referrer && document.referrer.indexOf(origin + "/") === 0) {  // a server under a path prefix
    var r = document.referrer.split("#")[0].split("?")[0];
    base = r.slice(0, r.lastIndexOf("/") + 1);
  }
  return base;
}
function artifactUrl(path) {  // path relative to the run's artifact root
  return BASE + "get-artifact?path=" + encodeURIComponent(path) + "&run_uuid=" + encodeURIComponent(A.run_id);
}
function imgSrc(rel) { return BASE ? artifactUrl(A.artifact_dir + "/" + rel) : rel; }
function runFileUrl(rel) { return BASE ? artifactUrl(rel) : "../" + rel; }

function el(tag, props) {
  var e = document.createElement(tag);
  if (props) { for (var k in props) {
    if (k === "text") { e.textContent = props[k]; } else if (k === "cls") { e.className = props[k]; }
    else { e.setAttribute(k, props[k]); } } }
  for (var j = 2; j < arguments.length; j++) {
    var kid = arguments[j];
    if (kid === null || kid === undefined) { continue; }
    e.appendChild(typeof kid === "object" ? kid : document.createTextNode(String(kid)));
  }
  return e;
}
function svg(tag, attrs) {
  var e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (var k in attrs) { e.setAttribute(k, attrs[k]); }
  return e;
}
function link(route, text) { return el("a", {href: "#/" + route, text: text}); }
function classLink(c) { return link("class/" + c, A.classes[c]); }
function layerName(j) { return A.layers[A.layer_of[j]].name; }
function layerLink(name) { return link("layer/" + encodeURIComponent(name), name); }
function featureLink(j) { return link("feature/" + j, A.features[j]); }
function fmt(x, n) { return x === null || x === undefined ? "–" : Number(x).toFixed(n); }
function sgn(x) { return (x >= 0 ? "+" : "") + Number(x).toFixed(3); }
function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(2) + " %"; }
function dOf(j, c) { return STRIP[j * C + c] / 127; }
function crops(j, cls) {
  var span = el("span", {cls: cls || "crops"}), n = A.crops[String(j)] || 0;
  for (var k = 0; k < n; k++) {
    span.appendChild(el("img", {src: imgSrc("img/f" + j + "_" + k + ".jpg"), alt: A.features[j] + " crop " + k,
                                loading: "lazy"}));
  }
  if (!n) { span.appendChild(el("span", {cls: "muted", text: "no crops"})); }
  return span;
}
function section(title) { return el("h2", {text: title}); }
function kv(rows) {
  var t = el("table");
  rows.forEach(function (r) { t.appendChild(el("tr", null, el("th", {text: r[0]}), el("td", null, r[1]))); });
  return t;
}

function indexView() {
  var out = [el("h1", {text: "Feature atlas: " + A.dataset})];
  if (A.random_weights) {
    out.push(el("div", {cls: "banner", id: "random-banner",
      text: "Random weights: this network was not trained; D here measures chance structure, not learned features."}));
  }
  out.push(kv([["dataset", A.dataset], ["model", A.model], ["weights", A.weights || "–"],
    ["images", String(A.n_images)], ["classes", String(C)], ["features", String(F)],
    ["layers", String(A.layers.length)], ["t+ / t-", sgn(A.t_plus) + " / " + sgn(A.t_minus)],
    ["kept pairs (real / randomized labels)", pct(A.kept) + " / " + pct(A.kept_random)],
    ["MLflow run", A.run_id || "–"]]));
  if (A.figures.length) {
    out.push(section("Figures"));
    var ul = el("ul");
    A.figures.forEach(function (f) { ul.appendChild(el("li", null, el("a", {href: runFileUrl(f), text: f}))); });
    out.push(ul);
  }
  out.push(section("Classes"));
  var t = el("table", {id: "class-table"}, el("tr", null, el("th", {text: "class"}), el("th", {cls: "num", text: "images"}),
    el("th", {cls: "num", text: "# D > t+"}), el("th", {cls: "num", text: "# D < t-"})));
  for (var c = 0; c < C; c++) {
    t.appendChild(el("tr", null, el("td", null, classLink(c)), el("td", {cls: "num", text: String(A.n_in[c])}),
      el("td", {cls: "num", text: String(A.n_pos[c])}), el("td", {cls: "num", text: String(A.n_neg[c])})));
  }
  out.push(t, section("Layers"));
  var lt = el("table", {id: "layer-table"}, el("tr", null, el("th", {text: "layer"}), el("th", {cls: "num", text: "features"}),
    el("th", {cls: "num", text: "kept"}), el("th", {cls: "num", text: "kept (random)"}), el("th", {cls: "num", text: "irrelevant"})));
  A.layers.forEach(function (L) {
    lt.appendChild(el("tr", null, el("td", null, layerLink(L.name)), el("td", {cls: "num", text: String(L.n)}),
      el("td", {cls: "num", text: pct(L.kept)}), el("td", {cls: "num", text: pct(L.kept_random)}),
      el("td", {cls: "num", text: String(L.irrelevant.length)})));
  });
  out.push(lt);
  return out;
}

function featureTable(entries, id) {
  var t = el("table", {id: id}, el("tr", null, el("th", {cls: "num", text: "#"}), el("th", {text: "feature"}),
    el("th", {text: "layer"}), el("th", {cls: "num", text: "D"}), el("th", {cls: "num", text: "q"}),
    el("th", {cls: "num", text: "AUROC"}), el("th", {text: "most activating images"})));
  entries.forEach(function (e, r) {
    var j = e[0];
    t.appendChild(el("tr", {"data-feature": String(j)}, el("td", {cls: "num", text: String(r + 1)}),
      el("td", null, featureLink(j)), el("td", null, layerLink(layerName(j))),
      el("td", {cls: "num " + (e[1] >= 0 ? "pos" : "neg"), text: sgn(e[1])}),
      el("td", {cls: "num", text: e[2] === null ? "–" : Number(e[2]).toPrecision(3)}),
      el("td", {cls: "num", text: fmt(e[3], 3)}), el("td", null, crops(j))));
  });
  if (!entries.length) { t.appendChild(el("tr", null, el("td", {colspan: "7", cls: "muted", text: "none"}))); }
  return t;
}

function classView(c) {
  if (!(c >= 0 && c < C)) { return notFound(); }
  return [el("h1", {text: A.classes[c]}),
    el("p", {text: A.n_in[c] + " images; " + A.n_pos[c] + " features with D > t+ (" + sgn(A.t_plus) + "), " +
      A.n_neg[c] + " with D < t- (" + sgn(A.t_minus) + "); at most " + A.top_k + " shown each, ranked by D."}),
    section("Described by presence (D > t+)"), featureTable(A.pos[c], "presence"),
    section("Described by absence (D < t-)"), featureTable(A.neg[c], "absence")];
}

function histogram(L) {
  var w = 400, h = 120, n = L.hist.length, top = Math.max.apply(null, L.hist.concat([1]));
  var s = svg("svg", {width: w, height: h + 16, viewBox: "0 0 " + w + " " + (h + 16), id: "histogram"});
  L.hist.forEach(function (v, b) {
    var bh = h * v / top, x0 = A.hist_edges[b];
    var r = svg("rect", {x: b * w / n, y: h - bh, width: w / n - 1, height: bh,
                         fill: x0 + 1e-9 >= 0 ? "#2e7d32" : "#c62828"});
    var tip = svg("title", {}); tip.textContent = "D in [" + x0 + ", " + A.hist_edges[b + 1] + "): " + v;
    r.appendChild(tip); s.appendChild(r);
  });
  [[A.t_plus, "t+"], [A.t_minus, "t-"]].forEach(function (t) {
    var x = (t[0] + 1) / 2 * w;
    s.appendChild(svg("line", {x1: x, x2: x, y1: 0, y2: h, stroke: "#000", "stroke-dasharray": "3,2"}));
  });
  ["-1", "0", "+1"].forEach(function (lab, i) {
    var tx = svg("text", {x: i * w / 2 + (i === 0 ? 2 : i === 2 ? -18 : -4), y: h + 13, "font-size": "11"});
    tx.textContent = lab; s.appendChild(tx);
  });
  return s;
}

function layerView(name) {
  var L = null;
  A.layers.forEach(function (x) { if (x.name === name) { L = x; } });
  if (!L) { return notFound(); }
  var ul = el("ul", {cls: "cols", id: "irrelevant"}), shown = L.irrelevant.slice(0, 500);
  shown.forEach(function (j) { ul.appendChild(el("li", null, featureLink(j))); });
  return [el("h1", {text: "Layer " + L.name}),
    kv([["features", String(L.n)], ["kept pairs (real labels)", pct(L.kept)], ["kept pairs (randomized)", pct(L.kept_random)],
        ["irrelevant features (no class with D > t+ or D < t-)", String(L.irrelevant.length)]]),
    section("D over the layer's (feature, class) pairs"), histogram(L),
    section("Irrelevant features" + (L.irrelevant.length > shown.length ? " (first " + shown.length + ")" : "")),
    L.irrelevant.length ? ul : el("p", {cls: "muted", text: "none"})];
}

function strip(j) {
  var bw = Math.max(2, Math.min(12, Math.floor(800 / C))), h = 100, w = bw * C;
  var s = svg("svg", {width: w, height: h, viewBox: "0 0 " + w + " " + h, id: "strip"});
  s.appendChild(svg("line", {x1: 0, x2: w, y1: h / 2, y2: h / 2, stroke: "#999"}));
  for (var c = 0; c < C; c++) {
    var d = dOf(j, c), bh = Math.abs(d) * h / 2;
    var r = svg("rect", {x: c * bw, y: d >= 0 ? h / 2 - bh : h / 2, width: Math.max(1, bw - 1), height: bh,
                         fill: d > A.t_plus ? "#2e7d32" : d < A.t_minus ? "#c62828" : "#9e9e9e"});
    var tip = svg("title", {}); tip.textContent = A.classes[c] + ": D ≈ " + sgn(d);
    r.appendChild(tip); s.appendChild(r);
  }
  return s;
}

function classList(cs, j, id) {
  var ul = el("ul", {cls: "cols", id: id});
  cs.slice().sort(function (a, b) { return Math.abs(dOf(j, b)) - Math.abs(dOf(j, a)) || a - b; }).forEach(function (c) {
    ul.appendChild(el("li", null, classLink(c), " (D ≈ " + sgn(dOf(j, c)) + ")"));
  });
  if (!cs.length) { ul.appendChild(el("li", {cls: "muted", text: "none"})); }
  return ul;
}

function featureView(j) {
  if (!(j >= 0 && j < F)) { return notFound(); }
  return [el("h1", {text: "Feature " + A.features[j]}), el("p", null, "layer ", layerLink(layerName(j))),
    section("D across the classes (green: D > t+, red: D < t-)"), strip(j),
    section("Most activating images" + (A.crop_source ? " (" + A.crop_source + ")" : "")), crops(j, "bigcrops"),
    section("Classes described by presence (D > t+)"), classList(A.fpos[j], j, "feature-presence"),
    section("Classes described by absence (D < t-)"), classList(A.fneg[j], j, "feature-absence")];
}

function notFound() { return [el("h1", {text: "Not found"}), el("p", null, link("", "back to the index"))]; }

// inside the MLflow UI (a blob: document in an iframe sandboxed to scripts) Chromium refuses even a fragment
// navigation ("Not allowed to load local resource"): the route then lives in the page, links are intercepted
var IN_BLOB = location.protocol === "blob:", current = "#/", past = [];
function go(hash) {
  if (!IN_BLOB) { location.hash = hash; return; }
  past.push(current); current = hash; route();
}
document.addEventListener("click", function (ev) {
  var a = ev.target && ev.target.closest ? ev.target.closest("a") : null;
  var href = a ? a.getAttribute("href") : null;
  if (IN_BLOB && href && href.indexOf("#/") === 0) { ev.preventDefault(); go(href); }
});
document.getElementById("back").addEventListener("click", function (ev) {
  ev.preventDefault();
  if (IN_BLOB) { if (past.length) { current = past.pop(); route(); } } else { history.back(); }
});

function route() {
  var h = (IN_BLOB ? current : location.hash).replace(/^#\/?/, "");
  try { h = decodeURIComponent(h); } catch (e) { h = "?"; }
  var parts = h.split("/"), kind = parts[0];
  var arg = parts.slice(1).join("/"), nodes, crumb = "";
  if (!h) { nodes = indexView(); }
  else if (kind === "class") { nodes = classView(Number(arg)); crumb = "class"; }
  else if (kind === "layer") { nodes = layerView(arg); crumb = "layer"; }
  else if (kind === "feature") { nodes = featureView(Number(arg)); crumb = "feature"; }
  else { nodes = notFound(); }
  view.textContent = "";
  nodes.forEach(function (n) { view.appendChild(n); });
  document.getElementById("crumb").textContent = crumb;
  document.title = "atlas · " + A.dataset + (crumb ? " · " + crumb : "");
  document.body.setAttribute("data-route", kind || "index");
  window.scrollTo(0, 0);
}

function search() {
  var q = document.getElementById("search").value.trim().toLowerCase(), box = document.getElementById("results");
  box.textContent = "";
  if (!q) { return; }
  var groups = [["classes", A.classes, classLink], ["layers", A.layers.map(function (L) { return L.name; }),
    function (i) { return layerLink(A.layers[i].name); }], ["features", A.features, featureLink]];
  groups.forEach(function (g) {
    var hits = [];
    for (var i = 0; i < g[1].length && hits.length < 50; i++) {
      if (g[1][i].toLowerCase().indexOf(q) >= 0) { hits.push(i); }
    }
    if (!hits.length) { return; }
    var p = el("p", {cls: "hits-" + g[0]}, el("b", {text: g[0] + ": "}));
    hits.forEach(function (i, k) { if (k) { p.appendChild(document.createTextNode(" · ")); } p.appendChild(g[2](i)); });
    box.appendChild(p);
  });
  if (!box.firstChild) { box.appendChild(el("p", {cls: "muted", text: "no match"})); }
}

document.getElementById("search").addEventListener("input", search);
window.addEventListener("hashchange", route);
route();
window.atlasReady = performance.now();
document.body.setAttribute("data-ready", "1");
})();
</script>
</body></html>
"""
