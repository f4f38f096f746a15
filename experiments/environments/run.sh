#!/usr/bin/env bash
# Agents in a real environment (issue 11): writes the figures of experiments/environments/results/.
#   AGENTBENCH_OS=/path/to/AgentBench/data/os_interaction experiments/environments/run.sh [steps...]
# Steps (default: all that can run here):
#   check    genpi-env-check: AgentBench's dev split (reference agent, wrong-answer replay) and genpi's own problems
#   bench    genpi-bench's lockstep figure: episodes/s batched vs one at a time, 32 episodes, one warm engine
#            (model $BENCH_MODEL, default tiny_agent)
#   measure  tiny_agent on genpi's own problems: synthesize os data with the model itself, train one GenPI run
#            (loss=$LOSS, default genpi_kl), then genpi-eval with eval.env.enabled=true (teacher, student, floor)
#   baseline tiny_agent's teacher and floor alone (no adapter) on the first $N_BASELINE (all 120) of genpi's problems
#            ($TINY_AGENT: a built tiny_agent folder to use instead of model=tiny_agent's default build;
#            $BASELINE_OUT: where to write, instead of results/tiny_agent_teacher_floor.json)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=experiments/environments/results
AGENTBENCH_OS=${AGENTBENCH_OS:-../shared/agentbench/os_interaction}
ROOT=${GENPI_OUTPUT_ROOT:-outputs}
LOSS=${LOSS:-genpi_kl}
STEPS=${*:-check bench measure baseline}
mkdir -p "$OUT"

# genpi's own problems (deterministic: the same 120 problems on every machine)
"$PY" -m genpi.environments.genpi_os --out "$ROOT/env/genpi_os"

for step in $STEPS; do
  case $step in
  check)
    if [ -f "$AGENTBENCH_OS/data/dev.json" ]; then
      "$PY" -m genpi.env_check env.data_dir="$AGENTBENCH_OS" env.split=dev | tee "$OUT/env_check_agentbench_dev.txt"
      "$PY" -m genpi.env_check env.data_dir="$AGENTBENCH_OS" env.split=dev check.agent=wrong \
        | tee "$OUT/env_check_agentbench_dev_wrong.txt"
    else
      echo "no AgentBench data at $AGENTBENCH_OS: set AGENTBENCH_OS to skip nothing" >&2
    fi
    "$PY" -m genpi.env_check env=genpi_os | tee "$OUT/env_check_genpi_os.txt"
    "$PY" -m genpi.env_check env=genpi_os check.agent=wrong | tee "$OUT/env_check_genpi_os_wrong.txt"
    ;;
  bench)
    "$PY" -m genpi.bench --skip training memory topk roleswap --env-episodes 32 --env-model "${BENCH_MODEL:-tiny_agent}" \
      --out "$OUT/bench_env.json" >/dev/null
    "$PY" - "$OUT/bench_env.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["env_episodes"]
print(f"{r['episodes']} episodes of {r['model']} ({r['engine']}, {r['backend']} sandbox): "
      f"{r['batched']['episodes_per_s']:.3f} episodes/s batched, {r['one_at_a_time']['episodes_per_s']:.3f} one at a "
      f"time, speedup {r['speedup']:.2f}x")
PY
    ;;
  measure)
    # $TINY_AGENT: a built tiny_agent folder instead of model=tiny_agent's default build; $MEASURE_OUT: the file
    # prefix of the two results (default results/tiny_agent_genpi_os); $TRAIN_ARGS: more overrides for the training
    MODEL=(model=tiny_agent ${TINY_AGENT:+"model.name_or_path=$TINY_AGENT"})
    NAME=$(basename "${TINY_AGENT:-tiny_agent}" | tr '[:upper:]' '[:lower:]')  # as genpi names its folders
    PREFIX=${MEASURE_OUT:-$OUT/tiny_agent_genpi_os}
    "$PY" -m genpi.synth task=os "${MODEL[@]}" experiment_name=internalization synth.name=internalization \
      synth.pseudo_inputs.source=templates synth.pseudo_inputs.split=heldout synth.pseudo_inputs.num_inputs=160 \
      synth.outputs.sampling.max_tokens=96 synth.conversations.sampling.max_tokens=96 \
      synth.conversations.env_sampling.max_tokens=128 synth.progress=false
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of overrides
    "$PY" -m genpi.train experiment=internalization task=os loss="$LOSS" "${MODEL[@]}" post_eval=false \
      data.path="$ROOT/synth/os/$NAME/internalization" ${TRAIN_ARGS:-}
    RUN=$(ls -td "$ROOT"/runs/os-"$LOSS"-"$NAME"-* | head -n 1)
    REPORT=$("$PY" -m genpi.evaluate run_dir="$RUN" task=os "${MODEL[@]}" eval.engine=hf eval.savings.measure=false \
      eval.max_new_tokens=96 eval.env.enabled=true env=genpi_os eval.env.max_new_tokens=96 | sed -n 's/^report: //p')
    cp "$(dirname "$REPORT")/metrics.json" "${PREFIX}_metrics.json"
    sed -n '/^## Agents in the environment/,/^## Examples/p' "$REPORT" | sed '$d' > "$PREFIX.md"
    cat "$PREFIX.md"
    ;;
  baseline)  # teacher and floor of tiny_agent (no adapter needed) on the first $N_BASELINE of genpi's problems
    "$PY" - "$ROOT/env/genpi_os" "${N_BASELINE:-120}" "${BASELINE_OUT:-$OUT/tiny_agent_teacher_floor.json}" "${TINY_AGENT:-tiny_agent}" <<'PY'
import json, sys
from pathlib import Path
from genpi import schema
from genpi.environments import results
from genpi.environments.evaluate import make_spec, problems_of, run_env_evaluation, text_of, view_of
from genpi.tasks.base import builtin_task
data_dir, n, out, model = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
env = schema.Env(name="genpi_os", data_dir=data_dir, lead_separator="\n", observation="The terminal printed:\n{output}",
                 empty_observation="The terminal printed nothing.", max_problems=n)
model_cfg = {"name_or_path": model, "dtype": "float32"}
spec = make_spec(problems=problems_of(env), sides=["teacher", "floor"], view=view_of(env, builtin_task("os")),
                 text=text_of(env), sandbox_cfg=schema.EnvSandbox(), backend="local", round_limit=8, max_running=32,
                 max_new_tokens=96, max_model_len=4096, model_cfg=model_cfg, episodes_path=out.with_suffix(".jsonl"))
res = run_env_evaluation(spec, "hf", model_cfg, None, out.parent)
out.write_text(json.dumps(res, indent=1))
print(results.success_table(res["summary"], ["teacher", "floor"]))
PY
    ;;
  *) echo "unknown step $step (check | bench | measure | baseline)" >&2; exit 2 ;;
  esac
done
