#!/usr/bin/env bash
# Can the tiny architecture learn to carry a question's paths and names into its commands (issue 11)? Probes of
# pre-training recipes on the os task alone, every one single-threaded and seeded. Writes results/.
#   experiments/tiny_agent_copy/run.sh [steps...]     (default: all; the probes take about four hours, one after another)
# Steps:
#   probes   the chain of candidates (folders under $OUT; each writes probe.json: exact commands on env-split inputs,
#            a proxy only, never used to choose)
#   val      eval_val.py on every candidate and the shipped tiny_agent: the validation proxies (two sets)
#   env      the best candidate on validation (and the two played before, words_3 and pieces_2): teacher and floor on
#            the first 40 of genpi's own problems (the real judge)
#   measure  GenPI on the copying candidates: success of teacher, student and floor on all 120 of genpi's problems
#   opcd     a pilot of issue 13 on tokens_5: on-policy distillation in GenPI's wall time, judged as in measure
#   four     the four-task build of four_task.json (genpi's builder; hours on one thread, resumed after a kill): its
#            validation proxies, its answer turns, teacher and floor on the first 40 of genpi's problems
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
HERE=experiments/tiny_agent_copy
OUT=${OUT:-outputs/tiny_agent_copy}
RES=$HERE/results
STEPS=${*:-probes val env measure}
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
    # words_3 continued on values made of the vocabulary's pieces, as the builder's fresh_values=pieces makes them,
    # observations ending in a newline (the builder's terminal_newline), their drill 3 steps in 7:
    "$PY" $HERE/probe_pieces.py 1500 "$OUT/pieces_1" "$OUT/words_3" 3,1,3 | tail -n 1
    "$PY" $HERE/probe_pieces.py 1500 "$OUT/pieces_2" "$OUT/pieces_1" 3,1,3 | tail -n 1
    for m in pools fresh fresh2 drill_then_lr3e-3 drill_then_lr1e-3 words_1 words_2 words_2_drill3 words_3 vocab_1 \
        pieces_1 pieces_2; do
      cp "$OUT/$m/probe.json" "$RES/probe_$m.json"
    done
    # made-up values whose words are 1-3 random tokens of the whole vocabulary (probe_tokens.py): their copy drill
    # from the random base, then the os corpus of such values + their drill, chunks of 1,500 steps (corpus seed = i),
    # each validated as it ends
    "$PY" $HERE/probe_tokens.py drill 900 "$OUT/tokens_drill" | tail -n 1
    prev=tokens_drill
    for i in 1 2 3 4 5; do
      SEED=$i "$PY" $HERE/probe_tokens.py corpus 1500 "$OUT/tokens_$i" "$OUT/$prev" 3,1,1 | tail -n 1
      cp "$OUT/tokens_$i/probe.json" "$RES/probe_tokens_$i.json"
      prev=tokens_$i
    done
    ;;
  val)
    SHIPPED=$("$PY" -c "from genpi.models.factory import resolve_model_path as r; print(r({'name_or_path': 'tiny_agent'}))")
    "$PY" $HERE/eval_val.py "$RES/validation.json" shipped="$SHIPPED" pools="$OUT/pools" fresh2="$OUT/fresh2" \
      drill_then_lr3e-3="$OUT/drill_then_lr3e-3" drill_then_lr1e-3="$OUT/drill_then_lr1e-3" words_1="$OUT/words_1" \
      words_2="$OUT/words_2" words_2_drill3="$OUT/words_2_drill3" words_3="$OUT/words_3" \
      vocab_1="$OUT/vocab_1" pieces_1="$OUT/pieces_1" pieces_2="$OUT/pieces_2" tokens_1="$OUT/tokens_1" \
      tokens_2="$OUT/tokens_2" tokens_3="$OUT/tokens_3" tokens_4="$OUT/tokens_4" tokens_5="$OUT/tokens_5"
    # the answer turn alone, with and without a terminal's final newline after the output
    "$PY" $HERE/answer_turn.py "$RES/answer_turn.json" words_3="$OUT/words_3" pieces_1="$OUT/pieces_1" \
      pieces_2="$OUT/pieces_2" tokens_5="$OUT/tokens_5"
    "$PY" $HERE/gather.py
    ;;
  env)
    # the candidate with the most exact commands on the pool-value validation set, whose values are real words as
    # genpi's problems' are (ties: directories carried there, then the same on the made-up-value set), never chosen
    # on genpi's problems or the env-split proxy. (Before the pieces and tokens candidates, the made-up set came
    # first, which chose words_3; pieces_2 was played as soon as its chain ended, before the tokens chain's
    # candidates were compared with it.)
    BEST=$("$PY" -c "import json, sys; v = json.load(open(sys.argv[1])); v.pop('shipped', None)
key = lambda s: (s['exact_code'], s['dir_copied'])
print(max(v, key=lambda k: (key(v[k]['pools']), key(v[k]['fresh']))))" "$RES/validation.json")
    for m in $(printf "%s\n" words_3 pieces_2 "$BEST" | awk '!seen[$0]++'); do
      echo "playing $m on genpi's problems"
      GENPI_OUTPUT_ROOT="$OUT" N_BASELINE=40 TINY_AGENT="$OUT/$m" BASELINE_OUT="$RES/env_$m.json" \
        experiments/environments/run.sh baseline
    done
    "$PY" $HERE/gather.py
    ;;
  measure)
    # GenPI on copying candidates, judged by success on all 120 of genpi's problems: synthesis with the candidate
    # itself, one genpi_kl run, genpi-eval with the environment (experiments/environments/run.sh measure)
    for m in pieces_2 tokens_5; do
      GENPI_OUTPUT_ROOT="$OUT" TINY_AGENT="$OUT/$m" MEASURE_OUT="$RES/measure_$m" experiments/environments/run.sh measure
    done
    ;;
  opcd)
    # issue 13 on a copying probe, a pilot (one seed, opcd's defaults, not chosen on validation): on-policy
    # distillation (loss=opcd, answers up to 96 tokens) on tokens_5's data, its fit held to the wall time of GenPI's
    # fit there (genpi.runs.fit_seconds of its train.log: "training os on" to "Trainer.fit stopped"), judged as in
    # measure
    budget=$("$PY" -c "import sys; from genpi.runs import fit_seconds; print(int(fit_seconds(sys.argv[1])))" \
      "$(ls -d "$OUT"/runs/os-genpi_kl-tokens_5-* | head -n 1)/train.log")
    echo "opcd's fit budget: $budget s (GenPI's fit)"
    GENPI_OUTPUT_ROOT="$OUT" TINY_AGENT="$OUT/tokens_5" LOSS=opcd MEASURE_OUT="$RES/measure_tokens_5_opcd" \
      TRAIN_ARGS="loss.kl.sampling.max_new_tokens=96 trainer.max_epochs=1000 +trainer.max_time=$(printf 00:00:%02d:%02d $((budget / 60)) $((budget % 60)))" \
      experiments/environments/run.sh measure
    ;;
  four)
    FOUR=$("$PY" $HERE/build_four.py | tail -n 1)
    "$PY" -c "import json, sys; c = json.load(open(sys.argv[1])); c.pop('base', None)
json.dump(c, open(sys.argv[2], 'w'), indent=2); open(sys.argv[2], 'a').write('\\n')" "$FOUR/genpi_tiny_agent.json" "$RES/four_task_card.json"
    "$PY" $HERE/eval_val.py "$RES/validation.json" four_task="$FOUR"
    "$PY" $HERE/answer_turn.py "$RES/answer_turn.json" four_task="$FOUR"
    GENPI_OUTPUT_ROOT="$OUT" N_BASELINE=40 TINY_AGENT="$FOUR" BASELINE_OUT="$RES/env_four_task.json" \
      experiments/environments/run.sh baseline
    "$PY" $HERE/gather.py
    ;;
  *) echo "unknown step $step (probes | val | env | measure | opcd | four)" >&2; exit 2 ;;
  esac
done
