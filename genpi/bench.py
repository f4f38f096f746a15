"""genpi-bench: training-step and loss benchmarks, side by side in one run on the same model and data.

``python -m genpi.bench [--prompt-tokens 1000 --input-tokens 128 --steps 10]``

Prints, for one machine and one set of versions:
- the teacher pass alone, naive (re-reading the prompt) vs prefix-cached;
- a whole GenPI+KL training step with the naive teacher, the prefix-cached teacher and cached top-k
  teacher logits, next to plain SFT (the reference);
- the padding ratio of length-grouped vs plain batches;
- how much of the full KL the cached top-k teacher log-probs recover (k = 5, 20, 50), on model=tiny_agent;
- peak memory of the chunked vs unchunked KL + cross-entropy at 8 x 1,024 tokens and a 128,256 vocabulary
  (each in a fresh process, so one's peak cannot hide the other's);
- the synthesis throughput of batched vs one-at-a-time role swapping (experiments/bench/bench_roleswap.py);
- the same memory at the real vocabularies (Llama 3's 128,256, Llama 4's 202,048) from the models with those
  tokenizers (genpi/models/real_vocab.py): their output heads and hidden states, not a synthetic head;
- on-policy distillation's training step (sampling + scoring + backward) next to the off-policy KL step on the same
  batch (``--only onpolicy``);
- the teacher pass by its three paths (naive / cached prompt / shared-prefix attention) over prompt lengths and two
  model shapes, next to the FLOP bound of each, and the peak memory of each path against the batch size
  (``--only teacher_attention``; experiments/bench/run_teacher_attention.sh writes the committed figures).

Each section is a function ``bench_<name>(args) -> dict`` listed in :data:`SECTIONS`; ``--only`` / ``--skip`` pick
sections, and an existing ``--out`` file keeps the sections this run did not measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def _versions() -> dict[str, str]:
    import peft
    import pytorch_lightning
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "lightning": pytorch_lightning.__version__,
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads"}


def _timeit(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def build_bench_setup(prompt_tokens: int, input_tokens: int, response_tokens: int, n_records: int, batch_size: int):
    """The tiny model with LoRA, a task whose prompt is ``prompt_tokens`` long, and synthetic records."""
    from genpi.data.datamodule import Collator, GenPIDataModule
    from genpi.data.records import write_jsonl
    from genpi.data.tokenize import teacher_prompt
    from genpi.models.factory import load_model_and_tokenizer
    from genpi.tasks.base import Task, build_task

    model, tok = load_model_and_tokenizer({"name_or_path": "tiny", "lora": {"enabled": True, "r": 16, "alpha": 32,
                                                                            "dropout": 0.0}}, for_training=True)
    base = build_task(name="os", builtin_prompt="os.txt", parser=None)
    text = base.prompt_text
    filler_ids = tok(text, add_special_tokens=False)["input_ids"]
    reps = prompt_tokens // max(1, len(filler_ids)) + 1
    ids = (filler_ids * reps)[:prompt_tokens]
    task = Task(name="bench", prompt_turns=[{"role": "user", "content": tok.decode(ids) + "\nThe problem:"}],
                parser=None)
    words = tok(" ".join(base.prompt_turns[-2]["content"].split() * 50), add_special_tokens=False)["input_ids"]
    recs = []
    for i in range(n_records):
        x = tok.decode(words[i : i + input_tokens])
        y = tok.decode(words[i + 7 : i + 7 + response_tokens])
        recs.append({"context_id": "b", "context": task.prompt_text, "pseudo_input": f"{i} {x}",
                     "teacher_output_single": y, "student_output_single": y[::-1], "reason": "r",
                     "teacher_output_conv": [{"role": "assistant", "content": y}]})
    path = Path(tempfile.mkdtemp(prefix="genpi-bench-")) / "records.jsonl"
    write_jsonl(recs, path)
    dm = GenPIDataModule(task, tok, path=str(path), losses=("sft", "pg", "kl"), batch_size=batch_size, val_size=1,
                         test_size=1, limits={"input_tokens": input_tokens, "response_tokens": response_tokens})
    dm.setup()
    collate = Collator(tok.pad_token_id)
    batch = collate([dm.datasets["train"][i] for i in range(batch_size)])
    return model, tok, task, dm, batch, teacher_prompt(tok, task)


def _add_topk(module, batch: dict[str, Any], k: int) -> None:
    with torch.no_grad():
        th = module.teacher_hidden(batch["kl"])
        w, b = module.lm_head()
        logits = torch.nn.functional.linear(th, w, b).float().log_softmax(-1)
        lp, ids = logits.topk(k, dim=-1)
    batch["kl"]["teacher_topk_ids"], batch["kl"]["teacher_topk_logprobs"] = ids, lp


def bench_training(args) -> dict[str, Any]:
    from genpi.module import GenPIModule

    model, tok, task, dm, batch, prompt = build_bench_setup(args.prompt_tokens, args.input_tokens,
                                                            args.response_tokens, args.records, args.batch_size)
    out: dict[str, Any] = {"prompt_tokens": len(prompt.ids), "batch_size": args.batch_size}

    def make(kl_w: float, sft_w: float, pg_w: float, teacher: str = "online", prefix_cache: bool = True,
             teacher_attention: str = "cached"):
        if not prefix_cache:
            teacher_attention = "naive"
        m = GenPIModule(model, {"kl": {"weight": kl_w, "teacher": teacher, "prefix_cache": prefix_cache,
                                       "teacher_attention": teacher_attention},
                                "sft": {"weight": sft_w}, "pg": {"weight": pg_w}}, {"lr": 1e-4}, prompt.ids)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            m.compute(batch)["loss"].backward()
            opt.step()

        return m, step

    naive, _ = make(1, 0, 0, prefix_cache=False)
    cached, _ = make(1, 0, 0, prefix_cache=True)
    shared, _ = make(1, 0, 0, prefix_cache=True, teacher_attention="shared")
    t_naive = _timeit(lambda: naive.teacher_hidden(batch["kl"]), args.steps)
    t_cached = _timeit(lambda: cached.teacher_hidden(batch["kl"]), args.steps)
    t_shared = _timeit(lambda: shared.teacher_hidden(batch["kl"]), args.steps)
    reference = naive.teacher_hidden(batch["kl"])
    diff = (reference - cached.teacher_hidden(batch["kl"])).abs().max().item()
    out["teacher_pass"] = {"naive_s": t_naive, "prefix_cached_s": t_cached, "speedup": t_naive / t_cached,
                           "max_abs_diff": diff, "shared_prefix_s": t_shared, "shared_speedup": t_naive / t_shared,
                           "shared_max_abs_diff": (reference - shared.teacher_hidden(batch["kl"])).abs().max().item()}

    tokens = sum(int(batch[k]["attention_mask"].sum()) for k in ("sft", "pg")) + int(
        batch["kl"]["student_attention_mask"].sum() + batch["kl"]["teacher_attention_mask"].sum())
    steps = {}
    for name, kw in (("genpi_kl_naive", dict(kl_w=1, sft_w=0.7, pg_w=0.3, prefix_cache=False)),
                     ("genpi_kl_prefix_cached", dict(kl_w=1, sft_w=0.7, pg_w=0.3, prefix_cache=True)),
                     ("sft_kl_naive", dict(kl_w=1, sft_w=1, pg_w=0, prefix_cache=False)),
                     ("sft_kl_prefix_cached", dict(kl_w=1, sft_w=1, pg_w=0, prefix_cache=True))):
        _, step = make(**kw)
        steps[name] = _timeit(step, args.steps)
    _add_topk(cached, batch, args.topk)
    _, step = make(1, 0.7, 0.3, teacher="cached")
    steps["genpi_kl_cached_logits"] = _timeit(step, args.steps)
    _, step = make(0, 0.7, 0.3)
    steps["genpi_no_kl"] = _timeit(step, args.steps)
    _, step = make(1, 0, 0, teacher="cached")
    steps["kl_cached_logits_only"] = _timeit(step, args.steps)
    _, step = make(0, 1, 0)
    steps["sft_only"] = _timeit(step, args.steps)
    out["step_s"] = steps
    out["tokens_per_s"] = {k: tokens / v for k, v in steps.items()}
    out["ratios"] = {
        "teacher_pass naive / prefix-cached (target >= 3)": t_naive / t_cached,
        "GenPI+KL step naive / prefix-cached (target >= 1.5)": steps["genpi_kl_naive"] / steps["genpi_kl_prefix_cached"],
        "SFT+KL step naive / prefix-cached": steps["sft_kl_naive"] / steps["sft_kl_prefix_cached"],
        "PG share of the GenPI+KL step": 1 - (steps["sft_kl_prefix_cached"] / steps["genpi_kl_prefix_cached"]),
        "GenPI+KL cached-logits step / GenPI (SFT+PG) step (target <= 1.2)":
            steps["genpi_kl_cached_logits"] / steps["genpi_no_kl"],
        "KL cached-logits step / SFT step": steps["kl_cached_logits_only"] / steps["sft_only"],
    }
    grouped = dm.padding_ratio()
    dm.group_by_length = False
    out["padding_ratio"] = {"length_grouped": grouped, "plain": dm.padding_ratio()}
    return out


def _loss_memory_child(mode: str, n_tokens: int, vocab: int, hidden: int, chunk: int) -> None:
    """Run one loss variant forward+backward and print its value and this process's peak RSS."""
    from genpi import losses

    torch.manual_seed(0)
    w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_(False)
    hs = torch.randn(n_tokens, hidden, requires_grad=True)
    ht = torch.randn(n_tokens, hidden)
    targets = torch.randint(0, vocab, (n_tokens,))
    # The peak reset to what is resident now (Linux), so that the imports' own peak does not hide the loss's.
    resettable = _reset_peak()
    base = _status_mb("VmRSS")
    if base is None:  # not Linux: the process's peak since it started
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if mode == "chunked":
        kl = losses.chunked_distill_loss(hs, ht, w, kind="forward_kl", chunk_size=chunk)
        ce = losses.chunked_token_cross_entropy(hs, w, targets, chunk_size=chunk)
    else:
        s_logits, t_logits = hs @ w.T, ht @ w.T
        kl = losses.distill_loss(s_logits, t_logits, torch.ones(n_tokens, dtype=torch.bool), kind="forward_kl")
        ce = losses.token_cross_entropy(s_logits, targets)
    (kl + ce).backward()
    peak = _status_mb("VmHWM") if resettable else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"kl": kl.item(), "ce": ce.item(), "grad_norm": hs.grad.norm().item(),
                      "peak_mb": peak, "delta_mb": peak - base}))


def _reset_peak() -> bool:
    """Reset this process's peak resident memory (``VmHWM``) to its current size; False where Linux cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def bench_loss_memory(args) -> dict[str, Any]:
    """Peak memory of KL + cross-entropy, unchunked vs chunked, each in a fresh process, at ``mem_tokens / 8``
    tokens (one sequence) and at ``mem_tokens`` (the whole batch). A variant the machine cannot hold is killed by
    the kernel; that is reported as such, and the values are compared where both finish."""
    res: dict[str, Any] = {"vocab": args.mem_vocab, "hidden": args.mem_hidden, "chunk": args.chunk, "tokens": {}}
    for n in sorted({max(1, args.mem_tokens // 8), args.mem_tokens}):
        row: dict[str, Any] = {}
        for mode in ("unchunked", "chunked"):
            cmd = [sys.executable, "-m", "genpi.bench", "--_loss-child", mode, "--mem-tokens", str(n),
                   "--mem-vocab", str(args.mem_vocab), "--mem-hidden", str(args.mem_hidden), "--chunk", str(args.chunk)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode == 0:
                row[mode] = json.loads(p.stdout.strip().splitlines()[-1])
            else:
                why = "killed by the kernel: out of memory" if p.returncode == -9 else f"exit {p.returncode}"
                row[mode] = {"failed": why}
        if "peak_mb" in row["unchunked"] and "peak_mb" in row["chunked"]:
            row["peak_ratio_unchunked_over_chunked"] = row["unchunked"]["delta_mb"] / max(1e-6, row["chunked"]["delta_mb"])
            row["max_value_diff"] = max(abs(row["unchunked"][k] - row["chunked"][k]) for k in ("kl", "ce"))
        res["tokens"][str(n)] = row
    return res


def bench_topk(args) -> dict[str, Any]:
    """How much of the full KL(teacher || student) the stored top-k teacher log-probs recover, for several k, on
    the task's sample records (teacher: the base model with the prompt; student: the same model without it)."""
    from genpi import losses
    from genpi.data.datamodule import Collator, GenPIDataModule
    from genpi.data.tokenize import teacher_prompt
    from genpi.models.factory import load_model_and_tokenizer
    from genpi.module import GenPIModule
    from genpi.tasks.base import builtin_task

    model, tok = load_model_and_tokenizer({"name_or_path": args.topk_model, "lora": {"dropout": 0.0}},
                                          for_training=True)
    task = builtin_task(args.topk_task)
    dm = GenPIDataModule(task, tok, losses=("kl",), batch_size=8, val_size=1, test_size=1)
    dm.setup()
    batch = Collator(tok.pad_token_id)([dm.datasets["train"][i] for i in range(16)])["kl"]
    module = GenPIModule(model, {"kl": {"weight": 1.0}}, {}, teacher_prompt(tok, task).ids).eval()
    with torch.no_grad():
        weight, bias = module.lm_head()
        t_logits = torch.nn.functional.linear(module.teacher_hidden(batch), weight, bias).float()
        s_hidden = module.hidden(batch["student_input_ids"], batch["student_attention_mask"])
        s_logits = torch.nn.functional.linear(s_hidden[batch["student_response_mask"]], weight, bias).float()
        full = float(losses.distill_loss(s_logits, t_logits, torch.ones(len(s_logits))))
        out: dict[str, Any] = {"model": args.topk_model, "task": args.topk_task, "tokens": len(s_logits),
                               "full_forward_kl": full, "k": {}}
        t_logp = t_logits.log_softmax(-1)
        for k in (5, 20, 50):
            lps, ids = t_logp.topk(k, dim=-1)
            value = float(losses.topk_forward_kl(s_logits, ids, lps))
            out["k"][str(k)] = {"topk_forward_kl": value, "share_of_full": value / full if full else None,
                                "teacher_mass_in_topk": float(lps.exp().sum(-1).mean())}
    return out


def bench_roleswap(args) -> dict[str, Any] | None:
    """experiments/bench/bench_roleswap.py in its own process (it starts the vLLM engine), its figures read back."""
    script = REPO / "experiments" / "bench" / "bench_roleswap.py"
    if not script.is_file():
        return None
    out = Path(tempfile.mkdtemp(prefix="genpi-bench-")) / "roleswap.json"
    p = subprocess.run([sys.executable, str(script), "--json", str(out)], capture_output=True, text=True)
    if p.returncode != 0 or not out.is_file():
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.read_text())


# --- teacher attention: naive / cached prompt / shared-prefix (issue 17) ---------------------------------------
TEACHER_PATHS = ("naive", "cached", "shared")
# The wider shape: Llama-style, hidden 1,024, GQA with 4 query heads per key head (as Llama-3-8B), two layers so
# that 20+ naive passes over 4k-token prompts stay within minutes on two CPU cores.
WIDE_SHAPE = {"hidden_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4,
              "intermediate_size": 2816, "vocab_size": 4096, "max_position_embeddings": 8192}


def teacher_bench_model(shape: str) -> torch.nn.Module:
    """The model a teacher-attention figure is measured on: ``tiny`` (genpi's built-in model) or ``wide``
    (:data:`WIDE_SHAPE`, random weights, seeded), float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from genpi.models.factory import load_model

    if shape == "tiny":
        return load_model({"name_or_path": "tiny"}, for_training=False).eval()
    if shape == "wide":
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**WIDE_SHAPE)).eval()
    raise ValueError(f"unknown bench shape {shape!r}: tiny or wide")


def teacher_flops(config, batch: int, prompt_len: int, suffix_len: int) -> dict[str, float]:
    """Forward FLOPs (a multiply-add = 2) of the teacher's decoder stack, LM head excluded (every path shares it).

    ``naive`` runs all ``P + S`` positions with causal attention; ``bound`` is the least any path must do: the ``S``
    suffix positions' own layers plus their attention over the ``P`` prompt keys and their causal suffix (the
    prompt's keys and values, a constant of the frozen base, are computed once and not counted per step).
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // hq
    linear_per_token = 2 * (h * hq * d + 2 * h * hkv * d + hq * d * h + 3 * h * config.intermediate_size)
    per_key = 4 * hq * d  # q.k and p.v per (query, key) pair

    def causal_pairs(n: int) -> int:
        return n * (n + 1) // 2

    n = prompt_len + suffix_len
    naive = batch * layers * (n * linear_per_token + per_key * causal_pairs(n))
    bound = batch * layers * (suffix_len * linear_per_token + per_key * (suffix_len * prompt_len + causal_pairs(suffix_len)))
    return {"naive": float(naive), "bound": float(bound)}


def teacher_pass(path: str, model: torch.nn.Module, kv, ids: torch.Tensor, mask: torch.Tensor,
                 kernel: str = "auto") -> torch.Tensor:
    """The teacher's final hidden states after the prompt, ``[B, S, H]``, by one of :data:`TEACHER_PATHS`."""
    from genpi.models.prefix import hidden_after_prefix, hidden_after_shared_prefix

    decoder = model.get_decoder()
    with torch.no_grad():
        if path == "naive":
            p = kv[0][0].shape[-2]
            return decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, p:]
        if path == "cached":
            return hidden_after_prefix(decoder, model.config, kv, ids, mask)
        return hidden_after_shared_prefix(decoder, kv, ids, mask, kernel=kernel)


def teacher_inputs(model: torch.nn.Module, batch: int, prompt_len: int, suffix_len: int, seed: int = 0):
    """Ids ``[B, P + S]`` sharing a random prompt, a full mask, and the prompt's keys/values (computed once)."""
    from genpi.models.prefix import prefix_kv

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, prompt_len), generator=g)
    ids = torch.cat([prompt.expand(batch, -1), torch.randint(3, vocab, (batch, suffix_len), generator=g)], 1)
    with torch.no_grad():
        kv = prefix_kv(model.get_decoder(), prompt)
    return ids, torch.ones_like(ids), kv


def _spread(times: list[float]) -> dict[str, float]:
    ts = sorted(times)

    def q(f: float) -> float:
        i = f * (len(ts) - 1)
        lo = int(i)
        return ts[lo] + (ts[min(lo + 1, len(ts) - 1)] - ts[lo]) * (i - lo)

    return {"median_s": q(0.5), "p25_s": q(0.25), "p75_s": q(0.75), "min_s": ts[0], "max_s": ts[-1], "n": len(ts)}


def bench_teacher_timing(shape: str, prompt_lens: list[int], suffix_len: int, batch: int, steps: int,
                         warmup: int, progress=None) -> dict[str, Any]:
    """Per prompt length: each path's time (median of ``steps`` rounds after ``warmup``, the paths interleaved in
    every round so that load on the machine hits them alike), the speedups over naive, the FLOP bound and the
    share of it reached. ``progress(out)`` is called after each prompt length (to save what is measured)."""
    model = teacher_bench_model(shape)
    cfg = model.config
    out: dict[str, Any] = {"shape": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers",
                                                                   "num_attention_heads", "num_key_value_heads",
                                                                   "intermediate_size")},
                           "batch_size": batch, "suffix_tokens": suffix_len, "P": {}}
    for p in prompt_lens:
        print(f"bench: teacher attention, {shape}, P={p}", file=sys.stderr, flush=True)
        ids, mask, kv = teacher_inputs(model, batch, p, suffix_len)
        ref = teacher_pass("naive", model, kv, ids, mask)
        diffs = {path: float((teacher_pass(path, model, kv, ids, mask) - ref).abs().max())
                 for path in TEACHER_PATHS[1:]}
        times: dict[str, list[float]] = {path: [] for path in TEACHER_PATHS}
        for round_ in range(warmup + steps):
            for path in TEACHER_PATHS:
                t0 = time.perf_counter()
                teacher_pass(path, model, kv, ids, mask)
                if round_ >= warmup:
                    times[path].append(time.perf_counter() - t0)
        stats = {path: _spread(ts) for path, ts in times.items()}
        flops = teacher_flops(cfg, batch, p, suffix_len)
        bound = flops["naive"] / flops["bound"]
        row: dict[str, Any] = {"time": stats, "max_abs_diff_vs_naive": diffs,
                               "flops": flops, "flop_bound_speedup": bound, "token_ratio": (p + suffix_len) / suffix_len}
        for path in TEACHER_PATHS[1:]:
            speedup = stats["naive"]["median_s"] / stats[path]["median_s"]
            row[f"{path}_speedup"] = speedup
            row[f"{path}_share_of_flop_bound"] = speedup / bound
        row["gflop_per_s"] = {"naive": flops["naive"] / stats["naive"]["median_s"] / 1e9,
                              **{path: flops["bound"] / stats[path]["median_s"] / 1e9 for path in TEACHER_PATHS[1:]}}
        # when and under what load this row was measured: rows of several runs can share one report
        row["measured"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "load_1min": round(os.getloadavg()[0], 2)}
        out["P"][str(p)] = row
        if progress:
            progress(out)
    return out


def _status_mb(field: str) -> float | None:
    """A memory figure of this process from Linux's ``/proc/self/status`` (``VmHWM``: peak since the last reset,
    ``VmRSS``: now), in MiB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _teacher_memory_child(path: str, shape: str, batch: int, prompt_len: int, suffix_len: int) -> None:
    """One teacher pass in this fresh process; print the memory it added above what was resident before it."""
    model = teacher_bench_model(shape)
    ids, mask, kv = teacher_inputs(model, batch, prompt_len, suffix_len)
    resettable = _reset_peak()  # to what is resident now, so the prompt's own pass does not count
    before = _status_mb("VmRSS")
    teacher_pass(path, model, kv, ids, mask)
    peak = _status_mb("VmHWM")
    if before is None or peak is None:  # not Linux: the whole process's peak, the model's own pass included
        before, peak = 0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_added_mb": peak - before, "peak_resettable": resettable}))


def bench_teacher_memory(shape: str, prompt_len: int, suffix_len: int, batches: list[int]) -> dict[str, Any]:
    """Peak memory each path adds for one teacher pass, against the batch size, each in a fresh process (glibc told
    to return large blocks to the system at once, so that resident memory follows the tensors), next to the bytes
    of the prompt's keys and values the path holds (one copy for ``shared``, one per example for the others)."""
    cfg = teacher_bench_model(shape).config if shape == "tiny" else None
    if cfg is None:
        from transformers import LlamaConfig

        cfg = LlamaConfig(**WIDE_SHAPE)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    prompt_kv_mb = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * d * prompt_len * 4 / 2**20
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out: dict[str, Any] = {"shape": shape, "prompt_tokens": prompt_len, "suffix_tokens": suffix_len,
                           "prompt_kv_mb_per_copy": prompt_kv_mb, "batch": {}}
    for b in batches:
        row: dict[str, Any] = {}
        for path in TEACHER_PATHS:
            cmd = [sys.executable, "-m", "genpi.bench", "--_teacher-memory-child", path, shape, str(b),
                   str(prompt_len), str(suffix_len)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode == 0:
                row[path] = json.loads(p.stdout.strip().splitlines()[-1])
            else:
                why = "killed by the kernel: out of memory" if p.returncode == -9 else f"exit {p.returncode}"
                row[path] = {"failed": why, "stderr": (p.stderr.strip().splitlines() or [""])[-1]}
            row[path]["prompt_kv_copies"] = 1 if path == "shared" else b
        out["batch"][str(b)] = row
    return out


def _keep_other_teacher_rows(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A teacher-attention run over some shapes and prompt lengths keeps the report's rows of the others (so one
    prompt length can be measured again, e.g. on an idle machine), when both runs used the same rounds, threads,
    batch and suffix; otherwise the new run replaces the section."""
    if not old or not old.get("timing") or any(old.get(k) != new.get(k) for k in ("rounds", "threads", "kernel")):
        return new
    merged = {shape: {**v, "P": dict(v["P"])} for shape, v in old["timing"].items()}
    for shape, v in new["timing"].items():
        kept = merged.get(shape)
        if kept and (kept["batch_size"], kept["suffix_tokens"]) == (v["batch_size"], v["suffix_tokens"]):
            kept["P"].update(v["P"])
        else:
            merged[shape] = v
    return {**new, "timing": merged, "memory": {**old.get("memory", {}), **new.get("memory", {})}}


# report key -> how a new run of that section keeps parts of the report's earlier run (other sections are replaced)
KEEP_EARLIER = {"teacher_attention": _keep_other_teacher_rows}


def bench_teacher_attention(args) -> dict[str, Any]:
    """Teacher pass by path, per shape and prompt length (keys ``<shape>`` then ``P``), and memory by batch size."""
    from genpi.models.shared_prefix_attention import resolve_kernel

    res: dict[str, Any] = {"kernel": resolve_kernel("auto", torch.device("cpu")), "complete": False,
                           "threads": torch.get_num_threads(), "rounds": args.teacher_steps,
                           "warmup_rounds": args.teacher_warmup, "timing": {}, "memory": {}}
    save = getattr(args, "save_partial", None) or (lambda result: None)
    # Shape by shape, each shape's memory right after its timing, the report saved after every piece: on a loaded
    # machine a long sweep that is stopped keeps what it measured (and says it is incomplete).
    for shape in dict.fromkeys([*args.teacher_shapes, *args.teacher_mem_shapes]):
        if shape in args.teacher_shapes:
            batch = args.teacher_batch.get(shape, 4) if isinstance(args.teacher_batch, dict) else args.teacher_batch

            def progress(timing: dict[str, Any], shape: str = shape) -> None:
                res["timing"][shape] = timing
                save(res)

            res["timing"][shape] = bench_teacher_timing(shape, args.teacher_prompts, args.teacher_suffix, batch,
                                                        args.teacher_steps, args.teacher_warmup, progress)
        if shape in args.teacher_mem_shapes:
            print(f"bench: teacher attention memory, {shape}", file=sys.stderr, flush=True)
            res["memory"][shape] = bench_teacher_memory(shape, args.teacher_mem_prompt, args.teacher_suffix,
                                                        args.teacher_mem_batches)
            save(res)
    res["complete"] = True
    return res


# report key -> (section name for --only / --skip, function)
def bench_real_vocab(args) -> dict[str, Any]:
    from genpi.models.real_vocab import bench_memory

    return bench_memory(args.real_vocab_models, args.real_vocab_tokens, args.chunk)


def bench_onpolicy(args) -> dict[str, Any]:
    """On-policy distillation (issue 13) next to the off-policy KL step, on the same batch and model: a whole
    training step (forward, backward, optimizer) of each, and the on-policy step split into sampling, scoring (the
    student's and the teacher's pass over the samples) and backward. Both use the reverse KL; the off-policy step
    scores the synthesized answers (``--response-tokens``), the on-policy one ``--onpolicy-new-tokens`` sampled."""
    from genpi.module import GenPIModule
    from genpi.synthesis.clients.base import end_of_turn_ids

    model, tok, task, dm, batch, prompt = build_bench_setup(args.prompt_tokens, args.input_tokens,
                                                            args.response_tokens, args.records, args.batch_size)
    kl = {"weight": 1.0, "kind": "reverse_kl", "sampling": {"temperature": 1.0, "top_p": 1.0,
                                                            "max_new_tokens": args.onpolicy_new_tokens}}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    kl_batch = {"kl": batch["kl"]}
    phases: dict[str, list[float]] = {"sample_s": [], "score_s": [], "backward_s": [], "sampled_len": []}

    def make(on_policy: bool):
        m = GenPIModule(model, {"kl": {**kl, "on_policy": on_policy}}, {"lr": 1e-5}, prompt.ids,
                        stop_ids=end_of_turn_ids(tok), pad_id=tok.pad_token_id, seed=0)

        def step(record: bool) -> None:
            opt.zero_grad(set_to_none=True)
            loss = m.compute(kl_batch)["loss"]
            t0 = time.perf_counter()
            loss.backward()
            if on_policy and record:
                phases["backward_s"].append(time.perf_counter() - t0)
                for k in ("sample_s", "score_s", "sampled_len"):
                    phases[k].append(m.opcd_stats[k])
            opt.step()

        return step

    steps = {"offpolicy_kl": make(False), "onpolicy_kl": make(True)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    # The two steps interleaved in every round, so that load on the machine hits them alike; one warm-up round.
    for round_ in range(1 + args.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(record=round_ > 0)
            if round_ > 0:
                times[name].append(time.perf_counter() - t0)
    stats = {name: _spread(ts) for name, ts in times.items()}
    split = {k: _spread(v)["median_s"] for k, v in phases.items()}
    split["sampled_len"] = sum(phases["sampled_len"]) / len(phases["sampled_len"])
    on, off = stats["onpolicy_kl"]["median_s"], stats["offpolicy_kl"]["median_s"]
    return {"batch_size": args.batch_size, "prompt_tokens": len(prompt.ids), "input_tokens": args.input_tokens,
            "offpolicy_answer_tokens": int(batch["kl"]["student_response_mask"].sum()) / args.batch_size,
            "max_new_tokens": args.onpolicy_new_tokens, "rounds": args.steps, "threads": torch.get_num_threads(),
            "step": stats, "onpolicy_over_offpolicy": on / off, "onpolicy_split_median": split,
            "sampling_share_of_onpolicy_step": split["sample_s"] / on}


def bench_env(args) -> dict[str, Any]:
    """Agent episodes per second, batched in lockstep vs one at a time (genpi/environments/bench.py)."""
    from genpi.environments.bench import bench_episodes

    return bench_episodes(args.env_model, args.env_episodes)


SECTIONS: dict[str, tuple[str, Any]] = {
    "training": ("training", bench_training),
    "loss_memory": ("memory", bench_loss_memory),
    "real_vocab_memory": ("real_vocab", bench_real_vocab),
    "topk": ("topk", bench_topk),
    "roleswap": ("roleswap", bench_roleswap),
    "teacher_attention": ("teacher_attention", bench_teacher_attention),
    "env_episodes": ("env", bench_env),
    "onpolicy": ("onpolicy", bench_onpolicy),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """genpi-bench's command line (also what the README's genpi-bench lines are checked against)."""
    names = [name for name, _ in SECTIONS.values()]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--input-tokens", type=int, default=128)
    ap.add_argument("--response-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--mem-tokens", type=int, default=8 * 1024)
    ap.add_argument("--mem-vocab", type=int, default=128_256)
    ap.add_argument("--mem-hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--topk-model", default="tiny_agent", help="model of the top-k comparison (a peaked one)")
    ap.add_argument("--topk-task", default="os")
    ap.add_argument("--teacher-shapes", nargs="*", default=["tiny", "wide"], choices=["tiny", "wide"],
                    help="teacher attention: model shapes timed (none: memory only)")
    ap.add_argument("--teacher-prompts", nargs="+", type=int, default=[256, 1024, 4096],
                    help="teacher attention: prompt lengths P")
    ap.add_argument("--teacher-suffix", type=int, default=192, help="teacher attention: x + y tokens per example")
    ap.add_argument("--teacher-batch", type=int, default=None,
                    help="teacher attention: batch size (default 8 on tiny, 2 on wide)")
    ap.add_argument("--teacher-steps", type=int, default=20, help="teacher attention: timed rounds per path")
    ap.add_argument("--teacher-warmup", type=int, default=3)
    ap.add_argument("--teacher-mem-shapes", nargs="*", default=["wide"], choices=["tiny", "wide"])
    ap.add_argument("--teacher-mem-prompt", type=int, default=4096)
    ap.add_argument("--teacher-mem-batches", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--quick", action="store_true",
                    help="teacher attention on a small setting (tiny model, short prompts, 3 rounds): for tests")
    ap.add_argument("--skip", nargs="*", default=[], choices=names)
    ap.add_argument("--only", nargs="*", default=None, choices=names, help="run these sections alone")
    ap.add_argument("--out", default="outputs/bench/bench.json",
                    help="JSON report; an existing file keeps the sections this run does not measure")
    ap.add_argument("--real-vocab-models", nargs="*", default=["tiny_llama3_vocab", "tiny_llama4_vocab"],
                    help="models whose real vocabulary the loss memory is measured at")
    ap.add_argument("--real-vocab-tokens", type=int, default=1024, help="tokens of the real-vocabulary memory runs")
    ap.add_argument("--dry-run", action="store_true", help="print the sections and settings this run would use; run nothing")
    ap.add_argument("--env-episodes", type=int, default=32, help="episodes of the lockstep benchmark (env)")
    ap.add_argument("--env-model", default="tiny_agent", help="model of the lockstep benchmark (env)")
    ap.add_argument("--onpolicy-new-tokens", type=int, default=64,
                    help="onpolicy: tokens the student samples per answer (the off-policy step scores "
                         "--response-tokens)")
    ap.add_argument("--_loss-child", dest="loss_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_real-vocab-child", dest="real_vocab_child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_teacher-memory-child", dest="teacher_memory_child", nargs=5, default=None,
                    help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        chosen = [n for n, _ in SECTIONS.values() if n not in args.skip and (args.only is None or n in args.only)]
        print(f"genpi-bench would run: {', '.join(chosen)}; report: {args.out}")
        print(json.dumps({k: v for k, v in vars(args).items() if not k.endswith("child")}, indent=1, default=str))
        return
    if args.real_vocab_child:
        from genpi.models.real_vocab import loss_memory_child

        print(json.dumps(loss_memory_child(*args.real_vocab_child, args.mem_tokens, args.chunk)))
        return
    if args.loss_child:
        _loss_memory_child(args.loss_child, args.mem_tokens, args.mem_vocab, args.mem_hidden, args.chunk)
        return
    if args.teacher_memory_child:
        path, shape, batch, prompt_len, suffix_len = args.teacher_memory_child
        _teacher_memory_child(path, shape, int(batch), int(prompt_len), int(suffix_len))
        return
    if args.quick:
        args.teacher_shapes, args.teacher_prompts, args.teacher_suffix = ["tiny"], [64, 256], 32
        args.teacher_steps, args.teacher_warmup, args.teacher_batch = 3, 1, 2
        args.teacher_mem_shapes, args.teacher_mem_prompt, args.teacher_mem_batches = ["tiny"], 256, [4]
    if args.teacher_batch is None:
        args.teacher_batch = {"tiny": 8, "wide": 2}
    torch.manual_seed(0)
    out = Path(args.out)
    report: dict[str, Any] = {}
    if out.is_file():
        try:
            report = json.loads(out.read_text())
        except ValueError:
            report = {}
    report["versions"] = _versions()
    earlier = dict(report)  # the sections as they were before this run (partial saves overwrite ``report``)

    def _with_earlier(key: str, result: Any) -> Any:
        """A section's result, with what it keeps of the report's earlier run of it (see KEEP_EARLIER)."""
        keep = KEEP_EARLIER.get(key)
        return keep(earlier.get(key), result) if keep and isinstance(result, dict) else result

    out.parent.mkdir(parents=True, exist_ok=True)
    for key, (name, fn) in SECTIONS.items():
        if name in args.skip or (args.only is not None and name not in args.only):
            continue

        def save_partial(result: dict[str, Any], key: str = key) -> None:
            report[key] = {**_with_earlier(key, result), "versions": report["versions"]}
            out.write_text(json.dumps(report, indent=2))

        args.save_partial = save_partial
        result = fn(args)
        if isinstance(result, dict):
            result.setdefault("versions", report["versions"])
        report[key] = _with_earlier(key, result)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"bench: {out}")


if __name__ == "__main__":
    main()
