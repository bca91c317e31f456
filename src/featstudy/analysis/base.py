"""The callback base and the shared context the analyses read from.

The context computes each expensive result once, on first use (the real KS, the randomized-label KS and the
thresholds), so a callback can be dropped (``~analysis.callbacks.ks``) without breaking the ones after it.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featstudy.store import Embedding

log = logging.getLogger(__name__)


@dataclass
class CallbackResult:
    """What one callback produced.

    Attributes
    ----------
    metrics : dict
        Scalar metrics, logged at step 0.
    series : dict
        ``name -> (steps, values)`` curves, logged as metric steps.
    files : list of Path
        Files written under the output folder; logged as artifacts at their path relative to it (a folder: its
        files under its own path, in one call).
    tables : dict
        ``artifact file (.json) -> {column: values}``: tables also logged through MLflow's table API (the CSV
        files in ``files`` are what a reader opens; these feed the UI's table views).
    objects : dict
        Anything tests or callers may want (arrays, result objects); not logged.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    tables: dict[str, dict[str, list]] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)


def write_table(result: CallbackResult, path: Path, header: list[str], rows: list[list]) -> Path:
    """Write ``rows`` under ``header`` as CSV at ``path`` (floats with 6 significant digits) and add the same table,
    full precision, to ``result`` as ``tables/<stem>.json`` (MLflow's table API) and to its files."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    result.files.append(path)
    result.tables[f"{path.parent.name}/{path.stem}.json"] = {h: [row[i] for row in rows] for i, h in enumerate(header)}
    return path


@dataclass(frozen=True)
class KeptFractions:
    """Share of (feature, class) pairs with D > t+ or D < t- (:meth:`AnalysisContext.kept`).

    Attributes
    ----------
    by_layer, by_layer_random : dict
        layer -> share in [0, 1], real and randomized labels (over all K permutations), in column order (Fig. 10).
    overall, overall_random : float
        The same over all analysed layers.
    """

    by_layer: dict[str, float]
    by_layer_random: dict[str, float]
    overall: float
    overall_random: float


class AnalysisContext:
    """The embedding, the analysis settings and lazily computed statistics shared by the callbacks.

    Parameters
    ----------
    embedding : Embedding
        The finished, cached embedding (features memory-mapped).
    analysis : mapping
        ``cfg.analysis``: ``bins``, ``permutations``, ``seed``, ``layers``, ``chunk_size``.
    output_dir : Path
        The run's output folder; callbacks write under it.
    dataset : str
        The dataset's name (``cfg.dataset.name``), for tables and titles.
    extra : dict
        Anything else the app passes (the embedding handle, the config, other cached embeddings).
    """

    def __init__(self, embedding: Embedding, analysis: Mapping[str, Any], output_dir: Path, dataset: str,
                 **extra: Any):
        self.embedding = embedding
        self.analysis = analysis
        self.output_dir = Path(output_dir)
        self.dataset = dataset
        self.extra = extra
        layers = analysis.get("layers")
        self.columns = embedding.layer_columns(list(layers) if layers is not None else None)
        self.feature_names = [embedding.feature_names[i] for i in self.columns]
        self.layer_of_feature = embedding.layer_of_feature[self.columns]
        self.layers = list(dict.fromkeys(self.layer_of_feature.tolist()))
        self._cache: dict[str, Any] = {}

    # -- data
    @property
    def labels(self) -> np.ndarray:
        """(N,) column index of each image's class in D: ``classes[labels[i]]`` is image i's class."""
        self._index_classes()
        return self._cache["labels"]

    @property
    def classes(self) -> list[str]:
        """Names of the classes that have images, in label order: column c of every (F, C) array is ``classes[c]``.

        A class of ``classes.txt`` without any image (every one unreadable) has no column; it is left out here,
        with a warning, so no name is shifted onto another class's column.
        """
        self._index_classes()
        return self._cache["classes"]

    def _index_classes(self) -> None:
        if "classes" in self._cache:
            return
        present, labels = np.unique(self.embedding.labels, return_inverse=True)
        names = self.embedding.classes
        have = set(present.tolist())
        empty = [name for i, name in enumerate(names) if i not in have]
        if empty:
            log.warning("dataset: class(es) %s have no readable image (all skipped, see skipped.txt); left out of "
                        "the analysis: D has %d columns, one per class with images", empty, len(present))
        self._cache["classes"] = [names[i] for i in present]
        self._cache["labels"] = labels.reshape(-1).astype(np.int64)

    @property
    def features(self) -> np.ndarray:
        """(N, F) features of the analysed layers (the memory map itself when every layer is analysed)."""
        if "features" not in self._cache:
            feats = self.embedding.features
            if len(self.columns) != feats.shape[1]:
                feats = np.ascontiguousarray(feats[:, self.columns])
            self._cache["features"] = feats
        return self._cache["features"]

    def path(self, relative: str) -> Path:
        """``output_dir / relative`` with its parent folder created."""
        p = self.output_dir / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    # -- statistics, computed once
    def _timed(self, key: str, fn: Any) -> Any:
        if key not in self._cache:
            t0 = time.perf_counter()
            self._cache[key] = fn()
            self._cache[f"{key}_seconds"] = time.perf_counter() - t0
            log.info("%s: %.1f s", key, self._cache[f"{key}_seconds"])
        return self._cache[key]

    def ks(self) -> Any:
        """The signed KS of every (feature, class) pair, paper Eq. 3 (:func:`featstudy.stats.signed_ks`)."""
        from featstudy import stats

        a = self.analysis
        return self._timed("ks", lambda: stats.signed_ks(self.features, self.labels, bins=a.get("bins"),
                                                         chunk_size=a.get("chunk_size"), progress=False))

    def d_random(self) -> np.ndarray:
        """(K, F, C) signed D under ``analysis.permutations`` seeded label permutations (paper §5.4)."""
        from featstudy import stats

        a = self.analysis
        return self._timed("ks_random", lambda: np.asarray(stats.signed_ks_random(
            self.features, self.labels, permutations=int(a.get("permutations", 1)), seed=int(a.get("seed", 0)),
            bins=a.get("bins"), chunk_size=a.get("chunk_size"), progress=False)))

    def thresholds(self, step: float = 0.001) -> Any:
        """t+ and t- maximising d_avg (paper Eq. 4, Table 4; :func:`featstudy.stats.thresholds`)."""
        from featstudy import stats

        key = f"thresholds@{step}"
        return self._timed(key, lambda: stats.thresholds(self.ks().d, self.d_random(), step=step))

    def null_pq(self) -> tuple[np.ndarray, np.ndarray]:
        """(p, q), each (F, C): analytic KS p-values of the real labels' D (:func:`featstudy.stats.ks_pvalues`) and
        their Benjamini-Hochberg q-values over all F x C pairs; computed once for the null callback and the atlas."""
        ks = self.ks()
        return self._timed("null_pq", lambda: null_pq(ks.d, ks.n_in, ks.n))

    def auroc(self) -> np.ndarray:
        """(F, C) AUROC of every (feature, class) pair (:func:`featstudy.stats.class_auroc`), computed once."""
        from featstudy import stats

        return self._timed("auroc", lambda: stats.class_auroc(self.features, self.labels,
                                                              chunk_size=self.analysis.get("chunk_size")).auroc)

    def computed(self, key: str) -> Any | None:
        """What the context already holds under ``key`` (``auroc``, ``ks``...), without computing it; None if not."""
        return self._cache.get(key)

    def kept(self, step: float = 0.001) -> KeptFractions:
        """The shares of (feature, class) pairs with D > t+ or D < t- (paper §5.5, Fig. 10), real labels and
        randomized ones (over all K permutations): per layer (:func:`featstudy.stats.kept_fraction_by_layer`) and
        over all analysed layers. Computed here once for the thresholds and figures callbacks."""
        from featstudy import stats

        def compute() -> KeptFractions:
            th = self.thresholds(step)
            d, d_random = self.ks().d, self.d_random()
            return KeptFractions(
                by_layer=stats.kept_fraction_by_layer(d, th.t_plus, th.t_minus, self.layer_of_feature),
                by_layer_random=stats.kept_fraction_by_layer(d_random, th.t_plus, th.t_minus, self.layer_of_feature),
                overall=float(((d > th.t_plus) | (d < th.t_minus)).mean()),
                overall_random=float(((d_random > th.t_plus) | (d_random < th.t_minus)).mean()))

        return self._timed(f"kept@{step}", compute)

    def seconds(self, key: str) -> float | None:
        return self._cache.get(f"{key}_seconds")


def null_pq(d: np.ndarray, n_in: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(p, q) of one (F, C) table of signed D: analytic KS p-values of |D| (:func:`featstudy.stats.ks_pvalues`) and
    their Benjamini-Hochberg q-values over its F x C tests (:func:`featstudy.stats.bh_qvalues`)."""
    from featstudy import stats

    p = np.asarray(stats.ks_pvalues(np.abs(d), n_in, n))
    return p, np.asarray(stats.bh_qvalues(p.ravel())).reshape(p.shape)


class AnalysisCallback:
    """One analysis step. Subclasses set ``name`` and implement :meth:`run`."""

    name = "analysis"

    def run(self, ctx: AnalysisContext) -> CallbackResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def instantiate_callbacks(callbacks_cfg: Mapping[str, Any] | None) -> list[tuple[str, AnalysisCallback]]:
    """Instantiate every ``_target_`` block of ``cfg.analysis.callbacks`` in order; skip entries without one."""
    from hydra.utils import instantiate

    from featstudy.errors import ConfigError

    out: list[tuple[str, AnalysisCallback]] = []
    if not callbacks_cfg:
        return out
    for name, block in callbacks_cfg.items():
        if not isinstance(block, Mapping) or "_target_" not in block:
            log.debug("analysis.callbacks.%s has no _target_; skipped", name)
            continue
        try:
            cb = instantiate(block)
        except Exception as exc:  # noqa: BLE001 - surfaced as a one-line config error
            cause = exc.__cause__ or exc
            raise ConfigError(f"analysis.callbacks.{name}: cannot instantiate {block['_target_']} "
                              f"({str(cause).splitlines()[0]})") from exc
        if not isinstance(cb, AnalysisCallback):
            raise ConfigError(f"analysis.callbacks.{name}: {block['_target_']} is not an AnalysisCallback")
        cb.name = str(name)
        log.info("analysis callback %s <%s>", name, block["_target_"])
        out.append((str(name), cb))
    return out
