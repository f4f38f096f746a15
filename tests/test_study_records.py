"""The internalization study's records (experiments/internalization/record.py) and its selection of the on-policy
settings from them (select.py): what a partial study commits and what its continuation on another machine reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import CONF

STUDY = CONF.parent / "experiments" / "internalization"


def _run_folder(tmp_path: Path, name: str, split: str, format_rate: float, kl_gap: float,
                temperature: float = 1.0, lmbda: float = 1.0, turns: int = 1, later: float | None = None) -> Path:
    """A finished run's folder as genpi.train leaves it (run.json, metrics.json with its post-training evaluation's
    report, train.log), under tmp_path/runs, its evaluation under tmp_path/eval."""
    run = tmp_path / "runs" / f"{name}-20261130"
    run.mkdir(parents=True)
    ev = tmp_path / "eval" / name
    ev.mkdir(parents=True)
    (ev / "metrics.json").write_text(json.dumps({"info": {"split": split}}))
    (ev / "report.md").write_text("report\n")
    (run / "run.json").write_text(json.dumps({
        "task": "os", "run_name": name, "config": {
            "seed": 0, "loss": {"name": "opcd", "kl": {"lmbda": lmbda, "sampling": {"temperature": temperature, "turns": turns}}},
            "paths": {"output_root": str(tmp_path)}}}))
    (run / "metrics.json").write_text(json.dumps({
        "eval/student/format_rate": format_rate, "eval/teacher/format_rate": 0.9,
        "eval/gap_closed/kl_forward": kl_gap, "eval/n_examples": 19, "train/steps": 40,
        "eval/report": str(ev / "report.md"),
        **({} if later is None else {"eval/student/format_rate_later_turns": later})}))
    # two processes (a resumed run): 100 s and 25.5 s of fitting
    (run / "train.log").write_text(
        "[2026-11-30 10:00:00,000][genpi.train][INFO] training os on 120 records\n"
        "[2026-11-30 10:01:40,000][lightning.pytorch.utilities.rank_zero][INFO] `Trainer.fit` stopped: done\n"
        "[2026-11-30 11:00:00,000][genpi.train][INFO] training os on 120 records\n"
        "[2026-11-30 11:00:25,500][lightning.pytorch.utilities.rank_zero][INFO] `Trainer.fit` stopped: done\n")
    return run


def _record(run: Path, tmp_path: Path, out: Path, base: Path) -> subprocess.CompletedProcess:
    stamp = tmp_path / "stamp.args"
    stamp.write_text("N_INPUTS=160\nexperiment=internalization\ntask=os\n")
    return subprocess.run([sys.executable, str(STUDY / "record.py"), str(run), str(stamp), str(out)], cwd=base,
                          capture_output=True, text=True)


def test_record_holds_the_fit_time_split_command_line_and_no_path_of_the_machine(tmp_path):
    run = _run_folder(tmp_path, "os-genpi-s0", "test", 0.75, 0.9)
    out = tmp_path / "results" / "runs" / "os-genpi-s0"
    proc = _record(run, tmp_path, out, base=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "record.json").read_text())
    assert record["fit_seconds"] == 125.5            # both processes' fits summed
    assert record["split"] == "test"
    assert record["args"] == ["N_INPUTS=160", "experiment=internalization", "task=os"]
    for name in ("record.json", "run.json", "metrics.json"):
        assert str(tmp_path) not in (out / name).read_text(), name
    assert json.loads((out / "metrics.json").read_text())["eval/report"] == "eval/os-genpi-s0/report.md"
    assert json.loads((out / "run.json").read_text())["config"]["paths"]["output_root"] == "."


def test_record_refuses_a_run_without_its_evaluation(tmp_path):
    run = _run_folder(tmp_path, "os-kl-s0", "test", 0.5, 0.5)
    (run / "metrics.json").write_text(json.dumps({"train/steps": 40}))
    proc = _record(run, tmp_path, tmp_path / "rec", base=tmp_path)
    assert proc.returncode != 0 and "no held-out evaluation" in proc.stderr
    assert not (tmp_path / "rec").exists()


def test_selection_reads_the_candidates_records_and_never_a_held_out_split(tmp_path):
    records = tmp_path / "results" / "select"
    cands = {"c1": (0.8, 0.9, 1.0, 1.0), "c2": (0.9, 0.8, 0.7, 1.0), "c3": (0.9, 0.95, 1.0, 0.5)}
    for name, (fmt, gap, t, lmbda) in cands.items():
        run = _run_folder(tmp_path, name, "val", fmt, gap, temperature=t, lmbda=lmbda)
        assert _record(run, tmp_path, records / name, base=tmp_path).returncode == 0
    out = tmp_path / "results" / "selection.json"
    proc = subprocess.run([sys.executable, str(STUDY / "select.py"), str(records), str(out), *cands],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # c2 and c3 tie on format rate; c3 closes more of the KL gap
    assert proc.stdout.strip() == "loss.kl.sampling.temperature=1.0 loss.kl.lmbda=0.5"
    assert json.loads(out.read_text())["chosen"] == {"temperature": 1.0, "lmbda": 0.5}

    run = _run_folder(tmp_path, "c4", "test", 1.0, 1.0)
    assert _record(run, tmp_path, records / "c4", base=tmp_path).returncode == 0
    proc = subprocess.run([sys.executable, str(STUDY / "select.py"), str(records), str(out), *cands, "c4"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "not the validation split" in proc.stderr


def test_selection_of_the_turns_ranks_by_the_later_turns_and_needs_them(tmp_path):
    records = tmp_path / "results" / "select"
    cands = {"n2": (0.9, 0.9, 2, 0.4), "n3": (0.8, 0.8, 3, 0.6)}
    for name, (fmt, gap, turns, later) in cands.items():
        run = _run_folder(tmp_path, name, "val", fmt, gap, turns=turns, later=later)
        assert _record(run, tmp_path, records / name, base=tmp_path).returncode == 0
    out = tmp_path / "selection_turns.json"
    select = [sys.executable, str(STUDY / "select.py"), "--by", "later_turns", str(records), str(out)]
    proc = subprocess.run([*select, *cands], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "loss.kl.sampling.turns=3"   # better later turns, though worse first answers
    assert json.loads(out.read_text())["chosen"] == {"turns": 3}

    run = _run_folder(tmp_path, "n4", "val", 1.0, 1.0, turns=4)   # evaluated without eval.turns
    assert _record(run, tmp_path, records / "n4", base=tmp_path).returncode == 0
    proc = subprocess.run([*select, *cands, "n4"], capture_output=True, text=True)
    assert proc.returncode != 0 and "no format rate of later turns" in proc.stderr
