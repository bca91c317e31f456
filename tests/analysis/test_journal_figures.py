"""Figures ready for a paper (issue 11, item 8): journal column widths, fonts of at least 7 pt, vector PDFs with
embedded TrueType text, legends that never cover data, and D at +-1 inside the frame.

Each check reads the saved files (the PDF's MediaBox, the PNG's header) or the drawn artists in display
coordinates; the expectations are the journal sizes (3.5 in = 252 pt, 7 in = 504 pt) and geometry, not values
taken from featstudy.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from featstudy.analysis import plots
from featstudy.analysis.figures import FiguresCallback
from featstudy.errors import ConfigError

FAST = ["fig1", "fig5", "fig6", "fig9", "fig10"]
POINTS = {"single": 252.0, "double": 504.0}


def _pdf_width_pt(path) -> float:
    box = re.search(rb"/MediaBox\s*\[\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*\]", path.read_bytes())
    return float(box.group(3)) - float(box.group(1))


def _png_width_px(path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def _data_points_px(ax) -> np.ndarray:
    """Every plotted data point of ``ax`` in display pixels: line vertices, errorbar segments, bar corners."""
    pts = []
    for line in ax.get_lines():
        xy = np.asarray(line.get_xydata(), dtype=float)
        if line.get_transform() == ax.transData and xy.size:  # axhline / axvline span the axes: not data
            pts.append(ax.transData.transform(xy))
    for coll in ax.collections:
        if isinstance(coll, LineCollection):
            for seg in coll.get_segments():
                pts.append(ax.transData.transform(np.asarray(seg, dtype=float)))
    for patch in ax.patches:
        if isinstance(patch, Rectangle) and patch.get_height() != 0:
            x, y, w, h = patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()
            pts.append(ax.transData.transform([[x, y], [x + w, y], [x, y + h], [x + w, y + h]]))
    pts = [p for p in pts if len(p)]
    return np.concatenate(pts) if pts else np.zeros((0, 2))


def _tick_labels_clear(ax, renderer) -> bool:
    """Consecutive x tick labels do not overlap: horizontal ones by their boxes; slanted or upright ones (parallel
    strips of text) when the distance between neighbouring strips, spacing x sin(angle), is at least a line."""
    lo, hi = ax.get_xlim()
    ticks = [(x, t) for t, x in zip(ax.get_xticklabels(), ax.get_xticks()) if t.get_text() and lo <= x <= hi]
    if len(ticks) < 2:
        return True
    xs = ax.transData.transform([[x, 0] for x, _ in ticks])[:, 0]
    angle = np.deg2rad(ticks[0][1].get_rotation() % 180)
    if abs(np.sin(angle)) < 1e-6:
        boxes = sorted((t.get_window_extent(renderer) for _, t in ticks), key=lambda b: b.x0)
        return all(a.x1 <= b.x0 + 0.5 for a, b in zip(boxes, boxes[1:]))
    line_px = 1.4 * ticks[0][1].get_fontsize() * ax.figure.dpi / 72  # a line of text and its leading
    return bool(np.min(np.diff(np.sort(xs))) * abs(np.sin(angle)) >= line_px)


@pytest.mark.parametrize("width", ["single", "double"])
def test_every_figure_has_the_journal_width_fonts_and_vector_text(tiny, width):
    ctx = tiny.context()
    result = FiguresCallback(which=FAST, width=width, formats=["png", "pdf"], dpi=100).run(ctx)
    figures = result.objects["figures"]
    assert sorted(figures) == sorted(FAST)
    for name, fig in figures.items():
        pdf = tiny.out / "figures" / f"{name}.pdf"
        assert _pdf_width_pt(pdf) == pytest.approx(POINTS[width], abs=0.5), name
        assert _png_width_px(tiny.out / "figures" / f"{name}.png") == round(POINTS[width] / 72 * 100), name
        body = pdf.read_bytes()
        assert b"/Type3" not in body and b"/FontFile2" in body, name  # text as embedded TrueType, not Type 3
        sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert sizes and min(sizes) >= 7.0, (name, min(sizes))


@pytest.mark.parametrize("width", ["single", "double"])
def test_legends_never_cover_data_and_stay_on_the_page(tiny, width):
    """In display pixels after drawing: no data point inside any legend's box, every legend inside the figure."""
    ctx = tiny.context()
    figures = FiguresCallback(which=FAST, width=width, formats=["png"]).run(ctx).objects["figures"]
    checked = 0
    for name, fig in figures.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        page = fig.bbox
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
        pts = np.concatenate([_data_points_px(ax) for ax in fig.axes])
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, \
                (name, box, page)
            inside = (pts[:, 0] > box.x0) & (pts[:, 0] < box.x1) & (pts[:, 1] > box.y0) & (pts[:, 1] < box.y1)
            assert not inside.any(), (name, pts[inside][:3])
            checked += 1
        texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
        for text in texts + ([fig._suptitle] if fig._suptitle is not None else []):  # no title or label off the page
            if text.get_visible() and text.get_text().strip():
                box = text.get_window_extent(renderer)
                assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, (name, text.get_text(), box, page)
        for ax in fig.axes:  # tick labels side by side never overlap
            assert _tick_labels_clear(ax, renderer), name
    assert checked >= len(FAST)


@pytest.mark.parametrize("width", ["single", "double"])
def test_seventeen_layer_labels_do_not_overlap(width):
    """The paper's 16 conv layers and fc7 on fig5 and fig10 at one column: labels stand upright when slanted
    ones would not fit."""
    layers = [f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4)) for i in range(1, n + 1)] + ["fc7"]
    assert len(layers) == 17
    rng = np.random.default_rng(1)
    d = rng.uniform(-1, 1, (17 * 4, 5))
    layer_of = np.repeat(layers, 4)
    kept = {name: 0.5 for name in layers}
    for fig in (plots.fig5_modes({"ds": (d, layer_of)}, layers), plots.fig10_kept(layers, kept, kept, "t")):
        plots.journal_layout(fig, width)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        assert len([t for t in fig.axes[0].get_xticklabels() if t.get_text()]) == 17
        assert _tick_labels_clear(fig.axes[0], canvas.get_renderer()), width


def test_d_at_plus_minus_one_is_drawn_inside_the_frame():
    """A mode at exactly D = +1 (fig5) and a histogram bin at D = -1 (fig6) lie strictly inside the axes."""
    layer_of = np.array(["conv1_1"] * 4 + ["fc7"] * 4)
    d = np.array([[1.0, -1.0]] * 8)
    fig5 = plots.journal_layout(plots.fig5_modes({"ds": (d, layer_of)}, ["conv1_1", "fc7"]), "single")
    fig6 = plots.journal_layout(plots.fig6_distributions({"ds": (d, layer_of)}, ["conv1_1", "fc7"]), "single")
    for fig in (fig5, fig6):
        FigureCanvasAgg(fig).draw()
        for ax in fig.axes:
            frame = ax.get_window_extent()
            pts = _data_points_px(ax)
            assert len(pts)
            assert (pts[:, 1] > frame.y0 + 1).all() and (pts[:, 1] < frame.y1 - 1).all() or \
                (pts[:, 0] > frame.x0 + 1).all() and (pts[:, 0] < frame.x1 - 1).all()
    lo, hi = fig5.axes[0].get_ylim()
    assert lo < -1.0 and hi > 1.0


def test_a_free_size_figure_is_cropped_and_a_bad_width_is_refused(tiny):
    ctx = tiny.context()
    result = FiguresCallback(which=["fig9"], width=None, formats=["pdf"]).run(ctx)
    assert _pdf_width_pt(result.files[0]) not in (POINTS["single"], POINTS["double"])
    with pytest.raises(ConfigError, match=r"analysis.callbacks.figures.width='wide': allowed single"):
        FiguresCallback(width="wide")
    with pytest.raises(ValueError, match="width must be one of"):
        plots.journal_layout(plots.fig10_kept(["a"], {"a": 0.5}, {"a": 0.1}, "t"), "triple")


def test_top_feature_rows_are_labelled_and_the_title_sits_on_the_rows():
    """fig2/fig3 rows: layer:channel, the class and D on each row's label; the title right above the first row
    (no empty band), at both widths."""
    rng = np.random.default_rng(0)
    rows = [{"label": f"conv5_4:{k}\nbird {k}\nD=+0.{k}1", "images": [rng.integers(0, 255, (16, 16, 3), np.uint8)] * 9}
            for k in range(8)]
    for width in ("single", "double"):
        fig = plots.journal_layout(plots.fig_top_features(rows, "cub200: top 4 features by D+"), width)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        labels = [ax.get_ylabel() for ax in fig.axes]
        assert labels == [r["label"] for r in rows]
        title = fig._suptitle.get_window_extent(renderer)
        top_row = fig.axes[0].get_window_extent(renderer)
        gap_in = (title.y0 - top_row.y1) / fig.dpi
        assert 0 <= gap_in < 0.25, gap_in  # the title sits on the rows
        boxes = [ax.yaxis.label.get_window_extent(renderer) for ax in fig.axes]  # top to bottom
        assert all(a.y0 >= b.y1 - 0.5 for a, b in zip(boxes, boxes[1:])), width  # three-line labels never overlap
