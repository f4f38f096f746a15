#!/usr/bin/env bash
# The internalization study on model=tiny_agent (see README.md here): for each task, synthesize with the model
# itself, train every loss configuration and on-policy distillation, evaluate each run on held-out inputs (and, on
# os, by task success on genpi's own OS problems), then gather one table and one plot.
#   experiments/internalization/run.sh [extra overrides for every training run]
# Every finished run leaves a record in results/ here (record.py: its metrics, settings and fit time), which is what
# the table is gathered from; a run with a record made with the same command line is kept, so the script run again
# after a kill, or on another machine after a partial study's records were committed, does only what is missing
# (TASKS=os first, then the other tasks, is such a study in two parts). A run of the same name made with other
# settings is refused. Every run is split and evaluated on the same inputs (data.seed=0); SEEDS vary the rest (the adapter's
# initialization, the batch order's sampler, opcd's sampling). Settings (environment variables):
#   TASKS (os,webshop,m2w,kg)   LOSSES (genpi,genpi_kl,kl,sft,pg,w_prompt: seed 0)   SEEDS (0,1,2: GenPI and opcd)
#   N_INPUTS (160 synthesized inputs per task)
#   JOBS (2 training runs at a time: each fit shares the CPU with one other run, GenPI's that sets a budget and
#        opcd's that spends it alike, except a step's last run; on GPUs, the number of GPUs)
#   ENV_PROBLEMS (all 120 of genpi's OS problems; a number plays only the first ones, for a quick try)
#   CANDIDATES ("1.0:1.0 0.0:1.0 1.0:0.5 0.7:1.0": opcd's temperature:lmbda, chosen on os's VALIDATION split)
#   ONPOLICY (1; 0 skips on-policy distillation, steps 3 to 5, which need os's GenPI run)
#   TURNS ("2 3": the candidates of opcd_turns' number of sampled agent turns, chosen on os's VALIDATION split)
#   GENPI_OUTPUT_ROOT (outputs/internalization: synthesis, the runs' folders and genpi's OS problems)
#   RESULTS (experiments/internalization/results: the records, the selection, the table and the plot)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
TASKS=${TASKS:-os,webshop,m2w,kg}
LOSSES=${LOSSES:-genpi,genpi_kl,kl,sft,pg,w_prompt}
SEEDS=${SEEDS:-0,1,2}
N_INPUTS=${N_INPUTS:-160}
JOBS=${JOBS:-2}
CANDIDATES=${CANDIDATES:-"1.0:1.0 0.0:1.0 1.0:0.5 0.7:1.0"}
TURNS=${TURNS:-"2 3"}
export GENPI_OUTPUT_ROOT=${GENPI_OUTPUT_ROOT:-outputs/internalization}
# torch threads per run: cores / JOBS (torch takes every core in each process otherwise: two os runs at a time
# here took 17.8 s per step with two threads each and 3.8 s with one)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
export GENPI_LAUNCH_ID=${GENPI_LAUNCH_ID:-$(date +%Y%m%d-%H%M%S)-$$}
EXTRA=""   # the script's arguments, quoted, for the jobs' shells; none gives no word (printf '%q ' alone gives '')
[ $# -eq 0 ] || EXTRA=$(printf '%q ' "$@")
export PY EXTRA N_INPUTS ENV_PROBLEMS=${ENV_PROBLEMS:-}
ROOT=$GENPI_OUTPUT_ROOT
export RESULTS=${RESULTS:-experiments/internalization/results}
mkdir -p "$ROOT/logs"

# 0. genpi's own OS problems (deterministic: the same 120 on every machine), for the os runs' task success
"$PY" -m genpi.environments.genpi_os --out "$ROOT/env/genpi_os" >/dev/null

# 1. Synthesis: inputs from the templates' held-out slots (never seen in pre-training), then the model itself as
#    teacher (with the prompt), student (without), reasoner and, by role swapping, agent and environment.
"$PY" -m genpi.synth -m task="$TASKS" model=tiny_agent experiment_name=internalization synth.name=internalization \
  synth.pseudo_inputs.source=templates synth.pseudo_inputs.split=heldout synth.pseudo_inputs.num_inputs="$N_INPUTS" \
  synth.outputs.sampling.max_tokens=96 synth.conversations.sampling.max_tokens=96 \
  synth.conversations.env_sampling.max_tokens=128 synth.progress=false

# One training run (conf/experiment/internalization.yaml) evaluated after training, then recorded in
# $RESULTS/runs/NAME ($RESULTS/select/NAME for the selection's); kept when its record (or its finished folder, whose
# command line is stamped in logs/NAME.args) was made with the same settings, refused when made with others.
#   train NAME SPLIT TASK LOSS SEED [overrides...]   SPLIT: test (the held-out inputs) or val (the selection's);
#   an override written eval:KEY=VALUE goes to the evaluation after training, the others to training
train() {
  local name=$1 split=$2 task=$3 loss=$4 seed=$5 root=$ROOT/runs record=$RESULTS/runs/$1 extra a
  shift 5
  [ "$split" = val ] && root=$ROOT/select/runs && record=$RESULTS/select/$name
  local evals=(eval.engine=hf eval.savings.measure=false eval.max_new_tokens=96 "eval.split=$split") trains=()
  for a in "$@"; do if [[ $a == eval:* ]]; then evals+=("${a#eval:}"); else trains+=("$a"); fi; done
  # os on the held-out split: also task success on genpi's own problems (teacher, student, floor)
  [ "$task" = os ] && [ "$split" = test ] && evals+=(eval.env.enabled=true env=genpi_os eval.env.max_new_tokens=96
    ${ENV_PROBLEMS:+env.max_problems=$ENV_PROBLEMS})
  eval "extra=($EXTRA)"
  local args=(experiment=internalization task="$task" loss="$loss" seed="$seed" data.seed=0 run_name="$name"
    paths.output_root="$(dirname "$root")" data.path="$ROOT/synth/$task/tiny_agent/internalization"
    "post_eval_overrides=[$(printf '"%s",' "${evals[@]}" | sed 's/,$//')]" ${trains[@]+"${trains[@]}"} \
    ${extra[@]+"${extra[@]}"})
  local stamp="$ROOT/logs/$name.args" want
  want=$(printf '%s\n' "N_INPUTS=$N_INPUTS" "${args[@]}")
  if [ -f "$record/record.json" ]; then
    if [ "$("$PY" -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["args"]))' \
      "$record/record.json")" = "$want" ]; then echo "kept $name (recorded)"; return; fi
    echo "REFUSED $name: its record $record was made with other settings than this command line; remove it" \
      "or use another RESULTS" >&2
    return 1
  fi
  if ! grep -qs '"eval/student/format_rate"' "$root/$name"-*/metrics.json; then
    printf '%s\n' "$want" > "$stamp"
    "$PY" -m genpi.train "${args[@]}" > "$ROOT/logs/$name.log" 2>&1 \
      || { echo "FAILED $name: see $ROOT/logs/$name.log" >&2; return 1; }
  elif [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "REFUSED $name: $root/$name-* was made with other settings than $stamp now asks; remove it (and the" \
      "stamp) or use another GENPI_OUTPUT_ROOT" >&2
    return 1
  fi
  local done
  mapfile -t done < <(grep -ls '"eval/student/format_rate"' "$root/$name"-*/metrics.json)
  [ ${#done[@]} = 1 ] || { echo "FAILED $name: ${#done[@]} finished folders $root/$name-*, expected one" >&2
    return 1; }
  "$PY" experiments/internalization/record.py "$(dirname "${done[0]}")" "$stamp" "$record" || return 1
  echo "done $name"
}
# GenPI's fit wall time for TASK and SEED, in whole seconds (from its record: genpi.runs.fit_seconds of its train.log,
# summed over the processes of a resumed run): the budget of an on-policy run of the same task and seed, enforced by
# trainer.max_time
budget() {
  "$PY" -c "import json, sys; print(int(json.load(open(sys.argv[1]))['fit_seconds']))" \
    "$RESULTS/runs/$1-genpi-s$2/record.json"
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

# The end, after step 2 (ONPOLICY=0) or step 5: where the os students fail (episodes.py: first actions, validation
# failures after an observation, one trajectory per loss), then the table and the plots.
finish() {
  if [[ ",$TASKS," == *,os,* ]]; then
    "$PY" experiments/internalization/episodes.py "$RESULTS/runs" "$RESULTS/os_episodes.json"
  fi
  exec experiments/internalization/gather.sh "$RESULTS/runs"
}
if [ "${ONPOLICY:-1}" = 0 ]; then finish; fi

# 3. On-policy distillation's sampling temperature and on-policy share (lmbda), chosen on os's VALIDATION split
#    (seed 0, each fit held to GenPI's os fit time): the best student format rate, ties broken by the KL gap closed
b=$(budget os 0)
names=() lines=()
for c in $CANDIDATES; do
  t=${c%%:*}; l=${c##*:}; names+=("select-os-opcd-t$t-l$l")
  lines+=("train select-os-opcd-t$t-l$l val os opcd 0 loss.kl.sampling.temperature=$t loss.kl.lmbda=$l \
    loss.kl.sampling.max_new_tokens=96 trainer.max_epochs=1000 +trainer.max_time=$(hms "$b")")
done
printf '%s\n' "${lines[@]}" | parallel
CHOSEN=$("$PY" experiments/internalization/select.py "$RESULTS/select" "$RESULTS/selection.json" "${names[@]}")
echo "opcd settings chosen on os's validation split: $CHOSEN"

# 4. On-policy distillation on every task and seed with those settings, each fit held to GenPI's fit time there
lines=()
for task in ${TASKS//,/ }; do
  for seed in ${SEEDS//,/ }; do
    b=$(budget "$task" "$seed")   # here, not inside the jobs' lines: a missing GenPI run stops the script
    lines+=("train $task-opcd-s$seed test $task opcd $seed $CHOSEN loss.kl.sampling.max_new_tokens=96 \
      trainer.max_epochs=1000 +trainer.max_time=$(hms "$b")")
  done
done
printf '%s\n' "${lines[@]}" | parallel

# 5. On-policy distillation on the student's own trajectories (os only; its rows are named opcd_turns): with step 3's
#    temperature and lmbda, the student samples up to N agent turns of each synthesized conversation, the
#    environment's turns between them taken from the record (loss.kl.sampling.turns), so that the turns after an
#    observation (an OS agent's answer) are trained on its own text too. N chosen on os's VALIDATION split by the
#    student's format rate on the conversations' later turns (eval.turns=3), then 3 seeds as in step 4.
if [[ ",$TASKS," == *,os,* ]]; then
  b=$(budget os 0)
  names=() lines=()
  for n in $TURNS; do
    names+=("select-os-opcd_turns-n$n")
    lines+=("train select-os-opcd_turns-n$n val os opcd 0 loss.name=opcd_turns $CHOSEN loss.kl.sampling.turns=$n \
      loss.kl.sampling.max_new_tokens=96 trainer.max_epochs=1000 +trainer.max_time=$(hms "$b") eval:eval.turns=3")
  done
  printf '%s\n' "${lines[@]}" | parallel
  N=$("$PY" experiments/internalization/select.py --by later_turns "$RESULTS/select" "$RESULTS/selection_turns.json" \
    "${names[@]}")
  echo "opcd_turns' turns chosen on os's validation split: $N"
  lines=()
  for seed in ${SEEDS//,/ }; do
    b=$(budget os "$seed")
    lines+=("train os-opcd_turns-s$seed test os opcd $seed loss.name=opcd_turns $CHOSEN $N \
      loss.kl.sampling.max_new_tokens=96 trainer.max_epochs=1000 +trainer.max_time=$(hms "$b")")
  done
  printf '%s\n' "${lines[@]}" | parallel
fi

finish
