#!/usr/bin/env bash
# The internalization study on model=tiny_agent (see README.md here): for each task, synthesize with the model
# itself, train every loss configuration, evaluate each run on held-out inputs, then gather one table and one plot.
# Extra arguments are Hydra overrides for the training sweep (e.g. trainer.max_epochs=2, hydra/launcher=local).
# TASKS and LOSSES (comma lists) narrow the study; N_INPUTS sets the synthesized inputs per task.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
TASKS=${TASKS:-os,webshop,m2w,kg}
LOSSES=${LOSSES:-genpi,genpi_kl,kl,sft,pg,w_prompt}
N_INPUTS=${N_INPUTS:-160}
export GENPI_LAUNCH_ID=${GENPI_LAUNCH_ID:-$(date +%Y%m%d-%H%M%S)-$$}

# 1. Synthesis: inputs from the templates' held-out slots (never seen in pre-training), then the model itself as
#    teacher (with the prompt), student (without), reasoner and, by role swapping, agent and environment.
"$PY" -m genpi.synth -m task="$TASKS" model=tiny_agent experiment_name=internalization synth.name=internalization \
  synth.pseudo_inputs.source=templates synth.pseudo_inputs.split=heldout synth.pseudo_inputs.num_inputs="$N_INPUTS" \
  synth.outputs.sampling.max_tokens=96 synth.conversations.sampling.max_tokens=96 \
  synth.conversations.env_sampling.max_tokens=128 synth.progress=false

# 2. Training and evaluation: every loss configuration on every task (conf/experiment/internalization.yaml).
"$PY" -m genpi.train -m experiment=internalization task="$TASKS" loss="$LOSSES" "$@"

# 3. The table and the plot.
exec "$(dirname "$0")/gather.sh"
