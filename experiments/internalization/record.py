"""A finished run's record, committed with the study's results (results/runs/NAME, results/select/NAME): the run's
run.json and metrics.json, and record.json with the command line it was made with (run.sh's stamp), its fit wall
time (genpi.runs.fit_seconds: the budget an on-policy run of the same task and seed gets) and the split its
evaluation read. A record is what the table is gathered from, and what run.sh keeps on another machine: a study
stopped half-way goes on where its committed records end, without the runs' folders (outputs/ is not committed).
Paths under the working directory are written relative to it (genpi.aggregate.portable).
    python experiments/internalization/record.py RUN_DIR STAMP RECORD_DIR"""
import json
import math
import os
import sys
from pathlib import Path

from genpi.aggregate import portable
from genpi.runs import fit_seconds


def write_record(run_dir: Path, stamp: Path, out: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if "eval/student/format_rate" not in metrics:
        raise SystemExit(f"{run_dir}: no held-out evaluation in metrics.json (did its post_eval run?)")
    eval_metrics = Path(metrics["eval/report"]).parent / "metrics.json"
    split = json.loads(eval_metrics.read_text())["info"]["split"]
    out.mkdir(parents=True, exist_ok=True)
    for name in ("run.json", "metrics.json"):
        doc = portable(json.loads((run_dir / name).read_text()))
        (out / name).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    # tenths rounded down: run.sh's budget, int() of it, is the whole seconds of the fit as genpi.runs gives them
    seconds = math.floor(fit_seconds(run_dir / "train.log") * 10) / 10
    record = {"args": stamp.read_text().splitlines(), "fit_seconds": seconds,
              "split": split, "run_dir": portable(str(run_dir))}
    (out / "record.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    run_dir, stamp, out = (Path(a) for a in sys.argv[1:4])
    # absolute without resolving links: an outputs/ that is a link elsewhere stays under the working directory
    write_record(Path(os.path.abspath(run_dir)), stamp, out)
