#!/usr/bin/env bash
# How `make demo`'s task and loss were chosen: the demo's pipeline (conf/experiment/demo.yaml) with GenPI (genpi)
# and GenPI + KL (genpi_kl), each evaluated on its VALIDATION split (eval.split=val); the test split, which the
# demo's report shows, is never looked at. Writes results/selection.{csv,md}; the best student format rate on
# validation (ties: the larger share of the KL gap closed) is the demo's setting.
# Tasks: m2w and os, the two tasks whose teacher follows the format on at least 90% of the held-out inputs of
# tiny_agent's build record (genpi/models/artifacts/tiny_agent.json: m2w 100%, os 94%). kg (44%) and webshop (56%)
# were left out before training: the demo needs a student at 50% or more, which a teacher near or below that cannot
# show; webshop's role-swapped synthesis (up to 10 turns of long pages) also took over 8 CPU-minutes here, beyond
# the demo's 5-minute budget. TASKS / LOSSES (comma lists) change the grid; extra arguments are overrides for every
# run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
TASKS=${TASKS:-m2w,os}
LOSSES=${LOSSES:-genpi,genpi_kl}
export GENPI_OUTPUT_ROOT=${GENPI_OUTPUT_ROOT:-outputs/demo_selection}
for task in ${TASKS//,/ }; do
  for loss in ${LOSSES//,/ }; do
    "$PY" -m genpi.pipeline experiment=demo task="$task" loss="$loss" eval.split=val eval.engine=hf \
      eval.savings.measure=false "$@" | tail -n 3
  done
done
"$PY" experiments/demo/gather.py "$GENPI_OUTPUT_ROOT" experiments/demo/results
