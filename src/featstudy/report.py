"""``python -m featstudy.report``: the figures and tables that compare datasets, from finished MLflow runs.

* ``fig5``: per layer, modes of D+ and D- with 68% intervals, one colour per dataset (paper Figure 5).
* ``fig6``: D distributions, conv1_1-conv5_3 against conv5_4 + fc7, one curve per dataset (Figure 6).
* ``fig8``: the same with ImageNet (``imagenet_val``) in blue and the other datasets in green (Figure 8); only
  when an ImageNet run is among the chosen ones.
* ``tables/table4.csv``: t+, d_avg(t+), t-, d_avg(t-) for every dataset (Table 4).
* ``atlas/index.html``: one self-contained page of the features shared by all datasets, specific to one, in some or
  in none, per layer, each run with its own t+/t- (:mod:`featstudy.analysis.compare`; docs/atlas.md).

Runs are chosen with ``--runs ID ...`` or, by default, the latest FINISHED job run of each dataset in the
experiment (``--datasets`` narrows that). The report itself is logged as a run (tag ``featstudy.role=report``)
whose tags name the runs it used.

Examples::

    python -m featstudy.report                                   # latest run of every dataset
    python -m featstudy.report --datasets mit67 cub200 flowers102 imagenet_val
    python -m featstudy.report --runs 3f2a... 9bc1... --tracking-uri sqlite:////abs/mlruns/mlflow.db
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path


from featstudy import __version__
from featstudy.analysis.ks import load_ks_arrays
from featstudy.errors import EXIT_USAGE, FeatstudyError

IMAGENET = "imagenet_val"


class ReportFiles(list):
    """What :func:`build_report` wrote: a list of the files (as before), with ``figures`` (``fig5``, ``fig6`` and,
    when drawn, ``fig8`` -> the :class:`matplotlib.figure.Figure`, still intact after saving)."""

    def __init__(self, files=(), figures=None):
        super().__init__(files)
        self.figures = dict(figures or {})


def _layer_order(per_run: list[list[str]]) -> list[str]:
    """The union of the runs' layers in network order: each run lists its layers in column order, so the longest
    list sets the order and a layer only some runs have goes after its predecessor there (before its successor
    when it comes first). A run that analysed only some layers (e.g. conv5_4 and fc7) thus does not reorder the
    x axis of fig5."""
    merged: list[str] = []
    for names in sorted(per_run, key=len, reverse=True):
        for i, name in enumerate(names):
            if name in merged:
                continue
            if i > 0:
                merged.insert(merged.index(names[i - 1]) + 1, name)
            else:
                after = [merged.index(n) for n in names[1:] if n in merged]
                merged.insert(after[0] if after else len(merged), name)
    return merged


def _default_root() -> Path:
    from featstudy.config import project_root

    return project_root()[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    root = _default_root()
    p = argparse.ArgumentParser(prog="python -m featstudy.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
                   help="MLflow store (default: sqlite:///<root>/mlruns/mlflow.db; root = $FEATSTUDY_ROOT, else the "
                        "folder at or above the working directory holding .project-root, else the working directory)")
    p.add_argument("--experiment", default="featstudy", help="MLflow experiment name (default: featstudy)")
    p.add_argument("--runs", nargs="+", default=None, help="run ids to compare (default: latest per dataset)")
    p.add_argument("--datasets", nargs="+", default=None, help="datasets to compare (default: all with a run)")
    p.add_argument("--out", default=None, help="output folder (default: <root>/outputs/report/<timestamp>)")
    p.add_argument("--tag", nargs="+", default=[], metavar="KEY=VALUE",
                   help="pick the latest run per dataset among those with these tags (e.g. weights=IMAGENET1K_V1)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="compare runs whose model, weights, crops, pooling or bins differ (refused by default)")
    p.add_argument("--formats", nargs="+", default=["png", "pdf"], choices=["png", "pdf", "svg"])
    p.add_argument("--width", default="double", choices=["single", "double", "free"],
                   help="journal column width of the figures: single (3.5 in), double (7 in, default) or free")
    p.add_argument("--no-log", action="store_true", help="do not log the report as an MLflow run")
    return p.parse_args(argv)


def build_report(runs: list[dict], arrays: dict[str, dict], table4_rows: dict[str, list[dict]], out: Path,
                 formats: list[str], width: str | None = "double") -> ReportFiles:
    """Write fig5, fig6, fig8 (when ImageNet is present) and table4.csv under ``out``; return the files (a list,
    whose ``figures`` attribute holds the Figure objects)."""
    from featstudy.analysis import plots

    per_dataset = {}
    imagenet: set[str] = set()
    per_run_layers: list[list[str]] = []
    for run, name in zip(runs, _display_names(runs)):
        a = arrays[run["run_id"]]
        if run["dataset"] == IMAGENET:
            imagenet.add(name)
        per_dataset[name] = (a["d"], a["layer_of_feature"].astype(str))
        per_run_layers.append(list(dict.fromkeys(a["layer_of_feature"].astype(str).tolist())))
    layers = _layer_order(per_run_layers)
    files = ReportFiles()
    others = {k: v for k, v in per_dataset.items() if k not in imagenet}
    files.figures["fig5"] = plots.fig5_modes(others or per_dataset, layers)
    files.figures["fig6"] = plots.fig6_distributions(others or per_dataset, layers, title="D distribution")
    if imagenet and others:
        colors = {k: ("tab:blue" if k in imagenet else "tab:green") for k in per_dataset}
        files.figures["fig8"] = plots.fig6_distributions(per_dataset, layers, colors=colors,
                                                         title="ImageNet (blue) against the other datasets (green)")
    for name, fig in files.figures.items():
        if width is not None:
            plots.journal_layout(fig, width)
        files += plots.save_figure(fig, out / "figures", name, formats)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    table = out / "tables" / "table4.csv"
    header: list[str] = []
    rows = []
    for run in runs:
        # a run without table4.csv (thresholds callback dropped) still gets its row, thresholds left empty
        for row in table4_rows.get(run["run_id"]) or [{"dataset": run["dataset"]}]:
            row = {**row, "run_id": run["run_id"]}
            header += [k for k in row if k not in header]  # runs may differ in columns: the union, in order
            rows.append(row)
    header = [k for k in header if k != "run_id"] + ["run_id"]
    with open(table, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=header or ["dataset", "run_id"], restval="")
        w.writeheader()
        w.writerows(rows)
    files.append(table)
    return files


def _display_names(runs: list[dict]) -> list[str]:
    """One name per run: its dataset, with the run id's first 8 characters when a dataset comes again."""
    names: list[str] = []
    for run in runs:
        name = run["dataset"]
        if name in names:
            name = f"{name} ({run['run_id'][:8]})"
        names.append(name)
    return names


#: what must agree between the runs of one report (else --allow-mixed)
COMPARED = ("model", "weights", "crops", "pooling", "bins")


def run_settings(run: dict) -> dict[str, str]:
    """The settings a report compares, from a run's params and tags: model, weights (the resolved ``weights``
    tag), crops (``ten 256/224``; ``ten 248/224 bicubic`` when not bilinear), pooling, bins (``exact`` for
    ``analysis.bins=null``); ``?`` where unknown."""
    p, t = run.get("params", {}), run.get("tags", {})
    crops = p.get("crops.name")
    if crops and p.get("crops.size"):
        crops += f" {p['crops.resize']}/{p['crops.size']}" if p.get("crops.resize") not in (None, "null", "None") \
            else f" {p['crops.size']}"
        if p.get("crops.interpolation") not in (None, "bilinear"):  # runs before the setting were all bilinear
            crops += f" {p['crops.interpolation']}"
    bins = p.get("analysis.bins")
    return {"model": p.get("model.name") or "?", "weights": t.get("weights") or p.get("model.weights") or "?",
            "crops": crops or "?", "pooling": p.get("pooling.name") or "?",
            "bins": "exact" if bins in ("null", "None") else (bins or "?")}


def check_comparable(runs: list[dict], allow_mixed: bool) -> None:
    """Refuse runs whose :data:`COMPARED` settings differ, naming the first differing setting and each run's value,
    unless ``allow_mixed``."""
    settings = [run_settings(r) for r in runs]
    for key in COMPARED:
        values = {s[key] for s in settings}
        if len(values) > 1 and not allow_mixed:
            each = ", ".join(f"{r['dataset']} ({r['run_id'][:8]}): {s[key]}" for r, s in zip(runs, settings))
            raise FeatstudyError(f"the runs differ in {key} ({each}); pick comparable runs (--runs ID ..., or "
                                 "--tag KEY=VALUE, e.g. --tag weights=IMAGENET1K_V1), or compare them anyway with "
                                 "--allow-mixed")


def run_thresholds(run: dict, rows: list[dict], ks) -> tuple[float, float, str] | None:
    """A run's (t+, t-, where from): its ``tables/table4.csv`` row; else recomputed from ``ks`` (its
    ``arrays/ks.npz``, opened: d and d_random are read only then) by :func:`featstudy.stats.thresholds` (Eq. 4) on
    the run's grid step (param ``analysis.threshold_step``, 0.001 when absent); None when neither is there."""
    import math

    for row in rows:
        try:
            t_plus, t_minus = float(row["t_plus"]), float(row["t_minus"])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(t_plus) and math.isfinite(t_minus):  # "nan" / "inf" parse, but are no thresholds
            return t_plus, t_minus, "tables/table4.csv"
    from featstudy import stats

    if "d_random" not in ks.files:
        return None
    step = float(run.get("params", {}).get("analysis.threshold_step") or 0.001)
    th = stats.thresholds(ks["d"], ks["d_random"], step=step)
    return float(th.t_plus), float(th.t_minus), f"recomputed from arrays/ks.npz (step {step:g})"


def comparison_page(runs: list[dict], arrays: dict[str, dict], npz_paths: dict[str, Path],
                    tables: dict[str, list[dict]], out: Path, files: list[Path], run_id: str | None) -> Path | None:
    """Write the cross-dataset page ``out/atlas/index.html`` (:mod:`featstudy.analysis.compare`) and return it;
    None, with one line saying why, when it cannot be made (a run without feature names or thresholds, no feature
    in common, a folder that cannot be written, arrays that do not fit). Figures and Table 4 stay whatever happens
    here."""
    try:
        return _comparison_page(runs, arrays, npz_paths, tables, out, files, run_id)
    except OSError as exc:
        why = f"{exc.strerror or type(exc).__name__}: {exc.filename or out / 'atlas'}"
    except Exception as exc:  # noqa: BLE001 - e.g. a corrupt npz, d_random not shaped as d: the rest is kept
        why = f"{type(exc).__name__}: {_first_line(exc)}"
    print(f"[featstudy.report] no comparison page ({why}); the figures and Table 4 stay", flush=True)
    return None


def _comparison_page(runs: list[dict], arrays: dict[str, dict], npz_paths: dict[str, Path],
                     tables: dict[str, list[dict]], out: Path, files: list[Path], run_id: str | None) -> Path | None:
    """:func:`comparison_page`: each run's ``arrays/ks.npz`` opened once, its d and layers as :func:`main` read
    them (``arrays``)."""
    import numpy as np

    from featstudy.analysis.compare import CompareRun, common_features, write_compare_page

    compared = []
    for run, name in zip(runs, _display_names(runs)):
        where = f"run {run['run_id']} ({run['dataset']})"
        with np.load(npz_paths[run["run_id"]], allow_pickle=False) as z:
            th = run_thresholds(run, tables.get(run["run_id"]) or [], z)
            missing = [k for k in ("feature_names", "classes") if k not in z.files]
            if missing or th is None:
                why = f"arrays/ks.npz lacks {', '.join(missing)}" if missing else \
                    "no tables/table4.csv and no d_random in arrays/ks.npz"
                print(f"[featstudy.report] no comparison page, {where}: {why} (rerun its analysis with this version)",
                      flush=True)
                return None
            s = run_settings(run)
            a = arrays[run["run_id"]]
            compared.append(CompareRun(name, run["run_id"], a["d"], z["feature_names"].astype(str).tolist(),
                                       a["layer_of_feature"].astype(str).tolist(), z["classes"].astype(str).tolist(),
                                       th[0], th[1], model=s["model"], weights=s["weights"]))
        if th[2] != "tables/table4.csv":
            print(f"[featstudy.report] {where}: t+ {th[0]:g}, t- {th[1]:g} {th[2]}", flush=True)
    if not common_features(compared)[0]:
        print("[featstudy.report] no comparison page: the runs have no feature in common", flush=True)
        return None
    figures = sorted(str(f.relative_to(out)) for f in files if f.suffix == ".png" and f.parent.name == "figures")
    page = write_compare_page(compared, out / "atlas", figures=figures, run_id=run_id)
    print(f"[featstudy.report] comparison page: {page}", flush=True)
    return page


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _report_tracker(args: argparse.Namespace, runs: list[dict], out: Path):
    """The MLflow run the report is logged as (created before the comparison page, which holds its id)."""
    from featstudy import tracking

    sqlite = tracking.sqlite_path(args.tracking_uri)
    return tracking.Tracker.create(
        args.tracking_uri, args.experiment, str(sqlite.parent / "artifacts") if sqlite else None,
        run_name=f"report: {', '.join(r['dataset'] for r in runs)}"[:250],
        tags={"featstudy.role": "report", "featstudy.version": __version__,
              "featstudy.report_runs": ",".join(r["run_id"] for r in runs), "featstudy.output_dir": str(out)})


def main(argv: list[str] | None = None) -> int:
    import os

    from featstudy import tracking

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded artifact: noise
    args = parse_args(argv)
    tracker = None
    try:
        try:
            tags = {}
            for item in args.tag:
                key, sep, value = item.partition("=")
                if not sep or not key:
                    raise FeatstudyError(f"--tag {item!r}: expected KEY=VALUE, e.g. --tag weights=IMAGENET1K_V1")
                tags[key] = value
            runs = tracking.find_job_runs(args.tracking_uri, args.experiment, run_ids=args.runs,
                                          datasets=args.datasets, tags=tags)
        except FeatstudyError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. an unknown run id in --runs
            raise FeatstudyError(f"{'--runs' if args.runs else '--tracking-uri'}: {_first_line(exc)}") from exc
        if not runs:
            raise FeatstudyError(f"no runs to compare in experiment {args.experiment!r} of {args.tracking_uri}")
        for run in runs:  # which run stands for each dataset, never silently
            s = run_settings(run)
            print(f"[featstudy.report] {run['dataset']}: run {run['run_id']} {run.get('name') or ''!r} "
                  + " ".join(f"{k}={s[k]}" for k in COMPARED), flush=True)
        check_comparable(runs, args.allow_mixed)
        out = Path(args.out).absolute() if args.out else (
            _default_root() / "outputs" / "report" / time.strftime("%Y-%m-%d_%H-%M-%S"))
        out.mkdir(parents=True, exist_ok=True)
        arrays, tables, npz_paths = {}, {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for run in runs:
                dst = Path(tmp) / run["run_id"]
                try:
                    npz = tracking.download_artifact(args.tracking_uri, run["run_id"], "arrays/ks.npz", dst)
                except Exception as exc:  # noqa: BLE001 - a run without the artifact is a user error here
                    raise FeatstudyError(f"run {run['run_id']} ({run['dataset']}) has no arrays/ks.npz artifact "
                                         f"(was analysis.callbacks.ks dropped?): {_first_line(exc)}") from exc
                try:
                    arrays[run["run_id"]] = load_ks_arrays(npz, keys=("d", "layer_of_feature"))
                except KeyError as exc:
                    raise FeatstudyError(f"run {run['run_id']} ({run['dataset']}): arrays/ks.npz lacks "
                                         f"{exc.args[0]}") from exc
                npz_paths[run["run_id"]] = kept_npz = Path(tmp) / f"{run['run_id']}.npz"
                Path(npz).replace(kept_npz)  # kept for the comparison page (read lazily there)
                try:
                    t4 = tracking.download_artifact(args.tracking_uri, run["run_id"], "tables/table4.csv", dst)
                    with open(t4, newline="", encoding="utf-8") as fh:
                        tables[run["run_id"]] = list(csv.DictReader(fh))
                except Exception:  # noqa: BLE001 - the thresholds callback may have been dropped
                    tables[run["run_id"]] = []
            files = build_report(runs, arrays, tables, out, args.formats,
                                 None if args.width == "free" else args.width)
            tracker = None if args.no_log else _report_tracker(args, runs, out)
            try:
                page = comparison_page(runs, arrays, npz_paths, tables, out, files,
                                       tracker.run_id if tracker is not None else None)
            except BaseException:
                if tracker is not None:
                    tracker.end("FAILED")
                raise
            if page is not None:
                files.append(page)
    except FeatstudyError as exc:
        print(f"featstudy.report: error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    print(f"[featstudy.report] {len(runs)} runs ({', '.join(r['dataset'] for r in runs)}) -> {out}")
    if tracker is not None:
        status = "FAILED"
        try:
            # one param per run, also when a dataset comes twice (the run id's prefix tells them apart)
            tracker.log_params({f"run.{name.replace(' (', '.').rstrip(')')}": r["run_id"]
                                for r, name in zip(runs, _display_names(runs))})
            for f in files:
                rel = f.relative_to(out)
                tracker.log_artifact(f, str(rel.parent))
            status = "FINISHED"
        finally:
            tracker.end(status)
        print(f"[featstudy.report] logged as MLflow run {tracker.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
