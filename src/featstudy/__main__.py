"""``python -m featstudy <overrides>``: Hydra composes ``conf/config.yaml``, then :func:`featstudy.app.run`.

A bad config (unknown group option, unknown or missing key, a value that is not allowed) exits with status 2 and
one line naming the key and what is allowed; set ``HYDRA_FULL_ERROR=1`` for the full traceback.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import featstudy.config  # noqa: F401 - registers the ${abspath:} resolver before Hydra composes
from featstudy.errors import EXIT_USAGE, FeatstudyError


def config_dir() -> str:
    """``$FEATSTUDY_CONF`` or the repository's ``conf/`` (next to ``src/``)."""
    env = os.environ.get("FEATSTUDY_CONF")
    return str(Path(env).absolute()) if env else str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _entry(cfg: DictConfig) -> None:
    from featstudy.app import run
    from featstudy.config import project_root
    from featstudy.tracking import ui_command

    root, how = project_root()
    if str(root) == str(cfg.paths.root_dir):
        print(f"[featstudy] project root: {root} ({how})", flush=True)
    else:
        print(f"[featstudy] project root: {cfg.paths.root_dir} (paths.root_dir)", flush=True)
    metrics, objects = run(cfg)
    if objects.get("rank"):  # a DDP helper rank: rank 0 reports
        return
    out = Path(cfg.paths.output_dir)
    print(f"[featstudy] figures: {out / 'figures'}   tables: {out / 'tables'}")
    if cfg.tracking.uri is not None:  # the run's experiment, as its Tracker knew it (None: the command alone)
        exp_id = objects.get("experiment_id") if objects.get("run_id") else None
        print(f"[featstudy] browse the runs: {ui_command(str(cfg.tracking.uri), exp_id)}")


def _chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return out


def one_line(exc: BaseException) -> str:
    """A one-line message for a user-fixable error (Hydra's, OmegaConf's or featstudy's)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    chain = _chain(exc)
    for e in chain:
        if isinstance(e, FeatstudyError):
            return str(e).splitlines()[0]
    for e in chain:  # a featstudy resolver's error, which OmegaConf re-raises as text (e.g. ${unique_dir:})
        match = re.match(r"(ConfigError|DataError) raised while resolving interpolation: (.*)", str(e))
        if match:
            return match.group(2).splitlines()[0]
    for e in chain:
        if isinstance(e, MissingConfigException) and getattr(e, "options", None) is not None:
            missing = str(getattr(e, "missing_cfg_file", "") or "")
            group = missing.rsplit("/", 1)[0] if "/" in missing else missing
            option = missing.rsplit("/", 1)[-1]
            return f"{group}={option}: no such option; allowed: {', '.join(sorted(e.options))}"
    for e in chain:
        if isinstance(e, OverrideParseException):
            msg = str(e).splitlines()[0] if str(e).strip() else "cannot parse"
            return f"cannot parse override {getattr(e, 'override', '')!r}: {msg}"
    text = " ".join(str(e) for e in chain)
    match = re.search(r"Could not override '([^']+)'", text)
    if match and "not in struct" in text:
        key = match.group(1)
        add = re.search(r"use (\+\S+)", text)
        value = add.group(1).split("=", 1)[1] if add and "=" in add.group(1) else "<value>"
        closest = _closest_key(key)
        if closest:
            return f"{key}: no such key; did you mean {closest}={value}?"
        return f"{key}: no such key" + (f" (to add a new key use {add.group(1)})" if add else "")
    match = re.search(r"Ambiguous value for argument '([^']+)'", text)
    if match:  # Hydra's advice, kept: list, quoted string or sweep
        arg = match.group(1)
        key, _, value = arg.partition("=")
        return (f"{arg}: ambiguous value; as a list: {key}=[{value}]; as a string, quote it: {key}='{value}'; "
                "to sweep over it, add -m")
    match = re.search(r"Missing mandatory value: (\S+)", text)
    if match:
        return f"{match.group(1)}: missing mandatory value; set {match.group(1)}=<value>"
    lines = [ln.strip() for e in chain for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    extra = [ln for ln in lines[1:] if ln.startswith(("Key '", "To append", "full_key", "Missing mandatory", "Could not"))]
    for ln in extra[:2]:
        if ln not in text:
            text += " " + ln
    return text.replace("\n", " ")


def _closest_key(key: str) -> str | None:
    """The existing key nearest to a mistyped ``key`` (``analysis.bin`` -> ``analysis.bins``), looked up in the
    config composed with this command's group choices (``experiment=demo``...); None when nothing is close."""
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import DictConfig, OmegaConf

    groups = [a for a in sys.argv[1:] if "=" in a and not a.startswith(("+", "~", "-"))
              and "." not in a.split("=", 1)[0] and "," not in a]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=groups)
    except Exception:  # noqa: BLE001 - no suggestion rather than a second error
        return None
    finally:
        GlobalHydra.instance().clear()
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not isinstance(node, DictConfig):
        return None
    match = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1, cutoff=0.6)
    if not match:
        return None
    return f"{parent}.{match[0]}" if parent else match[0]


def disk_full(exc: BaseException) -> str | None:
    """One line for an OSError "no space left" / "quota exceeded" anywhere in the chain that featstudy did not
    already report (a featstudy error in the chain wins), naming the file and the fix; else None."""
    import errno

    chain = _chain(exc)
    if any(isinstance(e, FeatstudyError) for e in chain):
        return None
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = str(Path(e.filename).parent) if e.filename else _job_folder()
            return (f"cannot write {e.filename or f'in {where}' if where else 'a file'} ({e.strerror}); free space"
                    + (f" on the disk holding {where}" if where else "")
                    + ", or write elsewhere: paths.root_dir=<folder on another disk> (or paths.log_dir, "
                    "paths.mlruns_dir, paths.cache_dir)")
    return None


def _job_folder() -> str | None:
    """The output folder of the job Hydra was starting (its ``.hydra/`` is written before featstudy runs)."""
    return featstudy.config.CREATED_DIRS[-1] if featstudy.config.CREATED_DIRS else None


def _user_error_types() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (FeatstudyError, HydraException, OmegaConfBaseException)


class _QuietJobErrors:
    """stderr proxy dropping Hydra's "Error executing job with overrides" line (the error is reported once, below)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        if text.startswith("Error executing job with overrides:"):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _resolve_printed_job_config(argv: list[str]) -> None:
    """``--cfg job`` prints the job's config resolved (Hydra's ``--resolve`` added), so what it prints is what runs:
    ``model.preprocessing`` shows the weights' own (``caffe`` for a Caffe checkpoint), not its interpolation. Only
    for ``job``: resolving Hydra's own config would create the run folder (``${unique_dir:}``)."""
    args = argv[1:]
    for i, arg in enumerate(args):
        shown = arg.split("=", 1)[1] if arg.startswith("--cfg=") else (args[i + 1] if arg in ("--cfg", "-c")
                                                                        and i + 1 < len(args) else None)
        if shown == "job" and "--resolve" not in args:
            argv.append("--resolve")
            return


def main() -> None:
    """Console entry point (``featstudy`` / ``python -m featstudy``)."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    full = previous == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra re-raise, so errors are reported here in one line
    stderr = sys.stderr
    if not full:
        sys.stderr = _QuietJobErrors(stderr)
    interrupted = failed = False
    import warnings

    # Hydra warns about a callback's exception, then re-raises it: a user error raised by featstudy's sweep callback
    # (bad tracking.uri, task_name...) is reported once, in the one line below
    warnings.filterwarnings("ignore", message=r"Callback SweepCallback\.\w+ raised (ConfigError|DataError)",
                            category=UserWarning)
    _resolve_printed_job_config(sys.argv)
    try:
        _entry()
    except KeyboardInterrupt:
        interrupted = True
        raise
    except BaseException as exc:
        failed = not isinstance(exc, SystemExit) or exc.code not in (0, None)
        disk = None if full else disk_full(exc)
        if disk is not None:  # e.g. Hydra writing .hydra/*.yaml into a run folder on a full disk
            print(f"featstudy: error: {disk}", file=stderr)
            sys.exit(EXIT_USAGE)
        if not isinstance(exc, _user_error_types()) or full:
            raise
        print(f"featstudy: error: {one_line(exc)}", file=stderr)
        sys.exit(EXIT_USAGE)
    finally:
        sys.stderr = stderr
        if previous is None:  # as it was: a caller in the same process (tests, notebooks) keeps its setting
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
        from featstudy.tracking import end_open_sweeps

        end_open_sweeps(interrupted=interrupted, failed=failed)


if __name__ == "__main__":
    main()
