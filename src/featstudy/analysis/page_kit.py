"""What the run's atlas (:mod:`featstudy.analysis.atlas_page`) and the report's comparison page
(:mod:`featstudy.analysis.compare_page`) share: one self-contained HTML file, its style and script inline, no network.

:func:`page` assembles a page from its views' script. The data arrive as JSON in
``<script type="application/json" id="atlas-data">`` (at :data:`DATA_MARK`; :func:`render` fills it in, escaped by
:func:`embed_json`); the shared script builds elements with ``createElement``/``textContent`` only (names are data,
never markup), routes on the hash (``#/``, ``#/<kind>/<arg>``) and searches. Images and the run's files load relative
to the page, or through the MLflow server's ``get-artifact`` endpoint (with the run id written into the data) when the
page runs from a ``blob:`` URL, as it does in the MLflow UI's artifact view; a fragment navigation is refused there,
so the route then lives in the page and its links are intercepted.

The views' script defines ``VIEWS`` (route kind -> function of the route's argument returning a list of nodes; ``""``
is the index), ``SEARCH`` (a list of ``[group name, list of labels, function(i) -> link]``) and ``TITLE``.
"""

from __future__ import annotations

import json

DATA_MARK = "@@ATLAS_DATA@@"

STYLE = r"""
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
"""

#: helpers every view uses; ``A`` is the page's data
HELPERS = r"""
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
function fmt(x, n) { return x === null || x === undefined ? "–" : Number(x).toFixed(n); }
function sgn(x) { return x === null || x === undefined ? "–" : (x >= 0 ? "+" : "") + Number(x).toFixed(3); }
function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(2) + " %"; }
function section(title) { return el("h2", {text: title}); }
function kv(rows) {
  var t = el("table");
  rows.forEach(function (r) { t.appendChild(el("tr", null, el("th", {text: r[0]}), el("td", null, r[1]))); });
  return t;
}
function routeIndex(arg, n) {  // the route's argument as an index in [0, n), else -1 ("", "0.5", "-1", "x")
  var i = Number(arg);
  return arg !== "" && Number.isInteger(i) && i >= 0 && i < n ? i : -1;
}
function notFound() { return [el("h1", {text: "Not found"}), el("p", null, link("", "back to the index"))]; }
function figureList(files) {
  var ul = el("ul", {id: "figures"});
  files.forEach(function (f) { ul.appendChild(el("li", null, el("a", {href: runFileUrl(f), text: f}))); });
  return ul;
}
"""

#: routing (real hashes on disk, in memory inside a blob: document) and search, over VIEWS / SEARCH / TITLE
ROUTER = r"""
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
  var parts = h.split("/"), kind = parts[0], arg = parts.slice(1).join("/");
  var fn = (kind || !arg) && Object.prototype.hasOwnProperty.call(VIEWS, kind) ? VIEWS[kind] : null;
  var nodes = fn ? fn(arg) : notFound();
  view.textContent = "";
  nodes.forEach(function (n) { view.appendChild(n); });
  document.getElementById("crumb").textContent = kind;
  document.title = TITLE + (kind ? " · " + kind : "");
  document.body.setAttribute("data-route", fn ? (kind || "index") : "notfound");
  window.scrollTo(0, 0);
}

function search() {
  var q = document.getElementById("search").value.trim().toLowerCase(), box = document.getElementById("results");
  box.textContent = "";
  if (!q) { return; }
  SEARCH.forEach(function (g) {
    var hits = [];
    for (var i = 0; i < g[1].length && hits.length < 50; i++) {
      if (String(g[1][i]).toLowerCase().indexOf(q) >= 0) { hits.push(i); }
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
"""


def page(title: str, home: str, placeholder: str, views_js: str) -> str:
    """A page template (with :data:`DATA_MARK` where the data go): the shared style, header, helpers and router
    around ``views_js`` (which defines ``VIEWS``, ``SEARCH`` and ``TITLE``)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{title}</title>\n<style>{STYLE}</style></head>\n<body>\n"
            f"<header><a href=\"#/\" id=\"home\">{home}</a><a href=\"#\" id=\"back\" title=\"back\">&#9664; back</a>"
            f"<span id=\"crumb\"></span>\n<input id=\"search\" type=\"search\" placeholder=\"{placeholder}\" "
            "aria-label=\"search\"></header>\n<div id=\"results\"></div>\n<main id=\"view\"></main>\n"
            f"<script type=\"application/json\" id=\"atlas-data\">{DATA_MARK}</script>\n<script>\n\"use strict\";\n"
            "(function () {\nvar A = JSON.parse(document.getElementById(\"atlas-data\").textContent);\n"
            + HELPERS + views_js + ROUTER + "})();\n</script>\n</body></html>\n")


def embed_json(data: dict) -> str:
    """Compact JSON safe inside ``<script type="application/json">``: no ``<``, ``>`` or ``&`` survives as such
    (``</script>`` in a name cannot close the block), nor U+2028/U+2029."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def render(template: str, data: dict) -> str:
    """``template`` (from :func:`page`) with ``data`` inlined once."""
    head, tail = template.split(DATA_MARK)
    return head + embed_json(data) + tail


def read_data(page_file) -> dict:
    """The data block of a written page, parsed back (tests, the cross-dataset report)."""
    from pathlib import Path

    text = Path(page_file).read_text(encoding="utf-8")
    mark = '<script type="application/json" id="atlas-data">'
    start = text.index(mark) + len(mark)
    return json.loads(text[start:text.index("</script>", start)])
