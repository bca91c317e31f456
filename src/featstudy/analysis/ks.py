"""The ks callback: D, D+ and D- for every (feature, class), real and randomized labels (paper Eq. 3, §5.4)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from featstudy.analysis.base import AnalysisCallback, AnalysisContext, CallbackResult

ARRAY_FILE = "arrays/ks.npz"


class KSCallback(AnalysisCallback):
    """Compute the signed KS statistic of every (feature, class) pair and its randomized-label counterpart.

    Writes ``arrays/ks.npz`` (compressed) with

    ``d``, ``d_plus``, ``d_minus`` : (F, C) float64
        Signed D (paper Eq. 3) and its positive / negative parts, real labels.
    ``location`` : (F, C) float64
        Feature value where the reported maximum lies.
    ``d_random`` : (K, F, C) float64
        Signed D under ``analysis.permutations`` seeded label permutations.
    ``classes``, ``feature_names``, ``layer_of_feature``, ``n_in``, ``n``, ``bins``, ``permutations``, ``seed``
        What is needed to read the arrays without the embedding.

    Metrics: ``n_images``, ``n_classes``, ``n_features``, ``ks_seconds``, ``ks_random_seconds``.
    """

    name = "ks"

    def run(self, ctx: AnalysisContext) -> CallbackResult:
        ks = ctx.ks()
        d_random = ctx.d_random()
        a = ctx.analysis
        path = ctx.path(ARRAY_FILE)
        np.savez_compressed(
            path,
            d=ks.d, d_plus=ks.d_plus, d_minus=ks.d_minus, location=ks.location,
            d_random=d_random,
            classes=np.asarray(ctx.classes), feature_names=np.asarray(ctx.feature_names),
            layer_of_feature=np.asarray(ctx.layer_of_feature),
            n_in=np.asarray(ks.n_in), n=np.asarray(ks.n),
            bins=np.asarray(-1 if a.get("bins") is None else int(a["bins"])),
            permutations=np.asarray(int(a.get("permutations", 1))), seed=np.asarray(int(a.get("seed", 0))),
            dataset=np.asarray(ctx.dataset),
        )
        metrics = {
            "n_images": float(len(ctx.labels)),
            "n_classes": float(len(ks.classes)),
            "n_features": float(ks.d.shape[0]),
        }
        for key in ("ks", "ks_random"):
            if ctx.seconds(key) is not None:
                metrics[f"{key}_seconds"] = float(ctx.seconds(key))
        return CallbackResult(metrics=metrics, files=[path], objects={"ks": ks, "d_random": d_random})


def load_ks_arrays(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read an ``arrays/ks.npz`` artifact back (all its arrays, or only ``keys``; used by :mod:`featstudy.report`).

    Raises ``KeyError(missing)``, the list of missing names, when ``keys`` asks for arrays the file does not hold.
    """
    with np.load(path, allow_pickle=False) as z:
        wanted = list(z.files) if keys is None else list(keys)
        missing = [k for k in wanted if k not in z.files]
        if missing:
            raise KeyError(missing)
        return {k: z[k] for k in wanted}
