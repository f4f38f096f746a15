"""How the ranks of one data-parallel job are started, so that a multirun of DDP jobs writes each job once.

Three ways a job gets its ranks, all ending with every rank in the job's one folder:

- **Lightning starts them** (``trainer=ddp_cpu``, or ``trainer=ddp`` on one machine): rank 0 is the Hydra process,
  and Lightning's subprocess launcher re-runs the command line for ranks 1..N-1. In a multirun that command line
  holds ``-m`` and the sweep, so each rank would compose a sweep of its own. Instead, rank 0 leaves the job's own
  overrides and folder in ``$GENPI_DDP_JOB`` (:func:`ddp_job`), and a re-run rank rewrites its command line into that
  single job, in that folder, before Hydra reads it (:func:`reenter_job`).
- **submitit's local executor starts them** (``hydra/launcher=local``, one task per rank): every task runs the Hydra
  job itself; :class:`genpi.submitit_env.SubmititLocalEnvironment` tells Lightning the ranks already exist, so nothing is re-launched.
- **srun starts them** (``hydra/launcher=slurm``): Lightning's ``SLURMEnvironment`` does the same for Slurm tasks.

Only rank 0 writes the run folder's records and talks to W&B (:func:`process_rank`); every rank writes its own log
(``train.log`` for rank 0, ``train_rank<r>.log`` beside it, named by the ``genpi_rank_suffix`` resolver).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from genpi.utils.errors import GenpiError

log = logging.getLogger("genpi.launching")

JOB_ENV = "GENPI_DDP_JOB"
# what Lightning's subprocess launcher sets in the rank-0 process and never takes back: left in place, the next job
# of a sweep would believe its ranks had been started already and wait for ranks that never come
LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", JOB_ENV)
# hydra.* overrides a re-entered rank must not inherit: they describe the sweep, not the job
SWEEP_ONLY = ("hydra.mode", "hydra.run.", "hydra.sweep.", "hydra/launcher", "hydra.launcher", "hydra/sweeper",
              "hydra.sweeper", "hydra.job.name", "hydra.job.num", "hydra.job.id", "hydra.output_subdir")
# how long rank 0 waits, after its job, for the ranks Lightning started to exit on their own
CHILD_EXIT_TIMEOUT_S = 300.0


def _submitit_local() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "local"


def process_rank() -> int:
    """This process's global rank as its launcher set it (0 when nothing distributed is going on).

    Read from the environment, so it is right before the Trainer exists (loggers are built before it): submitit's
    local executor's task id, else the variables Lightning reads itself (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``).
    """
    names = ("SUBMITIT_LOCAL_GLOBALID",) if _submitit_local() else ("RANK", "LOCAL_RANK", "SLURM_PROCID")
    for name in names:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return 0


def rank_suffix() -> str:
    """``""`` on rank 0, ``_rank<r>`` on the others: the log file name's suffix (``train_rank1.log``)."""
    rank = process_rank()
    return f"_rank{rank}" if rank else ""


def _job_tasks() -> int | None:
    """How many tasks an external launcher started for this job (submitit local or Slurm), or None."""
    if _submitit_local():
        return int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1"))
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and os.environ.get("SLURM_NTASKS", "").isdigit():
        return int(os.environ["SLURM_NTASKS"])
    return None


def check_launch(trainer_cfg: Any, choice: str | None = None) -> None:
    """Refuse, in one line and before any model loads, a trainer this machine or launcher cannot run.

    ``trainer_cfg`` is the composed ``trainer`` group; ``choice`` the option picked (``ddp``) for the message.
    """
    from genpi import schema

    spec = schema.read(trainer_cfg, schema.TrainerLaunch, "trainer")
    option = f"trainer={choice}" if choice else f"trainer.accelerator={spec.accelerator}"
    if spec.accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise GenpiError(f"{option} runs on GPUs and this machine has none (torch.cuda.is_available() is false): "
                             "for data parallel on CPU processes use trainer=ddp_cpu, for one process trainer=cpu")
    world = spec.devices * spec.num_nodes if isinstance(spec.devices, int) and spec.devices > 0 else None
    tasks = _job_tasks()
    if tasks is not None and world is not None and tasks != world:
        raise GenpiError(f"trainer.devices x trainer.num_nodes = {world} ranks, but the launcher started {tasks} "
                         "task(s) for this job: under submitit every rank is a task, so set hydra.launcher."
                         "tasks_per_node to trainer.devices (and hydra.launcher.nodes to trainer.num_nodes)")


def cluster_plugins() -> list | None:
    """The Trainer's cluster environment when an external launcher started the ranks, else None (Lightning's own)."""
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    if _submitit_local():
        from genpi.submitit_env import SubmititLocalEnvironment

        return [SubmititLocalEnvironment()]
    if SLURMEnvironment.detect():
        # submitit owns requeueing under Slurm (USR2, see conf/hydra/launcher/slurm.yaml): Lightning's own SIGUSR1
        # requeue is switched off so that a preempted job is requeued exactly once
        return [SLURMEnvironment(auto_requeue=False)]
    return None


# the trainers built in the current job, so that ddp_job can find the ranks their launchers started
_JOB_TRAINERS: list = []


def build_trainer(trainer_cfg: Any, **kwargs: Any):
    """``pytorch_lightning.Trainer`` from the ``trainer`` group, with the cluster environment of the launcher."""
    import hydra

    trainer = hydra.utils.instantiate(trainer_cfg, plugins=cluster_plugins(), **kwargs)
    _JOB_TRAINERS.append(trainer)
    return trainer


def _job_record() -> dict[str, Any] | None:
    """What a rank that Lightning re-launches needs to re-enter this process's Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    hydra_overrides = [o for o in hc.overrides.hydra if not o.lstrip("+~").startswith(SWEEP_ONLY)]
    return {"dir": str(hc.runtime.output_dir), "name": hc.job.name, "overrides": list(hc.overrides.task),
            "hydra_overrides": hydra_overrides}


@contextlib.contextmanager
def ddp_job() -> Iterator[None]:
    """The scope of one Hydra job in the process that runs it (rank 0, or the only rank).

    On entry, the job's overrides and folder go into ``$GENPI_DDP_JOB`` for the ranks Lightning may start. On exit,
    the environment Lightning's launcher changed is put back (so the next job of a sweep starts its own ranks on a
    fresh port), and those ranks are waited for; a rank that failed fails the job, naming its log.
    """
    saved = {name: os.environ.get(name) for name in LAUNCHER_ENV}
    record = _job_record() if process_rank() == 0 and "LOCAL_RANK" not in os.environ else None
    if record:
        os.environ[JOB_ENV] = json.dumps(record)
    _JOB_TRAINERS.clear()
    was_open = _process_group_open()
    failed = True
    try:
        yield
        failed = False
    finally:
        children = [p for t in _JOB_TRAINERS for p in (getattr(t.strategy.launcher, "procs", None) or [])]
        bad = _reap(children, kill=failed)
        for t in _JOB_TRAINERS:
            procs = getattr(t.strategy.launcher, "procs", None)
            if procs:
                # Lightning's child-process observer watches this same list and kills this process when a child
                # ends badly: the children are accounted for here, so it must not act on them again
                procs.clear()
        _JOB_TRAINERS.clear()
        _close_process_group(was_open)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if bad and record:
        rank, code = bad[0]
        raise GenpiError(f"rank {rank} of this job exited with code {code}: see "
                         f"{Path(record['dir']) / (record['name'] + f'_rank{rank}.log')}")


def _process_group_open() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _close_process_group(was_open: bool) -> None:
    """Close the process group this job opened: Lightning keeps it, and the next job of a sweep would otherwise
    reuse it (its peers, this job's ranks, are gone)."""
    if not was_open and _process_group_open():
        import torch.distributed as dist

        dist.destroy_process_group()


def _reap(children: list[subprocess.Popen], kill: bool) -> list[tuple[int, int]]:
    """Wait for (or, after a failure, kill) the ranks Lightning started; the (rank, exit code) of those that failed."""
    bad = []
    deadline = time.monotonic() + CHILD_EXIT_TIMEOUT_S
    for rank, proc in enumerate(children, start=1):
        if kill and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("rank %d (pid %d) did not exit %.0f s after its job ended: killed", rank, proc.pid,
                      CHILD_EXIT_TIMEOUT_S)
            proc.kill()
            code = proc.wait()
        if code != 0 and not kill:
            bad.append((rank, code))
    return bad


def reenter_job(argv: list[str] | None = None) -> list[str]:
    """The command line a rank that Lightning re-launched should run: the job rank 0 is running, not the sweep.

    Lightning starts rank r > 0 as rank 0's command line plus ``hydra.run.dir=...`` with ``LOCAL_RANK=r`` set. When
    ``$GENPI_DDP_JOB`` describes rank 0's job, the command line becomes that job's overrides (one value for every
    swept key, no ``-m``) with ``hydra.run.dir`` set to the job's folder and Hydra's ``.hydra`` files left to rank 0.
    The entry point calls this before Hydra parses ``sys.argv``; elsewhere it returns ``argv`` unchanged.
    """
    argv = list(sys.argv if argv is None else argv)
    record = os.environ.get(JOB_ENV)
    if not record or os.environ.get("LOCAL_RANK", "0") == "0":
        return argv
    job = json.loads(record)
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv[1:])
    flags = []
    for flag, value in (("--config-path", args.config_path), ("--config-name", args.config_name),
                        ("--config-dir", args.config_dir)):
        if value is not None:
            flags += [flag, value]
    return [argv[0], *flags, *job["hydra_overrides"], *job["overrides"], f"hydra.run.dir={_quoted(job['dir'])}",
            f"hydra.job.name={job['name']}", "hydra.output_subdir=null"]


def _quoted(value: Any) -> str:
    """A value as a Hydra override literal: sweep folder names hold '=' and ',' that would split it."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"
