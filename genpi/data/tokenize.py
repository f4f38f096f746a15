"""Records -> token ids and label masks for each loss, with the model's own chat template.

Every sequence is built from text *segments* rendered by the chat template. The whole text is tokenized at once
(``add_special_tokens=False``), as ``apply_chat_template`` and vLLM tokenize it at inference, and each token's
characters (its offsets) say which segment, hence which label, it belongs to; so that

- label spans are exact: a segment is either trained on or not, never "roughly", and a token that would be half label,
  half not is an error naming the template, not a silent shift;
- the ids are those the model meets at inference: tokenizing segment by segment would not be (a SentencePiece
  tokenizer adds a word-start piece at the start of every piece of text, a BPE merges across the cut);
- the teacher's prompt is a token prefix whose ids are the same in every example (the prefix cache of the training
  module relies on this), checked per example;
- a response has the same ids after the teacher's prompt+input as after the student's input, so the
  KL positions align one to one.

:func:`check_chat_template` refuses, in one line naming the template and what differs, a template whose rendering of
earlier turns changes when turns are added (a system prompt moved to the last user turn, a date that changes).
"""

from __future__ import annotations

import hashlib
import json
import logging
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from genpi.tasks.base import Message, Task
from genpi.utils.constants import IGNORE  # noqa: F401  (re-exported: older imports name it here)
from genpi.utils.errors import GenpiError

log = logging.getLogger(__name__)

_SENTINEL = "\u2063GENPI_INPUT\u2063"

PG_INSTRUCTION = (
    "Below are a task input, an answer written without instructions and an answer written with them. "
    "Write the instructions that turn the first answer into the second, then explain why.\n\n"
    "### Input\n{input}\n\n### Answer without instructions\n{student}\n\n### Answer with instructions\n{teacher}"
)
PG_REASON_HEADER = "\n\n### Why the instructions change the answer\n"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of a tokenizer's vocabulary and special tokens: stored top-k token ids mean the same tokens only
    under the tokenizer with the same fingerprint."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]
    blob = json.dumps([vocab, special], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def render(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_segments(tokenizer, messages: list[Message], label_from: int = 0) -> list[tuple[str, bool]]:
    """Split the rendered chat into ``(text, is_label)`` segments.

    Assistant messages at index ``>= label_from`` are labels: their content and the template's
    end-of-turn text, not the role header. Requires a prefix-stable chat template (rendering
    ``messages[:k]`` is a prefix of rendering ``messages[:k+1]``), as all common templates are.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, msg in enumerate(messages):
        if msg["role"] == "assistant" and k >= label_from:
            header_end = render(tokenizer, messages[:k], add_generation_prompt=True)
            full = render(tokenizer, messages[: k + 1])
            _check_prefix(tokenizer, done, header_end, messages[:k])
            _check_prefix(tokenizer, header_end, full, messages[: k + 1])
            if len(header_end) > len(done):
                segments.append((header_end[len(done) :], False))
            turn = full[len(header_end) :]
            cut = _end_of_turn(tokenizer, turn, msg["content"])
            segments.append((turn[:cut], True))
            if cut < len(turn):
                segments.append((turn[cut:], False))
            done = full
        else:
            full = render(tokenizer, messages[: k + 1])
            _check_prefix(tokenizer, done, full, messages[: k + 1])
            segments.append((full[len(done) :], False))
            done = full
    return segments


def _end_of_turn(tokenizer, turn: str, content: str) -> int:
    """Where an assistant turn's label ends in its rendered text ``turn``: just after the first special token that
    follows the content (``<|eot_id|>``, ``<|im_end|>``, ``</s>``), so that what a template writes after it (ChatML's
    newline) is context, not something the model learns to generate after it stopped; the whole turn when no
    special token follows."""
    start = 0
    for needle in (content, content.strip()):  # templates may trim the content
        at = turn.rfind(needle) if needle else -1
        if at >= 0:
            start = at + len(needle)
            break
    ends = [(turn.find(t, start), t) for t in getattr(tokenizer, "all_special_tokens", []) if t]
    ends = [(i, t) for i, t in ends if i >= 0]
    if not ends:
        return len(turn)
    i, token = min(ends, key=lambda e: (e[0], -len(e[1])))
    return i + len(token)


def template_name(tokenizer) -> str:
    """How errors name a tokenizer's chat template: the model folder's (or hub repo's) last name."""
    name = str(getattr(tokenizer, "name_or_path", "") or "").rstrip("/")
    return f"the chat template of {name.rsplit('/', 1)[-1]}" if name else "the model's chat template"


def _difference(shorter: str, longer: str, width: int = 40) -> tuple[str, str]:
    """The two texts around their first differing character (for one-line errors)."""
    i = next((k for k, (a, b) in enumerate(zip(shorter, longer)) if a != b), min(len(shorter), len(longer)))
    start = max(0, i - width // 4)
    return shorter[start : i + width], longer[start : i + width]


def _check_prefix(tokenizer, prefix: str, text: str, messages: list[Message]) -> None:
    if not text.startswith(prefix):
        was, now = _difference(prefix, text)
        raise GenpiError(
            f"{template_name(tokenizer)} is not prefix-stable: with {len(messages)} turns it renders {now!r} where "
            f"fewer turns rendered {was!r} (a system prompt or date that moves or changes as turns are added); set "
            "model.chat_template to a template that keeps earlier turns as they were"
        )


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Ids of ``text`` (no added BOS/EOS) and each token's ``(start, end)`` characters; ``None`` offsets for a
    tokenizer that cannot give them (a slow, Python-only tokenizer)."""
    if not text:
        return [], []
    if not getattr(tokenizer, "is_fast", False):
        return encode(tokenizer, text), None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids of the joined ``(text, is_label)`` segments, tokenized as one text, and their labels (the ids on
    tokens whose characters lie in a label segment, ``IGNORE`` elsewhere).

    A token whose characters reach into a segment of the other kind is a :class:`GenpiError`: its label would be
    neither right nor wrong, and the template should end a turn where the tokenizer cannot merge across it.
    """
    segments = [(t, lab) for t, lab in segments if t]
    text = "".join(t for t, _ in segments)
    ids, offsets = encode_with_offsets(tokenizer, text)
    if not ids:
        return [], []
    if offsets is None:
        return _encode_segments_one_by_one(tokenizer, segments, ids)
    ends = list(accumulate(len(t) for t, _ in segments))
    labels: list[int] = []
    for tid, (start, end) in zip(ids, offsets):
        first = min(bisect_right(ends, start), len(segments) - 1)  # the segment holding the token's first character
        last = min(bisect_right(ends, max(start, end - 1)), len(segments) - 1)
        is_label = segments[first][1]
        if any(segments[k][1] != is_label for k in range(first + 1, last + 1)):
            cut = ends[first]
            raise GenpiError(
                f"{template_name(tokenizer)}: the token {text[start:end]!r} spans the end of a "
                f"{'label' if is_label else 'context'} part ({text[max(0, cut - 20):cut]!r}) and the start of the next "
                f"({text[cut:cut + 20]!r}), so its label cannot be exact; set model.chat_template so that a special "
                "token or a separator the tokenizer cannot merge across ends each turn"
            )
        labels.append(tid if is_label else IGNORE)
    return ids, labels


def _encode_segments_one_by_one(tokenizer, segments: list[tuple[str, bool]],
                                 whole: list[int]) -> tuple[list[int], list[int]]:
    """For tokenizers without offsets: segment by segment, accepted only when that equals the whole text's ids."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_label in segments:
        seg = encode(tokenizer, text)
        ids += seg
        labels += seg if is_label else [IGNORE] * len(seg)
    if ids != whole:
        raise GenpiError(f"{template_name(tokenizer)}: tokenizing turn by turn gives other ids than tokenizing the "
                         "whole chat, and this (slow) tokenizer gives no offsets to split it exactly; load the model's "
                         "fast tokenizer (tokenizer.json)")
    return ids, labels


def encode_chat(tokenizer, messages: list[Message], label_from: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of a chat and its labels: the assistant turns at index ``>= label_from`` (see
    :func:`chat_segments`), ``IGNORE`` everywhere else."""
    return encode_segments(tokenizer, chat_segments(tokenizer, messages, label_from))


def truncate_text(tokenizer, text: str, max_tokens: int | None) -> tuple[str, bool]:
    """Cut ``text`` to at most ``max_tokens`` tokens; returns the text and whether it was cut."""
    if max_tokens is None:
        return text, False
    ids = encode(tokenizer, text)
    if len(ids) <= max_tokens:
        return text, False
    return tokenizer.decode(ids[:max_tokens]), True


@dataclass
class TeacherPrompt:
    """The teacher's prompt as token ids shared by every teacher sequence."""

    ids: list[int]
    text: str


# Inputs whose first characters a tokenizer may merge with the prompt's last ones (spaces, newlines, digits,
# punctuation, letters, non-ASCII): the shared prompt prefix ends on a token boundary that none of them moves.
_PROBE_INPUTS = ("x", "Hello world", " x", "  x", "\nx", "\n\nx", "\tx", "1", "42", ".", ":", "-", "(", "'s",
                 "\u00e9t\u00e9", "\u65e5\u672c", "`ls`")


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def teacher_prompt(tokenizer, task: Task) -> TeacherPrompt:
    """The teacher's shared prompt: the rendered text before the input and its ids, cut back to the last token
    boundary that no input can move (a BPE may merge the prompt's closing newline with an input's first one).

    Each teacher sequence is checked to start with these ids (:func:`teacher_prefix_ids`).
    """
    text = render(tokenizer, task.teacher_messages(_SENTINEL), add_generation_prompt=True)
    cut = text.find(_SENTINEL)
    if cut < 0:
        raise GenpiError("the chat template dropped the task input; check task.teacher_template and the model's template")
    ids, offsets = encode_with_offsets(tokenizer, text[:cut])
    keep = len(ids)
    for probe in _PROBE_INPUTS:
        view = render(tokenizer, task.teacher_messages(probe), add_generation_prompt=True)
        if not view.startswith(text[:cut]):
            raise GenpiError(f"{template_name(tokenizer)} renders the teacher's prompt differently for input {probe!r}: "
                             "the prompt is not a text prefix of the teacher's view; check task.teacher_template")
        keep = min(keep, _common_prefix_len(ids, encode(tokenizer, view)))
    if keep == 0:
        raise GenpiError(f"{template_name(tokenizer)}: no token of the teacher's prompt is a prefix of every teacher "
                         "view, so the prompt cannot be shared; check task.teacher_template and model.chat_template")
    if keep < len(ids):
        dropped = tokenizer.decode(ids[keep:])
        log.info("the teacher's prompt stops %d token(s) early (%r): inputs may merge with them", len(ids) - keep,
                 dropped)
    end = offsets[keep - 1][1] if offsets else len(tokenizer.decode(ids[:keep]))
    return TeacherPrompt(ids=ids[:keep], text=text[:end])


def teacher_prefix_ids(tokenizer, task: Task, pseudo_input: str, prompt: TeacherPrompt | None = None) -> list[int]:
    """Ids of the teacher's view up to its answer, tokenized as one text; they start with the shared prompt ids."""
    prompt = prompt or teacher_prompt(tokenizer, task)
    text = render(tokenizer, task.teacher_messages(pseudo_input), add_generation_prompt=True)
    if not text.startswith(prompt.text):
        raise GenpiError("the teacher prompt is not a text prefix of the teacher input; check task.teacher_template")
    ids = encode(tokenizer, text)
    _check_prompt_ids(tokenizer, prompt, ids, pseudo_input)
    return ids


def _check_prompt_ids(tokenizer, prompt: TeacherPrompt, ids: list[int], pseudo_input: str) -> None:
    if ids[: len(prompt.ids)] != prompt.ids:
        n = _common_prefix_len(prompt.ids, ids)
        raise GenpiError(
            f"{template_name(tokenizer)}: the teacher's prompt is not a token prefix of its view of input "
            f"{pseudo_input[:40]!r} (the tokenizer merges the prompt's {tokenizer.decode(prompt.ids[n:])!r} with the "
            "input's start); start the input with other characters or end task.teacher_template's text before "
            "{input} with a separator"
        )


def student_prefix_ids(tokenizer, task: Task, pseudo_input: str) -> list[int]:
    return encode(tokenizer, render(tokenizer, task.student_messages(pseudo_input), add_generation_prompt=True))


def response_ids(tokenizer, answer: str) -> list[int]:
    """Ids of an agent answer as the chat template closes it (content + end-of-turn text), as they follow the
    generation prompt in the whole chat's ids."""
    ids, labels = encode_chat(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": answer}])
    return [i for i, lab in zip(ids, labels) if lab != IGNORE]


def _dated_renders(tokenizer, messages: list[Message]) -> tuple[str, str] | None:
    """The chat rendered as on two different days, when the template reads the clock (``strftime_now``)."""
    from datetime import datetime

    from transformers.utils import chat_template_utils

    renders = []
    real = chat_template_utils.datetime
    for day in (datetime(2001, 2, 3, 4, 5, 6), datetime(2011, 12, 13, 14, 15, 16)):
        class _Frozen(datetime):  # the template's strftime_now calls datetime.now() from that module
            @classmethod
            def now(cls, tz=None, _day=day):
                return _day

        chat_template_utils.datetime = _Frozen
        try:
            renders.append(render(tokenizer, messages, add_generation_prompt=True))
        finally:
            chat_template_utils.datetime = real
    return (renders[0], renders[1]) if renders[0] != renders[1] else None


def check_chat_template(tokenizer, task: Task) -> None:
    """Refuse, in one line naming the template and what differs, a chat template genpi cannot train on exactly:

    - one that reads today's date (``strftime_now``): the teacher's prompt and every sequence would change from one
      day to the next, between synthesis, training and serving;
    - one that is not prefix-stable on the conversations genpi builds (the teacher's and the student's views, then
      assistant and user turns): earlier turns rendered differently once later turns are added (a system prompt
      moved to the last user turn, a default system prompt that depends on what follows).

    A default system prompt that every view gets alike is accepted: it is part of both views.
    """
    probe = "How many files are in /tmp?"
    turns: list[Message] = [{"role": "assistant", "content": "Think: I count them.\nAct: bash"},
                            {"role": "user", "content": "The output of the OS:\n3"},
                            {"role": "assistant", "content": "Act: answer(3)"}]
    dated = _dated_renders(tokenizer, task.student_messages(probe)) or _dated_renders(
        tokenizer, task.teacher_messages(probe))
    if dated:
        one, other = _difference(*dated)
        raise GenpiError(f"{template_name(tokenizer)} inserts today's date (strftime_now): it renders {one!r} on one day "
                         f"and {other!r} on another; set model.chat_template to the template with a fixed date")
    for head in (task.teacher_messages(probe), task.student_messages(probe)):
        chat_segments(tokenizer, head + turns, label_from=len(head))


@dataclass
class Limits:
    """Per-part token limits; ``None`` means no limit. PG targets are never cut unless asked."""

    input_tokens: int | None = 512
    response_tokens: int | None = 512
    conversation_tokens: int | None = 2048
    pg_answer_tokens: int | None = 256
    pg_target_tokens: int | None = None


@dataclass
class TruncationReport:
    counts: Counter = field(default_factory=Counter)
    total: int = 0

    def note(self, part: str, cut: bool) -> None:
        if cut:
            self.counts[part] += 1

    def log(self, where: str) -> None:
        if self.counts:
            parts = ", ".join(f"{k}: {v}/{self.total}" for k, v in sorted(self.counts.items()))
            log.warning("%s: truncated to the data.max_* limits (%s)", where, parts)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


class RecordEncoder:
    """Builds the per-loss token sequences of one record."""

    def __init__(self, tokenizer, task: Task, limits: Limits | None = None, pg_reason: bool = True,
                 sft_source: str = "conversation"):
        if sft_source not in ("conversation", "single"):
            raise GenpiError(f"loss.sft.source={sft_source!r}: choose 'conversation' or 'single'")
        self.sft_source = sft_source
        self.tok = tokenizer
        self.task = task
        self.limits = limits or Limits()
        self.pg_reason = pg_reason
        check_chat_template(tokenizer, task)
        self.prompt = teacher_prompt(tokenizer, task)
        self.report = TruncationReport()

    # -- SFT: student input, teacher conversation ------------------------------------
    def sft(self, rec: dict[str, Any], with_prompt: bool = False) -> dict[str, list[int]]:
        x, _ = self._input(rec)
        conv = list(rec["teacher_output_conv"]) if self.sft_source == "conversation" else []
        conv = conv or [{"role": "assistant", "content": rec["teacher_output_single"]}]
        head = self.task.teacher_messages(x) if with_prompt else self.task.student_messages(x)
        segs = chat_segments(self.tok, head + conv, label_from=len(head))
        ids, labels = self._join(segs, skip_text=self.prompt.text if with_prompt else None)
        limit = self.limits.conversation_tokens
        if limit is not None and with_prompt:
            limit += len(self.prompt.ids)
        if limit is not None and len(ids) > limit:
            self.report.note("sft_conversation", True)
            ids, labels = ids[:limit], labels[:limit]
        return {"input_ids": ids, "labels": labels}

    # -- PG: (input, student answer, teacher answer) -> prompt [+ reason] ----------------
    def pg(self, rec: dict[str, Any]) -> dict[str, list[int]]:
        x, _ = self._input(rec)
        student, cut_s = truncate_text(self.tok, rec["student_output_single"], self.limits.pg_answer_tokens)
        teacher, cut_t = truncate_text(self.tok, rec["teacher_output_single"], self.limits.pg_answer_tokens)
        self.report.note("pg_student_answer", cut_s)
        self.report.note("pg_teacher_answer", cut_t)
        target = rec.get("context") or self.task.prompt_text
        if self.pg_reason and rec.get("reason"):
            target = target + PG_REASON_HEADER + rec["reason"]
        target, cut = truncate_text(self.tok, target, self.limits.pg_target_tokens)
        self.report.note("pg_target", cut)
        msgs = [
            {"role": "user", "content": PG_INSTRUCTION.format(input=x, student=student, teacher=teacher)},
            {"role": "assistant", "content": target},
        ]
        ids, labels = self._join(chat_segments(self.tok, msgs))
        return {"input_ids": ids, "labels": labels}

    # -- KL: the teacher's single answer after both views ------------------------------
    def kl(self, rec: dict[str, Any]) -> dict[str, Any]:
        x, _ = self._input(rec)
        resp = response_ids(self.tok, rec["teacher_output_single"])
        if self.limits.response_tokens is not None and len(resp) > self.limits.response_tokens:
            self.report.note("kl_response", True)
            resp = resp[: self.limits.response_tokens]
        out: dict[str, Any] = {
            "teacher_input_ids": teacher_prefix_ids(self.tok, self.task, x, self.prompt) + resp,
            "student_input_ids": student_prefix_ids(self.tok, self.task, x) + resp,
            "response_len": len(resp),
        }
        if rec.get("teacher_topk_ids") is not None:
            ids, lps = rec["teacher_topk_ids"], rec["teacher_topk_logprobs"]
            if len(ids) < len(resp):
                raise GenpiError(
                    f"record {rec.get('record_id', '?')}: {len(ids)} stored teacher top-k rows for {len(resp)} response "
                    "tokens; rerun the synth teacher_logits stage with this model's tokenizer"
                )
            out["teacher_topk_ids"] = ids[: len(resp)]
            out["teacher_topk_logprobs"] = lps[: len(resp)]
        return out

    # -- on-policy over several turns: the environment's turns between the agent's ---------
    def kl_conversation(self, rec: dict[str, Any], turns: int) -> dict[str, list[list[int]]]:
        """The token ids that come between the agent turns of the record's conversation, in each view:
        ``env_student[k]`` (and ``env_teacher[k]``) runs from just after agent turn ``k + 1``'s end-of-turn token
        to just before agent turn ``k + 2``'s content: the environment's turn that follows it and the next agent
        header, as the chat template renders them inside the whole conversation.

        On-policy sampling over several turns (``loss.kl.sampling.turns``) puts the student's sampled turns
        between them: the view of the KL example (the input up to its generation prompt), sampled turn 1,
        ``env[0]``, sampled turn 2, ... At most ``turns - 1`` are kept, and only while their total stays within
        ``data.limits.conversation_tokens``; a conversation is read as far as it alternates agent, environment,
        agent. A record without a conversation, or with one agent turn, has none (one sampled turn).
        """
        conv = alternating_agent_turns(rec.get("teacher_output_conv") or [], turns)
        n_agent = (len(conv) + 1) // 2
        if n_agent < 2:
            return {"env_student": [], "env_teacher": []}
        x, _ = truncate_text(self.tok, rec["pseudo_input"], self.limits.input_tokens)
        out: dict[str, list[list[int]]] = {}
        for side, head, prefix in (
            ("student", self.task.student_messages(x), student_prefix_ids(self.tok, self.task, x)),
            ("teacher", self.task.teacher_messages(x), teacher_prefix_ids(self.tok, self.task, x, self.prompt)),
        ):
            ids, labels = encode_chat(self.tok, head + conv, label_from=len(head))
            runs = _label_runs(labels)
            if len(runs) != n_agent or ids[: runs[0][0]] != prefix:
                raise GenpiError(
                    f"record {rec.get('record_id', '?')}: {template_name(self.tok)} renders the {side}'s view "
                    f"differently inside the conversation ({len(runs)} agent turns found of {n_agent}, or another "
                    "start than the view alone), so sampled turns cannot be placed exactly; set "
                    "loss.kl.sampling.turns=1 or model.chat_template to a template that keeps earlier turns as they were"
                )
            out[f"env_{side}"] = [ids[end:start] for (_, end), (start, _) in zip(runs, runs[1:])]
        limit = self.limits.conversation_tokens
        if limit is not None:
            total, keep = 0, 0
            for piece in out["env_student"]:
                total += len(piece)
                if total > limit:
                    break
                keep += 1
            self.report.note("kl_conversation", keep < len(out["env_student"]))
            out = {k: v[:keep] for k, v in out.items()}
        if out["env_teacher"] == out["env_student"]:  # the usual case: one list in memory for both views
            out["env_teacher"] = out["env_student"]
        return out

    # -- helpers ----------------------------------------------------------------------
    def _input(self, rec: dict[str, Any]) -> tuple[str, bool]:
        x, cut = truncate_text(self.tok, rec["pseudo_input"], self.limits.input_tokens)
        self.report.note("input", cut)
        return x, cut

    def _join(self, segs: list[tuple[str, bool]], skip_text: str | None = None) -> tuple[list[int], list[int]]:
        """Ids and labels of the segments; with ``skip_text`` (the teacher's prompt), checked to start with the
        shared prompt ids, which the training module's prefix cache relies on."""
        ids, labels = encode_segments(self.tok, segs)
        if skip_text:
            text = "".join(t for t, _ in segs)
            if not text.startswith(skip_text):
                raise GenpiError(f"{template_name(self.tok)} renders the teacher's prompt differently inside a "
                                 "conversation: it is not a text prefix of it")
            _check_prompt_ids(self.tok, self.prompt, ids, text[len(skip_text) : len(skip_text) + 40])
        return ids, labels


def alternating_agent_turns(conv: list[Message], turns: int) -> list[Message]:
    """The conversation's first ``turns`` agent turns with the environment's turns between them: read while the
    roles alternate assistant, user, assistant, ...; ends on an agent turn (a trailing environment turn has no
    agent turn after it to sample)."""
    out: list[Message] = []
    for msg in conv:
        want = "assistant" if len(out) % 2 == 0 else "user"
        if msg.get("role") != want or len(out) >= 2 * turns - 1:
            break
        out.append({"role": msg["role"], "content": msg["content"]})
    return out if len(out) % 2 == 1 else out[:-1]


def _label_runs(labels: list[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of labelled positions."""
    runs: list[tuple[int, int]] = []
    for i, lab in enumerate(labels):
        if lab == IGNORE:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def keep_prompt(seed: int, index: int, drop_prob: float) -> bool:
    """Deterministic per-record coin for the with-prompt baseline: keep the prompt with prob 1 - drop_prob."""
    h = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 >= drop_prob
