"""The atlas page in a real headless Chromium (DevTools protocol, tests/analysis/cdp.py): every view reachable
through its links, hostile class names shown as text (no dialog), search, images displayed from disk and inside a
real ``mlflow ui`` (the page runs there from a blob: URL in a sandboxed iframe), no console error.
Skipped where Chromium is not installed (.ci/run installs it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cdp import CHROMIUM, Browser
from mlflow_ui import IFRAME_FLAGS, ui  # noqa: F401 - the fixture
from test_atlas import HOSTILE, fake_crops, hostile_context

from featstudy.analysis.atlas import AtlasCallback

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")


#: every image of the view displayed (they load lazily: each poll scrolls to the next one not loaded yet)
IMAGES_OK = ("(() => { if (!document.images.length) return false;"
             " for (const i of document.images) { if (!i.complete) { i.scrollIntoView(); return false; } }"
             " return [...document.images].every(i => i.naturalWidth > 0); })()")


@pytest.fixture
def page(tmp_path, monkeypatch, tiny):
    """An atlas with hostile class names and (fake) crops, and its context."""
    fake_crops(monkeypatch, [])
    ctx = hostile_context(tmp_path, tiny)
    result = AtlasCallback(crops_per_feature=2).run(ctx)
    return tmp_path / "out" / "atlas" / "index.html", result, ctx


def _route(b: Browser, hash_: str, kind: str) -> None:
    b.eval(f"location.hash = {hash_!r}")
    b.wait(f"document.body.dataset.route === {kind!r} && location.hash === {hash_!r}")


def test_every_view_from_disk(page):
    path, _, _ = page
    with Browser() as b:
        b.goto(path.as_uri())
        b.wait("document.body && document.body.dataset.ready === '1'")
        # index: the hostile names are text, the banner says the weights are random
        assert b.eval("[...document.querySelectorAll('#class-table a')].map(a => a.textContent)") == HOSTILE
        assert b.eval("document.getElementById('random-banner') !== null")
        assert b.eval("document.querySelector('h1').textContent") == "Feature atlas: tiny</script><b>x</b>"
        assert b.eval("document.querySelectorAll('img[src=x], script:not([id]) ~ script, b').length") == 0
        # cross-links: index -> class (click) -> feature (click) -> layer (click)
        b.eval("document.querySelector('#class-table a').click()")
        b.wait("document.body.dataset.route === 'class'")
        assert b.eval("document.querySelector('h1').textContent") == HOSTILE[0]
        assert b.eval("[...document.querySelectorAll('#presence tr[data-feature]')].map(r => +r.dataset.feature)") \
            == [1, 5]
        assert b.eval("[...document.querySelectorAll('#absence tr[data-feature]')].map(r => +r.dataset.feature)") \
            == [0, 3, 4]
        assert b.eval("[...document.querySelectorAll('#absence a')].map(a => a.textContent)").count(
            "conv5_4:<b>4</b>") == 1
        b.wait(IMAGES_OK)  # the crops display from disk
        assert b.eval("document.images.length") == 2 * 5  # (2 + 3 features) x 2 crops
        b.eval("document.querySelector('#presence tr[data-feature] a').click()")
        b.wait("document.body.dataset.route === 'feature'")
        assert b.eval("document.querySelector('h1').textContent") == "Feature conv1_1:1"
        assert b.eval("document.querySelectorAll('#strip rect').length") == 3
        assert b.eval("[...document.querySelectorAll('#feature-presence a')].map(a => a.textContent)") == \
            HOSTILE[:2]
        assert b.eval("[...document.querySelectorAll('#feature-absence a')].map(a => a.textContent)") == [HOSTILE[2]]
        b.wait(IMAGES_OK)
        b.eval("document.querySelector('main p a').click()")
        b.wait("document.body.dataset.route === 'layer'")
        assert b.eval("document.querySelector('h1').textContent") == "Layer conv1_1"
        assert b.eval("document.querySelectorAll('#histogram rect').length") == 40
        assert b.eval("[...document.querySelectorAll('#irrelevant a')].map(a => a.textContent)") == ["conv1_1:2"]
        _route(b, "#/layer/fc7", "layer")
        assert b.eval("[...document.querySelectorAll('#irrelevant a')].map(a => a.textContent)") == ["fc7:1", "fc7:2"]
        for bad in ("#/class/99", "#/class/", "#/class/0.5", "#/feature/-1"):
            _route(b, bad, bad.split("/")[1])
            assert b.eval("document.querySelector('h1').textContent") == "Not found"
        # search: a class by part of its (hostile) name, a feature by part of its name, a layer
        b.eval("const s = document.getElementById('search'); s.value = 'ONERROR';"
               "s.dispatchEvent(new Event('input'))")
        assert b.eval("[...document.querySelectorAll('.hits-classes a')].map(a => a.textContent)") == \
            HOSTILE[:1]
        b.eval("const t = document.getElementById('search'); t.value = '<b>4';"
               "t.dispatchEvent(new Event('input'))")
        assert b.eval("[...document.querySelectorAll('.hits-features a')].map(a => a.textContent)") == \
            ["conv5_4:<b>4</b>"]
        b.eval("const u = document.getElementById('search'); u.value = 'fc7';"
               "u.dispatchEvent(new Event('input'))")
        assert b.eval("[...document.querySelectorAll('.hits-layers a')].map(a => a.textContent)") == ["fc7"]
        b.eval("document.querySelector('.hits-layers a').click()")
        b.wait("document.body.dataset.route === 'layer' && location.hash === '#/layer/fc7'")
        _route(b, "#/", "index")
        assert b.dialogs == [] and b.errors == [] and b.failed == []


def test_images_inside_the_mlflow_ui(page, ui):  # noqa: F811 - the fixture
    """The run's artifact view loads the page from a blob: URL into an iframe sandboxed to scripts: the crops still
    display (get-artifact URLs with the run id written into the page)."""
    from mlflow.tracking import MlflowClient

    from featstudy.analysis import AnalysisContext

    base, exp_id, uri = ui
    client = MlflowClient(uri)
    run_id = client.create_run(exp_id, run_name="atlas").info.run_id
    _, _, ctx = page
    ctx = AnalysisContext(ctx.embedding, ctx.analysis, ctx.output_dir, ctx.dataset, run_id=run_id)
    result = AtlasCallback(crops_per_feature=2).run(ctx)
    for f in result.files:  # as app.run logs them: a file at its folder's path, a folder at its own path
        rel = Path(f).relative_to(ctx.output_dir)
        if Path(f).is_dir():
            client.log_artifacts(run_id, str(f), str(rel))
        else:
            client.log_artifact(run_id, str(f), str(rel.parent))
    client.set_terminated(run_id, "FINISHED")
    with Browser(extra_flags=IFRAME_FLAGS) as b:
        world = b.open_mlflow_html_artifact(base, exp_id, run_id, "atlas/index.html")
        # a fragment navigation is refused there: the links route inside the page
        b.eval("document.querySelector('#class-table a').click()", context_id=world)
        b.wait("document.body.dataset.route === 'class'", context_id=world)
        assert b.eval("document.querySelector('h1').textContent", context_id=world) == HOSTILE[0]
        srcs = b.eval("[...document.images].map(i => i.src)", context_id=world)
        assert srcs and all(s.startswith(f"{base}/get-artifact?path=atlas%2Fimg%2F") and s.endswith(run_id)
                            for s in srcs), srcs
        b.wait(IMAGES_OK, timeout=60, context_id=world)
        for view in ("feature", "layer"):  # class -> feature -> layer through the page's own links, then back
            b.eval("document.querySelector('main a[href^=\"#/" + view + "/\"]').click()", context_id=world)
            b.wait(f"document.body.dataset.route === {view!r}", context_id=world)
        b.eval("document.getElementById('back').click()", context_id=world)
        b.wait("document.body.dataset.route === 'feature'", context_id=world)
        ours = ("atlas", "get-artifact", "blob:")  # MLflow's own page logs a 404 of users/current: not ours
        assert b.dialogs == [] and [u for u in b.failed if any(k in u for k in ours)] == []
        assert [e for e in b.errors if any(k in e for k in ours)] == []
