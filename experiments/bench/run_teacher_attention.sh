#!/usr/bin/env bash
# The teacher-pass figures of the README (issue 17): naive / cached prompt / shared-prefix attention on the wide
# shape (hidden 1,024) and the tiny model, P in {1024, 4096, 256} at x + y = 192, 20 interleaved rounds after 2 of
# warm-up, then peak memory against batch size. Writes experiments/bench/results/bench.json (other sections kept),
# saved after every prompt length.
# Batch 1 for timing and P = 1,024 for memory keep the naive passes within what a shared 2-core machine gives in an
# hour; `genpi-bench --only teacher_attention` with no flags runs the full setting (batch 8/2, memory at P = 4,096).
# Usage: experiments/bench/run_teacher_attention.sh [extra genpi-bench flags]; PY picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# `--memory-only`: the memory figures alone, into bench_memory.json (they need no quiet machine).
if [[ "${1:-}" == "--memory-only" ]]; then
  shift
  exec "$PY" -m genpi.bench --only teacher_attention --out experiments/bench/results/bench_memory.json \
    --teacher-shapes --teacher-mem-shapes wide --teacher-mem-prompt 1024 --teacher-mem-batches 1 2 4 "$@"
fi
exec "$PY" -m genpi.bench --only teacher_attention --out experiments/bench/results/bench.json \
  --teacher-shapes wide tiny --teacher-prompts 1024 4096 256 --teacher-batch 1 --teacher-steps 20 \
  --teacher-warmup 2 --teacher-mem-shapes wide --teacher-mem-prompt 1024 --teacher-mem-batches 1 2 4 "$@"
