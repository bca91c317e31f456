"""The atlas callback: one self-contained HTML page to browse D by class, layer and feature (issue 15).

Writes ``atlas/index.html`` (the page, its data inlined as JSON, no network) and ``atlas/img/f<j>_<k>.jpg`` (the
``crops_per_feature`` most activating images of every feature shown, cropped to its receptive field by
:mod:`featstudy.analysis.images`, as figures 2 and 3 do). Views, by hash route: ``#/`` (the run), ``#/class/<i>``
(features describing class i by presence, D > t+, and by absence, D < t-, ranked by D, at most ``top_k`` each),
``#/layer/<name>`` (its D histogram, kept fraction, irrelevant features) and ``#/feature/<j>`` (D over all classes).

The page finds its images relative to itself (disk, a plain web server) or, inside the MLflow UI (which loads an
HTML artifact from a ``blob:`` URL into a sandboxed iframe), through the server's ``get-artifact`` endpoint with the
run id written into the page. A page that cannot be written (read-only folder, full disk) is one error line and the
metric ``atlas_written=0``: the run's other outputs stay. See docs/atlas.md.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import numpy as np

from featstudy.analysis import page_kit
from featstudy.analysis.base import AnalysisCallback, AnalysisContext, CallbackResult
from featstudy.errors import ConfigError

log = logging.getLogger(__name__)

HIST_BINS = 40  #: bins of each layer's D histogram over [-1, 1]
CHUNK = 256  #: features whose crops are made in one batched pass (bounds the images held open)


def _positive_int(key: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
            or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"analysis.callbacks.atlas.{key}={value!r}: must be an integer {span}")
    return int(value)


class AtlasCallback(AnalysisCallback):
    """Write the feature atlas, ``atlas/index.html`` and its image crops.

    Parameters
    ----------
    top_k : int
        Per class, at most this many features by presence (D > t+) and as many by absence (D < t-).
    crops_per_feature : int
        Most activating images shown per feature (0: none, no crops computed).
    jpeg_quality : int
        JPEG quality of the crops (1-95).
    crop_px : int
        Side of a crop in pixels.
    step : float
        Grid step of the thresholds (same as the thresholds callback).
    crops_of : str
        ``listed``: crops for the features the class views list (each once); ``all``: for every feature, so that
        every feature view shows its images (F x ``crops_per_feature`` files: 38,400 for VGG19 at 4).
    """

    name = "atlas"

    def __init__(self, top_k: int = 32, crops_per_feature: int = 4, jpeg_quality: int = 80, crop_px: int = 96,
                 step: float = 0.001, crops_of: str = "listed", **unknown: Any):
        if unknown:
            key = min(unknown)
            raise ConfigError(f"analysis.callbacks.atlas.{key}: unknown key; known: top_k, crops_per_feature, "
                              "jpeg_quality, crop_px, step, crops_of")
        if crops_of not in ("listed", "all"):
            raise ConfigError(f"analysis.callbacks.atlas.crops_of={crops_of!r}: must be listed (the features the "
                              "class views list) or all (every feature)")
        self.crops_of = crops_of
        self.top_k = _positive_int("top_k", top_k, 1)
        self.crops_per_feature = _positive_int("crops_per_feature", crops_per_feature, 0, 64)
        self.jpeg_quality = _positive_int("jpeg_quality", jpeg_quality, 1, 95)
        self.crop_px = _positive_int("crop_px", crop_px, 8, 1024)
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < float(step) < 1:
            raise ConfigError(f"analysis.callbacks.atlas.step={step!r}: must be a number in (0, 1)")
        self.step = float(step)

    def run(self, ctx: AnalysisContext) -> CallbackResult:
        data = build_data(ctx, self.top_k, self.step)
        folder = ctx.output_dir / "atlas"
        try:
            try:
                files = self._crops(ctx, data, folder / "img")
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - the page is useful without its images
                log.warning("atlas: no image crops (%s: %s); the page is written without them", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "")
                files, data["crops"] = [], {}
            page = folder / "index.html"
            page.write_text(render(data), encoding="utf-8")
        except OSError as exc:
            log.error("atlas: not written (%s: %s); the run's other outputs stay",
                      exc.strerror or type(exc).__name__, exc.filename or folder)
            return CallbackResult(metrics={"atlas_written": 0.0})
        # the crops as one folder: one MLflow call for thousands of files (app.run logs a folder at its own path)
        return CallbackResult(metrics={"atlas_written": 1.0, "atlas_bytes": float(page.stat().st_size),
                                       "atlas_crops": float(len(files))},
                              files=[page, folder / "img"] if files else [page], objects={"data": data,
                                                                                          "crops": files})

    def _crops(self, ctx: AnalysisContext, data: dict, img_dir: Path) -> list[Path]:
        """The crops of every feature the class lists show (``crops_of=all``: of every feature), written once each as
        ``img/f<j>_<k>.jpg``; their count per feature goes into ``data["crops"]``."""
        img_dir.mkdir(parents=True, exist_ok=True)
        if self.crops_of == "all":
            shown = list(range(len(data["features"])))
        else:
            shown = sorted({int(e[0]) for lists in (data["pos"], data["neg"]) for entries in lists for e in entries})
        if self.crops_per_feature == 0 or not shown:
            return []
        from PIL import Image

        from featstudy.analysis import images

        source = images.activation_source(ctx)
        data["crop_source"] = source.description
        files: list[Path] = []
        for start in range(0, len(shown), CHUNK):
            chunk = shown[start:start + CHUNK]
            cells = source.top_images_many([ctx.feature_names[j] for j in chunk], self.crops_per_feature)
            for j in chunk:
                k = 0
                for cell in cells[ctx.feature_names[j]]:
                    if cell is None:
                        continue
                    img = Image.fromarray(np.asarray(cell, dtype=np.uint8)).convert("RGB")
                    if img.size != (self.crop_px, self.crop_px):
                        img = img.resize((self.crop_px, self.crop_px), Image.Resampling.BILINEAR)
                    path = img_dir / f"f{j}_{k}.jpg"
                    img.save(path, "JPEG", quality=self.jpeg_quality)
                    files.append(path)
                    k += 1
                if k:
                    data["crops"][str(j)] = k
        return files


def _auroc(ctx: AnalysisContext) -> np.ndarray | None:
    """AUROC (F, C) from the selectivity callback (in the context, else its ``arrays/selectivity.npz``), or None."""
    cached = ctx.computed("auroc")
    if cached is not None:
        return np.asarray(cached)
    path = ctx.output_dir / "arrays" / "selectivity.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if list(z["feature_names"]) == ctx.feature_names and list(z["classes"]) == ctx.classes:
                    return np.asarray(z["auroc"])
        except (OSError, KeyError, ValueError) as exc:
            log.warning("atlas: %s not read (%s); no AUROC shown", path, exc)
    return None


def _sig(x: float, digits: int = 3) -> float | None:
    return float(f"{x:.{digits}g}") if np.isfinite(x) else None


def _num(x: Any, decimals: int = 4) -> float | None:
    """``x`` rounded, or None (JSON null) when it is not a finite number."""
    return None if x is None or not np.isfinite(x) else round(float(x), decimals)


def ranked(d: np.ndarray, t_plus: float, t_minus: float, top_k: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per class, the features with D > t+ by decreasing D and those with D < t- by increasing D (ties: lower
    feature index first), at most ``top_k`` each."""
    pos, neg = [], []
    for c in range(d.shape[1]):
        col = d[:, c]
        up = np.flatnonzero(col > t_plus)
        down = np.flatnonzero(col < t_minus)
        pos.append(up[np.argsort(-col[up], kind="stable")][:top_k].tolist())
        neg.append(down[np.argsort(col[down], kind="stable")][:top_k].tolist())
    return pos, neg


def build_data(ctx: AnalysisContext, top_k: int, step: float = 0.001) -> dict:
    """Everything the page shows, as plain JSON-able values (names are data, never markup)."""
    d = np.asarray(ctx.ks().d, dtype=np.float64)
    th = ctx.thresholds(step)
    t_plus, t_minus = float(th.t_plus), float(th.t_minus)
    kept = ctx.kept(step)
    q = ctx.null_pq()[1]
    auroc = _auroc(ctx)
    pos, neg = ranked(d, t_plus, t_minus, top_k)

    def entry(f: int, c: int) -> list:
        return [f, _num(d[f, c]), _sig(float(q[f, c])), None if auroc is None else _num(auroc[f, c])]

    layer_index = {layer: i for i, layer in enumerate(ctx.layers)}
    layer_of = [layer_index[layer] for layer in ctx.layer_of_feature.tolist()]
    described = (d > t_plus) | (d < t_minus)
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    layers = []
    for layer in ctx.layers:
        in_layer = ctx.layer_of_feature == layer
        counts, _ = np.histogram(np.clip(d[in_layer].ravel(), -1, 1), bins=edges)
        layers.append({"name": layer, "n": int(in_layer.sum()), "kept": _num(kept.by_layer.get(layer), 6),
                       "kept_random": _num(kept.by_layer_random.get(layer), 6), "hist": counts.tolist(),
                       "irrelevant": np.flatnonzero(in_layer & ~described.any(axis=1)).tolist()})
    strips = np.clip(np.rint(np.nan_to_num(d) * 127), -127, 127).astype(np.int8)
    meta = ctx.embedding.meta or {}
    handle = ctx.extra.get("handle")
    weights = str(getattr(handle, "weights_tag", "") or meta.get("weights") or "")
    figures_dir = ctx.output_dir / "figures"
    figures = sorted(f"figures/{p.name}" for p in figures_dir.glob("*.png")) if figures_dir.is_dir() else []
    return {
        "version": 1, "dataset": ctx.dataset, "model": str(meta.get("model") or ""), "weights": weights,
        "random_weights": weights == "random" or meta.get("weights_source") == "random",
        "run_id": ctx.extra.get("run_id"), "artifact_dir": "atlas",
        "n_images": len(ctx.labels), "t_plus": t_plus, "t_minus": t_minus,
        "kept": _num(kept.overall, 6), "kept_random": _num(kept.overall_random, 6), "top_k": top_k,
        "has_q": True, "has_auroc": auroc is not None,
        "classes": list(ctx.classes), "n_in": np.bincount(ctx.labels, minlength=len(ctx.classes)).tolist(),
        "features": list(ctx.feature_names), "layer_of": layer_of, "layers": layers,
        "hist_edges": [round(float(e), 4) for e in edges],
        "strips": base64.b64encode(strips.tobytes(order="C")).decode("ascii"),
        "pos": [[entry(f, c) for f in fs] for c, fs in enumerate(pos)],
        "neg": [[entry(f, c) for f in fs] for c, fs in enumerate(neg)],
        "n_pos": (d > t_plus).sum(axis=0).tolist(), "n_neg": (d < t_minus).sum(axis=0).tolist(),
        "fpos": [np.flatnonzero(row).tolist() for row in d > t_plus],
        "fneg": [np.flatnonzero(row).tolist() for row in d < t_minus],
        "figures": figures, "crops": {}, "crop_source": "",
    }


def render(data: dict) -> str:
    """The page: :data:`featstudy.analysis.atlas_page.TEMPLATE` with the data inlined once."""
    from featstudy.analysis.atlas_page import TEMPLATE

    return page_kit.render(TEMPLATE, data)


embed_json = page_kit.embed_json
read_data = page_kit.read_data


def decode_strips(data: dict) -> np.ndarray:
    """(F, C) int8 strips of a page's data (D ≈ value / 127)."""
    raw = np.frombuffer(base64.b64decode(data["strips"]), dtype=np.int8)
    return raw.reshape(len(data["features"]), len(data["classes"]))
