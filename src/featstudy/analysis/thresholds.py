"""The thresholds callback: t+ and t- (paper Eq. 4, Table 4, §5.5), irrelevant features, Table 3.

Metrics
-------
``t_plus``, ``t_minus``, ``d_avg_t_plus``, ``d_avg_t_minus``
    The thresholds maximising the average distance d_avg between real and randomized labels, and that maximum.
``n_irrelevant_features``
    Features with no pair above t+ and none below t- in any class (§5.5); per layer as
    ``n_irrelevant_features.<layer>`` (e.g. ``n_irrelevant_features.fc7``). With one threshold only:
    ``n_irrelevant_features_t_plus_only``, ``n_irrelevant_features_t_minus_only``.
``kept_fraction.<layer>``, ``kept_fraction_random.<layer>``
    Share of (feature, class) pairs of the layer with D > t+ or D < t- (Figure 10), real and randomized labels;
    ``kept_fraction`` and ``kept_fraction_random`` over all analysed layers.

Curves (metric steps, so the MLflow UI overlays them across runs): ``d_avg_plus`` and ``d_avg_minus`` at
``step = round(1000 * x)``, i.e. x in thousandths of D.

Files: ``tables/table4.csv``, ``tables/table3.csv``, ``tables/irrelevant_by_layer.csv``, ``tables/d_avg.csv``; each
table also goes to MLflow's table API as ``tables/<name>.json`` (same columns, full precision).
"""

from __future__ import annotations

import numpy as np

from featstudy.analysis.base import AnalysisCallback, AnalysisContext, CallbackResult, write_table

TABLE4_HEADER = ["dataset", "t_plus", "d_avg_t_plus", "t_minus", "d_avg_t_minus", "n_classes", "n_features",
                 "permutations", "bins"]


def table3_rows(feature_names_layers: list[str], analysed: set[str]) -> list[list]:
    """Rows ``layer, n_features, analysed`` in column order, then ``Total``."""
    layers = list(dict.fromkeys(feature_names_layers))
    counts = {name: 0 for name in layers}
    for name in feature_names_layers:
        counts[name] += 1
    rows = [[name, counts[name], "yes" if name in analysed else "no"] for name in layers]
    rows.append(["Total", len(feature_names_layers), str(sum(counts[n] for n in layers if n in analysed))])
    return rows


class ThresholdsCallback(AnalysisCallback):
    """Thresholds t+ / t-, irrelevant features and kept fractions per layer, Tables 3 and 4.

    Parameters
    ----------
    step : float
        Grid step of x in d_avg(x) (paper Eq. 4); the thresholds are multiples of it.
    """

    name = "thresholds"

    def __init__(self, step: float = 0.001):
        if not (0 < float(step) <= 0.1):
            from featstudy.errors import ConfigError

            raise ConfigError(f"analysis.callbacks.thresholds.step={step!r}: must be in (0, 0.1]")
        self.step = float(step)

    def run(self, ctx: AnalysisContext) -> CallbackResult:
        from featstudy import stats

        ks = ctx.ks()
        th = ctx.thresholds(self.step)
        t_plus, t_minus = float(th.t_plus), float(th.t_minus)
        metrics: dict[str, float] = {
            "t_plus": t_plus, "t_minus": t_minus,
            "d_avg_t_plus": float(th.d_avg_t_plus), "d_avg_t_minus": float(th.d_avg_t_minus),
        }

        layer_of = ctx.layer_of_feature
        irrelevant = stats.irrelevant_features(ks.d, t_plus, t_minus)
        metrics["n_irrelevant_features"] = float(irrelevant.sum())
        # one threshold only (§5.5): no class has D > t+ (resp. D < t-), whatever the other side
        metrics["n_irrelevant_features_t_plus_only"] = float(np.sum(~(ks.d > t_plus).any(axis=1)))
        metrics["n_irrelevant_features_t_minus_only"] = float(np.sum(~(ks.d < t_minus).any(axis=1)))
        fractions = ctx.kept(self.step)
        kept, kept_random = fractions.by_layer, fractions.by_layer_random
        rows = []
        for layer in ctx.layers:
            in_layer = layer_of == layer
            n_irr = int(irrelevant[in_layer].sum())
            metrics[f"n_irrelevant_features.{layer}"] = float(n_irr)
            metrics[f"kept_fraction.{layer}"] = float(kept[layer])
            metrics[f"kept_fraction_random.{layer}"] = float(kept_random[layer])
            rows.append([layer, int(in_layer.sum()), n_irr, float(kept[layer]), float(kept_random[layer])])
        metrics["kept_fraction"] = fractions.overall
        metrics["kept_fraction_random"] = fractions.overall_random

        grid = th.grid
        steps = np.rint(grid * 1000).astype(np.int64)  # x in thousandths of D
        result = CallbackResult(
            metrics=metrics,
            series={"d_avg_plus": (steps, th.d_avg_plus), "d_avg_minus": (steps, th.d_avg_minus)},
            objects={"thresholds": th, "irrelevant": irrelevant, "kept": kept, "kept_random": kept_random})
        bins = ctx.analysis.get("bins")
        write_table(result, ctx.path("tables/table4.csv"), TABLE4_HEADER, [[
            ctx.dataset, t_plus, float(th.d_avg_t_plus), t_minus, float(th.d_avg_t_minus), len(ks.classes),
            int(ks.d.shape[0]), int(ctx.analysis.get("permutations", 1)), "exact" if bins is None else int(bins)]])
        write_table(result, ctx.path("tables/table3.csv"), ["layer", "n_features", "analysed"],
                    table3_rows(ctx.embedding.layer_of_feature.tolist(), set(ctx.layers)))
        write_table(result, ctx.path("tables/irrelevant_by_layer.csv"),
                    ["layer", "n_features", "n_irrelevant", "kept_fraction", "kept_fraction_random"], rows)
        write_table(result, ctx.path("tables/d_avg.csv"), ["x", "d_avg_plus", "d_avg_minus"],
                    [[float(x), float(p), float(m)] for x, p, m in zip(grid, th.d_avg_plus, th.d_avg_minus)])
        return result
