"""The cross-dataset page of ``featstudy.report`` (issue 15): which features describe the classes of every dataset,
of one dataset only, or of none, layer by layer; one self-contained HTML file, ``atlas/index.html`` of the report.

A feature f *describes* dataset s when some class c of s has D_s(f, c) > t+_s (by presence) or D_s(f, c) < t−_s
(by absence), each run with its own thresholds (paper Eq. 4, Table 4; the characteristic pairs of §5.5). Over the
datasets compared, on the features every run analysed (matched by name), each feature falls in one category:

* **shared**: it describes every dataset;
* **only s**: it describes dataset s and no other (dataset-specific);
* **some**: more than one dataset but not all (from three datasets on);
* **none**: no dataset (irrelevant everywhere: §5.5's irrelevant features, across datasets).

Per feature and dataset the page also holds the number of classes described by presence and by absence, the
largest and smallest D with their classes, and the ``top_classes`` classes with the largest D > t+ and the smallest
D < t− (ties: lower class index first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featstudy.analysis import page_kit

SHARED, SOME, NONE = -3, -2, -1  #: category codes; a code s >= 0 means "only dataset s"


@dataclass
class CompareRun:
    """One run on the page: its dataset's display name, D (F_s, C_s) with its feature and class names, thresholds."""

    name: str
    run_id: str
    d: np.ndarray
    feature_names: list[str]
    layer_of_feature: list[str]
    classes: list[str]
    t_plus: float
    t_minus: float
    model: str = ""
    weights: str = ""


def common_features(runs: list[CompareRun]) -> tuple[list[str], list[str], list[list[int]]]:
    """The features every run analysed, in the order of the run with most features (network order): their names,
    their layers, and for each run the row of each of them in that run's D."""
    for r in runs:
        if len(set(r.feature_names)) != len(r.feature_names):
            twice = next(n for i, n in enumerate(r.feature_names) if n in r.feature_names[:i])
            raise ValueError(f"{r.name}: feature {twice!r} comes twice; features are matched by name")
    longest = max(runs, key=lambda r: len(r.feature_names))
    rows = [{name: i for i, name in enumerate(r.feature_names)} for r in runs]
    names = [n for n in longest.feature_names if all(n in row for row in rows)]
    layer = dict(zip(longest.feature_names, longest.layer_of_feature))
    return names, [layer[n] for n in names], [[row[n] for n in names] for row in rows]


def categories(described: np.ndarray) -> np.ndarray:
    """(F,) category codes from ``described`` (S, F) bool: :data:`SHARED` (all S), ``s`` (s only), :data:`SOME`,
    :data:`NONE` (none). With one dataset, a described feature is ``0`` ("only" the one)."""
    count = described.sum(axis=0)
    code = np.full(described.shape[1], SOME, dtype=np.int64)
    code[count == 0] = NONE
    code[count == described.shape[0]] = SHARED
    single = count == 1  # last: with one dataset, "only" it rather than "shared"
    code[single] = np.argmax(described[:, single], axis=0)
    return code


def extremes(d: np.ndarray) -> tuple[list, list, list, list]:
    """Per row of ``d``: the largest finite D and its column, the smallest and its column (first on ties); None for a
    row without a finite value (NaN is never a D)."""
    finite = np.isfinite(d)
    has = finite.any(axis=1)
    hi, lo = np.where(finite, d, -np.inf), np.where(finite, d, np.inf)
    ahi, alo = np.argmax(hi, axis=1), np.argmin(lo, axis=1)
    rows = range(d.shape[0])
    return ([round(float(hi[j, ahi[j]]), 4) if has[j] else None for j in rows],
            [int(ahi[j]) if has[j] else None for j in rows],
            [round(float(lo[j, alo[j]]), 4) if has[j] else None for j in rows],
            [int(alo[j]) if has[j] else None for j in rows])


def _top(col: np.ndarray, keep: np.ndarray, descending: bool, k: int) -> list:
    """Flat [class, D, class, D, ...] of the k classes in ``keep`` with the largest (or smallest) D."""
    idx = np.flatnonzero(keep)
    order = idx[np.argsort(-col[idx] if descending else col[idx], kind="stable")][:k]
    out: list = []
    for c in order:
        out += [int(c), round(float(col[c]), 4)]
    return out


def build_compare_data(runs: list[CompareRun], top_classes: int = 5, figures: list[str] | None = None,
                       run_id: str | None = None) -> dict:
    """Everything the comparison page shows, as plain JSON-able values (names are data, never markup)."""
    if not runs:
        raise ValueError("no runs to compare")
    names, layer_names, rows = common_features(runs)
    layers = list(dict.fromkeys(layer_names))
    layer_index = {n: i for i, n in enumerate(layers)}
    layer_of = np.array([layer_index[n] for n in layer_names], dtype=np.int64)
    n_pos, n_neg, dmax, amax, dmin, amin, tpos, tneg, datasets = [], [], [], [], [], [], [], [], []
    described = np.zeros((len(runs), len(names)), dtype=bool)
    for s, (run, row) in enumerate(zip(runs, rows)):
        full = np.asarray(run.d, dtype=np.float64)
        if full.ndim != 2 or full.shape[1] == 0 or full.shape[1] != len(run.classes):
            raise ValueError(f"{run.name}: D of shape {full.shape} for {len(run.classes)} classes")
        if not (np.isfinite(run.t_plus) and np.isfinite(run.t_minus)):
            raise ValueError(f"{run.name}: thresholds t+ {run.t_plus}, t- {run.t_minus} are not finite")
        d = full[np.asarray(row, dtype=np.int64)]
        pos, neg = d > run.t_plus, d < run.t_minus
        described[s] = (pos | neg).any(axis=1)
        n_pos.append(pos.sum(axis=1).tolist())
        n_neg.append(neg.sum(axis=1).tolist())
        hi, ahi, lo, alo = extremes(d)
        dmax.append(hi)
        amax.append(ahi)
        dmin.append(lo)
        amin.append(alo)
        tpos.append([_top(d[j], pos[j], True, top_classes) for j in range(len(names))])
        tneg.append([_top(d[j], neg[j], False, top_classes) for j in range(len(names))])
        datasets.append({"name": run.name, "run_id": run.run_id, "classes": list(run.classes),
                         "t_plus": float(run.t_plus), "t_minus": float(run.t_minus), "model": run.model,
                         "weights": run.weights, "n_features": int(np.asarray(run.d).shape[0]),
                         # over all the run's features (as its kept_fraction metric), not only those compared
                         "kept": round(float(((full > run.t_plus) | (full < run.t_minus)).mean()), 6),
                         "described": int(described[s].sum())})
    code = categories(described)
    layer_rows = []
    for i, layer in enumerate(layers):
        in_layer = layer_of == i
        c = code[in_layer]
        layer_rows.append({"name": layer, "n": int(in_layer.sum()), "shared": int((c == SHARED).sum()),
                           "some": int((c == SOME).sum()), "none": int((c == NONE).sum()),
                           "only": [int((c == s).sum()) for s in range(len(runs))]})
    return {"version": 1, "kind": "compare", "run_id": run_id, "artifact_dir": "atlas",
            "datasets": datasets, "features": names, "layer_of": layer_of.tolist(), "layers": layer_rows,
            "category": code.tolist(), "n_pos": n_pos, "n_neg": n_neg, "dmax": dmax, "amax": amax, "dmin": dmin,
            "amin": amin, "tpos": tpos, "tneg": tneg, "top_classes": top_classes,
            "left_out": {run.name: len(run.feature_names) - len(names) for run in runs},
            "figures": list(figures or [])}


def write_compare_page(runs: list[CompareRun], folder: Path, top_classes: int = 5, figures: list[str] | None = None,
                       run_id: str | None = None) -> Path:
    """Write ``folder/index.html`` (the comparison page) and return its path."""
    from featstudy.analysis.compare_page import TEMPLATE

    data = build_compare_data(runs, top_classes, figures, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "index.html"
    path.write_text(page_kit.render(TEMPLATE, data), encoding="utf-8")
    return path
