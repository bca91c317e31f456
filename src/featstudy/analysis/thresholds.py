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

Files: ``tables/table4.csv``, ``tables/table3.csv``, ``tables/irrelevant_by_layer.csv``, ``tables/d_avg.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from featstudy.analysis.base import AnalysisCallback, AnalysisContext, CallbackResult

TABLE4_HEADER = ["dataset", "t_plus", "d_avg_t_plus", "t_minus", "d_avg_t_minus", "n_classes", "n_features",
                 "permutations", "bins"]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    """A small CSV writer (floats with 6 significant digits)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return path


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
        d_random = ctx.d_random()
        th = ctx.thresholds(self.step)
        t_plus, t_minus = float(th.t_plus), float(th.t_minus)
        metrics: dict[str, float] = {
            "t_plus": t_plus, "t_minus": t_minus,
            "d_avg_t_plus": float(th.d_avg_t_plus), "d_avg_t_minus": float(th.d_avg_t_minus),
        }

        layer_of = ctx.layer_of_feature
        irrelevant = np.asarray(stats.irrelevant_features(ks.d, t_plus, t_minus), dtype=bool)
        metrics["n_irrelevant_features"] = float(irrelevant.sum())
        # one threshold only: a bound no D can pass disables the other side (D lies in [-1, 1])
        metrics["n_irrelevant_features_t_plus_only"] = float(np.sum(stats.irrelevant_features(ks.d, t_plus, -1.0)))
        metrics["n_irrelevant_features_t_minus_only"] = float(np.sum(stats.irrelevant_features(ks.d, 1.0, t_minus)))
        kept = stats.kept_fraction_by_layer(ks.d, t_plus, t_minus, layer_of)
        k, f, c = d_random.shape
        d_random_fc = np.transpose(d_random, (1, 0, 2)).reshape(f, k * c)
        kept_random = stats.kept_fraction_by_layer(d_random_fc, t_plus, t_minus, layer_of)
        rows = []
        for layer in ctx.layers:
            in_layer = layer_of == layer
            n_irr = int(irrelevant[in_layer].sum())
            metrics[f"n_irrelevant_features.{layer}"] = float(n_irr)
            metrics[f"kept_fraction.{layer}"] = float(kept[layer])
            metrics[f"kept_fraction_random.{layer}"] = float(kept_random[layer])
            rows.append([layer, int(in_layer.sum()), n_irr, float(kept[layer]), float(kept_random[layer])])
        kept_all = (ks.d > t_plus) | (ks.d < t_minus)
        kept_all_random = (d_random > t_plus) | (d_random < t_minus)
        metrics["kept_fraction"] = float(kept_all.mean())
        metrics["kept_fraction_random"] = float(kept_all_random.mean())

        files = [
            write_csv(ctx.path("tables/table4.csv"), TABLE4_HEADER, [[
                ctx.dataset, t_plus, float(th.d_avg_t_plus), t_minus, float(th.d_avg_t_minus), len(ks.classes),
                int(ks.d.shape[0]), int(ctx.analysis.get("permutations", 1)),
                "exact" if ctx.analysis.get("bins") is None else int(ctx.analysis["bins"])]]),
            write_csv(ctx.path("tables/table3.csv"), ["layer", "n_features", "analysed"],
                      table3_rows([n.rsplit(":", 1)[0] for n in ctx.embedding.feature_names], set(ctx.layers))),
            write_csv(ctx.path("tables/irrelevant_by_layer.csv"),
                      ["layer", "n_features", "n_irrelevant", "kept_fraction", "kept_fraction_random"], rows),
        ]
        grid = np.asarray(th.grid, dtype=float)
        steps = np.rint(grid * 1000).astype(np.int64)
        files.append(write_csv(ctx.path("tables/d_avg.csv"), ["x", "d_avg_plus", "d_avg_minus"],
                               [[float(x), float(p), float(m)]
                                for x, p, m in zip(grid, th.d_avg_plus, th.d_avg_minus)]))
        series = {"d_avg_plus": (steps, np.asarray(th.d_avg_plus, float)),
                  "d_avg_minus": (steps, np.asarray(th.d_avg_minus, float))}
        tables = {
            "tables/table4.json": {"dataset": [ctx.dataset], "t_plus": [t_plus], "d_avg_t_plus": [float(th.d_avg_t_plus)],
                                   "t_minus": [t_minus], "d_avg_t_minus": [float(th.d_avg_t_minus)]},
            "tables/irrelevant_by_layer.json": {
                "layer": [r[0] for r in rows], "n_features": [r[1] for r in rows], "n_irrelevant": [r[2] for r in rows],
                "kept_fraction": [r[3] for r in rows], "kept_fraction_random": [r[4] for r in rows]},
        }
        return CallbackResult(metrics=metrics, series=series, files=files, tables=tables,
                              objects={"thresholds": th, "irrelevant": irrelevant, "kept": kept,
                                       "kept_random": kept_random})
