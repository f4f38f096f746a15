"""Gather the demo's selection runs (validation-split evaluations) into results/selection.{csv,md}.

``python experiments/demo/gather.py OUTPUT_ROOT RESULTS_DIR``: reads every ``<OUTPUT_ROOT>/eval/*/metrics.json``
whose evaluation ran on the validation split, and ranks (task, loss) by the student's format rate, then by the
share of the KL gap closed.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def rows(output_root: Path) -> list[dict]:
    out = []
    for path in sorted(output_root.glob("eval/*/metrics.json")):
        m = json.loads(path.read_text())
        info = m.get("info", {})
        if info.get("split") != "val":
            continue
        run = json.loads((Path(info["run_dir"]) / "run.json").read_text()) if info.get("run_dir") else {}
        out.append({
            "task": info.get("task"), "loss": run.get("config", {}).get("loss", {}).get("name"),
            "val_inputs": info.get("n_examples"),
            "student_format_rate": m["student"].get("format_rate"), "floor_format_rate": m["floor"].get("format_rate"),
            "teacher_format_rate": m["teacher"].get("format_rate"),
            "gap_closed_kl_forward": m["gap_closed"].get("kl_forward"),
        })
    out.sort(key=lambda r: (-(r["student_format_rate"] or 0), -(r["gap_closed_kl_forward"] or 0)))
    return out


def main() -> None:
    output_root, results = Path(sys.argv[1]), Path(sys.argv[2])
    table = rows(output_root)
    if not table:
        raise SystemExit(f"no validation-split evaluations under {output_root}/eval")
    results.mkdir(parents=True, exist_ok=True)
    with (results / "selection.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    cols = list(table[0])
    lines = ["# How the demo's task and loss were chosen (validation split only)", "",
             "Written by `experiments/demo/select.sh`; ranked by the student's format rate on the validation split, "
             "then by the share of the KL gap closed. The first row is `make demo`'s setting.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    (results / "selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
