"""Figure builders shared by the figures callback and the report (matplotlib's object API on Agg, no pyplot).

Every builder takes plain arrays and returns a :class:`matplotlib.figure.Figure`; :func:`save_figure` writes it as
PNG and PDF. Nothing here reads the embedding or talks to MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# matplotlib's PDF backend subsets the embedded fonts with fontTools, which logs every table it prunes at INFO
# (hundreds of lines per job under Hydra's INFO logging): not the user's business
logging.getLogger("fontTools").setLevel(logging.WARNING)

#: Paper §5.3: low-level layers (conv1_1 .. conv5_3) against high-level ones (conv5_4 and fc7).
PAPER_HIGH_LAYERS = ("conv5_4", "fc7")
REAL_COLOR, RANDOM_COLOR = "black", "red"
DATASET_COLORS = ("tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


#: journal column widths in inches (``analysis.callbacks.figures.width``, ``featstudy.report --width``)
JOURNAL_WIDTHS = {"single": 3.5, "double": 7.0}
#: the smallest font a figure may use, in points (journals ask for 6-8 pt at print size)
MIN_FONT_PT, MAX_FONT_PT = 7.0, 9.0
#: D spans [-1, 1]; the axes go a little further so that values at exactly +-1 are not drawn on the frame
D_LIMITS = (-1.05, 1.05)


def journal_layout(fig: Figure, width: str) -> Figure:
    """Set ``fig`` to a journal column width (``single`` 3.5 in, ``double`` 7 in), its height scaled with the
    width (at least 2.4 in), every font between 7 and 9 pt, and constrained layout (legends and labels inside the
    page, no empty band under a title). Saved without ``bbox_inches="tight"``, the file is exactly that wide."""
    from matplotlib.text import Text

    if width not in JOURNAL_WIDTHS:
        raise ValueError(f"width must be one of {sorted(JOURNAL_WIDTHS)}, got {width!r}")
    w = JOURNAL_WIDTHS[width]
    old_w, old_h = fig.get_size_inches()
    # figures 2/3 say how tall they must be for their row labels (three lines of 7 pt per row)
    fig.set_size_inches(w, max(old_h * w / old_w, 2.4, float(getattr(fig, "featstudy_min_height_in", 0.0))))
    for text in fig.findobj(Text):
        text.set_fontsize(min(max(float(text.get_fontsize()), MIN_FONT_PT), MAX_FONT_PT))
    # titles and axis labels longer than their room are wrapped at spaces (constrained layout does not shrink text;
    # a long title would run off the page): about 0.55 em per character
    height = fig.get_size_inches()[1]
    for ax in fig.axes:
        share = ax.get_position().width
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        # slanted tick labels side by side need about 1.6 em each: where they do not fit, stand them upright
        if labels and len(labels) * 1.6 * MIN_FONT_PT / 72 > 0.8 * share * w:
            for t in labels:
                t.set_rotation(90)
                t.set_horizontalalignment("center")
        for text, room in ((ax.title, share * w), (ax.xaxis.label, share * w), (ax.yaxis.label, 0.8 * height)):
            _wrap(text, room)
    if fig._suptitle is not None:
        _wrap(fig._suptitle, w)
    fig.set_layout_engine("constrained")
    if width == "single":
        _legends_below(fig)
    return fig


def _legends_below(fig: Figure) -> None:
    """One column is too narrow for a legend beside the axes: every legend becomes one figure legend under
    everything (entries in order, each label once), in as many columns as fit."""
    entries: dict[str, object] = {}
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    for legend in legends:
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            entries.setdefault(text.get_text(), handle)
    if not entries:
        return
    for ax in fig.axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legends.clear()
    longest = max(len(label) for label in entries)
    ncols = max(1, min(len(entries), int(JOURNAL_WIDTHS["single"] * 72 / ((longest + 4) * 0.55 * 8))))
    fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncols=ncols, frameon=False,
               fontsize=8)


def _wrap(text, room_in: float) -> None:
    """Wrap ``text`` at spaces so that each line fits ``room_in`` inches at its font size."""
    import textwrap

    content = text.get_text()
    chars = max(int(room_in * 72 / (0.55 * float(text.get_fontsize()))), 12)
    if content and "\n" not in content and len(content) > chars:
        text.set_text("\n".join(textwrap.wrap(content, chars, break_long_words=False)))


def legend_outside(ax, **kwargs):
    """The legend right of the axes, never over the data."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False,
                     **{"fontsize": 8, **kwargs})


def save_figure(fig: Figure, folder: Path, name: str, formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 120) -> list[Path]:
    """Write ``folder/name.<fmt>`` for each format; return the paths. A figure with a layout engine
    (:func:`journal_layout`) keeps its exact size, any other is cropped to its content. PDF and SVG are vector,
    their text embedded as TrueType (Type 42) fonts, as journals ask. The figure stays intact (its data can be read
    back); it is freed with its last reference (no pyplot, so nothing else holds it)."""
    import matplotlib

    folder.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    exact = fig.get_layout_engine() is not None
    paths = []
    with matplotlib.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "path"}):
        for fmt in formats:
            path = folder / f"{name}.{fmt}"
            fig.savefig(path, dpi=dpi, bbox_inches=None if exact else "tight")
            paths.append(path)
    return paths


def split_low_high(layers: Sequence[str]) -> tuple[list[str], list[str]]:
    """(low, high) layer groups: the paper's split when its layer names are present, else the last two layers."""
    layers = list(layers)
    high = [name for name in layers if name in PAPER_HIGH_LAYERS]
    if not high:
        high = layers[-2:]
    return [name for name in layers if name not in high], high


def mode_interval(values: np.ndarray, lo: float, hi: float, bins: int = 50, mass: float = 0.34
                  ) -> tuple[float, float, float]:
    """Mode of ``values`` on a ``bins``-bin histogram over [lo, hi], and the interval holding ``mass`` of the
    probability on each side of it (paper Figure 5: 68% in all, like mu +- sigma of a normal).

    Returns (nan, nan, nan) for an empty sample.
    """
    values = np.asarray(values, dtype=float).ravel()
    if values.size == 0:
        return (np.nan, np.nan, np.nan)
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    i = int(np.argmax(counts))
    mode = 0.5 * (edges[i] + edges[i + 1])
    at_mode = float(np.mean(values <= mode))
    low = float(np.quantile(values, max(at_mode - mass, 0.0)))
    high = float(np.quantile(values, min(at_mode + mass, 1.0)))
    return (float(mode), low, high)


def fig1_histograms(intra: np.ndarray, inter: np.ndarray, title: str, bins: int = 50) -> Figure:
    """Figure 1: intra- and inter-class density estimates (normalised histograms) of one feature for one class."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    lo = float(min(np.min(intra), np.min(inter)))
    hi = float(max(np.max(intra), np.max(inter)))
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    ax.hist(inter, bins=edges, density=True, alpha=0.55, color="tab:blue", label=f"inter-class (n={len(inter)})")
    ax.hist(intra, bins=edges, density=True, alpha=0.55, color="tab:orange", label=f"intra-class (n={len(intra)})")
    ax.set_xlabel("feature activation")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    legend_outside(ax)
    return fig


def _tile(cells: Sequence, size: int, gap: int = 4) -> np.ndarray:
    """Thumbnails side by side on white (an empty cell stays light grey)."""
    strip = np.full((size, len(cells) * (size + gap), 3), 255, dtype=np.uint8)
    for j, img in enumerate(cells):
        x0 = j * (size + gap)
        if isinstance(img, str):  # "gap": stays white
            continue
        if img is None:
            strip[:, x0:x0 + size] = 225
            continue
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        h, w = min(arr.shape[0], size), min(arr.shape[1], size)
        strip[:h, x0:x0 + w] = arr[:h, :w, :3]
    return strip


def fig_top_features(rows: Sequence[Mapping], title: str) -> Figure:
    """Figures 2/3: one row per feature, its most activating image crops, then (optional) class samples.

    Each row is a mapping with ``label`` (str), ``images`` (list of HxW[x3] uint8 arrays or None) and optionally
    ``class_images`` and ``class_label``. One axes per row (fast to draw even for many images).
    """
    cells = [list(r["images"]) + (["gap"] + list(r["class_images"]) if r.get("class_images") else []) for r in rows]
    n_cols = max((len(c) for c in cells), default=1)
    size = max((np.asarray(img).shape[0] for c in cells for img in c if img is not None and not isinstance(img, str)), default=32)
    fig = Figure(figsize=(0.95 * n_cols + 1.8, 1.05 * max(len(rows), 1) + 0.5))
    lines = max((str(r["label"]).count("\n") + 1 for r in rows), default=1)
    fig.featstudy_min_height_in = len(rows) * (lines * 1.25 * MIN_FONT_PT / 72 + 0.06) + 0.6  # for journal_layout
    fig.suptitle(title, fontsize=10)
    for i, (row, c) in enumerate(zip(rows, cells)):
        ax = fig.add_subplot(len(rows), 1, i + 1)
        ax.imshow(_tile(c + ["gap"] * (n_cols - len(c)), size))
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_ylabel(row["label"], rotation=0, ha="right", va="center", fontsize=7)
        if row.get("class_images"):
            ax.text(1.0, 1.02, row.get("class_label", "class samples"), transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=7, color="tab:red")
    return fig


def fig5_modes(per_dataset: Mapping[str, tuple[np.ndarray, np.ndarray]], layers: Sequence[str]) -> Figure:
    """Figure 5: per layer, the modes of D+ (D > 0) and D- (D < 0) with 68% intervals, one colour per dataset.

    ``per_dataset[name] = (d, layer_of_feature)`` with ``d`` of shape (F, C).
    """
    fig = Figure(figsize=(max(6, 0.55 * len(layers) + 2), 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    width = 0.8 / max(len(per_dataset), 1)
    for k, (name, (d, layer_of)) in enumerate(per_dataset.items()):
        color = DATASET_COLORS[k % len(DATASET_COLORS)]
        for sign, lo, hi in ((1, 0.0, 1.0), (-1, -1.0, 0.0)):
            stats = []
            for layer in layers:
                vals = d[layer_of == layer]
                vals = vals[vals > 0] if sign > 0 else vals[vals < 0]
                stats.append(mode_interval(vals, lo, hi))
            m = np.array([s[0] for s in stats])
            err = np.array([[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]])
            # the mode is a bin centre and may lie just outside [low, high]: the bar then ends at the mode
            # (clipped at 0, never reflected to the other side of it, which would show values never seen)
            ax.errorbar(x + (k - (len(per_dataset) - 1) / 2) * width, m, yerr=np.maximum(err, 0.0), fmt="o", ms=3,
                        capsize=2, color=color, label=name if sign > 0 else None)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=60, fontsize=8)
    ax.set_ylim(*D_LIMITS)
    ax.set_ylabel("D (mode, 68% interval)")
    ax.set_title("D+ and D- per layer")
    legend_outside(ax)
    return fig


def fig6_distributions(per_dataset: Mapping[str, tuple[np.ndarray, np.ndarray]], layers: Sequence[str],
                       colors: Mapping[str, str] | None = None, title: str = "", bins: int = 100) -> Figure:
    """Figures 6/8: distribution of D (% of the group's (feature, class) pairs), low vs high layers."""
    low, high = split_low_high(layers)
    groups = [(g, names) for g, names in (("-".join(dict.fromkeys([low[0], low[-1]])) if low else "", low),
                                          ("+".join(high), high)) if names]
    fig = Figure(figsize=(5.5 * len(groups), 4), layout="constrained")
    edges = np.linspace(-1, 1, bins + 1)
    centers = 0.5 * (edges[:-1] + edges[1:])
    for gi, (gname, names) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), gi + 1)
        for k, (name, (d, layer_of)) in enumerate(per_dataset.items()):
            vals = d[np.isin(layer_of, names)].ravel()
            if vals.size == 0:
                continue
            counts, _ = np.histogram(vals, bins=edges)
            color = (colors or {}).get(name, DATASET_COLORS[k % len(DATASET_COLORS)])
            ax.plot(centers, 100.0 * counts / vals.size, color=color, lw=1.2, label=name)
        ax.set_xlabel("D")
        if gi == 0:
            ax.set_ylabel("% of (feature, class) pairs")
        ax.set_title(gname)
        ax.set_xlim(*D_LIMITS)
    # one legend for both panels, right of them (never over a curve): every dataset drawn in either panel, in order
    handles: dict[str, object] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            handles.setdefault(line.get_label(), line)
    names = [name for name in per_dataset if name in handles]  # the datasets' order, not the panels'
    if names:
        fig.legend([handles[n] for n in names], names, loc="outside right upper", frameon=False, fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def fig9_counts(grid: np.ndarray, real_counts: np.ndarray, random_counts: np.ndarray, t_plus: float,
                title: str) -> Figure:
    """Figure 9: per class, the number of features with D > x; real labels black, randomized red, t+ dashed."""
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    for row in np.asarray(random_counts):
        ax.plot(grid, row, color=RANDOM_COLOR, lw=0.6, alpha=0.5)
    for row in np.asarray(real_counts):
        ax.plot(grid, row, color=REAL_COLOR, lw=0.6, alpha=0.6)
    ax.plot([], [], color=REAL_COLOR, label="classes")
    ax.plot([], [], color=RANDOM_COLOR, label="randomized labels")
    ax.axvline(t_plus, color="tab:blue", ls="--", lw=1.2, label=f"t+ = {t_plus:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("x")
    ax.set_ylabel("# features with D > x")
    ax.set_title(title)
    legend_outside(ax)
    return fig


def fig10_kept(layers: Sequence[str], kept: Mapping[str, float], kept_random: Mapping[str, float],
               title: str) -> Figure:
    """Figure 10: per layer, % of (feature, class) pairs kept by t+/t-; real blue, randomized green."""
    fig = Figure(figsize=(max(6, 0.5 * len(layers) + 2), 4))
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    ax.bar(x - 0.2, [100 * kept[name] for name in layers], width=0.4, color="tab:blue", label="real labels")
    ax.bar(x + 0.2, [100 * kept_random[name] for name in layers], width=0.4, color="tab:green",
           label="randomized labels")
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=60, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of pairs kept")  # by t+ / t-: D > t+ or D < t- (the title says which)
    ax.set_title(title)
    legend_outside(ax)
    return fig
