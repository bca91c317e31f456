"""Ranks, devices and launches: what featstudy must agree on with Lightning when several processes extract.

* :func:`env_rank`: the global rank of this process, read from the same cluster environment Lightning picks
  (TorchElastic, SLURM unless the job is interactive, LSF, MPI, else Lightning's own ``NODE_RANK``/``LOCAL_RANK``).
  An inherited ``SLURM_PROCID=0`` in an interactive shell (``srun --pty bash``), where Lightning starts the DDP
  children itself, must not make every child a rank 0.
* :func:`sweep_devices`: ``trainer.devices`` of one job of a sweep: one device, a different GPU per job.
* :class:`Decision`: the helper ranks of an external launch (srun, torchrun) follow rank 0's decision, taken under
  the embedding's lock (reuse the finished embedding, extract with every rank, or let rank 0 extract alone).
* :class:`Interrupts`: keeps the exception Lightning swallows when it turns a KeyboardInterrupt into ``sys.exit(1)``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)

#: the default of ``trainer.ddp_timeout_s``: how long a rank waits for the others (Lightning's default is 30 min)
DDP_TIMEOUT_S = 600


def cluster_environment() -> str:
    """The name of the cluster environment Lightning's accelerator connector would pick, in its order:
    ``torchelastic``, ``slurm`` (not for a job named ``bash`` or ``interactive``), ``lsf``, ``mpi``, else
    ``lightning``."""
    from lightning_fabric.plugins.environments import (LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                       TorchElasticEnvironment)

    for name, env in (("torchelastic", TorchElasticEnvironment), ("slurm", SLURMEnvironment),
                      ("lsf", LSFEnvironment), ("mpi", MPIEnvironment)):
        if env.detect():
            return name
    return "lightning"


def _devices_per_node(cfg) -> int:
    devices = None if cfg is None else cfg.get("trainer", {}).get("devices")
    if isinstance(devices, int) and devices > 0:
        return devices
    if devices is not None and not isinstance(devices, (int, str)):
        return max(1, len(devices))
    return 1


def env_rank(cfg=None) -> int:
    """Global rank of this process (0 when not distributed), as Lightning computes it.

    TorchElastic: ``RANK``; SLURM (``srun``, not interactive): ``SLURM_PROCID``; LSF/MPI: their environment;
    otherwise Lightning's environment: ``NODE_RANK * devices per node + LOCAL_RANK`` (the children Lightning
    starts get ``LOCAL_RANK``; ``WORLD_SIZE`` / ``trainer.num_nodes`` give the devices per node, else ``cfg``).
    """
    name = cluster_environment()
    if name == "torchelastic":
        return int(os.environ.get("RANK", "0"))
    if name == "slurm":
        return int(os.environ.get("SLURM_PROCID", "0"))
    if name in ("lsf", "mpi"):
        from lightning_fabric.plugins.environments import LSFEnvironment, MPIEnvironment

        return int((LSFEnvironment if name == "lsf" else MPIEnvironment)().global_rank())
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if node == 0:
        return local
    nodes = int(cfg.get("trainer", {}).get("num_nodes", 1)) if cfg is not None else 1
    world = os.environ.get("WORLD_SIZE", "")
    per_node = int(world) // max(nodes, 1) if world.isdigit() and nodes > 0 else _devices_per_node(cfg)
    return node * max(per_node, 1) + local


def external_launch() -> bool:
    """True when the ranks were started outside Lightning (srun, torchrun, jsrun, mpirun): each rank runs the
    whole command, so the helpers must be told what rank 0 decided under the lock. False for one task (an array
    job of a sweep on SLURM): nobody to tell."""
    name = cluster_environment()
    if name == "slurm":
        return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
    if name == "torchelastic":
        return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    return name in ("lsf", "mpi")


def sweep_devices(devices, accelerator: str, job_num: int, n_gpus: int):
    """``trainer.devices`` for job ``job_num`` of a sweep on a machine where ``n_gpus`` CUDA devices are visible.

    ``auto`` (Lightning: every GPU, then DDP re-running the command line on every rank) and ``1`` become one
    device: with several GPUs visible and a GPU accelerator (``auto``, ``gpu``, ``cuda``), GPU ``job_num % n_gpus``
    as the list ``[i]``, so that parallel jobs (joblib) do not all land on ``cuda:0``; otherwise ``1``. Anything
    else is returned unchanged (a DDP setting is refused by the caller).
    """
    if devices not in ("auto", 1, "1"):
        return devices
    if n_gpus > 1 and str(accelerator) in ("auto", "gpu", "cuda"):
        return [int(job_num) % n_gpus]
    return 1


class Interrupts(pl.Callback):
    """Keeps the exception that stopped predict. Lightning (``trainer/call.py``) catches a KeyboardInterrupt (a
    signal turned into :class:`featstudy.app.Terminated`, Ctrl-C), kills its DDP children and calls
    ``sys.exit(1)``: the caller re-raises the kept interrupt so the run ends KILLED, not FAILED."""

    def __init__(self) -> None:
        self.exception: BaseException | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.exception = exception


def current_sigint():
    """SIGINT's handler now (None outside the main thread, where signals cannot be set)."""
    import signal
    import threading

    return signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None


def restore_sigint(handler) -> None:
    """Put back SIGINT's handler: Lightning sets it to SIG_IGN when it handles an interrupt and never restores it."""
    import signal

    if handler is not None:
        signal.signal(signal.SIGINT, handler)


def _launch_id() -> str:
    """What identifies one launch of all the ranks (the same in every rank, new on a resubmission)."""
    env = os.environ
    if cluster_environment() == "torchelastic":
        parts = [env.get("TORCHELASTIC_RUN_ID", ""), env.get("TORCHELASTIC_RESTART_COUNT", "0")]
    elif "SLURM_JOB_ID" in env:
        parts = [env["SLURM_JOB_ID"], env.get("SLURM_STEP_ID", ""), env.get("SLURM_RESTART_COUNT", "0")]
    else:
        parts = [env.get("LSB_JOBID", ""), env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")]
    return "-".join(p.replace(os.sep, "_") for p in parts if p) or "local"


class Decision:
    """Rank 0's choice for one key and one launch, in ``<cache>/embeddings/.launches/<key>.<launch id>.json``:
    ``wait`` (refreshed while rank 0 waits for another job's lock), ``hit``, ``ddp`` (with the number of images
    already done) or ``alone`` (fewer images left than ranks: rank 0 extracts them without DDP). Written
    atomically; read by the helper ranks of an external launch (:func:`external_launch`)."""

    def __init__(self, folder: Path, key: str):
        import threading

        self.path = Path(folder).parent / ".launches" / f"{key}.{_launch_id()}.json"
        self._lock, self._final, self._stop = threading.Lock(), False, threading.Event()

    def publish(self, action: str, **extra) -> None:
        from featstudy.store import atomic_write_text

        with self._lock:
            if self._final:
                return
            self._final = action != "wait"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"action": action, "time": time.time(), **extra}))

    def heartbeat(self, every_s: float = 10.0) -> None:
        """Rank 0: publish ``wait`` now and every ``every_s`` until a decision (or :meth:`stop`), so that the
        helpers keep waiting through the fingerprint, a weights download or another job's lock, and give up only
        once rank 0 has gone silent."""
        import threading

        self.publish("wait")

        def beat() -> None:
            while not self._stop.wait(every_s) and not self._final:
                try:
                    self.publish("wait")
                except OSError:  # the cache is unwritable: the extraction itself reports it
                    return

        threading.Thread(target=beat, name="featstudy-decision-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def await_(self, timeout_s: float, poll_s: float = 0.2) -> dict:
        """Rank 0's decision once it is not ``wait``; a DataError when rank 0 has said nothing (no new
        ``wait`` either) for ``timeout_s`` seconds."""
        from featstudy.errors import DataError

        last, seen = time.monotonic(), None
        while True:
            try:
                decision = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                decision = None
            if decision is not None and decision.get("action") != "wait":
                return decision
            if decision is not None and decision.get("time") != seen:
                seen, last = decision.get("time"), time.monotonic()
            if time.monotonic() - last > timeout_s:
                raise DataError(f"trainer.ddp_timeout_s: global rank 0 gave no decision on the embedding in "
                                f"{timeout_s:.0f} s ({self.path}); it failed or cannot reach paths.cache_dir, which "
                                "every node must see")
            time.sleep(poll_s)


def await_done(folder: Path, timeout_s: float, poll_s: float = 0.2) -> None:
    """Wait until ``folder``'s DONE marker exists (rank 0 extracting alone); a DataError after ``timeout_s``."""
    from featstudy.errors import DataError
    from featstudy.store import is_complete

    t0 = time.monotonic()
    while not is_complete(folder):
        if time.monotonic() - t0 > timeout_s:
            raise DataError(f"trainer.ddp_timeout_s: global rank 0 did not finish {folder} in {timeout_s:.0f} s")
        time.sleep(poll_s)


def ddp_timeout_s(cfg) -> float:
    """``trainer.ddp_timeout_s`` (default :data:`DDP_TIMEOUT_S`), checked: a positive number."""
    from featstudy.errors import ConfigError

    value = cfg.get("trainer", {}).get("ddp_timeout_s", DDP_TIMEOUT_S) if cfg is not None else DDP_TIMEOUT_S
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"trainer.ddp_timeout_s={value!r} is not allowed; trainer.ddp_timeout_s must be a positive "
                          "number of seconds (how long a rank waits for the others)")
    return float(value)


def check_accelerator(cfg) -> None:
    """``trainer.accelerator=gpu`` (or ``cuda``) where no CUDA device is visible: one line naming the setting and
    ``CUDA_VISIBLE_DEVICES``, never a silent run on the CPU."""
    from featstudy.errors import ConfigError

    accelerator = str(cfg.get("trainer", {}).get("accelerator", "auto")) if cfg is not None else "auto"
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(f"trainer.accelerator={accelerator}: no CUDA device is visible to this process "
                          f"(CUDA_VISIBLE_DEVICES={'unset' if visible is None else repr(visible)}); run it on a GPU "
                          "node with its GPUs visible, or set trainer.accelerator=cpu")


def world_size(trainer) -> int:
    """How many processes this Trainer's predict runs in (known before Lightning launches its children)."""
    from pytorch_lightning.strategies import ParallelStrategy

    if not isinstance(trainer.strategy, ParallelStrategy):
        return 1
    return int(trainer.num_devices) * int(trainer.num_nodes)


def check_cluster(trainer) -> None:
    """Lightning checks SLURM's tasks per node and nodes against ``trainer.devices``/``num_nodes`` only inside
    predict (a traceback); check them here and raise one line naming both settings."""
    from featstudy.errors import ConfigError

    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None:
        return
    try:
        env.validate_settings(num_devices=int(trainer.num_devices), num_nodes=int(trainer.num_nodes))
    except ValueError as exc:
        per_node, nodes = os.environ.get("SLURM_NTASKS_PER_NODE"), os.environ.get("SLURM_NNODES")
        raise ConfigError(f"trainer.devices={trainer.num_devices} trainer.num_nodes={trainer.num_nodes} do not match "
                          f"SLURM's --ntasks-per-node={per_node} --nodes={nodes}: set trainer.devices to "
                          "--ntasks-per-node and trainer.num_nodes to --nodes, and start the job with srun "
                          f"({str(exc).splitlines()[0]})") from None


def set_timeout(trainer, seconds: float) -> None:
    """A bounded wait for the other ranks (Lightning's default is 30 minutes): a rank that failed makes the others
    fail after ``seconds`` with the run marked FAILED, instead of holding the allocation."""
    from datetime import timedelta

    if hasattr(trainer.strategy, "_timeout"):  # DDPStrategy (ddp, ddp_spawn, ddp_fork): used by init_process_group
        trainer.strategy._timeout = timedelta(seconds=seconds)
