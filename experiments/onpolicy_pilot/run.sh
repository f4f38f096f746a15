#!/usr/bin/env bash
# A pilot of issue 13's question on the task where GenPI's student fails when it generates freely (os): GenPI and
# on-policy distillation (loss=opcd) trained on the same synthesized data as the internalization study
# (experiment=internalization, seed 0), the on-policy run held to GenPI's training wall time by trainer.max_time,
# both evaluated on the same held-out inputs. ONE seed, ONE task, and opcd's settings are its defaults
# (lmbda 1, temperature 1, top_p 1) with max_new_tokens 96 (the study's answer length), not chosen on the
# validation split: a pilot, not the issue's study. Writes results/pilot.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export GENPI_OUTPUT_ROOT=${GENPI_OUTPUT_ROOT:-outputs/onpolicy_pilot}
N_INPUTS=${N_INPUTS:-160}

# 1. synthesis, as the internalization study's run.sh does it (os only)
"$PY" -m genpi.synth task=os model=tiny_agent experiment_name=internalization synth.name=internalization \
  synth.pseudo_inputs.source=templates synth.pseudo_inputs.split=heldout synth.pseudo_inputs.num_inputs="$N_INPUTS" \
  synth.outputs.sampling.max_tokens=96 synth.conversations.sampling.max_tokens=96 \
  synth.conversations.env_sampling.max_tokens=128 synth.progress=false | tail -n 1

# 2. GenPI as in the study (a finished run is kept: run the script again to redo only what is missing)
ls "$GENPI_OUTPUT_ROOT"/runs/pilot-genpi-*/adapter >/dev/null 2>&1 ||
  "$PY" -m genpi.train experiment=internalization task=os loss=genpi run_name=pilot-genpi | tail -n 1

# 3. on-policy distillation, its fit held to GenPI's fit wall time (genpi.runs.fit_seconds of GenPI's train.log:
#    "training ... on" to "Trainer.fit stopped"; validation inside the fit counts against opcd's budget too): as many
#    epochs as fit in it
budget=$("$PY" -c "import sys; from pathlib import Path; from genpi.runs import fit_seconds
(log,) = Path(sys.argv[1]).glob('runs/pilot-genpi-*/train.log')
print(int(fit_seconds(log)))" "$GENPI_OUTPUT_ROOT")
hms=$(printf "00:%02d:%02d:%02d" $((budget / 3600)) $((budget % 3600 / 60)) $((budget % 60)))
ls "$GENPI_OUTPUT_ROOT"/runs/pilot-opcd-*/adapter >/dev/null 2>&1 ||
  "$PY" -m genpi.train experiment=internalization task=os loss=opcd run_name=pilot-opcd \
    loss.kl.sampling.max_new_tokens=96 trainer.max_epochs=1000 "+trainer.max_time=$hms" | tail -n 1

# 4. the figures
"$PY" - "$GENPI_OUTPUT_ROOT" "$budget" <<'EOF'
import json, sys, time
from pathlib import Path

from genpi.aggregate import portable

root, budget = Path(sys.argv[1]), int(sys.argv[2])
out = {"command": "experiments/onpolicy_pilot/run.sh", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "task": "os", "seed": 0, "opcd_max_time_s": budget, "load_1min_at_end": float(open("/proc/loadavg").read().split()[0]),
       "runs": {}}
for name in ("genpi", "opcd"):
    (run,) = [p.parent for p in (root / "runs").glob(f"pilot-{name}-*/adapter")]  # the finished run
    m = json.loads((run / "metrics.json").read_text())
    out["runs"][name] = {k: portable(m[k]) for k in sorted(m) if k.startswith(("eval/", "train/steps", "perf/",
                         "val/kl")) and not isinstance(m[k], (dict, list))}  # paths relative to the checkout
Path("experiments/onpolicy_pilot/results").mkdir(parents=True, exist_ok=True)
Path("experiments/onpolicy_pilot/results/pilot.json").write_text(json.dumps(out, indent=2) + "\n")
for name, r in out["runs"].items():
    print(name, {k: r.get(k) for k in ("eval/student/format_rate", "eval/teacher/format_rate", "eval/floor/format_rate",
                                       "eval/gap_closed/kl_forward", "train/steps")})
EOF
