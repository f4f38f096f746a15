"""DDP jobs in a multirun, checked end to end: what lands where, and the metrics against the jobs run one by one.

    python experiments/ddp_multirun/run.py [--launchers lightning,submitit] [--devices 2]

Runs a 2-job sweep (``seed=0,1``) of DDP jobs on CPU processes (gloo) with each launcher: ``lightning`` (Lightning
starts the ranks: the issue-16 command) and ``submitit`` (``hydra/launcher=local``, one task per rank, as srun
does); then each job alone (no ``-m``). Writes ``results/results.md`` and ``results/results.json`` beside this file:
per launcher, the sweep folders made, and per job the logs, ``run.json`` files and W&B runs found, and the metrics
next to those of the job run alone. Run folders go to a temporary folder (``--keep`` prints it and keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHORT = ["experiment_name=ddpprobe", "trainer.max_steps=2", "data.max_records=24", "data.batch_size=2"]
COMPARED = ("val/kl", "val/loss", "val/kl_start", "train/steps")


def train(args: list[str], root: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "GENPI_DDP_JOB")}
    env.update(GENPI_OUTPUT_ROOT=str(root), PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true")
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "genpi.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"genpi.train {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc, time.perf_counter() - t0


def metrics(job: Path) -> dict[str, float]:
    data = json.loads((job / "metrics.json").read_text())
    return {k: data[k] for k in COMPARED}


def describe(root: Path) -> dict:
    sweeps = sorted((root / "multirun" / "ddpprobe").iterdir())
    jobs = {}
    for sweep in sweeps:
        for job in sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")):
            jobs[job.name.split("__")[0]] = {
                "folder": f"{sweep.name}/{job.name}",
                "logs": sorted(p.name for p in job.glob("*.log")),
                "run_json_files": len(list(job.rglob("run.json"))),
                "wandb_runs": len(list((job / "wandb").glob("offline-run-*"))),
                "metrics": metrics(job),
            }
    return {"sweep_folders": len(sweeps), "runs_folder_made": (root / "runs").exists(), "jobs": jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launchers", default="lightning,submitit")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    opts = parser.parse_args()
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", f"trainer.devices={opts.devices}"]
    work = Path(tempfile.mkdtemp(prefix="genpi-ddp-"))
    report: dict = {"devices": opts.devices, "overrides": [*ddp, *SHORT], "launchers": {}, "alone": {}}
    for launcher in opts.launchers.split(","):
        extra = {"lightning": ["logger=many"], "submitit": ["hydra/launcher=local", "logger=many"]}[launcher]
        root = work / launcher
        _, seconds = train(["-m", *ddp, "seed=0,1", *SHORT, *extra], root)
        report["launchers"][launcher] = {**describe(root), "wall_s": round(seconds, 1)}
    for seed in (0, 1):
        proc, seconds = train([*ddp, f"seed={seed}", *SHORT], work / f"alone-s{seed}")
        (folder,) = [Path(ln.split(": ", 1)[1]) for ln in proc.stdout.splitlines() if ln.startswith("run folder: ")]
        report["alone"][f"os-genpi-tiny-s{seed}"] = {"metrics": metrics(folder), "wall_s": round(seconds, 1),
                                                    "logs": sorted(p.name for p in folder.glob("*.log"))}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out / "results.md").write_text(render(report))
    print((out / "results.md").read_text())
    if opts.keep:
        print(f"run folders: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def render(report: dict) -> str:
    lines = [f"# DDP jobs in a multirun ({report['devices']} CPU processes per job, gloo)", "",
             f"Overrides: `{' '.join(report['overrides'])}`, swept over `seed=0,1`; written by "
             "`python experiments/ddp_multirun/run.py`.", "",
             "| launcher | sweep folders | job | logs | run.json | W&B runs | val/kl | val/kl alone | |diff| | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for launcher, res in report["launchers"].items():
        for job, info in res["jobs"].items():
            alone = report["alone"][job]["metrics"]
            diff = max(abs(info["metrics"][k] - alone[k]) for k in COMPARED)
            lines.append(f"| {launcher} | {res['sweep_folders']} | {job} | {', '.join(info['logs'])} | "
                         f"{info['run_json_files']} | {info['wandb_runs']} | {info['metrics']['val/kl']:.6f} | "
                         f"{alone['val/kl']:.6f} | {diff:.1e} | {res['wall_s']} |")
    lines += ["", f"|diff| is the largest absolute difference over {', '.join(COMPARED)} between the sweep's job and "
              "the same job run alone (no `-m`); wall s is the whole sweep's time on a shared 2-core machine.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
