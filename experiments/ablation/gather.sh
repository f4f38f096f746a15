#!/usr/bin/env bash
# Gathers the newest ablation sweep (or the folder given) into results.md / results.csv / results.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SWEEP=${1:-$(ls -d outputs/multirun/ablation/*/ | sort | tail -n 1)}
exec "$PY" -m genpi.aggregate "$SWEEP" --rows loss --cols task \
  --metrics eval/gap_closed/kl_forward eval/student/format_rate val/kl val/kl_start --out experiments/ablation/results
