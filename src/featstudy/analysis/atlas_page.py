"""The atlas page (:mod:`featstudy.analysis.atlas`): the views of one run, in the shared page of
:mod:`featstudy.analysis.page_kit` (one HTML file, style and script inline, no network).

Routes: ``#/`` (the run), ``#/class/<i>``, ``#/layer/<name>``, ``#/feature/<j>``. Every element is built with
``createElement``/``textContent`` (names are data, never markup). D strips arrive as int8 (D ≈ value / 127).
"""

from featstudy.analysis.page_kit import DATA_MARK, page

VIEWS_JS = r"""
var C = A.classes.length, F = A.features.length;
var raw = atob(A.strips), STRIP = new Int8Array(raw.length);
for (var i = 0; i < raw.length; i++) { STRIP[i] = raw.charCodeAt(i) << 24 >> 24; }
function classLink(c) { return link("class/" + c, A.classes[c]); }
function layerName(j) { return A.layers[A.layer_of[j]].name; }
function layerLink(name) { return link("layer/" + encodeURIComponent(name), name); }
function featureLink(j) { return link("feature/" + j, A.features[j]); }
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
    out.push(section("Figures"), figureList(A.figures));
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

var VIEWS = {"": indexView, "class": function (a) { return classView(routeIndex(a, C)); }, "layer": layerView,
             "feature": function (a) { return featureView(routeIndex(a, F)); }};
var SEARCH = [["classes", A.classes, classLink], ["layers", A.layers.map(function (L) { return L.name; }),
  function (i) { return layerLink(A.layers[i].name); }], ["features", A.features, featureLink]];
var TITLE = "atlas · " + A.dataset;
"""

TEMPLATE = page("featstudy atlas", "featstudy atlas", "search class, layer, feature", VIEWS_JS)

__all__ = ["DATA_MARK", "TEMPLATE", "VIEWS_JS"]
