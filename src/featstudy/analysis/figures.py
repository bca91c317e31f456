"""The figures callback: the paper's per-dataset figures 1, 2, 3, 5, 6, 9 and 10, as PNG and PDF.

=====  ==============================================================================================
fig1   intra/inter-class histograms of one (feature, class); default the pair with the largest |D|
fig2   top features by D+ (largest D), each with its most activating images
fig3   top features by D- (most negative D), most activating images, then samples of the class
fig5   per layer, the modes of D+ and D- with 68% intervals
fig6   D distribution, conv1_1-conv5_3 against conv5_4 + fc7
fig9   per class, # features with D > x; real labels black, randomized red, t+ dashed
fig10  per layer, % of (feature, class) pairs kept by t+ / t-, real and randomized
=====  ==============================================================================================

Most activating images (figures 2 and 3) come, as in the paper, from the ImageNet validation embedding when one
made by the same model, weights, crops and pooling is in the cache; otherwise from the analysed dataset itself.
Each image is cropped to the feature's receptive field at its strongest spatial position when the feature has
one (conv layers) and the network can be rebuilt (see :mod:`featstudy.analysis.images`); fc features, which see
the whole image, show the whole (resized, centre-cropped) image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from featstudy.analysis import plots
from featstudy.analysis.base import AnalysisCallback, AnalysisContext, CallbackResult
from featstudy.errors import ConfigError

log = logging.getLogger(__name__)

FIGURES = ("fig1", "fig2", "fig3", "fig5", "fig6", "fig9", "fig10")


class FiguresCallback(AnalysisCallback):
    """Draw the per-dataset figures into ``<output>/figures/``.

    Parameters
    ----------
    formats : list of {"png", "pdf", "svg"}
        File formats written for every figure.
    top_k : int
        Figures 2 and 3: number of top features.
    n_images : int
        Figures 2 and 3: most activating images shown per feature (paper: 9).
    n_class_images : int
        Figure 3: samples of the class shown after the activating images.
    dpi : int
        Resolution of raster formats.
    which : list of str or None
        Subset of ``fig1, fig2, fig3, fig5, fig6, fig9, fig10``; None = all.
    fig1_feature, fig1_class : str or None
        Figure 1's pair, e.g. ``conv4_1:221`` and ``gazania``; None = the pair with the largest |D|.
    step : float
        Grid step of the thresholds (same as the thresholds callback).
    width : {"single", "double"} or None
        Journal column width of every figure (3.5 in or 7 in, fonts 7-9 pt, exact size in the files); None keeps
        each figure's own size, cropped to its content.
    """

    name = "figures"

    def __init__(self, formats=("png", "pdf"), top_k: int = 8, n_images: int = 9, n_class_images: int = 3,
                 dpi: int = 120, which=None, fig1_feature: str | None = None, fig1_class: str | None = None,
                 step: float = 0.001, width: str | None = "double"):
        self.formats = [str(f) for f in formats]
        bad = [f for f in self.formats if f not in ("png", "pdf", "svg")]
        if bad or not self.formats:
            raise ConfigError(f"analysis.callbacks.figures.formats={self.formats}: allowed png, pdf, svg")
        self.which = list(FIGURES) if which is None else [str(w) for w in which]
        unknown = [w for w in self.which if w not in FIGURES]
        if unknown:
            raise ConfigError(f"analysis.callbacks.figures.which: unknown {unknown}; allowed {list(FIGURES)}")
        self.top_k, self.n_images, self.n_class_images = int(top_k), int(n_images), int(n_class_images)
        self.dpi = int(dpi)
        self.fig1_feature = None if fig1_feature is None else str(fig1_feature)
        self.fig1_class = None if fig1_class is None else str(fig1_class)
        self.step = float(step)
        if width is not None and str(width) not in plots.JOURNAL_WIDTHS:
            raise ConfigError(f"analysis.callbacks.figures.width={width!r}: allowed single (3.5 in), double (7 in) "
                              "or null")
        self.width = None if width is None else str(width)

    def _save(self, ctx: AnalysisContext, drawn: dict, fig, name: str) -> list[Path]:
        """Write ``fig`` in every format and keep it in ``drawn`` (returned in ``objects["figures"]``)."""
        drawn[name] = fig
        if self.width is not None:
            plots.journal_layout(fig, self.width)
        return plots.save_figure(fig, ctx.output_dir / "figures", name, self.formats, self.dpi)

    def run(self, ctx: AnalysisContext) -> CallbackResult:
        ks = ctx.ks()
        d = np.asarray(ks.d)
        files: list[Path] = []
        drawn: dict = {}
        title = f"{ctx.dataset}"
        if "fig1" in self.which:
            f, c = self._fig1_pair(ctx, d)
            col = ctx.features[:, f]
            in_c = ctx.labels == c
            fig = plots.fig1_histograms(np.asarray(col[in_c]), np.asarray(col[~in_c]),
                                        f"{ctx.dataset}: feature {ctx.feature_names[f]}, class {ctx.classes[c]} "
                                        f"(D = {d[f, c]:+.3f})")
            files += self._save(ctx, drawn, fig, "fig1")
        if "fig2" in self.which or "fig3" in self.which:
            from featstudy.analysis import images

            source = images.activation_source(ctx)
            if "fig2" in self.which:
                rows = self._top_rows(ctx, d, source, positive=True)
                files += self._save(ctx, drawn, plots.fig_top_features(
                    rows, f"{ctx.dataset}: top {len(rows)} features by D+ ({source.description})"), "fig2")
            if "fig3" in self.which:
                rows = self._top_rows(ctx, d, source, positive=False)
                files += self._save(ctx, drawn, plots.fig_top_features(
                    rows, f"{ctx.dataset}: top {len(rows)} features by D- ({source.description})"), "fig3")
        per_dataset = {ctx.dataset: (d, ctx.layer_of_feature)}
        if "fig5" in self.which:
            files += self._save(ctx, drawn, plots.fig5_modes(per_dataset, ctx.layers), "fig5")
        if "fig6" in self.which:
            files += self._save(ctx, drawn, plots.fig6_distributions(per_dataset, ctx.layers, title=title), "fig6")
        if "fig9" in self.which or "fig10" in self.which:
            th = ctx.thresholds(self.step)
            if "fig9" in self.which:
                fig = plots.fig9_counts(th.grid, th.real_counts_plus, th.random_counts_plus, float(th.t_plus),
                                        f"{title}: D+ per class")
                files += self._save(ctx, drawn, fig, "fig9")
            if "fig10" in self.which:
                kept = ctx.kept(self.step)
                fig = plots.fig10_kept(ctx.layers, kept.by_layer, kept.by_layer_random,
                                       f"{title}: pairs kept by t+ / t-")
                files += self._save(ctx, drawn, fig, "fig10")
        return CallbackResult(files=files, objects={"figures": drawn})

    def _fig1_pair(self, ctx: AnalysisContext, d: np.ndarray) -> tuple[int, int]:
        if self.fig1_feature is None and self.fig1_class is None:
            f, c = np.unravel_index(int(np.argmax(np.abs(d))), d.shape)
            return int(f), int(c)
        if self.fig1_feature not in ctx.feature_names:
            raise ConfigError(f"analysis.callbacks.figures.fig1_feature={self.fig1_feature!r}: not an analysed "
                              f"feature (names look like {ctx.feature_names[0]})")
        if self.fig1_class not in ctx.classes:
            raise ConfigError(f"analysis.callbacks.figures.fig1_class={self.fig1_class!r}: not a class of "
                              f"{ctx.dataset} (e.g. {ctx.classes[:3]})")
        return ctx.feature_names.index(self.fig1_feature), ctx.classes.index(self.fig1_class)

    def _top_rows(self, ctx: AnalysisContext, d: np.ndarray, source, *, positive: bool) -> list[dict]:
        """The top_k distinct features by D (positive) or -D (negative) with their images."""
        order = np.argsort(-d if positive else d, axis=None, kind="stable")
        picks: list[tuple[int, int]] = []
        seen: set[int] = set()
        for flat in order:
            f, c = np.unravel_index(int(flat), d.shape)
            if (d[f, c] <= 0) if positive else (d[f, c] >= 0):
                break
            if f in seen:
                continue
            seen.add(int(f))
            picks.append((int(f), int(c)))
            if len(picks) == self.top_k:
                break
        images = source.top_images_many([ctx.feature_names[f] for f, _ in picks], self.n_images)
        rows: list[dict] = []
        for f, c in picks:
            name = ctx.feature_names[f]
            row = {"label": f"{name}\n{ctx.classes[c][:18]}\nD={d[f, c]:+.2f}", "images": images[name]}
            if not positive and self.n_class_images > 0:
                members = np.flatnonzero(ctx.labels == c)[: self.n_class_images]
                row["class_images"] = [source.dataset_image(int(i)) for i in members]
                row["class_label"] = f"class {ctx.classes[c][:24]}"
            rows.append(row)
        return rows
