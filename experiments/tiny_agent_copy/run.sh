#!/usr/bin/env bash
# Can the tiny architecture learn to carry a question's paths and names into its commands (issue 11)? Probes of
# pre-training recipes on the os task alone, every one single-threaded and seeded. Writes results/.
#   experiments/tiny_agent_copy/run.sh [steps...]     (default: all; the probes take about two hours, one after another)
# Steps:
#   probes   the chain of candidates (folders under $OUT; each writes probe.json: exact commands on env-split inputs,
#            a proxy only, never used to choose)
#   val      eval_val.py on every candidate and the shipped tiny_agent: the validation proxies (two sets)
#   env      the best candidate on validation: its teacher and floor on the first 40 of genpi's own problems (the real judge)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
HERE=experiments/tiny_agent_copy
OUT=${OUT:-outputs/tiny_agent_copy}
RES=$HERE/results
STEPS=${*:-probes val env}
mkdir -p "$OUT" "$RES"
for step in $STEPS; do
  case $step in
  probes)
    # The task corpus alone (os teacher and student views 3:1), from the random tiny base, 900 steps:
    # pool slot values (as tiny_agent's corpus) vs made-up syllable values; then 1,500 more steps of the latter.
    EXAMPLES=2048 "$PY" $HERE/probe_corpus.py pools 900 "$OUT/pools" | tail -n 1
    EXAMPLES=2048 "$PY" $HERE/probe_corpus.py fresh 900 "$OUT/fresh" | tail -n 1
    EXAMPLES=2048 "$PY" $HERE/probe_corpus.py fresh 1500 "$OUT/fresh2" "$OUT/fresh" 3,1,0 | tail -n 1
    # A copy drill alone (repeat made-up words; batch 32, lr 1e-3, 900 steps), then the corpus with the drill mixed in:
    "$PY" $HERE/probe_drill.py 1e-3 32 900 "$OUT/drill" | tail -n 1
    EXAMPLES=2048 "$PY" $HERE/probe_corpus.py fresh_drill 900 "$OUT/drill_then_lr3e-3" "$OUT/drill" 3,1,1 | tail -n 1
    LR=1e-3 "$PY" $HERE/probe_corpus.py fresh_drill 1200 "$OUT/drill_then_lr1e-3" "$OUT/drill" 3,1,1 | tail -n 1
    # genpi's own made-up values (half real words: genpi.tasks.generators.fresh_value) and its copy drill, lr 1e-3:
    "$PY" $HERE/probe_continue.py 1200 "$OUT/words_1" "$OUT/drill_then_lr1e-3" 3,1,1 | tail -n 1
    "$PY" $HERE/probe_continue.py 1500 "$OUT/words_2" "$OUT/words_1" 3,1,1 | tail -n 1
    "$PY" $HERE/probe_continue.py 1500 "$OUT/words_2_drill3" "$OUT/words_1" 3,1,3 | tail -n 1
    "$PY" $HERE/probe_continue.py 3000 "$OUT/words_3" "$OUT/words_2_drill3" 3,1,3 | tail -n 1
    # the drill also over the whole vocabulary (words made of the tokenizer's alphabetic tokens), so that every token
    # has been a copy target once:
    VOCAB_DRILL=1 "$PY" $HERE/probe_continue.py 1500 "$OUT/vocab_1" "$OUT/words_2" 3,1,3 | tail -n 1
    for m in pools fresh fresh2 drill_then_lr3e-3 drill_then_lr1e-3 words_1 words_2 words_2_drill3 words_3 vocab_1; do
      cp "$OUT/$m/probe.json" "$RES/probe_$m.json"
    done
    ;;
  val)
    SHIPPED=$("$PY" -c "from genpi.models.factory import resolve_model_path as r; print(r({'name_or_path': 'tiny_agent'}))")
    "$PY" $HERE/eval_val.py "$RES/validation.json" shipped="$SHIPPED" pools="$OUT/pools" fresh2="$OUT/fresh2" \
      drill_then_lr3e-3="$OUT/drill_then_lr3e-3" drill_then_lr1e-3="$OUT/drill_then_lr1e-3" words_1="$OUT/words_1" \
      words_2="$OUT/words_2" words_2_drill3="$OUT/words_2_drill3" words_3="$OUT/words_3" \
      vocab_1="$OUT/vocab_1"
    "$PY" $HERE/gather.py
    ;;
  env)
    # the candidate with the most exact commands on the made-up-value validation set (ties: directories carried
    # there, then the same on the pool-value set), never chosen on genpi's problems or the env-split proxy
    BEST=$("$PY" -c "import json, sys; v = json.load(open(sys.argv[1])); v.pop('shipped', None)
key = lambda s: (s['exact_code'], s['dir_copied'])
print(max(v, key=lambda k: (key(v[k]['fresh']), key(v[k]['pools']))))" "$RES/validation.json")
    echo "playing $BEST on genpi's problems"
    GENPI_OUTPUT_ROOT="$OUT" N_BASELINE=40 TINY_AGENT="$OUT/$BEST" BASELINE_OUT="$RES/env_$BEST.json" \
      experiments/environments/run.sh baseline
    "$PY" $HERE/gather.py
    ;;
  *) echo "unknown step $step (probes | val | env)" >&2; exit 2 ;;
  esac
done
