"""The report's comparison page (:mod:`featstudy.analysis.compare`): its views, in the shared page of
:mod:`featstudy.analysis.page_kit` (one HTML file, style and script inline, no network).

Routes: ``#/`` (the datasets and, per layer, the shared / dataset-specific / irrelevant feature counts),
``#/dataset/<s>`` (a dataset's run and its specific features), ``#/layer/<name>`` (the layer's features by
category) and ``#/feature/<j>`` (the feature in every dataset: classes described, extreme D, top classes).
"""

from featstudy.analysis.page_kit import DATA_MARK, page

VIEWS_JS = r"""
var S = A.datasets.length, F = A.features.length, SHARED = -3, SOME = -2, NONE = -1, CAP = 500;
function datasetLink(s) { return link("dataset/" + s, A.datasets[s].name); }
function layerLink(name) { return link("layer/" + encodeURIComponent(name), name); }
function featureLink(j) { return link("feature/" + j, A.features[j]); }
function layerName(j) { return A.layers[A.layer_of[j]].name; }
function catText(code) {
  if (code === SHARED) { return "shared: describes classes of every dataset"; }
  if (code === SOME) { return "describes classes of some datasets, not all"; }
  if (code === NONE) { return "irrelevant: describes no class of any dataset"; }
  return "specific to " + A.datasets[code].name + ": describes classes of no other dataset";
}
function num(x) { return el("td", {cls: "num", text: String(x)}); }
function counts(j) {  // "+n / -m" per dataset
  return A.datasets.map(function (_, s) {
    return el("td", {cls: "num", text: "+" + A.n_pos[s][j] + " / −" + A.n_neg[s][j]}); });
}

function indexView() {
  var names = A.datasets.map(function (D) { return D.name; });
  var out = [el("h1", {text: "Datasets compared: " + names.join(", ")})];
  A.datasets.forEach(function (D) {
    if (D.weights === "random") {
      out.push(el("div", {cls: "banner random-banner", text: D.name + ": random weights (not trained); its D measures chance structure."}));
    }
  });
  var t = el("table", {id: "dataset-table"}, el("tr", null, el("th", {text: "dataset"}), el("th", {text: "MLflow run"}),
    el("th", {text: "model"}), el("th", {text: "weights"}), el("th", {cls: "num", text: "classes"}),
    el("th", {cls: "num", text: "t+ / t-"}), el("th", {cls: "num", text: "kept pairs"}),
    el("th", {cls: "num", text: "describing features"})));
  A.datasets.forEach(function (D, s) {
    t.appendChild(el("tr", null, el("td", null, datasetLink(s)), el("td", {text: D.run_id}), el("td", {text: D.model || "–"}),
      el("td", {text: D.weights || "–"}), num(D.classes.length), el("td", {cls: "num", text: sgn(D.t_plus) + " / " + sgn(D.t_minus)}),
      el("td", {cls: "num", text: pct(D.kept)}), num(D.described + " of " + F)));
  });
  out.push(t);
  var left = Object.keys(A.left_out).filter(function (k) { return A.left_out[k] > 0; });
  if (left.length) {
    out.push(el("p", {cls: "muted", id: "left-out", text: "Compared on the " + F + " features every run analysed; left out: " +
      left.map(function (k) { return k + " " + A.left_out[k]; }).join(", ") + "."}));
  }
  out.push(section("Describing features per layer"), el("p", {text: "A feature describes a dataset when one of its classes has D > t+ or D < t- (that run's thresholds)."}));
  var head = el("tr", null, el("th", {text: "layer"}), el("th", {cls: "num", text: "features"}),
    el("th", {cls: "num", text: "shared by all"}));
  A.datasets.forEach(function (D) { head.appendChild(el("th", {cls: "num", text: "only " + D.name})); });
  if (S > 2) { head.appendChild(el("th", {cls: "num", text: "some"})); }
  head.appendChild(el("th", {cls: "num", text: "none"}));
  var lt = el("table", {id: "layer-table"}, head);
  A.layers.forEach(function (L) {
    var r = el("tr", {"data-layer": L.name}, el("td", null, layerLink(L.name)), num(L.n), num(L.shared));
    L.only.forEach(function (n) { r.appendChild(num(n)); });
    if (S > 2) { r.appendChild(num(L.some)); }
    r.appendChild(num(L.none));
    lt.appendChild(r);
  });
  out.push(lt);
  if (A.figures.length) { out.push(section("Figures"), figureList(A.figures)); }
  return out;
}

function featureRows(js, id) {
  var head = el("tr", null, el("th", {text: "feature"}));
  A.datasets.forEach(function (D) { head.appendChild(el("th", {cls: "num", text: D.name + " (+/−)"})); });
  var t = el("table", {id: id}, head);
  js.slice(0, CAP).forEach(function (j) {
    var r = el("tr", {"data-feature": String(j)}, el("td", null, featureLink(j)));
    counts(j).forEach(function (c) { r.appendChild(c); });
    t.appendChild(r);
  });
  if (!js.length) { t.appendChild(el("tr", null, el("td", {colspan: String(S + 1), cls: "muted", text: "none"}))); }
  if (js.length > CAP) { t.appendChild(el("tr", null, el("td", {colspan: String(S + 1), cls: "muted", text: "first " + CAP + " of " + js.length}))); }
  return t;
}
function inLayer(code, layer) {
  var js = [];
  for (var j = 0; j < F; j++) { if (A.category[j] === code && (layer < 0 || A.layer_of[j] === layer)) { js.push(j); } }
  return js;
}

function layerView(name) {
  var li = -1;
  A.layers.forEach(function (L, i) { if (L.name === name) { li = i; } });
  if (li < 0) { return notFound(); }
  var L = A.layers[li], out = [el("h1", {text: "Layer " + L.name}), el("p", {text: L.n + " features; counts per dataset: classes described by presence (+) / by absence (−)."})];
  out.push(section("Shared by all datasets (" + L.shared + ")"), featureRows(inLayer(SHARED, li), "cat-shared"));
  A.datasets.forEach(function (D, s) {
    out.push(section("Only " + D.name + " (" + L.only[s] + ")"), featureRows(inLayer(s, li), "cat-only-" + s));
  });
  if (S > 2) { out.push(section("Some datasets (" + L.some + ")"), featureRows(inLayer(SOME, li), "cat-some")); }
  out.push(section("None: irrelevant everywhere (" + L.none + ")"), featureRows(inLayer(NONE, li), "cat-none"));
  return out;
}

function datasetView(arg) {
  var s = routeIndex(arg, S);
  if (s < 0) { return notFound(); }
  var D = A.datasets[s], ul = el("ul", {cls: "cols", id: "classes"});
  D.classes.forEach(function (c) { ul.appendChild(el("li", {text: c})); });
  return [el("h1", {text: "Dataset " + D.name}),
    kv([["MLflow run", D.run_id], ["model", D.model || "–"], ["weights", D.weights || "–"],
        ["classes", String(D.classes.length)], ["features in the run", String(D.n_features)],
        ["t+ / t-", sgn(D.t_plus) + " / " + sgn(D.t_minus)], ["kept pairs", pct(D.kept)],
        ["describing features (of " + F + " compared)", String(D.described)]]),
    section("Features specific to " + D.name), featureRows(inLayer(s, -1), "specific"),
    section("Classes"), ul];
}

function topList(flat, s) {
  var span = el("span");
  for (var i = 0; i < flat.length; i += 2) {
    if (i) { span.appendChild(document.createTextNode(", ")); }
    span.appendChild(el("span", {cls: "cls", text: A.datasets[s].classes[flat[i]]}));
    span.appendChild(document.createTextNode(" (" + sgn(flat[i + 1]) + ")"));
  }
  if (!flat.length) { span.appendChild(el("span", {cls: "muted", text: "–"})); }
  return span;
}

function extreme(d, c, s) { return d === null ? "–" : sgn(d) + " (" + A.datasets[s].classes[c] + ")"; }
function featureView(arg) {
  var j = routeIndex(arg, F);
  if (j < 0) { return notFound(); }
  var t = el("table", {id: "per-dataset"}, el("tr", null, el("th", {text: "dataset"}),
    el("th", {cls: "num", text: "# D > t+"}), el("th", {cls: "num", text: "# D < t-"}), el("th", {text: "max D"}),
    el("th", {text: "min D"}), el("th", {text: "top classes by presence"}), el("th", {text: "top classes by absence"})));
  A.datasets.forEach(function (D, s) {
    t.appendChild(el("tr", {"data-dataset": String(s)}, el("td", null, datasetLink(s)), num(A.n_pos[s][j]), num(A.n_neg[s][j]),
      el("td", {cls: "pos", text: extreme(A.dmax[s][j], A.amax[s][j], s)}),
      el("td", {cls: "neg", text: extreme(A.dmin[s][j], A.amin[s][j], s)}),
      el("td", {cls: "tpos"}, topList(A.tpos[s][j], s)), el("td", {cls: "tneg"}, topList(A.tneg[s][j], s))));
  });
  return [el("h1", {text: "Feature " + A.features[j]}), el("p", null, "layer ", layerLink(layerName(j))),
    el("p", {id: "category", text: catText(A.category[j])}), t,
    el("p", {cls: "muted", text: "Top classes: at most " + A.top_classes + " each, by D."})];
}

var CLASSES = [], CLASS_OF = [];
A.datasets.forEach(function (D, s) { D.classes.forEach(function (c) { CLASSES.push(c); CLASS_OF.push(s); }); });
var VIEWS = {"": indexView, "dataset": datasetView, "layer": layerView, "feature": featureView};
var SEARCH = [["datasets", A.datasets.map(function (D) { return D.name; }), datasetLink],
  ["classes", CLASSES, function (i) { return el("span", null, el("span", {text: CLASSES[i] + " in "}), datasetLink(CLASS_OF[i])); }],
  ["layers", A.layers.map(function (L) { return L.name; }), function (i) { return layerLink(A.layers[i].name); }],
  ["features", A.features, featureLink]];
var TITLE = "featstudy report";
"""

TEMPLATE = page("featstudy report", "featstudy report", "search dataset, class, layer, feature", VIEWS_JS)

__all__ = ["DATA_MARK", "TEMPLATE", "VIEWS_JS"]
