"""Loss functions of GenPI as pure tensor functions (no framework imports beyond torch).

Directions are named in words: ``forward_kl`` is KL(teacher || student), ``reverse_kl`` is
KL(student || teacher), ``jsd`` the generalized Jensen-Shannon divergence with teacher weight ``beta``.
All divergences are computed in float32 and averaged over unmasked tokens; the teacher is detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KINDS = ("forward_kl", "reverse_kl", "jsd")


def _token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, beta: float,
                      temperature: float) -> torch.Tensor:
    """Per-row divergence ``[N]`` from logits ``[N, V]``."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; choose one of {KINDS}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if kind == "forward_kl":
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse_kl":
        return (s.exp() * (s - t)).sum(-1)
    # Generalized JSD: beta*KL(t||m) + (1-beta)*KL(s||m), m = beta*t + (1-beta)*s. At beta in {0, 1} the
    # mixture equals one side and the divergence is identically 0; return that exactly (log 0 is avoided).
    if beta <= 0.0 or beta >= 1.0:
        return torch.zeros(s.shape[:-1], device=s.device)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                 kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 scale_by_temperature_sq: bool = False) -> torch.Tensor:
    """Mean token divergence between teacher and student over unmasked positions.

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]``.
        teacher_logits: same shape; no gradient reaches it.
        mask: ``[B, T]`` or ``[N]``, true (or 1) where the token counts.
        kind: ``forward_kl`` = KL(teacher || student), ``reverse_kl`` = KL(student || teacher), ``jsd``.
        beta: teacher weight in the ``jsd`` mixture (0.5 = the symmetric JSD).
        temperature: both logits are divided by it before the softmax.
        scale_by_temperature_sq: multiply by T^2 (Hinton et al.'s gradient-scale correction); off by default.
    Returns:
        a scalar; 0 when no position is unmasked.
    """
    m = mask.bool()
    per_token = _token_divergence(student_logits[m], teacher_logits[m], kind, beta, temperature)
    loss = per_token.sum() / m.sum().clamp_min(1)
    return loss * temperature**2 if scale_by_temperature_sq else loss


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; ``labels[..., t]`` is already the target of ``logits[..., t, :]``.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``; labels: ``[B, T]`` or ``[N]``.
    Returns:
        a scalar; 0 when every label is ignored.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    n = (flat_labels != ignore_index).sum()
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    return total / n.clamp_min(1)


def select_positions(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of ``tensor`` ``[B, T, ...]`` where ``mask`` ``[B, T]`` is true, row-major: ``[N, ...]``.

    Two tensors whose masks have equal per-row counts give aligned rows.
    """
    return tensor[mask.bool()]


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(hidden, weight, bias).float()


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def chunked_distill_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                         kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                         chunk_size: int = 1024, lm_head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`distill_loss` from final hidden states, never holding more than ``chunk_size x V`` logits.

    Args:
        student_hidden, teacher_hidden: ``[N, H]``, the response positions already selected, aligned by row.
        lm_head_weight: ``[V, H]``; lm_head_bias: ``[V]`` or None.
    Each chunk's logits are recomputed in backward (activation checkpointing), so peak memory is
    O(chunk x V) rather than O(N x V).
    """
    n = student_hidden.shape[0]
    if n == 0:
        return student_hidden.sum() * 0.0
    teacher_hidden = teacher_hidden.detach()

    def piece(sh: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = _project(th, lm_head_weight.detach(),
                                None if lm_head_bias is None else lm_head_bias.detach())
        return _token_divergence(_project(sh, lm_head_weight, lm_head_bias), t_logits, kind, beta,
                                 temperature).sum()

    total = sum(checkpoint(piece, student_hidden[a:b], teacher_hidden[a:b], use_reentrant=False)
                for a, b in _chunks(n, chunk_size))
    return total / n


def chunked_token_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                                chunk_size: int = 1024, ignore_index: int = -100,
                                lm_head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`token_cross_entropy` from hidden states ``[N, H]`` and targets ``[N]``, chunk by chunk."""
    n = int((targets != ignore_index).sum())
    if n == 0:
        return hidden.sum() * 0.0

    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_project(h, lm_head_weight, lm_head_bias), y, ignore_index=ignore_index,
                               reduction="sum")

    total = sum(checkpoint(piece, hidden[a:b], targets[a:b], use_reentrant=False)
                for a, b in _chunks(hidden.shape[0], chunk_size))
    return total / n


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Maechler's two branches); -inf at x >= 0."""
    x = x.clamp_max(0.0)
    near = x > -math.log(2)
    safe_near = torch.where(near, x, torch.full_like(x, -1.0))
    safe_far = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def _topk_kl_rows(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-row KL(teacher || student) over k+1 buckets: the k stored tokens and the rest of the vocabulary.

    The student's rest mass is a log-sum-exp over its logits outside the k stored ids, never ``1 - sum(top)``: that
    difference cancels to 0 in float32 when the student is over-confident, and its gradient with it. The teacher's
    rest is ``log(1 - sum(exp(topk_logprobs)))`` (all the stored rows give). Exact when k = V; otherwise a lower
    bound of the full KL (merging outcomes never increases a KL divergence).
    """
    logits = student_logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    s_top = logits.gather(-1, topk_ids.long()) - log_z.unsqueeze(-1)
    outside = logits.scatter(-1, topk_ids.long(), float("-inf"))
    s_rest = torch.logsumexp(outside, dim=-1) - log_z  # -inf when the k ids cover the vocabulary
    t_top = topk_logprobs.float()
    t_rest = _log1mexp(torch.logsumexp(t_top, dim=-1))
    kl_top = (t_top.exp() * (t_top - s_top)).sum(-1)
    has_rest = torch.isfinite(t_rest) & torch.isfinite(s_rest)
    # where() with finite stand-ins on both branches: an -inf inside the unused branch would still poison gradients
    t_rest_safe = torch.where(has_rest, t_rest, torch.zeros_like(t_rest))
    s_rest_safe = torch.where(has_rest, s_rest, torch.zeros_like(s_rest))
    kl_rest = torch.where(has_rest, t_rest_safe.exp() * (t_rest_safe - s_rest_safe), torch.zeros_like(t_rest))
    return kl_top + kl_rest


def topk_forward_kl(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor,
                    teacher_topk_logprobs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL against an offline teacher stored as top-k ids ``[N, k]`` and log-probs ``[N, k]``.

    ``student_logits`` is ``[N, V]``; ``mask`` ``[N]`` optional. See :func:`_topk_kl_rows` for how the
    mass outside the top k is treated.
    """
    rows = _topk_kl_rows(student_logits, teacher_topk_ids, teacher_topk_logprobs)
    if mask is None:
        return rows.mean() if rows.numel() else rows.sum()
    m = mask.bool()
    return rows[m].sum() / m.sum().clamp_min(1)


def chunked_topk_forward_kl(student_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                            teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                            chunk_size: int = 1024, lm_head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`topk_forward_kl` from student hidden states ``[N, H]``, chunk by chunk."""
    n = student_hidden.shape[0]
    if n == 0:
        return student_hidden.sum() * 0.0

    def piece(h: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor) -> torch.Tensor:
        return _topk_kl_rows(_project(h, lm_head_weight, lm_head_bias), ids, lps).sum()

    total = sum(checkpoint(piece, student_hidden[a:b], teacher_topk_ids[a:b], teacher_topk_logprobs[a:b],
                           use_reentrant=False) for a, b in _chunks(n, chunk_size))
    return total / n
