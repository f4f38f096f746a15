"""A batch whose sequences start with the same long prefix (a task's prompt) runs that prefix once.

The prefix is run at batch size 1 with its key/value cache kept; the cache is expanded over the batch (a view, no
copy) and the rest of every sequence attends to it, with positions offset by the prefix length. Gradients flow back
through the expansion into the prefix's single pass, so this serves training passes (the adapter on, the prompt in
the input) as well as frozen ones. Used by the training module for SFT sequences that carry the prompt (the
``w_prompt`` baseline) and by the tiny_agent's pre-training.

The expanded cache is still concatenated with every example's own keys in each layer (transformers' cache update),
so attention reads B copies of the prefix. :func:`hidden_after_shared_prefix` avoids that for a frozen prefix: the
suffix runs without a cache and each layer attends to the one prefix copy through
:mod:`genpi.models.shared_prefix_attention`. :func:`choose_teacher_attention` picks among the three teacher paths
(``naive``: the whole sequence; ``cached``: the expanded cache; ``shared``: one prefix copy) and says why it fell
back where the shared path cannot apply.
"""

from __future__ import annotations

import logging

import torch

from genpi.data.tokenize import IGNORE

log = logging.getLogger(__name__)
TEACHER_ATTENTION = ("auto", "naive", "cached", "shared")


def common_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         targets: torch.Tensor | None = None) -> int:
    """How many leading positions every row shares: the same ids, no padding, and (given ``targets``, where
    ``targets[:, t]`` is what position ``t`` predicts) no trained target, so nothing is lost by not computing the
    prefix's logits. At least one position of every row is left after the prefix."""
    if input_ids.shape[0] == 0:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    if targets is not None:
        same &= (targets == IGNORE).all(0)
    shortest = int(attention_mask.sum(1).min())
    not_same = (~same[: max(0, shortest - 1)]).nonzero()
    return int(not_same[0]) if len(not_same) else max(0, shortest - 1)


def prefix_kv(decoder: torch.nn.Module, prefix_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values ``[(k, v)]`` per layer of a prefix ``[1, P]``, run at batch size 1."""
    out = decoder(input_ids=prefix_ids, use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def hidden_after_prefix(decoder: torch.nn.Module, config, kv: list[tuple[torch.Tensor, torch.Tensor]],
                        input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[B, T - P, H]`` of ``input_ids[:, P:]`` attending to a prefix given as its keys and
    values ``kv`` (batch size 1, expanded over the batch as a view).

    Args:
        input_ids, attention_mask: ``[B, T]``, right padded, the prefix's ``P`` positions included.
    """
    from transformers import DynamicCache

    b, width = input_ids.shape
    p = kv[0][0].shape[-2]
    cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv],
                         config=config)
    positions = torch.arange(p, width, device=input_ids.device).expand(b, -1)
    return decoder(input_ids=input_ids[:, p:], attention_mask=attention_mask, position_ids=positions,
                   past_key_values=cache, use_cache=True).last_hidden_state


def shared_prefix_hidden(decoder: torch.nn.Module, config, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         prefix_len: int) -> torch.Tensor:
    """Final hidden states ``[B, T - P, H]`` of the positions after a prefix of ``P`` tokens shared by every row,
    the prefix run once (with gradients when they are on).

    Args:
        decoder: the model's decoder stack (``model.get_decoder()``); config: the model's config.
        input_ids, attention_mask: ``[B, T]``, right padded; rows equal on their first ``P`` ids.
    """
    kv = prefix_kv(decoder, input_ids[:1, :prefix_len])
    return hidden_after_prefix(decoder, config, kv, input_ids, attention_mask)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of a ``[B, T]`` mask is ones then zeros."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def hidden_after_shared_prefix(decoder: torch.nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]],
                               input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               kernel: str = "auto") -> torch.Tensor:
    """Final hidden states ``[B, T - P, H]`` of ``input_ids[:, P:]``, each layer attending to the ONE copy of the
    prefix's keys and values ``kv`` (``[(k, v)]`` per layer, each ``[1, Hkv, P, D]``) and to its own causal suffix,
    merged by log-sum-exp (:mod:`genpi.models.shared_prefix_attention`).

    Args:
        decoder: the model's decoder stack; its ``config`` is the object its attention modules read.
        input_ids, attention_mask: ``[B, T]``, right padded, the prefix's ``P`` positions included.
        kernel: one of :data:`genpi.models.shared_prefix_attention.KERNELS`.
    """
    from genpi.models.shared_prefix_attention import shared_prefix_attention_on

    if not is_right_padded(attention_mask):
        raise ValueError("shared-prefix attention needs right-padded rows")
    b, width = input_ids.shape
    p = kv[0][0].shape[-2]
    positions = torch.arange(p, width, device=input_ids.device).expand(b, -1)
    with shared_prefix_attention_on(decoder.config):
        return decoder(input_ids=input_ids[:, p:], attention_mask=attention_mask[:, p:], position_ids=positions,
                       use_cache=False, shared_prefix_kv=kv, shared_prefix_kernel=kernel).last_hidden_state


_logged_fallbacks: set[str] = set()


def choose_teacher_attention(requested: str, config, attention_mask: torch.Tensor, prompt_len: int) -> tuple[str, str]:
    """The teacher path to run and why: ``(path, reason)`` with ``path`` one of naive / cached / shared.

    ``auto`` and ``shared`` take the shared path where it applies and otherwise fall back to ``cached`` (logged
    once per reason, at WARNING for an explicit ``shared``); ``naive`` and ``cached`` are taken as asked.
    """
    from genpi.models.shared_prefix_attention import unsupported_reason

    if requested not in TEACHER_ATTENTION:
        raise ValueError(f"teacher attention {requested!r}: one of {', '.join(TEACHER_ATTENTION)}")
    if requested in ("naive", "cached"):
        return requested, "asked for"
    if prompt_len == 0:
        why = "the teacher has no prompt"
    elif not is_right_padded(attention_mask):
        why = "rows are not right padded"
    else:
        why = unsupported_reason(config, attention_mask.shape[1])
    if why is None:
        return "shared", "applies"
    if why not in _logged_fallbacks:
        _logged_fallbacks.add(why)
        level = logging.WARNING if requested == "shared" else logging.INFO
        log.log(level, "teacher attention: shared-prefix attention does not apply (%s); using the cached prompt", why)
    return "cached", why
