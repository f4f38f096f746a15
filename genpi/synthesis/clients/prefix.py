"""Shared-prefix attention for batched ``generate``: the task's prompt read once per step, not once per row.

Every teacher and agent request starts with the same long prompt. Expanding its key/value cache to the
batch makes each decoding step read (and, for grouped-query attention, copy) ``batch x prompt`` keys
and values, which on a CPU costs more than the batching saves. Here the prompt's keys and values stay
at batch size 1 and each row's own tokens live in an ordinary per-row cache. A decoding step computes
attention in two parts joined under one softmax:

- prefix: the queries of all rows and grouped heads folded into one matrix against the shared keys
  (one ``bmm`` per key/value head; the prefix is never copied);
- own tokens: the usual per-row attention, with the padding mask.

The prefill of each call (many queries per row) uses torch's fused attention over the prefix expanded
once, which is faster there.

Used for Llama-like attention (no sliding window, no logit soft-capping); other models fall back to an
expanded cache (:func:`supports_shared_prefix`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# Not the training teacher's name (genpi.models.shared_prefix_attention.ATTENTION_NAME): transformers keeps one
# function per name, so sharing it let whichever registered last run the other's forward.
NAME = "genpi_shared_prefix_decode"
_QUERY_CHUNK_ELEMENTS = 1 << 25  # scores held at once during a long prefill: 128 MB in float32


def supports_shared_prefix(model) -> bool:
    """True when the model's attention is plain scaled dot-product over a full cache (Llama, Qwen2, ...)."""
    cfg = model.config
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attn_logit_softcapping", None):
        return False
    if getattr(cfg, "is_encoder_decoder", False):
        return False
    layers = _attention_modules(model)
    return bool(layers) and all(hasattr(m, "layer_idx") for m in layers)


def _attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, shared_prefix_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def prefix_cache(num_layers: int, prefix_len: int):
    """A cache whose per-row layers hold only the tokens after the shared prefix, but report the full length
    (prefix + own tokens), so that generate's positions and masks cover the whole sequence."""
    from transformers.cache_utils import Cache, DynamicLayer

    class _AfterPrefixLayer(DynamicLayer):
        def get_seq_length(self) -> int:
            return prefix_len + super().get_seq_length()

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.get_seq_length() + query_length, 0

    return Cache(layers=[_AfterPrefixLayer() for _ in range(num_layers)])


@contextlib.contextmanager
def shared_prefix(model, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, the model attends to ``prefix_kv`` (per layer, batch 1) before each row's own cache."""
    _register()
    modules = _attention_modules(model)
    saved = model.config._attn_implementation
    for m in modules:
        m._genpi_prefix = prefix_kv[m.layer_idx]
    model.config._attn_implementation = NAME
    try:
        yield
    finally:
        model.config._attn_implementation = saved
        for m in modules:
            m._genpi_prefix = None


def shared_prefix_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over ``[shared prefix][row's own keys]``.

    Shapes: ``query`` [B, Hq, q, D]; ``key``/``value`` [B, Hkv, S, D] (the row's own tokens, S >= q);
    the prefix [1, Hkv, P, D]; ``attention_mask`` [B, 1, q, P + S] (bool, True = attend; or additive
    float) or ``None`` (causal). Returns [B, q, Hq, D] like transformers' attention functions.
    """
    prefix = getattr(module, "_genpi_prefix", None)
    if prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    kp, vp = prefix
    b, hq, q, d = query.shape
    hkv, p = kp.shape[1], kp.shape[2]
    scale = scaling if scaling is not None else d**-0.5
    if q == 1:
        out = _attend(query, key, value, kp, vp, attention_mask, scale, hkv)
        return out.transpose(1, 2).contiguous(), None
    # Prefill (many queries per row): torch's fused kernel beats the folded products; the prefix is expanded
    # once per call here, never per generated token. Queries go in chunks to bound the score matrix.
    s = key.shape[2]
    full_k = torch.cat([kp.expand(b, -1, -1, -1), key], dim=2)
    full_v = torch.cat([vp.expand(b, -1, -1, -1), value], dim=2)
    if attention_mask is None:
        pos = torch.arange(q, device=query.device) + (s - q)
        own = torch.arange(s, device=query.device)[None, :] <= pos[:, None]
        attention_mask = torch.cat([own.new_ones(q, p), own], dim=-1)[None, None]
    step = max(1, _QUERY_CHUNK_ELEMENTS // max(1, b * hq * (p + s)))
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, i : i + step], full_k, full_v, attn_mask=attention_mask[:, :, i : i + step], scale=scale,
            enable_gqa=hq != hkv,
        )
        for i in range(0, q, step)
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _attend(query, key, value, kp, vp, mask, scale: float, hkv: int) -> torch.Tensor:
    """Decoding: the shared prefix read once for the whole batch. ``query`` [B, Hq, 1, D] -> [B, Hq, 1, D]."""
    b, hq, q, d = query.shape
    g, p, s = hq // hkv, kp.shape[2], key.shape[2]
    # Heads of one group share a key/value head: fold them into the query rows instead of repeating keys.
    folded = query.reshape(b, hkv, g * q, d)
    # Prefix part: all rows of the batch become rows of one matrix per key/value head.
    rows = folded.transpose(0, 1).reshape(hkv, b * g * q, d)
    scores_p = (torch.bmm(rows, kp[0].transpose(1, 2)) * scale).reshape(hkv, b, g * q, p).transpose(0, 1)
    # Own part: each row against its own tokens, masked for padding (the prefix never is; with one query
    # per row, causality allows every cached token).
    scores_s = torch.matmul(folded, key.transpose(-1, -2)) * scale
    if mask is not None and mask.dtype == torch.bool:
        scores_s = scores_s.view(b, hkv, g, q, s).masked_fill(~mask[:, :, None, :, p:], float("-inf"))
    elif mask is not None:
        scores_s = scores_s.view(b, hkv, g, q, s) + mask[:, :, None, :, p:]
    scores = torch.cat([scores_p, scores_s.reshape(b, hkv, g * q, s)], dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    probs_p = probs[..., :p].transpose(0, 1).reshape(hkv, b * g * q, p)
    out_p = torch.bmm(probs_p, vp[0]).reshape(hkv, b, g * q, d).transpose(0, 1)
    out = out_p + torch.matmul(probs[..., p:], value)
    return out.reshape(b, hq, q, d)
