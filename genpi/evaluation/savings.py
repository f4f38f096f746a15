"""What dropping the prompt saves: tokens per request, prefill compute, measured latency and throughput.

Compute uses the analytic estimate of a decoder forward pass, ``2 * parameters * tokens`` FLOPs (one
multiply-accumulate, 2 FLOPs, per weight per token; attention's own quadratic term is left out, so
the estimate is a lower bound that grows with the prompt). MACs are half the FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# The GenPI paper's headline savings from dropping the prompt (up to, over its tasks).
PAPER = {"macs_reduction": 0.39, "latency_reduction": 0.17}


def count_parameters(model) -> dict[str, int]:
    """Parameters of the base model: ``total`` and ``compute`` (without the input embedding table, a lookup
    that costs no multiply, unless it is tied to the output head, which multiplies every token).

    A ``peft`` model is measured without its adapter: a merged adapter costs nothing extra.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    total = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    emb = base.get_input_embeddings()
    head = base.get_output_embeddings()
    tied = head is not None and emb is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    lookup = 0 if tied or emb is None else emb.weight.numel()
    return {"total": int(total), "compute": int(total - lookup)}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _reduction(before: float, after: float) -> float | None:
    return 1 - after / before if before else None


def compute_savings(teacher_prompt_tokens: Sequence[int], student_prompt_tokens: Sequence[int],
                    answer_tokens: Sequence[int], params: int) -> dict[str, Any]:
    """Tokens and FLOPs per request with the prompt (teacher) and without it (student), from exact counts.

    Args:
        teacher_prompt_tokens, student_prompt_tokens: prompt length of each request, with / without the prompt.
        answer_tokens: generated tokens per request (the teacher's greedy answers), decoded in both cases.
        params: parameters that multiply every token (``count_parameters(...)["compute"]``).
    """
    with_p, without_p, gen = _mean(teacher_prompt_tokens), _mean(student_prompt_tokens), _mean(answer_tokens)
    prefill_with, prefill_without = 2 * params * with_p, 2 * params * without_p
    request_with, request_without = 2 * params * (with_p + gen), 2 * params * (without_p + gen)
    return {
        "prompt_tokens_with": with_p,
        "prompt_tokens_without": without_p,
        "prompt_tokens_saved": with_p - without_p,
        "prompt_token_reduction": _reduction(with_p, without_p),
        "answer_tokens": gen,
        "params": int(params),
        "prefill_flops_with": prefill_with,
        "prefill_flops_without": prefill_without,
        "prefill_flops_saved": prefill_with - prefill_without,
        "prefill_flops_reduction": _reduction(prefill_with, prefill_without),
        # per request = prefill + decoding the answer: the figure the paper's MACs compare
        "request_macs_with": request_with / 2,
        "request_macs_without": request_without / 2,
        "request_macs_reduction": _reduction(request_with, request_without),
    }


def timing_savings(timing: dict[str, dict[str, float]] | None) -> dict[str, Any]:
    """Reductions from measured timings: ``without_prompt`` (what a merged adapter costs) and ``student_lora``
    (the adapter served unmerged) against ``with_prompt``. Positive = faster without the prompt."""
    if not timing or "with_prompt" not in timing:
        return {}
    ref = timing["with_prompt"]
    out: dict[str, Any] = {}
    for name in ("without_prompt", "student_lora"):
        t = timing.get(name)
        if not t:
            continue
        out[name] = {
            "latency_reduction": _reduction(ref["latency_s"], t["latency_s"]),
            "prefill_latency_reduction": _reduction(ref["prefill_latency_s"], t["prefill_latency_s"]),
            "throughput_gain": t["throughput_tok_s"] / ref["throughput_tok_s"] - 1 if ref["throughput_tok_s"] else None,
        }
    return out


def paper_rows(savings: dict[str, Any]) -> list[tuple[str, float | None, float | None, str]]:
    """Rows ``(what, ours, paper, note)`` comparing our reductions with the paper's headline figures."""
    timing = (savings.get("timing_reduction") or {}).get("without_prompt") or {}
    lora = (savings.get("timing_reduction") or {}).get("student_lora") or {}
    return [
        ("MACs per request", savings.get("request_macs_reduction"), PAPER["macs_reduction"],
         "2 x params x (prompt + answer tokens)"),
        ("prefill FLOPs", savings.get("prefill_flops_reduction"), None, "2 x params x prompt tokens"),
        ("latency per request", timing.get("latency_reduction"), PAPER["latency_reduction"],
         "measured; adapter merged (= base without the prompt)"),
        ("latency per request, LoRA served", lora.get("latency_reduction"), None, "measured; adapter as a LoRA request"),
        ("prefill latency", timing.get("prefill_latency_reduction"), None, "measured; one new token"),
        ("throughput gain", timing.get("throughput_gain"), None, "measured; batch of all inputs"),
    ]
