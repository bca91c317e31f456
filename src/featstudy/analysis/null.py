"""The null callback: analytic KS p-values, Benjamini-Hochberg q-values, the share of significant pairs.

A complement to the paper's randomized-label baseline: under H0 (the class's activations come from the same
distribution as the rest) the two-sample KS statistic has a known distribution (:func:`featstudy.stats.ks_pvalues`;
ties in post-ReLU features make it conservative). q-values control the false discovery rate over all
(feature, class) pairs (:func:`featstudy.stats.bh_qvalues`).

Metrics: ``null_significant_share`` (pairs with q < ``q``, real labels), ``null_significant_share.<layer>``, and
``null_significant_share_random`` (the same on the randomized labels: BH over each permutation's F x C tests, as
for the real labels, then the mean over the ``analysis.permutations`` shares; close to 0 when the null is right).
File: ``tables/null_by_layer.csv`` (and ``tables/null_by_layer.json`` in MLflow's table API).
"""

from __future__ import annotations


from featstudy.analysis.base import AnalysisCallback, AnalysisContext, CallbackResult, null_pq, write_table


class NullCallback(AnalysisCallback):
    """Share of (feature, class) pairs significant at FDR level ``q`` (default 0.05), overall and per layer."""

    name = "null"

    def __init__(self, q: float = 0.05):
        if not (0 < float(q) < 1):
            from featstudy.errors import ConfigError

            raise ConfigError(f"analysis.callbacks.null.q={q!r}: must be in (0, 1)")
        self.q = float(q)

    def run(self, ctx: AnalysisContext) -> CallbackResult:
        ks = ctx.ks()
        p, q = ctx.null_pq()
        significant = q < self.q
        metrics = {"null_significant_share": float(significant.mean())}
        rows = []
        for layer in ctx.layers:
            in_layer = ctx.layer_of_feature == layer
            share = float(significant[in_layer].mean())
            metrics[f"null_significant_share.{layer}"] = share
            rows.append([layer, int(in_layer.sum() * significant.shape[1]), int(significant[in_layer].sum()), share])
        # each permutation is a dataset of its own: BH over its F x C tests, as for the real labels; then the mean
        # (the mean share over permutations = all their significant pairs / all their pairs: integers, one division)
        shares_random, hits, pairs = [], 0, 0
        for d in ctx.d_random():
            below = null_pq(d, ks.n_in, ks.n)[1] < self.q
            shares_random.append(float(below.mean()))
            hits, pairs = hits + int(below.sum()), pairs + below.size
        metrics["null_significant_share_random"] = hits / pairs
        result = CallbackResult(metrics=metrics, objects={"p": p, "q": q, "shares_random": shares_random})
        write_table(result, ctx.path("tables/null_by_layer.csv"),
                    ["layer", "n_pairs", f"n_q_below_{self.q:g}", "share"], rows)
        return result
