"""Shared-prefix (cascade) attention: a batch's queries attend to ONE copy of a prompt's keys and values.

Every teacher sequence is (prompt P) + (its own suffix x + y). The prompt's keys and values are the same for the
whole batch, so each layer's attention is split in two and merged exactly:

- prefix part: all ``B x T`` suffix queries against the single ``[1, Hkv, P, D]`` prompt keys, no mask (every
  suffix position sees the whole prompt). The batch is folded into the query length, so the prompt's keys are read
  once per head, never copied per example;
- suffix part: each example's queries against its own ``T`` keys, causal;
- merge: with ``lse`` the log-sum-exp of each part's scaled scores,
  ``out = out_p * exp(lse_p - lse) + out_s * exp(lse_s - lse)``, ``lse = logaddexp(lse_p, lse_s)``, which is the
  softmax over the concatenated keys, exactly.

Right padding needs no mask: a valid query sits before every pad of its row, so the causal mask already hides the
pads (pad rows' outputs are never read).

Kernels (each returns the log-sum-exp the merge needs):

- ``torch_flash_cpu``: PyTorch's CPU flash-attention kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``),
  the kernel behind ``F.scaled_dot_product_attention`` on CPU; it returns the log-sum-exp that the public function
  drops, and handles GQA;
- ``flash_attn``: FlashAttention's ``flash_attn_func(..., return_attn_probs=True)`` on CUDA in half precision when
  the package is installed;
- ``torch_flash_cuda``: PyTorch's CUDA flash kernel (``aten::_scaled_dot_product_flash_attention``) otherwise;
  neither CUDA path has been run here (no GPU on the machine this was written on);
- ``eager``: float32 matmul + ``logsumexp`` (scores materialized), any device, the reference.

On CPU, ``flex_attention`` was tried (torch 2.13): compiled, it refuses to return the log-sum-exp ("torch.compile on
CPU only supports inference and `return_lse` is not supported yet"); uncompiled it materializes the scores like
``eager``. So it is not offered.

The function plugs into transformers through its ``AttentionInterface`` under :data:`ATTENTION_NAME`; the model's
``config._attn_implementation`` is switched to it only inside :func:`shared_prefix_attention_on`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

ATTENTION_NAME = "genpi_shared_prefix"
KERNELS = ("auto", "torch_flash_cpu", "flash_attn", "torch_flash_cuda", "eager")
# Model families whose attention calls ``AttentionInterface`` with (query, key, value) after RoPE and nothing this
# function would have to reproduce (no softcapping, no attention sinks); sliding windows are checked per config.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def register() -> None:
    """Make :data:`ATTENTION_NAME` known to transformers (attention function and its mask: sdpa's boolean mask,
    which this function does not read but transformers builds for every registered name). Done at every use, not
    once per process: the registry is global, and re-registering is a dictionary assignment."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def unsupported_reason(config: Any, sequence_len: int | None = None) -> str | None:
    """Why shared-prefix attention cannot run this model exactly on sequences of ``sequence_len`` positions (prompt
    included; None: any length), or None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type={model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    window = getattr(config, "sliding_window", None)
    windowed = window and getattr(config, "use_sliding_window", model_type == "mistral")
    if windowed and (sequence_len is None or sequence_len > window):
        return f"sliding-window attention (window {window}) would hide part of the prompt"
    if any(t not in ("full_attention", "sliding_attention") for t in (getattr(config, "layer_types", None) or [])):
        return "some layers are neither full nor sliding-window attention (layer_types)"
    if not windowed and any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return "some layers are not full attention (layer_types)"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout is on"
    return None


def resolve_kernel(kernel: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The kernel ``auto`` stands for on ``device`` and ``dtype``, or ``kernel`` itself after checking it can run
    there. The CUDA flash kernels take only half precision, so float32 on CUDA is ``eager``."""
    if kernel == "auto":
        if device.type == "cpu":
            return "torch_flash_cpu"
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            return "flash_attn" if _has_flash_attn() else "torch_flash_cuda"
        return "eager"
    if kernel == "torch_flash_cpu" and device.type != "cpu":
        raise ValueError(f"kernel torch_flash_cpu runs on CPU, not {device.type}")
    if kernel in ("flash_attn", "torch_flash_cuda") and device.type != "cuda":
        raise ValueError(f"kernel {kernel} runs on CUDA, not {device.type}")
    if kernel == "flash_attn" and not _has_flash_attn():
        raise ValueError("kernel flash_attn needs the flash-attn package")
    return kernel


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def shared_prefix_attention_on(config: Any) -> Iterator[None]:
    """Route the model's attention through :func:`shared_prefix_attention` for the duration of the block.

    ``config`` is the model's config object (shared by its attention modules, which read
    ``config._attn_implementation`` at every call)."""
    register()
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before


def shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            shared_prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                            shared_prefix_kernel: str = "auto", sliding_window: int | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """One layer's attention of a batch's suffix over (the shared prefix, its own causal suffix).

    Args:
        module: the attention module (its ``layer_idx`` picks this layer's prefix keys).
        query: ``[B, Hq, T, D]``, RoPE applied at the suffix's positions (offset by ``P``).
        key, value: ``[B, Hkv, T, D]``, the suffix's own keys and values (no cache).
        attention_mask: ignored; the rows must be right padded (checked by the caller).
        shared_prefix_kv: per layer, the prefix's ``(key, value)``, each ``[1, Hkv, P, D]``.
    Returns:
        ``([B, T, Hq, D], None)``, the layout transformers' attention functions return.
    """
    if shared_prefix_kv is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention needs shared_prefix_kv (use genpi.models.prefix)")
    prefix_key, prefix_value = shared_prefix_kv[module.layer_idx]
    if dropout or (sliding_window is not None and sliding_window < prefix_key.shape[-2] + query.shape[-2]):
        raise RuntimeError(f"{ATTENTION_NAME}: attention dropout, and a sliding window shorter than the sequence, "
                           "are not supported (genpi.models.prefix.choose_teacher_attention falls back before)")
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    kernel = resolve_kernel(shared_prefix_kernel, query.device, query.dtype)
    out = cascade_attention(query, key, value, prefix_key, prefix_value, scale, kernel)
    return out.transpose(1, 2), None


def cascade_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_key: torch.Tensor,
                      prefix_value: torch.Tensor, scale: float, kernel: str) -> torch.Tensor:
    """Attention of ``query`` over ``[prefix ; own causal suffix]``, merged by log-sum-exp.

    Args:
        query: ``[B, Hq, T, D]``; key, value: ``[B, Hkv, T, D]``; prefix_key, prefix_value: ``[1, Hkv, P, D]``.
    Returns:
        ``[B, Hq, T, D]`` in ``query``'s dtype.
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    # Under autocast, RoPE leaves queries and keys in float32 and values in bf16 (SDPA casts them itself, these
    # kernels do not), and a prompt cache made outside autocast may meet bf16 queries: bring all to one dtype.
    device_type = query.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else query.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    prefix_key, prefix_value = prefix_key.to(dtype), prefix_value.to(dtype)
    groups = hq // hkv
    # Fold the batch (and the query heads sharing a key head) into the query length: [1, Hkv, B*G*T, D], so one
    # kernel call reads the single prefix copy for every example.
    folded = query.view(b, hkv, groups, t, d).permute(1, 0, 2, 3, 4).reshape(1, hkv, b * groups * t, d)
    prefix_out, prefix_lse = attention_with_lse(folded, prefix_key, prefix_value, scale, causal=False, kernel=kernel)
    prefix_out = prefix_out.view(hkv, b, groups, t, d).permute(1, 0, 2, 3, 4).reshape(b, hq, t, d)
    prefix_lse = prefix_lse.view(hkv, b, groups, t).permute(1, 0, 2, 3).reshape(b, hq, t)
    own_out, own_lse = attention_with_lse(query, key, value, scale, causal=True, kernel=kernel)
    return merge_attention_states(prefix_out, prefix_lse, own_out, own_lse).to(query.dtype)


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> torch.Tensor:
    """Exact softmax attention over the union of two disjoint key sets, from each set's output and log-sum-exp.

    Args:
        out_a, out_b: ``[B, H, T, D]``; lse_a, lse_b: ``[B, H, T]`` (natural log of the sum of exp(scaled scores)).
    Returns:
        ``[B, H, T, D]`` float32.
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a.float() * (lse_a - lse).exp().unsqueeze(-1) + out_b.float() * (lse_b - lse).exp().unsqueeze(-1)


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, causal: bool,
                       kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp by one library kernel.

    Args:
        query: ``[B, Hq, L, D]``; key, value: ``[B, Hkv, S, D]`` with ``Hq`` a multiple of ``Hkv``. ``causal`` aligns
            the last query with the last key (here ``L == S`` whenever it is set).
    Returns:
        ``([B, Hq, L, D], [B, Hq, L])``, the log-sum-exp of the scaled scores in float32.
    """
    if kernel == "torch_flash_cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal,
                                                                            scale=scale)
        return out, lse
    if kernel == "flash_attn":
        from flash_attn import flash_attn_func

        # flash_attn takes [B, L, H, D] and handles GQA; its log-sum-exp is [B, H, L].
        out, lse, _ = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                      softmax_scale=scale, causal=causal, return_attn_probs=True)
        return out.transpose(1, 2), lse.float()
    groups = query.shape[1] // key.shape[1]
    if kernel == "torch_flash_cuda":
        if groups > 1:  # this kernel wants as many key heads as query heads
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        res = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False, scale=scale)
        return res[0], res[1].float()
    if kernel == "eager":
        return _eager_attention_with_lse(query, key, value, scale, causal, groups)
    raise ValueError(f"unknown shared-prefix attention kernel {kernel!r}: one of {', '.join(KERNELS)}")


def _eager_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                              causal: bool, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, length, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    # Group query heads under their key head instead of repeating the keys: [B, Hkv, G*L, D].
    q = query.float().reshape(b, hkv, groups * length, d)
    scores = (q @ key.float().transpose(-1, -2)) * scale  # [B, Hkv, G*L, S]
    if causal:
        visible = torch.ones(length, s, dtype=torch.bool, device=query.device).tril(s - length)
        scores = scores.view(b, hkv, groups, length, s).masked_fill(~visible, float("-inf")).view_as(scores)
    lse = scores.logsumexp(-1)
    out = (scores - lse.unsqueeze(-1)).exp() @ value.float()
    return out.view(b, hq, length, d).to(query.dtype), lse.view(b, hq, length)
