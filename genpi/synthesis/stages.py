"""The synthesis stages, one function each, and :func:`run_stages`, which chains them.

A row is a dict for one pseudo input: its columns so far (``pseudo_input``, ``teacher_output_single``,
...) and ``ids``, the record id it has in each stage's store. A stage takes rows and returns them with
its columns added; its record ids hash the upstream record id with the stage's fingerprint (see
:mod:`genpi.synthesis.plan`), so equal inputs under an equal config find their stored results, and
anything else is computed afresh. Each stage works alone (its inputs read from the store of an earlier
run in the same folder, or from ``synth.from_dataset``) or chained.

Shards (``synth.num_shards=K``, ``synth.shard=i``): which stage runs where, and why.

- ``pseudo_inputs``: with ``source=generate`` (the costly part with a large generator) shard ``i`` generates
  rounds ``i, i+K, i+2K, ...`` into its own file; the deduplication then replays every shard's rounds in round
  order, once all the rounds an unsharded run would use are stored, so the list is the unsharded run's (a
  shard done with its rounds waits for the others'). ``source=file`` / ``templates`` cost nothing: every shard
  reads the whole list. The first shard to finish writes the list to the store, under the store's lock.
- ``outputs``, ``reasons``, ``conversations``, ``teacher_logits``: each record belongs to the shard its pseudo
  input's id falls in (:func:`owned_by`); a shard runs every later stage on its records alone, with no waiting,
  into its own files (a record never changes shard between stages, so no stage waits for another shard).
- the merge: the shard that finishes last (or ``synth.merge_only=true``) reads every shard's files and writes
  ``data.jsonl`` in the order of the pseudo-input list.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genpi.synthesis.clients import ChatClient, ClientPool, request_seed
from genpi.synthesis.plan import PRODUCES, REQUIRES, STAGES, Plan, StagePlan, lineage, task_inputs_path
from genpi.synthesis.prompts import PSEUDO_INPUT_TEMPLATE, REASON_TEMPLATE
from genpi.synthesis.roleswap import role_swap
from genpi.synthesis.store import Store, shard_of, stable_hash
from genpi.tasks.base import Task
from genpi.utils.errors import GenpiError

log = logging.getLogger(__name__)

Row = dict[str, Any]


# -- running -------------------------------------------------------------------------------------------
@dataclass
class StageContext:
    """What a stage function works with: the task, its plan, the clients, the store, where to report."""

    task: Task
    plan: StagePlan
    clients: ClientPool
    store: Store
    out_dir: Path
    chunk_size: int = 64
    progress: bool = True
    failed_samples: int = 5
    wait_minutes: float = 60.0
    poll_seconds: float = 1.0
    stats: dict[str, Any] = field(default_factory=dict)

    def client(self) -> ChatClient:
        return self.clients.get(self.plan.client, self.plan.model)

    def bar(self, total: int, initial: int = 0, unit: str = "rec"):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=self.plan.name, unit=unit, disable=not self.progress,
                    dynamic_ncols=True, leave=True)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def input_id(pseudo_input: str) -> str:
    return stable_hash("input", pseudo_input)


def per_record(
    ctx: StageContext, rows: list[Row], work: Callable[..., list[dict[str, Any]]] | None,
) -> list[Row]:
    """Run ``work`` on the rows whose record is not in the store yet, one chunk at a time, each chunk
    appended to the store before the next starts; then give every row the stage's columns.

    ``work(rows, record_ids, tick)`` returns one dict of the stage's columns per row; it may call
    ``tick(n)`` as records finish, for the progress bar. With ``work=None`` nothing is computed: rows only
    pick up what the store already holds (a stage not asked for in this run).
    """
    stage = ctx.plan.name
    need = REQUIRES[stage]
    shard = ctx.store.shard(stage, ctx.plan.fingerprint)  # this shard's own file: the only one it appends to
    done = ctx.store.load(stage, ctx.plan.fingerprint)  # every shard's records: what exists is never recomputed
    keyed = [(stable_hash(ctx.plan.fingerprint, row["ids"][need]), row) for row in rows if need in row["ids"]]
    todo = [(rid, row) for rid, row in keyed if rid not in done]
    ctx.stats.update(records=len(keyed), from_store=len(keyed) - len(todo), computed=0)
    if work is not None and todo:
        ctx.store.write_meta(stage, ctx.plan.fingerprint, ctx.plan.describe())
        with ctx.bar(total=len(keyed), initial=len(keyed) - len(todo)) as bar:
            for chunk in _chunks(todo, ctx.chunk_size):
                ticked = [0]

                def tick(n: int, ticked: list[int] = ticked) -> None:
                    ticked[0] += n
                    bar.update(n)

                results = work([row for _, row in chunk], [rid for rid, _ in chunk], tick)
                if len(results) != len(chunk):
                    raise RuntimeError(f"stage {stage} returned {len(results)} results for {len(chunk)} records")
                new = []
                for (rid, row), res in zip(chunk, results):
                    rec = {**{k: v for k, v in row.items() if k != "ids"}, **res, "record_id": rid,
                           "ids": {**row["ids"], stage: rid}}
                    new.append(rec)
                    done[rid] = rec
                shard.append(new)
                ctx.stats["computed"] += len(new)
                bar.update(len(new) - ticked[0])
    elif work is None:
        ctx.stats["records"] = sum(1 for rid, _ in keyed if rid in done)
    for rid, row in keyed:
        if rid in done:
            row.update({c: done[rid][c] for c in PRODUCES[stage] if c in done[rid]})
            row["ids"][stage] = rid
    return rows


# -- stage 1: pseudo inputs ------------------------------------------------------------------------------
class Dedup:
    """Keeps the first of exact and normalized (whitespace/case) duplicates, counting both kinds."""

    def __init__(self) -> None:
        from genpi.tasks.parsers import normalize_for_dedup

        self.normalize = normalize_for_dedup
        self.exact: set[str] = set()
        self.normalized: set[str] = set()
        self.accepted: list[str] = []
        self.candidates = 0
        self.exact_duplicates = 0
        self.normalized_duplicates = 0

    def add(self, text: str) -> bool:
        text = text.strip()
        if not text:
            return False
        self.candidates += 1
        if text in self.exact:
            self.exact_duplicates += 1
            return False
        self.exact.add(text)
        norm = self.normalize(text)
        if norm in self.normalized:
            self.normalized_duplicates += 1
            return False
        self.normalized.add(norm)
        self.accepted.append(text)
        return True

    def stats(self) -> dict[str, Any]:
        dups = self.exact_duplicates + self.normalized_duplicates
        return {"candidates": self.candidates, "exact_duplicates": self.exact_duplicates,
                "normalized_duplicates": self.normalized_duplicates,
                "duplicate_rate": dups / self.candidates if self.candidates else 0.0}


def generator_messages(task: Task, settings: dict[str, Any], round_index: int, request: int, seed: int) -> list[dict]:
    """The generator's request: the prompt, a seeded sample of the task's demonstrations, how many to write."""
    rng = random.Random(request_seed(seed, "demos", round_index, request))
    demos = list(task.demonstrations)
    k_demo = min(int(settings.get("num_demonstrations") or 0), len(demos))
    shown = rng.sample(demos, k_demo) if k_demo else []
    examples = "\n".join(f"{i}. {d}" for i, d in enumerate(shown, 1)) or "(none yet)"
    template = settings.get("template") or PSEUDO_INPUT_TEMPLATE
    text = template.format(prompt=task.prompt_text, examples=examples, k=int(settings.get("inputs_per_request") or 10))
    return [{"role": "user", "content": text}]


def round_schedule(settings: dict[str, Any], outputs_per_request: int) -> list[int]:
    """Requests in each generation round until the attempt budget (``max_attempts``) is spent.

    It depends on settings only, so every shard knows every round's size (and which rounds are its own)
    before any is generated; a round holds ``requests * sampling.n`` generator outputs.
    """
    want = int(settings.get("num_inputs") or 0)
    budget = int(settings.get("max_attempts") or want)
    per_round = max(1, int(settings.get("requests_per_round") or 1))
    sizes, attempts = [], 0
    while attempts < budget:
        requests = min(per_round, math.ceil((budget - attempts) / outputs_per_request))
        sizes.append(requests)
        attempts += requests * outputs_per_request
    return sizes


class Replay:
    """Replays stored generation rounds in round order through the parser and :class:`Dedup`, stopping where
    an uninterrupted unsharded run stops (``num_inputs`` distinct inputs, or the attempt budget spent).

    Rounds may have been generated in any order by any shard; the replay only moves past round ``r`` once
    it is stored, so its result never depends on who generated what, or when.
    """

    def __init__(self, task: Task, want: int, budget: int, keep_samples: int):
        self.task, self.want, self.budget, self.keep_samples = task, want, budget, keep_samples
        self.dedup = Dedup()
        self.next_round = self.attempts = self.failed = 0
        self.samples: list[dict[str, Any]] = []

    @property
    def complete(self) -> bool:
        return len(self.dedup.accepted) >= self.want or self.attempts >= self.budget

    def advance(self, stored: dict[str, dict[str, Any]]) -> bool:
        """Replay every stored round that follows the last one replayed; True once the replay is complete."""
        while not self.complete:
            rec = stored.get(f"round-{self.next_round}")
            if rec is None:
                return False
            for text in rec["texts"]:
                self.attempts += 1
                parsed = self.task.parse_pseudo_inputs(text)
                if not parsed:
                    self.failed += 1
                    if len(self.samples) < self.keep_samples:
                        self.samples.append({"round": self.next_round, "text": text})
                for x in parsed:
                    self.dedup.add(x)
            self.next_round += 1
        return True


def _generate_rounds(ctx: StageContext, want: int) -> Replay:
    """``source=generate``: this shard's rounds (round ``r`` belongs to shard ``r % num_shards``), generated
    until the replay of every shard's stored rounds is complete. A shard whose rounds are all stored waits
    (``synth.wait_minutes``) for the others' before the replay, and so the deduplication, can finish."""
    settings, task, store = ctx.plan.settings, ctx.task, ctx.store
    sampling = ctx.plan.sampling
    assert sampling is not None
    sizes = round_schedule(settings, sampling.n)
    replay = Replay(task, want, int(settings.get("max_attempts") or want), ctx.failed_samples)
    own = store.shard("pseudo_inputs", ctx.plan.fingerprint, kind="rounds")
    mine = [r for r in range(len(sizes)) if r % store.num_shards == store.shard_index]
    store.write_meta("pseudo_inputs", ctx.plan.fingerprint, ctx.plan.describe())
    stored = store.load("pseudo_inputs", ctx.plan.fingerprint, kind="rounds")
    generated, deadline, pos = 0, None, 0
    with ctx.bar(total=want, unit="input") as bar:
        while True:
            before = min(want, len(replay.dedup.accepted))
            done = replay.advance(stored)
            bar.update(min(want, len(replay.dedup.accepted)) - before)
            bar.set_postfix(attempts=replay.attempts, failed=replay.failed)
            if done:
                break
            while pos < len(mine) and f"round-{mine[pos]}" in stored:
                pos += 1
            if pos < len(mine):
                r = mine[pos]
                msgs = [generator_messages(task, settings, r, i, sampling.seed or 0) for i in range(sizes[r])]
                seeds = [request_seed(sampling.seed, "round", r, i) for i in range(sizes[r])]
                texts = ctx.client().chat(msgs, sampling, seeds=seeds)
                rec = {"record_id": f"round-{r}", "round": r, "texts": texts}
                own.append([rec])
                stored[rec["record_id"]] = rec
                generated += 1
            else:
                deadline = deadline or time.monotonic() + 60 * ctx.wait_minutes
                if time.monotonic() > deadline:
                    missing = [r for r in range(replay.next_round, len(sizes)) if f"round-{r}" not in stored]
                    owners = sorted({r % store.num_shards for r in missing})
                    raise GenpiError(
                        f"pseudo_inputs: {store.label} waited {ctx.wait_minutes:g} min for rounds {missing[:8]} of "
                        f"shards {owners}: run every shard at once while inputs are generated (a Slurm array with "
                        "hydra.launcher.array_parallelism >= synth.num_shards), then rerun this one (its rounds are kept)"
                    )
                time.sleep(ctx.poll_seconds)
            if store.sharded:  # other shards' rounds arrive while this one works
                stored.update(store.load("pseudo_inputs", ctx.plan.fingerprint, kind="rounds"))
    ctx.stats.update(source="generate", rounds=replay.next_round, rounds_generated=generated)
    return replay


def pseudo_inputs(ctx: StageContext) -> list[Row]:
    """Stage 1: the task inputs, deduplicated (exact, then whitespace/case-normalized).

    ``source=file`` reads them from a file; ``source=templates`` draws them from the built-in task's input
    templates (:mod:`genpi.tasks.generators`) with slot values of one split. Both are cheap and
    deterministic: every shard reads the whole list itself. ``source=generate`` asks the generator for
    numbered lists in rounds of ``requests_per_round`` requests (``sampling.n`` outputs each) until
    ``num_inputs`` distinct inputs are parsed or ``max_attempts`` outputs are spent; with shards, each
    generates its own rounds (see :func:`_generate_rounds`). Every round is stored before the next, and round
    seeds are fixed, so a resumed run replays the stored rounds and continues exactly where it stopped, and
    the deduplicated list does not depend on the shard count. Outputs with nothing parseable count as failed
    attempts; a few are saved to ``failed_samples.jsonl`` beside the dataset. No input at all is an error that
    reports those numbers.
    """
    settings = ctx.plan.settings
    task = ctx.task
    dedup = Dedup()
    want = settings.get("num_inputs")
    attempts = failed = 0
    samples: list[dict[str, Any]] = []
    if settings.get("source", "file") == "file":
        from genpi.tasks.parsers import read_inputs_file

        path = task_inputs_path(task, settings)
        for text in read_inputs_file(path):
            dedup.add(text)
            if want and len(dedup.accepted) >= int(want):
                break
        ctx.stats.update(source="file", file=str(path))
    elif settings.get("source") == "templates":
        from genpi.tasks.generators import generate_examples

        split, seed = settings.get("split") or "heldout", int(ctx.plan.settings.get("seed") or 0)
        for example in generate_examples(task.name, int(want), seed=seed, split=split):
            dedup.add(example["pseudo_input"])
        ctx.stats.update(source="templates", split=split, seed=seed)
    else:
        want = int(want)
        replay = _generate_rounds(ctx, want)
        dedup, attempts, failed, samples = replay.dedup, replay.attempts, replay.failed, replay.samples
    accepted = dedup.accepted[: int(want)] if want else dedup.accepted
    ctx.stats.update(dedup.stats(), requested=want, records=len(accepted))
    if attempts:  # generator yield; a file has none
        ctx.stats.update(attempts=attempts, failed_attempts=failed, parse_yield=(attempts - failed) / attempts)
    rows = [{"pseudo_input": x, "ids": {"pseudo_inputs": input_id(x)}} for x in accepted]
    # The deduplicated list is written once, under the store's lock: the first shard to get here writes it,
    # the others find it written (every shard's replay gives the same list).
    with ctx.store.critical():
        if samples:
            path = ctx.out_dir / "failed_samples.jsonl"
            path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
            ctx.stats["failed_samples_file"] = str(path)
        if rows:
            final = ctx.store.common("pseudo_inputs", ctx.plan.fingerprint)
            have = final.load()
            final.append([{"record_id": row["ids"]["pseudo_inputs"], **row} for row in rows
                          if row["ids"]["pseudo_inputs"] not in have])
    if not accepted:
        where = f"; samples of the generator's output: {ctx.stats['failed_samples_file']}" if samples else ""
        raise GenpiError(
            f"pseudo_inputs ended with no inputs: {attempts} generator outputs, {failed} with nothing parseable, "
            f"{dedup.candidates} candidates, {dedup.exact_duplicates + dedup.normalized_duplicates} duplicates{where}. "
            "Use a stronger generator (synth.pseudo_inputs.model.name_or_path=...), more attempts "
            "(synth.pseudo_inputs.max_attempts), or synth.pseudo_inputs.source=file"
        )
    if want and len(accepted) < int(want):
        log.warning("pseudo_inputs: %d of %d inputs after %d attempts (%d unparseable); continuing with those",
                    len(accepted), want, attempts, failed)
    ctx.stats.setdefault("computed", len(rows))
    return rows


# -- stage 2: teacher and student answers ---------------------------------------------------------------
def outputs(ctx: StageContext, rows: list[Row], compute: bool = True) -> list[Row]:
    """Stage 2: the teacher (``task.teacher_messages(x)``: prompt + input) and the student
    (``task.student_messages(x)``: input alone) answer every input, both in one batched call per chunk."""
    sampling = ctx.plan.sampling
    assert sampling is not None

    def work(chunk: list[Row], rids: list[str], tick: Callable[[int], None]) -> list[dict[str, Any]]:
        msgs = [ctx.task.teacher_messages(r["pseudo_input"]) for r in chunk]
        msgs += [ctx.task.student_messages(r["pseudo_input"]) for r in chunk]
        seeds = [request_seed(sampling.seed, rid, "teacher") for rid in rids]
        seeds += [request_seed(sampling.seed, rid, "student") for rid in rids]
        texts = ctx.client().chat(msgs, sampling, seeds=seeds)
        n = len(chunk)
        return [{"teacher_output_single": texts[i], "student_output_single": texts[n + i]} for i in range(n)]

    return per_record(ctx, rows, work if compute else None)


# -- stage 3: reasons --------------------------------------------------------------------------------------
def reason_messages(task: Task, row: Row, template: str | None = None) -> list[dict[str, str]]:
    text = (template or REASON_TEMPLATE).format(
        prompt=task.prompt_text, input=row["pseudo_input"], student=row["student_output_single"],
        teacher=row["teacher_output_single"],
    )
    return [{"role": "user", "content": text}]


def reasons(ctx: StageContext, rows: list[Row], compute: bool = True) -> list[Row]:
    """Stage 3: a reasoner sees the prompt, the input, the student's answer ("bad") and the teacher's
    ("good") and explains in a few sentences why the prompt changes the answer."""
    sampling = ctx.plan.sampling
    assert sampling is not None

    def work(chunk: list[Row], rids: list[str], tick: Callable[[int], None]) -> list[dict[str, Any]]:
        msgs = [reason_messages(ctx.task, r, ctx.plan.settings.get("template")) for r in chunk]
        texts = ctx.client().chat(msgs, sampling, seeds=[request_seed(sampling.seed, rid, "reason") for rid in rids])
        return [{"reason": t} for t in texts]

    return per_record(ctx, rows, work if compute else None)


# -- stage 4: role-swapped conversations --------------------------------------------------------------------
def conversations(ctx: StageContext, rows: list[Row], compute: bool = True) -> list[Row]:
    """Stage 4: role swapping (see :mod:`genpi.synthesis.roleswap`). The conversations of one chunk advance
    together, one batched call per turn and side; the agent's first turn is the teacher's single answer
    unless ``reuse_teacher_output=false``. A chunk is stored when all its conversations have ended."""
    plan = ctx.plan
    assert plan.sampling is not None and plan.env_sampling is not None and plan.env_model is not None
    max_turns = int(plan.settings.get("max_turns") or ctx.task.max_turns)
    reuse = bool(plan.settings.get("reuse_teacher_output", True))

    def work(chunk: list[Row], rids: list[str], tick: Callable[[int], None]) -> list[dict[str, Any]]:
        agent = ctx.client()
        env = ctx.clients.get(plan.env_client or plan.client, plan.env_model)
        convs = role_swap(
            ctx.task, [r["pseudo_input"] for r in chunk], agent, env, plan.sampling, plan.env_sampling,
            max_turns=max_turns, first_turns=[r["teacher_output_single"] for r in chunk] if reuse else None,
            keys=rids, on_done=tick,
        )
        return [{"teacher_output_conv": c.turns, "ended_by": c.ended_by} for c in convs]

    rows = per_record(ctx, rows, work if compute else None)
    ctx.stats["ended_by"] = _count(r.get("ended_by") for r in rows if "conversations" in r["ids"])
    return rows


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        if v:
            out[v] = out.get(v, 0) + 1
    return out


# -- stage 5: the teacher's top-k log-probs -------------------------------------------------------------
def teacher_logits(ctx: StageContext, rows: list[Row], compute: bool = True) -> list[Row]:
    """Stage 5: the teacher's top-k log-probabilities on its own answer tokens.

    Tokenized exactly as training tokenizes the KL target (the functions of :mod:`genpi.data.tokenize`,
    with the model's own tokenizer from :func:`genpi.models.factory.load_tokenizer`):

    - the teacher prefix: ``tokenizer.apply_chat_template(task.teacher_messages(x),
      add_generation_prompt=True, tokenize=False)``, tokenized with ``add_special_tokens=False`` (the
      task's prompt as one segment whose ids are shared by every record, then the rest)
      -- ``teacher_prefix_ids``;
    - the response: ``teacher_output_single`` followed by the template's end-of-turn text (e.g.
      ``<|eot_id|>``), tokenized with ``add_special_tokens=False`` -- ``response_ids``.

    ``teacher_topk_ids[t]`` / ``teacher_topk_logprobs[t]`` (``k`` each, best first) are the teacher's
    distribution over response token ``t`` given the prefix and response tokens ``< t``; there is one row
    per response token, end-of-turn token included. Log-probs are float32 log-softmax of the raw logits
    (no temperature), rounded to 6 decimals.
    """
    k = int(ctx.plan.settings["top_k"])

    def work(chunk: list[Row], rids: list[str], tick: Callable[[int], None]) -> list[dict[str, Any]]:
        from genpi.data.tokenize import response_ids, teacher_prefix_ids, teacher_prompt
        from genpi.models.factory import load_tokenizer

        tok = _tokenizer_cache.get(json.dumps(ctx.plan.model, sort_keys=True, default=str))
        if tok is None:
            tok = load_tokenizer(ctx.plan.model)
            _tokenizer_cache[json.dumps(ctx.plan.model, sort_keys=True, default=str)] = tok
        prompt = teacher_prompt(tok, ctx.task)
        seqs, starts = [], []
        for r in chunk:
            prefix = teacher_prefix_ids(tok, ctx.task, r["pseudo_input"], prompt)
            seqs.append(prefix + response_ids(tok, r["teacher_output_single"]))
            starts.append(len(prefix))
        out = ctx.client().topk_logprobs(seqs, starts, k)
        return [{"teacher_topk_ids": ids, "teacher_topk_logprobs": [[round(v, 6) for v in row] for row in lps]}
                for ids, lps in out]

    return per_record(ctx, rows, work if compute else None)


_tokenizer_cache: dict[str, Any] = {}

STAGE_FUNCTIONS: dict[str, Callable[..., list[Row]]] = {
    "outputs": outputs, "reasons": reasons, "conversations": conversations, "teacher_logits": teacher_logits,
}


# -- where rows come from when pseudo_inputs does not run --------------------------------------------------
def rows_from_dataset(path: Path, stages: tuple[str, ...]) -> list[Row]:
    """Rows from a dataset: each stage it holds gets a content-hash record id, so later stages key on it."""
    from genpi.data.records import load_records

    rows = []
    for rec in load_records(path, columns=("pseudo_input",)):
        row: Row = {"pseudo_input": rec["pseudo_input"], "ids": {"pseudo_inputs": input_id(rec["pseudo_input"])}}
        for stage in stages[1:]:
            cols = {c: rec.get(c) for c in PRODUCES[stage] if c != "ended_by"}
            row.update(cols)
            row["ids"][stage] = stable_hash("dataset", stage, row["ids"][REQUIRES[stage]], cols)
        rows.append(row)
    return rows


def rows_from_store(store: Store, stage: str, fingerprint: str, order: list[str] | None = None) -> list[Row]:
    """Rows from an earlier run's records of ``stage`` (every column up to that stage, with their ids), from
    every shard's file; ``order`` (pseudo-input ids) puts them in the order of the pseudo-input list."""
    rows = []
    for rec in store.load(stage, fingerprint).values():
        row = {k: v for k, v in rec.items() if k != "record_id"}
        row["ids"] = dict(rec["ids"])
        rows.append(row)
    if order:
        rank = {rid: i for i, rid in enumerate(order)}
        rows.sort(key=lambda r: rank.get(r["ids"]["pseudo_inputs"], len(rank)))
    return rows


def stored_pseudo_inputs(plan: Plan, store: Store) -> list[Row]:
    """The deduplicated pseudo-input list a finished ``pseudo_inputs`` stage wrote (for a merge, which
    computes nothing): its first ``num_inputs`` entries, as asking for fewer inputs keeps a prefix of the list."""
    stage = plan.stages["pseudo_inputs"]
    rows = rows_from_store(store, "pseudo_inputs", stage.fingerprint)
    want = stage.settings.get("num_inputs")
    return rows[: int(want)] if want else rows


def owned_by(plan: Plan, row: Row) -> bool:
    """Whether this run's shard synthesizes ``row``: its pseudo input's id decides, so a record stays on one
    shard through every stage, and the split does not depend on which records exist yet."""
    return shard_of(row["ids"]["pseudo_inputs"], plan.shards.num_shards) == plan.shards.shard


def source_rows(plan: Plan, store: Store, clients: ClientPool | None,
                reports: dict[str, dict[str, Any]]) -> tuple[list[Row], int]:
    """Every row of the dataset before the later stages (pseudo inputs computed, or read from
    ``synth.from_dataset`` or the store), and the index in :data:`STAGES` of the first later stage.
    Without ``clients`` (a merge) nothing is computed: pseudo inputs come from the store."""
    if plan.source == "pseudo_inputs":
        if clients is None:
            rows = stored_pseudo_inputs(plan, store)
            if not rows:
                raise GenpiError(f"no shard has finished pseudo_inputs in {plan.out_dir}: run the shards first "
                                 "(synth.merge_only=false)")
            return rows, 1
        ctx = _context(plan, "pseudo_inputs", clients, store)
        t0 = time.perf_counter()
        rows = pseudo_inputs(ctx)
        reports["pseudo_inputs"] = {"ran": "computed", "seconds": time.perf_counter() - t0, **ctx.stats,
                                    **plan.stages["pseudo_inputs"].describe()}
        return rows, 1
    if plan.source == "dataset":
        assert plan.from_dataset is not None
        rows = rows_from_dataset(plan.from_dataset, plan.dataset_stages)
        for s in plan.dataset_stages:
            reports[s] = {"ran": "dataset", "records": len(rows), "computed": 0, "dataset": str(plan.from_dataset)}
        return rows, STAGES.index(plan.requested[0])
    prereq = plan.source.split(":", 1)[1]
    order = [r["ids"]["pseudo_inputs"] for r in stored_pseudo_inputs(plan, store)]
    rows = rows_from_store(store, prereq, plan.stages[prereq].fingerprint, order)
    for s in reversed(lineage(prereq)):
        reports[s] = {"ran": "store", "records": len(rows), "computed": 0, **plan.stages[s].describe()}
    return rows, STAGES.index(plan.requested[0])


def _context(plan: Plan, name: str, clients: ClientPool | None, store: Store) -> StageContext:
    return StageContext(plan.task, plan.stages[name], clients, store, plan.out_dir, plan.chunk_size,  # type: ignore[arg-type]
                        plan.progress, plan.failed_samples, wait_minutes=plan.shards.wait_minutes)


def run_stages(plan: Plan, store: Store, clients: ClientPool) -> tuple[list[Row], dict[str, dict[str, Any]]]:
    """Run the plan's stages in order on this shard's rows; stages not asked for still pick up their stored
    results. Pseudo inputs are the whole list on every shard (see :func:`pseudo_inputs`); the later stages fan
    out: each shard computes only the rows it owns (:func:`owned_by`).

    Returns every row (this shard's with the stages' columns; the others' as the pseudo-input stage left them)
    and a report per stage (records, computed, from store, seconds, settings, stats) for this shard's rows.
    """
    reports: dict[str, dict[str, Any]] = {}
    all_rows, start = source_rows(plan, store, clients, reports)
    rows = [r for r in all_rows if owned_by(plan, r)]
    for name in STAGES[start:]:
        compute = name in plan.requested
        ctx = _context(plan, name, clients, store)
        t0 = time.perf_counter()
        came_in = len(rows)
        rows = STAGE_FUNCTIONS[name](ctx, rows, compute=compute)
        if compute:
            reports[name] = {"ran": "computed", "seconds": time.perf_counter() - t0, **ctx.stats,
                             **plan.stages[name].describe()}
            if ctx.stats.get("records", 0) == 0 and came_in:
                raise GenpiError(f"synth stage {name!r} ended with no records ({came_in} rows came in)")
        elif ctx.stats.get("records"):
            reports[name] = {"ran": "store", **ctx.stats, **plan.stages[name].describe()}
    return all_rows, {s: reports[s] for s in STAGES if s in reports}


def collect(plan: Plan, store: Store, rows: list[Row]) -> tuple[list[Row], dict[str, dict[str, Any]]]:
    """Every stage's stored columns for ``rows`` (every shard's records; nothing computed), in ``rows``' order,
    and what was found per stage (``records``; ``ended_by`` for conversations)."""
    found: dict[str, dict[str, Any]] = {}
    start = 1 if plan.source == "pseudo_inputs" else STAGES.index(plan.requested[0])
    for name in STAGES[start:]:
        ctx = _context(plan, name, None, store)
        rows = STAGE_FUNCTIONS[name](ctx, rows, compute=False)
        found[name] = dict(ctx.stats)
    return rows, found
