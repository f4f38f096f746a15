#!/usr/bin/env bash
# The internalization study on model=tiny_agent (see README.md here): for each task, synthesize with the model
# itself, train every loss configuration and on-policy distillation, evaluate each run on held-out inputs (and, on
# os, by task success on genpi's own OS problems), then gather one table and one plot.
#   experiments/internalization/run.sh [extra overrides for every training run]
# A run that finished (its metrics.json holds the held-out evaluation) is kept: run the script again after a kill and
# only what is missing is done. Settings (environment variables):
#   TASKS (os,webshop,m2w,kg)   LOSSES (genpi,genpi_kl,kl,sft,pg,w_prompt: seed 0)   SEEDS (0,1,2: GenPI and opcd)
#   N_INPUTS (160 synthesized inputs per task)   JOBS (2 training runs at a time)
#   ENV_PROBLEMS (all 120 of genpi's OS problems; a number plays only the first ones, for a quick try)
#   CANDIDATES ("1.0:1.0 0.0:1.0 1.0:0.5": opcd's temperature:lmbda, chosen on os's VALIDATION split)
#   GENPI_OUTPUT_ROOT (outputs/internalization: synthesis, runs, the selection and genpi's OS problems)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
TASKS=${TASKS:-os,webshop,m2w,kg}
LOSSES=${LOSSES:-genpi,genpi_kl,kl,sft,pg,w_prompt}
SEEDS=${SEEDS:-0,1,2}
N_INPUTS=${N_INPUTS:-160}
JOBS=${JOBS:-2}
CANDIDATES=${CANDIDATES:-"1.0:1.0 0.0:1.0 1.0:0.5"}
export GENPI_OUTPUT_ROOT=${GENPI_OUTPUT_ROOT:-outputs/internalization}
export GENPI_LAUNCH_ID=${GENPI_LAUNCH_ID:-$(date +%Y%m%d-%H%M%S)-$$}
export PY EXTRA="$*" ENV_PROBLEMS=${ENV_PROBLEMS:-}
ROOT=$GENPI_OUTPUT_ROOT
mkdir -p "$ROOT/logs"

# 0. genpi's own OS problems (deterministic: the same 120 on every machine), for the os runs' task success
"$PY" -m genpi.environments.genpi_os --out "$ROOT/env/genpi_os" >/dev/null

# 1. Synthesis: inputs from the templates' held-out slots (never seen in pre-training), then the model itself as
#    teacher (with the prompt), student (without), reasoner and, by role swapping, agent and environment.
"$PY" -m genpi.synth -m task="$TASKS" model=tiny_agent experiment_name=internalization synth.name=internalization \
  synth.pseudo_inputs.source=templates synth.pseudo_inputs.split=heldout synth.pseudo_inputs.num_inputs="$N_INPUTS" \
  synth.outputs.sampling.max_tokens=96 synth.conversations.sampling.max_tokens=96 \
  synth.conversations.env_sampling.max_tokens=128 synth.progress=false

# One training run (conf/experiment/internalization.yaml) evaluated after training; skipped when done.
#   train NAME SPLIT TASK LOSS SEED [overrides...]   SPLIT: test (the held-out inputs) or val (the selection's)
train() {
  local name=$1 split=$2 task=$3 loss=$4 seed=$5 root=$ROOT/runs
  shift 5
  [ "$split" = val ] && root=$ROOT/select/runs
  if grep -qs '"eval/student/format_rate"' "$root/$name"-*/metrics.json; then echo "kept $name"; return; fi
  local evals=(eval.engine=hf eval.savings.measure=false eval.max_new_tokens=96 "eval.split=$split")
  # os on the held-out split: also task success on genpi's own problems (teacher, student, floor)
  [ "$task" = os ] && [ "$split" = test ] && evals+=(eval.env.enabled=true env=genpi_os eval.env.max_new_tokens=96
    ${ENV_PROBLEMS:+env.max_problems=$ENV_PROBLEMS})
  # shellcheck disable=SC2086  # EXTRA: the script's own arguments, a list of overrides
  "$PY" -m genpi.train experiment=internalization task="$task" loss="$loss" seed="$seed" run_name="$name" \
    paths.output_root="$(dirname "$root")" data.path="$ROOT/synth/$task/tiny_agent/internalization" \
    "post_eval_overrides=[$(printf '"%s",' "${evals[@]}" | sed 's/,$//')]" "$@" $EXTRA > "$ROOT/logs/$name.log" 2>&1 \
    || { echo "FAILED $name: see $ROOT/logs/$name.log" >&2; return 1; }
  echo "done $name"
}
# GenPI's fit wall time for TASK and SEED, in seconds (its train.log: "training ... on" to "Trainer.fit stopped",
# summed over the processes of a resumed run; a process killed mid-fit is not counted):
# the budget of an on-policy run of the same task and seed, enforced by trainer.max_time
budget() {
  "$PY" - "$ROOT/runs" "$1-genpi-s$2" <<'EOF'
import re, sys
from datetime import datetime
from pathlib import Path

(log,) = Path(sys.argv[1]).glob(f"{sys.argv[2]}-*/train.log")
marks = [(line[1:24], "`Trainer.fit` stopped" in line) for line in log.read_text().splitlines()
         if re.match(r"\[[^]]+\]\[genpi\.train\]\[INFO\] training ", line) or "`Trainer.fit` stopped" in line]
# each start with the end that follows it, summed (a resumed run logs a start and an end per process)
total, start = 0.0, None
for stamp, is_end in marks:
    t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
    if is_end and start is not None:
        total, start = total + (t - start).total_seconds(), None
    elif not is_end:
        start = t
assert total > 0, f"{log}: no complete fit (a start of training and its Trainer.fit stop)"
print(int(total))
EOF
}
hms() { printf "00:%02d:%02d:%02d" $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }
export -f train budget hms
export ROOT
parallel() { xargs -P "$JOBS" -I{} bash -c '{}'; }   # one line of stdin per run, JOBS at a time

# 2. The paper's configurations (seed 0), and GenPI on the other seeds (its spread, beside opcd's)
for task in ${TASKS//,/ }; do
  for loss in ${LOSSES//,/ }; do echo "train $task-$loss-s0 test $task $loss 0"; done
  for seed in ${SEEDS//,/ }; do [ "$seed" = 0 ] || echo "train $task-genpi-s$seed test $task genpi $seed"; done
done | parallel

# 3. On-policy distillation's sampling temperature and on-policy share (lmbda), chosen on os's VALIDATION split
#    (seed 0, each fit held to GenPI's os fit time): the best student format rate, ties broken by the KL gap closed
b=$(budget os 0)
for c in $CANDIDATES; do
  t=${c%%:*}; l=${c##*:}
  echo "train select-os-opcd-t$t-l$l val os opcd 0 loss.kl.sampling.temperature=$t loss.kl.lmbda=$l \
    loss.kl.sampling.max_new_tokens=96 trainer.max_epochs=1000 +trainer.max_time=$(hms "$b")"
done | parallel
CHOSEN=$("$PY" experiments/internalization/select.py "$ROOT/select/runs" experiments/internalization/results/selection.json)
echo "opcd settings chosen on os's validation split: $CHOSEN"

# 4. On-policy distillation on every task and seed with those settings, each fit held to GenPI's fit time there
for task in ${TASKS//,/ }; do
  for seed in ${SEEDS//,/ }; do
    echo "train $task-opcd-s$seed test $task opcd $seed $CHOSEN loss.kl.sampling.max_new_tokens=96 \
      trainer.max_epochs=1000 +trainer.max_time=$(hms "$(budget "$task" "$seed")")"
  done
done | parallel

# 5. The table and the plot.
exec "$(dirname "$0")/gather.sh" "$ROOT/runs"
