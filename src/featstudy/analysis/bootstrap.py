"""The bootstrap callback: percentile confidence intervals for t+ and t- (paper Eq. 4, Table 4).

The paper reports its thresholds "in range [0.11, 0.19] in all cases" (§5.5) without an error bar. With
``analysis.bootstrap=<n>`` (default 0: off, because it reruns the KS n times) each of n replicates resamples the
images with replacement within each class, draws its own label permutation(s) and recomputes D and the
thresholds (:func:`featstudy.stats.bootstrap_thresholds`, a stratified percentile bootstrap).

Metrics: ``t_plus_ci_low``, ``t_plus_ci_high``, ``t_minus_ci_low``, ``t_minus_ci_high`` at ``analysis.bootstrap_level``
(default 0.95). Files: ``tables/table4.csv`` gains those four columns (the report's cross-dataset Table 4 shows
them), ``tables/bootstrap.csv`` holds every replicate's t+, d_avg(t+), t-, d_avg(t-).
"""

from __future__ import annotations

import csv

from featstudy.analysis.base import AnalysisCallback, AnalysisContext, CallbackResult, write_table

CI_COLUMNS = ("t_plus_ci_low", "t_plus_ci_high", "t_minus_ci_low", "t_minus_ci_high")
#: the columns this callback adds to table4.csv (replaced, not repeated, when it runs again on the same folder)
ADDED_COLUMNS = (*CI_COLUMNS, "bootstrap_replicates", "bootstrap_level")


def check_bootstrap(n_boot, level) -> None:
    """``analysis.bootstrap`` an integer >= 0 and ``analysis.bootstrap_level`` in (0, 1), else one ConfigError."""
    from featstudy.errors import ConfigError

    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 0:
        raise ConfigError(f"analysis.bootstrap={n_boot!r}: must be an integer >= 0 (replicates; 0 = off)")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ConfigError(f"analysis.bootstrap_level={level!r}: must be a number in (0, 1), e.g. 0.95")


def _number(cell: str):
    """A cell of table4.csv read back: an int or float where it is one, else the text (``exact``, a dataset)."""
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return cell


class BootstrapCallback(AnalysisCallback):
    """Confidence intervals of t+ and t-; does nothing when ``n_boot`` is 0.

    Parameters
    ----------
    n_boot : int
        Replicates (``analysis.bootstrap``).
    level : float
        Coverage of the percentile intervals (``analysis.bootstrap_level``).
    step : float
        Grid step of x in d_avg(x), as the thresholds callback's.
    """

    name = "bootstrap"

    def __init__(self, n_boot: int = 0, level: float = 0.95, step: float = 0.001):
        check_bootstrap(n_boot, level)
        self.n_boot, self.level, self.step = int(n_boot), float(level), float(step)

    def run(self, ctx: AnalysisContext) -> CallbackResult:
        if self.n_boot == 0:
            return CallbackResult()
        from featstudy import stats

        a = ctx.analysis
        boot = ctx._timed(f"bootstrap@{self.n_boot},{self.step}", lambda: stats.bootstrap_thresholds(
            ctx.features, ctx.labels, n_boot=self.n_boot, seed=int(a.get("seed", 0)), bins=a.get("bins"),
            permutations=int(a.get("permutations", 1)), step=self.step, level=self.level))
        (tp_lo, tp_hi), (tm_lo, tm_hi) = boot.interval("t_plus", self.level), boot.interval("t_minus", self.level)
        metrics = {"t_plus_ci_low": float(tp_lo), "t_plus_ci_high": float(tp_hi),
                   "t_minus_ci_low": float(tm_lo), "t_minus_ci_high": float(tm_hi)}
        result = CallbackResult(metrics=metrics, objects={"bootstrap": boot})
        write_table(result, ctx.path("tables/bootstrap.csv"), ["replicate", "t_plus", "d_avg_t_plus", "t_minus",
                                                              "d_avg_t_minus"],
                    [[b, float(boot.t_plus[b]), float(boot.d_avg_t_plus[b]), float(boot.t_minus[b]),
                      float(boot.d_avg_t_minus[b])] for b in range(self.n_boot)])
        table4 = ctx.path("tables/table4.csv")
        if table4.is_file():  # the thresholds callback's row, with the intervals added
            with open(table4, newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
            keep = [i for i, h in enumerate(rows[0]) if h not in ADDED_COLUMNS]
            header = [rows[0][i] for i in keep] + list(ADDED_COLUMNS)
            body = [[_number(row[i]) for i in keep] + [*(metrics[c] for c in CI_COLUMNS), self.n_boot, self.level]
                    for row in rows[1:]]
            write_table(result, table4, header, body)
        return result
