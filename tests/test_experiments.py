"""Experiments at scale on this machine: experiment files, multiruns (basic and submitit local), Optuna,
resume after a kill, W&B offline files. DDP equivalence (2 ranks = 1 process on the global batch) is checked in
tests/test_ddp_multirun.py, on a job of its sweep."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import CONF, compose_cfg, wait_for_wandb_records
from tests.test_train import run_train

REPO = CONF.parent
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TINY = ["model=tiny", "trainer=cpu"]


def cli(args: list[str], tmp_path: Path, timeout: int = 600, env: dict | None = None,
        module: str = "genpi.train") -> subprocess.CompletedProcess:
    e = dict(os.environ, WANDB_MODE="offline", **(env or {}))
    e.pop("GENPI_LAUNCH_ID", None)
    # A W&B test run in this process leaves its service's address here; a command started as a user starts it
    # runs its own service (sharing this one, a killed run's id would stay in use for its resumption).
    e.pop("WANDB_SERVICE", None)
    # Hydra's flags (-m, --cfg) go before the overrides: argparse takes no flag after a positional.
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run([sys.executable, "-m", module, *flags, f"paths.output_root={tmp_path}", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=e)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_runs_on_tiny(tmp_path, tiny_path, experiment):
    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
    assert cfg.experiment_name == experiment  # the W&B group and sweep folder name
    # A study that trains on its own synthesized data runs here on the task's built-in sample instead.
    data = ["data.path=null"] if cfg.data.path and not Path(cfg.data.path).exists() else []
    out = run_train(tmp_path, [f"experiment={experiment}", *TINY, "debug=fdr", *data])
    assert out["trainer"].global_step == 1


def test_paper_setups_state_the_paper_values(tmp_path):
    cfg = compose_cfg("train", ["experiment=paper_m2w"], tmp_path)
    assert cfg.model.load_in_4bit and cfg.model.lora.r == 16 and cfg.model.lora.alpha == 32
    assert cfg.optim.lr == 1e-4 and cfg.optim.scheduler == "cosine" and cfg.optim.warmup_ratio == 0.03
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 32 and cfg.trainer.max_epochs == 10
    assert cfg.loss.sft.weight == 0.3 and cfg.task.name == "m2w"
    assert compose_cfg("train", ["experiment=paper_os"], tmp_path).loss.sft.weight == 0.7


@pytest.mark.slow
def test_multirun_local_submitit_two_jobs_and_a_failing_one(tmp_path, tiny_path):
    # two jobs through submitit's local executor, one of which fails: it is reported and the other finishes
    r = cli(["-m", "hydra/launcher=local", "debug=fdr", "experiment_name=two", "data.path=missing.jsonl,null",
             "data.batch_size=4"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = tmp_path / "multirun" / "two"
    assert list(sweep.glob("*/.submitit"))
    # fast_dev_run writes no run.json (a dry run); the jobs' composed configs and their logs show they ran.
    jobs = [p.parent.parent for p in sweep.glob("*/*/.hydra/config.yaml")]
    assert len(jobs) == 2
    assert {OmegaConf.load(j / ".hydra" / "config.yaml").data.path for j in jobs} == {"missing.jsonl", None}
    errors = list(sweep.glob("*/*/error.txt"))
    assert len(errors) == 1 and "dataset not found" in errors[0].read_text()
    (ok,) = [j for j in jobs if not (j / "error.txt").exists()]
    log = (ok / "train.log").read_text()
    assert "training os on" in log and "Job completed successfully" in log


@pytest.mark.slow
def test_two_sweeps_in_the_same_second_never_share_a_folder(tmp_path, tiny_path):
    args = ["experiment_name=same", "debug=fdr", "loss=sft"]
    e = dict(os.environ, WANDB_MODE="offline")
    e.pop("GENPI_LAUNCH_ID", None)
    procs = [subprocess.Popen([sys.executable, "-m", "genpi.train", "-m", f"paths.output_root={tmp_path}", *args],
                              cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0
    sweeps = list((tmp_path / "multirun" / "same").iterdir())
    assert len(sweeps) == 2


@pytest.mark.slow
def test_loss_weight_sweep(tmp_path, tiny_path):
    r = cli(["-m", "experiment_name=w", "loss=genpi_kl", "loss.kl.weight=0.0,1.0", "trainer.max_steps=2",
             "data.max_records=24"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "multirun" / "w").glob("*/*/metrics.json")]
    assert len(metrics) == 2 and all("val/kl" in m for m in metrics)
    dirs = sorted(p.name for p in (tmp_path / "multirun" / "w").glob("*/*") if p.is_dir() and p.name[0] != ".")
    assert any("loss.kl.weight=0.0" in d for d in dirs) and any("loss.kl.weight=1.0" in d for d in dirs)


@pytest.mark.slow
def test_optuna_two_trials(tmp_path, tiny_path):
    r = cli(["hparams_search=genpi_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
             "post_eval=false", "optimized_metric=val/kl", "hydra.sweeper.direction=minimize",
             "trainer.max_steps=1", "data.max_records=24"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = next((tmp_path / "multirun" / "optuna_loss_weights").iterdir())
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in best and "loss.kl.weight" in best


def _run_folder(root: Path, run_name: str) -> Path:
    """The one run folder of ``run_name`` (named ``<run_name>-<config hash>``)."""
    (folder,) = (root / "runs").glob(f"{run_name}-*")
    return folder


@pytest.mark.slow
def test_killed_run_resumes_in_the_same_folder_with_the_same_wandb_run(tmp_path, tiny_path):
    epochs, batch = 4, 4
    common = ["loss=sft", "data.max_records=48", f"data.batch_size={batch}", f"trainer.max_epochs={epochs}",
              "logger=many", "model.lora.dropout=0.0", "+callbacks.model_checkpoint.every_n_train_steps=2"]
    e = dict(os.environ, WANDB_MODE="offline")
    e.pop("WANDB_SERVICE", None)
    # Its own process group, killed whole as a scheduler kills a job: the run and its wandb service process (a
    # service left alive would still hold the run id the resumed run asks for).
    p = subprocess.Popen([sys.executable, "-m", "genpi.train", f"paths.output_root={tmp_path}", *common,
                          "run_name=killed"], cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 300
    while not list((tmp_path / "runs").glob("killed-*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed = _run_folder(tmp_path, "killed")
    assert not (killed / "adapter").exists()  # it really died mid-way
    again = cli([*common, "run_name=killed"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    m_res = json.loads((killed / "metrics.json").read_text())
    # every step of every epoch ran once (one process, no accumulation: a batch is a step): none lost with the kill,
    # none trained again after the resume
    assert m_res["train/steps"] == epochs * math.ceil(m_res["data/train_records"] / batch)
    run_ids = {d.name.split("-", 3)[-1] for d in (killed / "wandb").glob("offline-run-*")}
    assert run_ids == {(killed / "wandb_id.txt").read_text().strip()}


def test_wandb_offline_files_carry_group_job_type_tags_and_config(tmp_path, tiny_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    out = run_train(tmp_path, ["logger=wandb", "experiment_name=wb", "trainer.max_steps=1", "data.max_records=24",
                               "tags=[mytag]"])
    import wandb

    wandb.finish()  # what task_wrapper does after every job: the run's files are complete only then
    run_dir = out["run_dir"]
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    run_rec, configs = None, []
    for rec in wait_for_wandb_records(next(offline.glob("*.wandb")), ("run", "config")):
        if rec.WhichOneof("record_type") == "run":
            run_rec = rec.run
        if rec.WhichOneof("record_type") == "config":
            configs.append({u.key: u.value_json for u in rec.config.update})
    assert run_rec is not None, f"no run record in {offline}"
    assert run_rec.run_group == "wb" and run_rec.job_type == "train" and "mytag" in run_rec.tags
    assert run_rec.run_id == (run_dir / "wandb_id.txt").read_text().strip()
    merged = {k: v for c in configs for k, v in c.items()}
    assert json.loads(merged["loss"])["name"] == "genpi" and "task" in merged
    text = "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file() and p.suffix in
                   (".json", ".yaml", ".txt", ".log"))
    assert "x" * 40 not in text  # the key never lands on disk
