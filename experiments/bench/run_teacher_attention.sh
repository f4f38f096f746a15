#!/usr/bin/env bash
# The teacher-pass figures of the README (issue 17): naive / cached prompt / shared-prefix attention on the tiny
# model and the wide shape (hidden 1,024), P in {256, 1024, 4096} at x + y = 192, 20 interleaved rounds after 3 of
# warm-up, and peak memory against batch size. Writes experiments/bench/results/bench.json (other sections kept).
# Usage: experiments/bench/run_teacher_attention.sh [extra genpi-bench flags]; PY picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m genpi.bench --only teacher_attention --out experiments/bench/results/bench.json "$@"
