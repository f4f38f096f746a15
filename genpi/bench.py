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
- the synthesis throughput of batched vs one-at-a-time role swapping (experiments/bench/bench_roleswap.py).
"""

from __future__ import annotations

import argparse
import json
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

    def make(kl_w: float, sft_w: float, pg_w: float, teacher: str = "online", prefix_cache: bool = True):
        m = GenPIModule(model, {"kl": {"weight": kl_w, "teacher": teacher, "prefix_cache": prefix_cache},
                                "sft": {"weight": sft_w}, "pg": {"weight": pg_w}}, {"lr": 1e-4}, prompt.ids)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            m.compute(batch)["loss"].backward()
            opt.step()

        return m, step

    naive, _ = make(1, 0, 0, prefix_cache=False)
    cached, _ = make(1, 0, 0, prefix_cache=True)
    t_naive = _timeit(lambda: naive.teacher_hidden(batch["kl"]), args.steps)
    t_cached = _timeit(lambda: cached.teacher_hidden(batch["kl"]), args.steps)
    diff = (naive.teacher_hidden(batch["kl"]) - cached.teacher_hidden(batch["kl"])).abs().max().item()
    out["teacher_pass"] = {"naive_s": t_naive, "prefix_cached_s": t_cached, "speedup": t_naive / t_cached,
                           "max_abs_diff": diff}

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
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "chunked":
        kl = losses.chunked_distill_loss(hs, ht, w, kind="forward_kl", chunk_size=chunk)
        ce = losses.chunked_token_cross_entropy(hs, w, targets, chunk_size=chunk)
    else:
        s_logits, t_logits = hs @ w.T, ht @ w.T
        kl = losses.distill_loss(s_logits, t_logits, torch.ones(n_tokens, dtype=torch.bool), kind="forward_kl")
        ce = losses.token_cross_entropy(s_logits, targets)
    (kl + ce).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kl": kl.item(), "ce": ce.item(), "grad_norm": hs.grad.norm().item(),
                      "peak_mb": peak / 1024, "delta_mb": (peak - base) / 1024}))


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


def main(argv: list[str] | None = None) -> None:
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
    ap.add_argument("--env-episodes", type=int, default=32, help="episodes of the lockstep benchmark (env)")
    ap.add_argument("--env-model", default="tiny_agent", help="model of the lockstep benchmark (env)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["training", "memory", "topk", "roleswap", "env"])
    ap.add_argument("--out", default="outputs/bench/bench.json")
    ap.add_argument("--_loss-child", dest="loss_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loss_child:
        _loss_memory_child(args.loss_child, args.mem_tokens, args.mem_vocab, args.mem_hidden, args.chunk)
        return
    torch.manual_seed(0)
    report: dict[str, Any] = {"versions": _versions()}
    if "training" not in args.skip:
        report["training"] = bench_training(args)
    if "memory" not in args.skip:
        report["loss_memory"] = bench_loss_memory(args)
    if "topk" not in args.skip:
        report["topk"] = bench_topk(args)
    if "roleswap" not in args.skip:
        report["roleswap"] = bench_roleswap(args)
    if "env" not in args.skip:  # episodes/s batched in lockstep vs one at a time (genpi/environments/bench.py)
        from genpi.environments.bench import bench_episodes

        report["env_episodes"] = bench_episodes(args.env_model, args.env_episodes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"bench: {out}")


if __name__ == "__main__":
    main()
