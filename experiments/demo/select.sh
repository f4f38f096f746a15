#!/usr/bin/env bash
# How `make demo`'s task and loss were chosen: the demo's pipeline (conf/experiment/demo.yaml) with GenPI (genpi)
# and GenPI + KL (genpi_kl), each evaluated on its VALIDATION split (eval.split=val); the test split, which the
# demo's report shows, is never looked at. Writes results/selection.{csv,md}; the best student format rate on
# validation (ties: the larger share of the KL gap closed) is the demo's setting.
# Tasks: kg, whose teacher follows the format on every held-out input (tiny_agent.json). webshop was tried too
# and dropped before training: its role-swapped synthesis (up to 10 turns of long pages) alone took over 8
# CPU-minutes here, beyond the demo's 5-minute budget. TASKS / LOSSES (comma lists) change the grid; extra arguments
# are overrides for every run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
TASKS=${TASKS:-kg}
LOSSES=${LOSSES:-genpi,genpi_kl}
export GENPI_OUTPUT_ROOT=${GENPI_OUTPUT_ROOT:-outputs/demo_selection}
for task in ${TASKS//,/ }; do
  for loss in ${LOSSES//,/ }; do
    "$PY" -m genpi.pipeline experiment=demo task="$task" loss="$loss" eval.split=val eval.engine=hf \
      eval.savings.measure=false "$@" | tail -n 3
  done
done
"$PY" experiments/demo/gather.py "$GENPI_OUTPUT_ROOT" experiments/demo/results
