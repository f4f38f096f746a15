#!/usr/bin/env bash
# Gathers the study's records (run.sh writes one per finished run: default experiments/internalization/results/runs,
# or the folder RUNS given) into results.md / results.csv / results.png beside it (in RUNS/..): a cell of several
# seeds is their mean ± standard deviation (count).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUNS=${1:-experiments/internalization/results/runs}
exec "$PY" -m genpi.aggregate "$RUNS" --rows loss --cols task --reference-rows \
  --metrics eval/student/format_rate eval/student/kl_forward eval/gap_closed/kl_forward eval/gap_closed/format_rate \
  eval/env/student/success_rate eval/env/gap_closed/success_rate \
  --plots eval/student/format_rate eval/env/student/success_rate \
  --out "$(dirname "$RUNS")"
