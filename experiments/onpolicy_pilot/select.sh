#!/usr/bin/env bash
# The on-policy pilot's settings chosen on the VALIDATION split (run after run.sh, which writes the synthesis, the
# GenPI run and results/pilot.json): loss=opcd on os with a few sampling temperatures and on-policy shares (lmbda),
# each fit held to GenPI's fit wall time as in run.sh, each evaluated on the run's validation split; the best
# student format rate on validation (ties: the larger share of the KL gap closed) is then evaluated once on the
# held-out test split. Writes results/selection.json. One seed, 16 validation inputs: a pilot, not the study.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export GENPI_OUTPUT_ROOT=${GENPI_OUTPUT_ROOT:-outputs/onpolicy_pilot}
CANDIDATES=${CANDIDATES:-"1.0:1.0 0.0:1.0 0.5:1.0 1.0:0.5"}   # temperature:lmbda
budget=$("$PY" -c "import json; print(json.load(open('experiments/onpolicy_pilot/results/pilot.json'))['opcd_max_time_s'])")
hms=$(printf "00:%02d:%02d:%02d" $((budget / 3600)) $((budget % 3600 / 60)) $((budget % 60)))
EVAL=(eval.engine=hf eval.savings.measure=false eval.max_new_tokens=96)
for c in $CANDIDATES; do
  t=${c%%:*}; l=${c##*:}
  ls "$GENPI_OUTPUT_ROOT"/runs/select-opcd-t$t-l$l-*/adapter >/dev/null 2>&1 ||
    "$PY" -m genpi.train experiment=internalization task=os loss=opcd run_name="select-opcd-t$t-l$l" \
      loss.kl.sampling.temperature="$t" loss.kl.lmbda="$l" loss.kl.sampling.max_new_tokens=96 \
      trainer.max_epochs=1000 "+trainer.max_time=$hms" \
      "post_eval_overrides=[$(printf '"%s",' "${EVAL[@]}")\"eval.split=val\"]" | tail -n 1
done
"$PY" - "$GENPI_OUTPUT_ROOT" "${EVAL[@]}" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path

root, evals = Path(sys.argv[1]), sys.argv[2:]
rows = []
for adapter in sorted(root.glob("runs/select-opcd-*/adapter")):
    m = json.loads((adapter.parent / "metrics.json").read_text())
    cfg = json.loads((adapter.parent / "run.json").read_text())["config"]["loss"]["kl"]
    rows.append({"run": adapter.parent.name, "temperature": cfg["sampling"]["temperature"], "lmbda": cfg["lmbda"],
                 "steps": m["train/steps"], "val_inputs": m["eval/n_examples"],
                 "val_student_format_rate": m["eval/student/format_rate"],
                 "val_teacher_format_rate": m["eval/teacher/format_rate"],
                 "val_gap_closed_kl_forward": m["eval/gap_closed/kl_forward"]})
rows.sort(key=lambda r: (-r["val_student_format_rate"], -r["val_gap_closed_kl_forward"]))
best = rows[0]
proc = subprocess.run([sys.executable, "-m", "genpi.evaluate", "task=os", "model=tiny_agent",
                       f"run_dir={root / 'runs' / best['run']}", *evals], capture_output=True, text=True, check=True)
report = Path(next(ln for ln in proc.stdout.splitlines() if ln.startswith("report: ")).split(": ", 1)[1])
t = json.loads((report.parent / "metrics.json").read_text())
out = {"command": "experiments/onpolicy_pilot/select.sh", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "task": "os", "seed": 0, "candidates": rows, "chosen": best["run"],
       "test": {"inputs": t["n_examples"], "student_format_rate": t["student"]["format_rate"],
                "teacher_format_rate": t["teacher"]["format_rate"], "floor_format_rate": t["floor"]["format_rate"],
                "gap_closed_kl_forward": t["gap_closed"]["kl_forward"]}}
Path("experiments/onpolicy_pilot/results/selection.json").write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=2))
EOF
