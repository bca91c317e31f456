"""The report's comparison page in a real headless Chromium (tests/analysis/cdp.py): every view through its links,
hostile dataset and class names shown as text, search, from disk and inside a real ``mlflow ui`` (blob: URL in a
sandboxed iframe), no console error. The expected lists come from test_compare.py's hand table.
Skipped where Chromium is not installed (.ci/run installs it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cdp import CHROMIUM, Browser
from mlflow_ui import IFRAME_FLAGS, ui  # noqa: F401 - the fixture
from test_compare import hand_runs

from featstudy.analysis.compare import write_compare_page

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")


EVIL = "<img src=x onerror=alert(1)>"


def hostile_page(out: Path, run_id: str | None = None) -> Path:
    runs = hand_runs()
    runs[0].name = EVIL  # dataset A
    runs[1].classes = ["</script><b>b0</b>", "b1", "b2"]
    (out / "figures").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 0, 0)).save(out / "figures" / "fig5.png")
    return write_compare_page(runs, out / "atlas", figures=["figures/fig5.png"], run_id=run_id)


def texts(b: Browser, selector: str, context_id=None) -> list[str]:
    return b.eval(f"[...document.querySelectorAll({selector!r})].map(e => e.textContent)", context_id=context_id)


def test_every_view_from_disk(tmp_path):
    page = hostile_page(tmp_path)
    with Browser() as b:
        b.goto(page.as_uri())
        b.wait("document.body && document.body.dataset.ready === '1'")
        assert texts(b, "#dataset-table td:first-child a") == [EVIL, "B", "C"]
        assert b.eval("document.querySelector('h1').textContent") == f"Datasets compared: {EVIL}, B, C"
        assert b.eval("document.querySelectorAll('img').length") == 0  # the hostile name made no element
        # per layer: features, shared, only A, only B, only C, some, none (the hand table)
        assert texts(b, "#layer-table tr[data-layer='L1'] td") == ["L1", "4", "1", "0", "1", "0", "1", "1"]
        assert texts(b, "#layer-table tr[data-layer='L2'] td") == ["L2", "2", "0", "1", "0", "0", "0", "1"]
        assert "left out: B 1" in b.eval("document.getElementById('left-out').textContent")
        # the figure link opens the report's figure next to the page's folder
        href = b.eval("document.querySelector('#figures a').href")
        assert href == (tmp_path / "figures" / "fig5.png").as_uri()
        # index -> layer -> feature -> dataset, by clicks
        b.eval("document.querySelector('#layer-table a').click()")
        b.wait("document.body.dataset.route === 'layer'")
        assert texts(b, "#cat-shared a") == ["L1:0"] and texts(b, "#cat-only-1 a") == ["L1:3"]
        assert texts(b, "#cat-some a") == ["L1:2"] and texts(b, "#cat-none a") == ["L1:1"]
        assert texts(b, "#cat-shared tr[data-feature] td")[1:] == ["+1 / −0", "+1 / −1", "+1 / −0"]
        b.eval("document.querySelector('#cat-only-1 a').click()")
        b.wait("document.body.dataset.route === 'feature'")
        assert b.eval("document.querySelector('h1').textContent") == "Feature L1:3"
        assert b.eval("document.getElementById('category').textContent").startswith("specific to B")
        assert texts(b, "#per-dataset tr[data-dataset='1'] td.tneg") == ["</script><b>b0</b> (-0.410)"]
        assert b.eval("document.querySelectorAll('#per-dataset b').length") == 0
        b.eval("document.querySelector('#per-dataset a').click()")
        b.wait("document.body.dataset.route === 'dataset'")
        assert b.eval("document.querySelector('h1').textContent") == f"Dataset {EVIL}"
        assert texts(b, "#specific a") == ["L2:0"]
        for bad in ("#/feature/99", "#/feature/0.5", "#/feature/", "#/dataset/-1", "#/dataset/1e0x", "#//x"):
            b.eval(f"location.hash = {bad!r}")
            b.wait(f"location.hash === {bad!r} && document.querySelector('h1').textContent === 'Not found'")
        # search: a class (hostile) and a feature and a dataset
        for query, group, want in (("</script>", "classes", ["</script><b>b0</b> in B"]),
                                   ("l2:1", "features", ["L2:1"]), ("onerror", "datasets", [EVIL])):
            b.eval(f"(() => {{ const s = document.getElementById('search'); s.value = {query!r};"
                   " s.dispatchEvent(new Event('input')); })()")
            assert texts(b, f".hits-{group} > a, .hits-{group} > span") == want
        b.eval("document.querySelector('.hits-datasets a').click()")
        b.wait("document.body.dataset.route === 'dataset'")
        assert b.dialogs == [] and b.errors == [] and b.failed == []


def test_inside_the_mlflow_ui(tmp_path, ui):  # noqa: F811 - the fixture
    """Logged as a report run's artifact: the page runs from a blob: URL, routes in memory, and links the report's
    figure through get-artifact with the run id written into the page."""
    from mlflow.tracking import MlflowClient

    base, exp_id, uri = ui
    client = MlflowClient(uri)
    run_id = client.create_run(exp_id, run_name="report").info.run_id
    page = hostile_page(tmp_path, run_id)
    client.log_artifact(run_id, str(page), "atlas")
    client.log_artifact(run_id, str(tmp_path / "figures" / "fig5.png"), "figures")
    client.set_terminated(run_id, "FINISHED")
    with Browser(extra_flags=IFRAME_FLAGS) as b:
        world = b.open_mlflow_html_artifact(base, exp_id, run_id, "atlas/index.html")
        assert texts(b, "#dataset-table td:first-child a", world) == [EVIL, "B", "C"]
        href = b.eval("document.querySelector('#figures a').href", context_id=world)
        assert href == f"{base}/get-artifact?path=figures%2Ffig5.png&run_uuid={run_id}"
        for view in ("layer", "feature", "dataset"):
            b.eval("document.querySelector('main a[href^=\"#/" + view + "/\"]').click()", context_id=world)
            b.wait(f"document.body.dataset.route === {view!r}", context_id=world)
        b.eval("document.getElementById('back').click()", context_id=world)
        b.wait("document.body.dataset.route === 'feature'", context_id=world)
        ours = ("atlas", "get-artifact", "blob:")
        assert b.dialogs == [] and [u for u in b.failed if any(k in u for k in ours)] == []
        assert [e for e in b.errors if any(k in e for k in ours)] == []
