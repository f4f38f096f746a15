"""Records -> token ids and label masks for each loss, with the model's own chat template.

Every sequence is built from text *segments* rendered by the chat template and tokenized one by
one (``add_special_tokens=False``), so that

- label spans are exact: a segment is either trained on or not, never "roughly";
- the teacher's prompt is one segment whose ids are the same in every example (the prefix cache
  of the training module relies on this);
- a response has the same ids after the teacher's prompt+input as after the student's input, so the
  KL positions align one to one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from genpi.constants import IGNORE  # noqa: F401  (re-exported: older imports name it here)
from genpi.errors import GenpiError
from genpi.tasks.base import Message, Task

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
            _check_prefix(done, header_end, messages[:k])
            _check_prefix(header_end, full, messages[: k + 1])
            if len(header_end) > len(done):
                segments.append((header_end[len(done) :], False))
            segments.append((full[len(header_end) :], True))
            done = full
        else:
            full = render(tokenizer, messages[: k + 1])
            _check_prefix(done, full, messages[: k + 1])
            segments.append((full[len(done) :], False))
            done = full
    return segments


def _check_prefix(prefix: str, text: str, messages: list[Message]) -> None:
    if not text.startswith(prefix):
        raise GenpiError(
            f"the model's chat template is not prefix-stable at turn {len(messages)} "
            "(rendering fewer turns is not a prefix of rendering more): set model.chat_template to a template that is"
        )


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids of ``(text, is_label)`` segments and their labels (the ids, or ``IGNORE`` off the labels)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_label in segments:
        seg = encode(tokenizer, text)
        ids += seg
        labels += seg if is_label else [IGNORE] * len(seg)
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


def teacher_prompt(tokenizer, task: Task) -> TeacherPrompt:
    """Render the teacher's messages around a sentinel input and keep the text before it."""
    text = render(tokenizer, task.teacher_messages(_SENTINEL), add_generation_prompt=True)
    cut = text.find(_SENTINEL)
    if cut < 0:
        raise GenpiError("the chat template dropped the task input; check task.teacher_template and the model's template")
    prefix = text[:cut]
    return TeacherPrompt(ids=encode(tokenizer, prefix), text=prefix)


def teacher_prefix_ids(tokenizer, task: Task, pseudo_input: str, prompt: TeacherPrompt | None = None) -> list[int]:
    """Ids of the teacher's view up to its answer: the shared prompt ids, then the input part."""
    prompt = prompt or teacher_prompt(tokenizer, task)
    text = render(tokenizer, task.teacher_messages(pseudo_input), add_generation_prompt=True)
    if not text.startswith(prompt.text):
        raise GenpiError("the teacher prompt is not a text prefix of the teacher input; check task.teacher_template")
    return prompt.ids + encode(tokenizer, text[len(prompt.text) :])


def student_prefix_ids(tokenizer, task: Task, pseudo_input: str) -> list[int]:
    return encode(tokenizer, render(tokenizer, task.student_messages(pseudo_input), add_generation_prompt=True))


def response_ids(tokenizer, answer: str) -> list[int]:
    """Ids of an agent answer as the chat template closes it (content + end-of-turn text)."""
    segs = chat_segments(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": answer}])
    return encode(tokenizer, "".join(t for t, is_label in segs if is_label))


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

    # -- helpers ----------------------------------------------------------------------
    def _input(self, rec: dict[str, Any]) -> tuple[str, bool]:
        x, cut = truncate_text(self.tok, rec["pseudo_input"], self.limits.input_tokens)
        self.report.note("input", cut)
        return x, cut

    def _join(self, segs: list[tuple[str, bool]], skip_text: str | None = None) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        if skip_text:
            # The prompt is its own segment so that its ids match the teacher prompt ids exactly.
            text = "".join(t for t, _ in segs)
            assert text.startswith(skip_text)
            ids = list(self.prompt.ids)
            labels = [IGNORE] * len(ids)
            rest, consumed = [], len(skip_text)
            for t, lab in segs:
                if consumed >= len(t):
                    consumed -= len(t)
                    continue
                rest.append((t[consumed:], lab))
                consumed = 0
            segs = rest
        more_ids, more_labels = encode_segments(self.tok, segs)
        return ids + more_ids, labels + more_labels


def keep_prompt(seed: int, index: int, drop_prob: float) -> bool:
    """Deterministic per-record coin for the with-prompt baseline: keep the prompt with prob 1 - drop_prob."""
    h = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 >= drop_prob
