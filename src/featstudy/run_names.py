"""MLflow run names that put what differs first, so the runs table's name column tells runs apart (issue 11).

* A single run: ``<dataset> · <model> · <weights> · <bins>``, e.g. ``cub200 · vgg19 · IMAGENET1K_V1 · exact``
  (``exact`` for ``analysis.bins=null``, ``100 bins`` otherwise; a weights file by its file name).
* A sweep child: the swept settings first, by their last key segment (``bins=25``; the full key where two swept
  keys share a last segment), then the single-run name: ``bins=25 · cub200 · vgg19 · IMAGENET1K_V1 · 25 bins``.
  The swept keys are those whose override in the sweep's command held a sweep (``a,b``, ``range(...)``,
  ``choice(...)``, ``glob(...)``), read from Hydra's ``multirun.yaml`` in the sweep folder; without it, every
  override of the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

SEP = " · "
#: MLflow's limit on a run name
MAX_LEN = 250


def _select(cfg: Any, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None) if OmegaConf.is_config(cfg) else None


def single_run_name(cfg: Any) -> str:
    """``dataset · model · weights · exact|N bins``; parts the config lacks are left out."""
    weights = _select(cfg, "model.weights")
    if isinstance(weights, str) and ("/" in weights or weights.endswith((".pth", ".pt", ".safetensors"))):
        weights = Path(weights).name
    bins = _select(cfg, "analysis.bins") if _select(cfg, "analysis") is not None else "absent"
    parts = [_select(cfg, "dataset.name"), _select(cfg, "model.name"), weights,
             None if bins == "absent" else ("exact" if bins is None else f"{bins} bins")]
    name = SEP.join(str(p) for p in parts if p not in (None, ""))
    return (name or str(_select(cfg, "task_name") or "featstudy"))[:MAX_LEN]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def swept_keys(sweep_dir: str | Path) -> list[str] | None:
    """The keys the sweep's command swept, in its order, from ``<sweep_dir>/multirun.yaml``; None if unreadable."""
    path = Path(sweep_dir) / "multirun.yaml"
    try:
        overrides = OmegaConf.select(OmegaConf.load(path), "hydra.overrides.task", default=None)
    except Exception:  # noqa: BLE001 - missing or unreadable: the caller falls back to the job's overrides
        return None
    if overrides is None:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:  # Hydra's own parser: a,b / range() / choice() / glob() sweep; [a,b] or 'a,b' do not
        parsed = OverridesParser.create().parse_overrides(overrides=[str(o) for o in overrides])
    except Exception:  # noqa: BLE001
        return None
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def sweep_child_name(cfg: Any, job_overrides: list[str], swept: list[str] | None) -> str:
    """The swept settings of this job (``key=value`` by the shortest unambiguous key), then :func:`single_run_name`."""
    pairs = [(_key(o), o.split("=", 1)[1]) for o in job_overrides if "=" in o]
    if swept is not None:
        pairs = [(k, v) for k, v in pairs if k in swept]
    last = [k.rsplit(".", 1)[-1] for k, _ in pairs]
    shown = [f"{(s if last.count(s) == 1 else k)}={v}" for (k, v), s in zip(pairs, last)]
    head = ", ".join(shown)
    return (head + SEP + single_run_name(cfg) if head else single_run_name(cfg))[:MAX_LEN]
