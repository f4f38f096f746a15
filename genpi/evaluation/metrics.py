"""Evaluation metrics: divergence to the teacher, agreement with its greedy answers, the gap closed.

Three models are compared on the same held-out inputs:

- ``teacher``: the base model with the prompt (the reference);
- ``student``: the base model with the adapter, without the prompt;
- ``floor``: the base model without the prompt and without the adapter (what dropping the prompt costs
  when nothing is internalized).

Text agreement works on whitespace-separated words, so it does not depend on a model's tokenizer.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from genpi import losses

MODELS = ("teacher", "student", "floor")
KL_KINDS = {"kl_forward": "forward_kl", "kl_reverse": "reverse_kl"}
AGREEMENT = ("exact_match", "token_f1", "rouge_l")


# -- text agreement --------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return text.split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two answers are the same text (surrounding whitespace aside), else 0.0."""
    return float(prediction.strip() == reference.strip())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the multiset overlap of words (SQuAD-style, without its English-specific normalization).

    Two empty answers agree (1.0); an empty answer against a non-empty one scores 0.0.
    """
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) on words: the longest common subsequence over both lengths.

    Two empty answers agree (1.0); an empty answer against a non-empty one scores 0.0.
    """
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def agreement(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per-example exact match, token F1 and ROUGE-L of ``predictions`` against ``references``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return {
        "exact_match": [exact_match(p, r) for p, r in zip(predictions, references)],
        "token_f1": [token_f1(p, r) for p, r in zip(predictions, references)],
        "rouge_l": [rouge_l(p, r) for p, r in zip(predictions, references)],
    }


def format_flags(answers: Sequence[str], check: Callable[[str], bool]) -> list[float]:
    """1.0 per answer that passes the task's format check, else 0.0."""
    return [float(bool(check(a))) for a in answers]


def mean(values: Iterable[float]) -> float | None:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else None


# -- the gap closed ----------------------------------------------------------------------------
def gap_closed(floor: float | None, student: float | None, teacher: float | None, eps: float = 1e-9) -> float | None:
    """Share of the floor-to-teacher gap the student closes: ``(floor - student) / (floor - teacher)``.

    The same formula serves metrics where higher is better (agreement, format rate) and where lower is
    better (KL, whose teacher value is 0 by definition: then it reads ``1 - student / floor``): the
    ratio of two differences does not depend on the direction. 1 = the student matches the teacher,
    0 = no better than the floor, < 0 = worse than the floor, > 1 = past the teacher; the sign is kept,
    never clipped. ``None`` when a value is missing or the floor already equals the teacher (there is no
    gap to close, and any ratio would be noise).
    """
    if floor is None or student is None or teacher is None:
        return None
    denom = floor - teacher
    if not math.isfinite(denom) or abs(denom) <= eps:
        return None
    return (floor - student) / denom


# -- divergence to the teacher, per example ----------------------------------------------------
def split_rows(rows: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Split ``[N, ...]`` row-major response positions back into examples of ``lengths`` rows each."""
    if sum(lengths) != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows for response lengths summing to {sum(lengths)}")
    return list(torch.split(rows, list(lengths)))


@torch.no_grad()
def divergence_per_example(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, lengths: Sequence[int],
                           lm_head_weight: torch.Tensor, lm_head_bias: torch.Tensor | None = None,
                           kinds: dict[str, str] | None = None, chunk_size: int = 256) -> dict[str, list[float]]:
    """Mean per-token divergence of each example, for each kind.

    Args:
        student_hidden, teacher_hidden: ``[N, H]`` final hidden states at the response positions, aligned
            by row, examples one after another (``lengths`` rows each).
        lm_head_weight: ``[V, H]``; lm_head_bias: ``[V]`` or None.
        kinds: output name -> ``losses.distill_loss`` kind; default ``{kl_forward: forward_kl, kl_reverse: reverse_kl}``.
        chunk_size: at most this many positions' logits ``[chunk, V]`` are held at once.
    Returns:
        output name -> one float per example (0.0 for an example with no response token).
    """
    kinds = kinds or KL_KINDS
    out: dict[str, list[float]] = {name: [] for name in kinds}
    for s_rows, t_rows in zip(split_rows(student_hidden, lengths), split_rows(teacher_hidden, lengths)):
        sums = dict.fromkeys(kinds, 0.0)
        n = s_rows.shape[0]
        for start in range(0, n, chunk_size):
            s_logits = F.linear(s_rows[start : start + chunk_size], lm_head_weight, lm_head_bias)
            t_logits = F.linear(t_rows[start : start + chunk_size], lm_head_weight, lm_head_bias)
            mask = torch.ones(s_logits.shape[0], dtype=torch.bool, device=s_logits.device)
            for name, kind in kinds.items():
                # distill_loss is a token mean; times the chunk's length it adds up to the example's sum.
                sums[name] += float(losses.distill_loss(s_logits, t_logits, mask, kind=kind)) * s_logits.shape[0]
        for name in kinds:
            out[name].append(sums[name] / n if n else 0.0)
    return out


@torch.no_grad()
def kl_to_teacher(module, batches: Iterable[dict[str, Any]], chunk_size: int = 256) -> dict[str, Any]:
    """Per-example forward and reverse KL to the teacher of the student (adapter on) and the floor (adapter off).

    Args:
        module: a :class:`genpi.module.GenPIModule` around a ``PeftModel`` (the teacher is the base with
            the adapter off, seeing the prompt; its prefix cache is reused).
        batches: collated batches of :class:`genpi.data.datamodule.Collator`, each with a ``kl`` part:
            ``student_input_ids [B, Ts]``, ``teacher_input_ids [B, Tt]``, their attention and response masks.
    Returns:
        ``{"tokens": [n_i], "student": {"kl_forward": [...], "kl_reverse": [...]}, "floor": {...}}``, one
        value per example in batch order. The teacher's own KL is 0 by definition and not computed.
    """
    weight, bias = module.lm_head()
    out: dict[str, Any] = {"tokens": [], "student": {k: [] for k in KL_KINDS}, "floor": {k: [] for k in KL_KINDS}}
    for batch in batches:
        kl = batch["kl"]
        lengths = [int(n) for n in kl["student_response_mask"].sum(dim=1)]
        teacher_h = module.teacher_hidden(kl)
        for name in ("student", "floor"):
            ctx = contextlib.nullcontext() if name == "student" else module.adapter_off()
            with ctx:
                h = module.hidden(kl["student_input_ids"], kl["student_attention_mask"])[kl["student_response_mask"]]
            per = divergence_per_example(h, teacher_h, lengths, weight, bias, chunk_size=chunk_size)
            for k, v in per.items():
                out[name][k].extend(v)
        out["tokens"].extend(lengths)
    return out


def token_weighted_mean(values: Sequence[float], tokens: Sequence[int]) -> float | None:
    """Mean over all response tokens (an example of n tokens counts n times), as training's ``val/kl``."""
    total = sum(tokens)
    if not total:
        return None
    return sum(v * n for v, n in zip(values, tokens)) / total


def summarize(per_example: dict[str, dict[str, list[float]]], kl: dict[str, Any] | None,
              has_format: bool) -> dict[str, dict[str, float | None]]:
    """Model -> metric -> mean, plus ``gap_closed`` -> metric -> share.

    Args:
        per_example: model -> ``exact_match`` / ``token_f1`` / ``rouge_l`` / ``format_ok`` -> one value per example.
        kl: the output of :func:`kl_to_teacher`, or None when KL was not measured.
    """
    table: dict[str, dict[str, float | None]] = {m: {} for m in MODELS}
    for m in MODELS:
        if kl is not None:
            for k in KL_KINDS:
                table[m][k] = 0.0 if m == "teacher" else token_weighted_mean(kl[m][k], kl["tokens"])
        for k in AGREEMENT:
            table[m][k] = mean(per_example[m][k])
        if has_format:
            table[m]["format_rate"] = mean(per_example[m]["format_ok"])
    table["gap_closed"] = {k: gap_closed(table["floor"][k], table["student"][k], table["teacher"][k])
                           for k in table["teacher"]}
    return table
