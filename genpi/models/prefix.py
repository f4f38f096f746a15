"""A batch whose sequences start with the same long prefix (a task's prompt) runs that prefix once.

The prefix is run at batch size 1 with its key/value cache kept; the cache is expanded over the batch (a view, no
copy) and the rest of every sequence attends to it, with positions offset by the prefix length. Gradients flow back
through the expansion into the prefix's single pass, so this serves training passes (the adapter on, the prompt in
the input) as well as frozen ones. Used by the training module for SFT sequences that carry the prompt (the
``w_prompt`` baseline) and by the tiny_agent's pre-training.
"""

from __future__ import annotations

import torch

from genpi.data.tokenize import IGNORE


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
