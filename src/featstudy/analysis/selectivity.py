"""The selectivity callback: AUROC of every (feature, class) pair and the class selectivity index of every feature.

Two readings of the embedding beside the paper's signed KS (Eq. 3), on the same features and labels:

* ``auroc[f, c] = P(X_in > X_out) + ½·P(X_in = X_out)`` (:func:`featstudy.stats.class_auroc`), 0.5 when the class
  is not told apart; |AUROC − 0.5| measures a shift of the whole distribution where |D| measures the largest gap
  between the two EDFs at one point.
* the class selectivity index of Morcos et al. (2018), ``(μ_max − μ_rest) / (μ_max + μ_rest)`` per feature
  (:func:`featstudy.stats.selectivity_index`): 0 for a feature equally active on every class, 1 for one that fires
  on a single class only.

Metrics, per analysed layer: ``auroc_abs_median.<layer>`` (the median of |AUROC − 0.5| over the layer's
(feature, class) pairs) and ``selectivity_median.<layer>`` (the median index over the layer's features).
File: ``arrays/selectivity.npz`` with ``auroc`` (F, C), ``selectivity`` (F,), ``preferred`` (F,) class names,
``class_means`` (F, C), ``feature_names`` and ``classes``. Figure ``figures/selectivity.<fmt>``: per layer, the
distribution of the selectivity index next to that of |D| (box plots; their data in ``objects["figure_data"]``).
"""

from __future__ import annotations

import numpy as np

from featstudy.analysis.base import AnalysisCallback, AnalysisContext, CallbackResult


class SelectivityCallback(AnalysisCallback):
    """AUROC and class selectivity of every analysed feature; per-layer medians and one figure.

    Parameters
    ----------
    formats : list of str
        Figure formats (``png``, ``pdf``, ``svg``).
    dpi : int
        Resolution of raster formats.
    """

    name = "selectivity"

    def __init__(self, formats: list[str] | tuple[str, ...] = ("png", "pdf"), dpi: int = 120):
        from featstudy.errors import ConfigError

        formats = list(formats or [])
        bad = [f for f in formats if f not in ("png", "pdf", "svg")]
        if bad:
            raise ConfigError(f"analysis.callbacks.selectivity.formats: {bad} not among png, pdf, svg")
        if not isinstance(dpi, int) or isinstance(dpi, bool) or dpi < 10:
            raise ConfigError(f"analysis.callbacks.selectivity.dpi={dpi!r}: must be an integer >= 10")
        self.formats, self.dpi = formats, dpi

    def run(self, ctx: AnalysisContext) -> CallbackResult:
        from featstudy import stats

        features, labels = ctx.features, ctx.labels
        auroc = ctx.auroc()
        sel = stats.selectivity_index(features, labels)
        classes = np.asarray(ctx.classes, dtype=object)
        abs_d = np.abs(ctx.ks().d)
        metrics: dict[str, float] = {}
        data: dict[str, dict[str, np.ndarray]] = {}
        for layer in ctx.layers:
            in_layer = ctx.layer_of_feature == layer
            shift = np.abs(auroc[in_layer] - 0.5)
            metrics[f"auroc_abs_median.{layer}"] = float(np.median(shift))
            metrics[f"selectivity_median.{layer}"] = float(np.median(sel.index[in_layer]))
            data[layer] = {"selectivity": sel.index[in_layer], "abs_d": abs_d[in_layer].ravel()}
        path = ctx.path("arrays/selectivity.npz")
        # ctx.labels are D's column indices: sel.classes is 0..C-1 and the position of a preferred label is its column
        preferred = classes[np.searchsorted(np.asarray(sel.classes), np.asarray(sel.preferred))].astype(str)
        np.savez(path, auroc=auroc, selectivity=sel.index, preferred=preferred, class_means=sel.class_means,
                 feature_names=np.asarray(ctx.feature_names, dtype=str), classes=classes.astype(str))
        files = [path]
        figure = None
        if self.formats:
            from featstudy.analysis import plots

            figure = selectivity_figure(data, f"{ctx.dataset}: class selectivity index and |D| per layer")
            files += plots.save_figure(figure, ctx.output_dir / "figures", "selectivity", self.formats, self.dpi)
        return CallbackResult(metrics=metrics, files=files,
                              objects={"auroc": auroc, "selectivity": sel, "figure_data": data, "figure": figure})


def selectivity_figure(data: dict[str, dict[str, np.ndarray]], title: str):
    """Two panels sharing the layer axis: box plots of the selectivity index (left) and of |D| (right) per layer."""
    from matplotlib.figure import Figure

    layers = list(data)
    fig = Figure(figsize=(max(6.0, 0.45 * len(layers) + 3), 4))
    left, right = fig.subplots(1, 2, sharey=False)
    for ax, key, label in ((left, "selectivity", "class selectivity index"), (right, "abs_d", "|D|")):
        ax.boxplot([data[layer][key] for layer in layers], showfliers=False)
        ax.set_xticks(np.arange(1, len(layers) + 1))
        ax.set_xticklabels(layers, rotation=60, fontsize=7)
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=9)
    return fig
