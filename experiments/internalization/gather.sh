#!/usr/bin/env bash
# Gathers the newest internalization sweep (or the folder given) into results.md / results.csv / results.png here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SWEEP=${1:-$(ls -d outputs/multirun/internalization/*/ | sort | tail -n 1)}
exec "$PY" -m genpi.aggregate "$SWEEP" --rows loss --cols task --reference-rows \
  --metrics eval/student/format_rate eval/student/kl_forward eval/gap_closed/kl_forward eval/gap_closed/format_rate \
  --out experiments/internalization/results
