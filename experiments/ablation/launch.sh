#!/usr/bin/env bash
# The ablation study: every loss configuration x every task on the built-in tiny model, each run
# evaluated on its held-out split. Extra arguments are Hydra overrides (e.g. hydra/launcher=local,
# model=llama3_8b trainer=gpu hydra/launcher=slurm hydra.launcher.partition=...).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m genpi.train -m experiment_name=ablation \
  task=os,webshop,m2w,kg loss=genpi,genpi_kl,kl,sft,pg,w_prompt \
  post_eval=true trainer.max_epochs=3 "$@"
