#!/usr/bin/env bash
# The real-tokenizer models (genpi/models/real_vocab.py): build each, write its facts (vocabulary, parameters, the
# tasks' prompts in its tokens), then genpi-bench's loss memory at the real vocabularies, chunked vs unchunked, from
# these models' own output heads. Writes results/tokenizers.{json,md} and results/memory.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=experiments/real_tokenizers/results
"$PY" -m genpi.models.real_vocab --out "$OUT"
"$PY" -m genpi.bench --only real_vocab --real-vocab-tokens "${TOKENS:-1024}" --chunk "${CHUNK:-128}" --out "$OUT/memory.json"
