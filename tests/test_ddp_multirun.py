"""Data-parallel jobs in a multirun: each job written once, in one sweep folder, with every rank's log beside it.

The end-to-end tests run real 2-process DDP jobs (gloo on CPU) through the console entry point, started by
Lightning's subprocess launcher and by submitit's local executor (one task per rank, as srun does), and compare
their metrics with the same jobs run one at a time, and with one process on the global batch (DDP's equivalence).
The others check the pieces without starting any rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CONF, compose_cfg

REPO = CONF.parent
# the command, with a short real training instead of debug=fdr (which writes no metrics to compare)
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]
# no LoRA dropout: a DDP job then equals one process on the global batch (each rank draws other dropout masks)
SHORT = ["experiment_name=ddpprobe", "trainer.max_steps=2", "data.max_records=24", "data.batch_size=2",
         "model.lora.dropout=0.0"]
COMPARED = ("val/kl", "val/loss", "val/kl_start", "train/steps")


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "GENPI_DDP_JOB")}
    # the checkout under test, also for the ranks Lightning re-launches; one thread per rank on a shared machine
    env.update(GENPI_OUTPUT_ROOT=str(root), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="offline",
               WANDB_SILENT="true")
    return env


def _train(args: list[str], root: Path, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genpi.train", *args], cwd=REPO, env=_env(root),
                          capture_output=True, text=True, timeout=timeout)


def _jobs(root: Path) -> tuple[Path, list[Path]]:
    """The one sweep folder under ``root`` and its job folders (fails if there is not exactly one sweep)."""
    sweeps = sorted((root / "multirun" / "ddpprobe").iterdir())
    assert len(sweeps) == 1, f"expected one sweep folder, got {[s.name for s in sweeps]}"
    return sweeps[0], sorted(p for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))


def _metrics(job: Path) -> dict[str, float]:
    data = json.loads((job / "metrics.json").read_text())
    return {k: data[k] for k in COMPARED}


def _check_layout(root: Path) -> list[Path]:
    sweep, jobs = _jobs(root)
    assert [j.name.split("__")[0] for j in jobs] == ["os-genpi-tiny-s0", "os-genpi-tiny-s1"]
    assert not (root / "runs").exists(), "a rank composed a single run of its own"
    for job in jobs:
        assert not (job / "error.txt").exists(), (job / "error.txt").read_text()
        logs = sorted(p.name for p in job.glob("*.log"))
        assert logs == ["train.log", "train_rank1.log"], logs
        for log in logs:  # each rank got as far as training, in this job's folder
            assert "training os on" in (job / log).read_text(), log
        assert len(list(job.rglob("run.json"))) == 1
        run = json.loads((job / "run.json").read_text())
        assert run["config"]["seed"] == int(job.name.split("__")[0][-1])
        assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "adapter").is_dir()
    return jobs


@pytest.fixture(scope="module")
def lightning_sweep(tmp_path_factory, tiny_path):
    """The issue's multirun: 2 jobs, each DDP over 2 CPU processes that Lightning starts; CSV and W&B (offline)."""
    root = tmp_path_factory.mktemp("lightning")
    proc = _train(["-m", *DDP, "seed=0,1", *SHORT, "logger=many"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


@pytest.mark.slow
def test_lightning_launched_ddp_multirun_writes_each_job_once_with_every_rank_log(lightning_sweep):
    root, proc = lightning_sweep
    jobs = _check_layout(root)
    # one "run folder" line per job (rank 0's), none from the other ranks
    printed = [ln.split(": ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("run folder: ")]
    assert sorted(printed) == [str(j) for j in jobs]


@pytest.mark.slow
def test_wandb_sees_one_run_per_job(lightning_sweep):
    root, _ = lightning_sweep
    _, jobs = _jobs(root)
    for job in jobs:
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs  # rank 1 opened none
        assert runs[0].name.endswith((job / "wandb_id.txt").read_text().strip())
    assert len(list(root.rglob("wandb_id.txt"))) == len(jobs) == 2  # no W&B run outside the two job folders


@pytest.mark.slow
def test_sweep_metrics_equal_the_jobs_run_one_by_one(lightning_sweep, tmp_path):
    root, _ = lightning_sweep
    _, jobs = _jobs(root)
    # the sweep's second job alone (the same overrides without -m): the first job is compared with the
    # submitit launcher's below, and the two jobs' metrics differ, so each job ran its own seed
    proc = _train([*DDP, "seed=1", *SHORT], tmp_path / "s1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (single,) = [Path(ln.split(": ", 1)[1]) for ln in proc.stdout.splitlines() if ln.startswith("run folder: ")]
    assert sorted(p.name for p in single.glob("*.log")) == ["train.log", "train_rank1.log"]
    assert _metrics(single) == pytest.approx(_metrics(jobs[1]), rel=1e-6)
    assert _metrics(jobs[0]) != _metrics(jobs[1])  # the seed reached the job (split, init, order)
    # and DDP itself: 2 ranks x batch 2 equal one process x batch 4 (the loss is a token mean over the ranks)
    one = [a for a in SHORT if not a.startswith("data.batch_size=")] + ["data.batch_size=4"]
    proc = _train(["trainer=cpu", "seed=1", "experiment_name=ddpone", *one[1:]], tmp_path / "one")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (alone,) = [Path(ln.split(": ", 1)[1]) for ln in proc.stdout.splitlines() if ln.startswith("run folder: ")]
    assert sorted(p.name for p in alone.glob("*.log")) == ["train.log"]
    assert _metrics(alone) == pytest.approx(_metrics(jobs[1]), rel=1e-3)
    assert _metrics(alone) != pytest.approx(_metrics(jobs[0]), rel=1e-3)  # the tolerance tells the seeds apart


@pytest.mark.slow
def test_submitit_local_launcher_starts_one_task_per_rank(lightning_sweep, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = _train(["-m", "hydra/launcher=local", "trainer=ddp_cpu", "seed=0,1", *SHORT], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _check_layout(tmp_path)
    _, lightning_jobs = _jobs(lightning_sweep[0])
    for job, other in zip(jobs, lightning_jobs):
        assert _metrics(job) == pytest.approx(_metrics(other), rel=1e-6)
    # submitit started the ranks: no rank was re-launched by Lightning (its re-launched ranks re-enter the job
    # through GENPI_DDP_JOB; here each task's own stdout is in the submitit folder, one per rank)
    task_logs = sorted(p.name.split("_", 1)[1] for p in tmp_path.rglob(".submitit/*/*_log.out"))
    assert task_logs == ["0_log.out", "0_log.out", "1_log.out", "1_log.out"], task_logs


def test_ddp_on_a_machine_without_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _train(["trainer=ddp", "debug=fdr"], tmp_path, timeout=900)  # generous: imports alone took 2 min at load 40
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("genpi: error:")]
    assert len(lines) == 1 and "trainer=ddp" in lines[0] and "trainer=ddp_cpu" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("run.json")) and not list(tmp_path.rglob("*.ckpt"))


def test_reentered_rank_gets_rank0_job_not_the_sweep(monkeypatch):
    from genpi import launching

    job_dir = "/out/multirun/ddpprobe/2026-01-01_00-00-00-abc/os-genpi-tiny-s1__trainer.devices=2,x='y'"
    record = {"dir": job_dir, "name": "train", "overrides": ["trainer=ddp", "trainer.devices=2", "seed=1"],
              "hydra_overrides": ["hydra.job.chdir=false"]}
    # what Lightning runs for rank 1: rank 0's command line, -m and the sweep included, plus its own overrides
    lightning_argv = ["genpi/train.py", "-m", "--config-dir", "my_conf", "trainer=ddp", "trainer.devices=2",
                      "seed=0,1", 'hydra.run.dir="outputs/runs/x"', "hydra.job.name=train_ddp_process_1",
                      "hydra.output_subdir=null"]
    monkeypatch.setenv(launching.JOB_ENV, json.dumps(record))
    monkeypatch.setenv("LOCAL_RANK", "1")
    argv = launching.reenter_job(lightning_argv)
    assert "-m" not in argv and "seed=0,1" not in argv and 'hydra.run.dir="outputs/runs/x"' not in argv
    assert argv[:3] == ["genpi/train.py", "--config-dir", "my_conf"]
    assert argv[3:7] == ["hydra.job.chdir=false", "trainer=ddp", "trainer.devices=2", "seed=1"]
    assert "hydra.output_subdir=null" in argv and "hydra.job.name=train" in argv
    # the folder survives Hydra's override parser whole, '=' ',' and quote included
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (run_dir,) = [a for a in argv if a.startswith("hydra.run.dir=")]
    assert OverridesParser.create().parse_override(run_dir).value() == job_dir
    monkeypatch.setenv("LOCAL_RANK", "0")  # rank 0 itself, and any process Lightning did not start, is left alone
    assert launching.reenter_job(lightning_argv) == lightning_argv
    monkeypatch.delenv(launching.JOB_ENV)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launching.reenter_job(lightning_argv) == lightning_argv


def test_ddp_job_hands_the_job_to_its_ranks_and_restores_the_environment(tmp_path, monkeypatch):
    from genpi import launching

    for name in launching.LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    compose_cfg("train", ["trainer=ddp_cpu", "seed=3"], tmp_path)
    with launching.ddp_job():
        record = json.loads(os.environ[launching.JOB_ENV])
        # what Lightning's launcher leaves in rank 0's environment once it started the ranks
        os.environ.update(LOCAL_RANK="0", NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1234")
    run_dir = Path(record["dir"])  # runs/<run_name>-<config hash> (run identity)
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("os-genpi-tiny-s3-")
    assert record["name"]
    assert not [n for n in launching.LAUNCHER_ENV if n in os.environ]  # the next job starts its own ranks
    monkeypatch.setenv("MASTER_PORT", "29500")  # set by the user or a cluster: kept
    with launching.ddp_job():
        os.environ["MASTER_PORT"] = "1234"
    assert os.environ["MASTER_PORT"] == "29500"


@pytest.mark.parametrize(("env", "rank"), [
    ({}, 0),
    ({"LOCAL_RANK": "1"}, 1),  # a rank Lightning started
    ({"SLURM_PROCID": "3"}, 3),  # a Slurm task
    ({"RANK": "2", "LOCAL_RANK": "0"}, 2),  # torchrun
    ({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_GLOBALID": "1", "LOCAL_RANK": "0"}, 1),  # submitit's local task
])
def test_process_rank_and_log_suffix_follow_the_launcher(monkeypatch, env, rank):
    from genpi import launching
    from genpi.utils.hydra_utils import _rank_suffix

    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "SUBMITIT_EXECUTOR", "SUBMITIT_LOCAL_GLOBALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launching.process_rank() == rank
    assert _rank_suffix() == (f"_rank{rank}" if rank else "")


def test_submitit_local_tasks_are_the_ranks(monkeypatch):
    from genpi import launching
    from genpi.utils.errors import GenpiError

    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    ranks = []
    for task in ("0", "1"):
        monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "2")
        monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", task)
        monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", task)
        monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "41234")
        (env,) = launching.cluster_plugins()
        assert env.creates_processes_externally  # Lightning re-launches nothing
        ranks.append((env.global_rank(), env.local_rank(), env.world_size(), env.main_port))
    assert ranks == [(0, 0, 2, ranks[0][3]), (1, 1, 2, ranks[0][3])]  # both tasks agree on the port
    launching.check_launch({"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "1")
    with pytest.raises(GenpiError, match="tasks_per_node"):
        launching.check_launch({"accelerator": "cpu", "devices": 2, "strategy": "ddp"})


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")))
def test_every_trainer_option_composes_and_reads(tmp_path, option):
    from omegaconf import OmegaConf

    from genpi import schema

    cfg = compose_cfg("train", [f"trainer={option}"], tmp_path)
    spec = schema.read(cfg.trainer, schema.TrainerLaunch, "trainer")
    if option == "ddp_cpu":
        assert (spec.accelerator, spec.devices, spec.strategy) == ("cpu", 2, "ddp")
    with pytest.raises(schema.GenpiError, match="trainer.accelerator='tpuu'"):
        schema.read({**OmegaConf.to_container(cfg.trainer, resolve=True), "accelerator": "tpuu"},
                    schema.TrainerLaunch, "trainer")
