"""Role swapping, batched against one conversation at a time, on the same model and inputs in one run.

    .venv/bin/python experiments/bench/bench_roleswap.py                 # vLLM engine, 32 conversations
    .venv/bin/python experiments/bench/bench_roleswap.py --client hf      # transformers in-process

Both modes run :func:`genpi.synthesis.roleswap.role_swap` with greedy decoding; "one at a time" calls it
once per conversation (what the GenPI release did), "batched" once for all of them (one client call per
turn and side). Each mode runs ``--repeats`` times after a warm-up; the best time counts. Prints both timings, the speed-up (target: at least 8x at 32 conversations on the tiny
model) and whether the two modes wrote the same conversations. ``--json FILE`` saves the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


def load_yaml(group: str, name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    import genpi.utils.hydra_utils  # noqa: F401 - registers the resolvers the configs use

    return OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"), resolve=True)  # type: ignore[return-value]


def bench_roleswap(client, task, inputs: list[str], max_tokens: int, turns: int, repeats: int = 2,
                   warmup: bool = True) -> dict[str, Any]:
    """Time batched and one-at-a-time role swapping on ``client`` (agent and environment), the best of
    ``repeats`` runs of each mode; returns the figures."""
    from genpi.synthesis.clients import Sampling
    from genpi.synthesis.roleswap import role_swap

    sampling = Sampling(temperature=0.0, max_tokens=max_tokens)
    if warmup:  # first calls pay for lazy initialisation (kernels, caches) that neither mode should be charged
        role_swap(task, inputs[:2], client, client, sampling, sampling, max_turns=turns)
        role_swap(task, inputs[:1], client, client, sampling, sampling, max_turns=turns)
    t_batched = t_single = float("inf")
    for _ in range(max(1, repeats)):  # the best of a few runs: the machine's noise only ever adds time
        t0 = time.perf_counter()
        batched = role_swap(task, inputs, client, client, sampling, sampling, max_turns=turns)
        t_batched = min(t_batched, time.perf_counter() - t0)
        t0 = time.perf_counter()
        single = [role_swap(task, [x], client, client, sampling, sampling, max_turns=turns)[0] for x in inputs]
        t_single = min(t_single, time.perf_counter() - t0)
    same = sum(a.turns == b.turns for a, b in zip(batched, single))
    n_turns = sum(len(c.turns) for c in batched)
    return {
        "conversations": len(inputs), "max_turns": turns, "max_tokens": max_tokens, "turns_written": n_turns,
        "repeats": repeats,
        "batched_s": round(t_batched, 3), "one_at_a_time_s": round(t_single, 3),
        "speedup": round(t_single / t_batched, 2), "identical_conversations": same,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--client", choices=["vllm", "hf"], default="vllm", help="client running agent and environment")
    ap.add_argument("--task", default="os", help="a conf/task option")
    ap.add_argument("--model", default="tiny", help="a conf/model option")
    ap.add_argument("--conversations", type=int, default=32, help="conversations per mode")
    ap.add_argument("--turns", type=int, default=3, help="agent turns per conversation (no early end on a random model)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per turn")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode; the best time counts")
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the client's block in conf/synth/default.yaml (e.g. dtype=float32)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.path.insert(0, str(REPO))
    import yaml

    from genpi.synthesis.clients import make_client
    from genpi.tasks import build_task

    task = build_task(**load_yaml("task", args.task))
    model_cfg = load_yaml("model", args.model)
    inputs = _inputs(task, args.conversations)
    settings = _client_settings(args.client)
    for item in args.setting:
        key, _, value = item.partition("=")
        settings[key] = yaml.safe_load(value)
    client = make_client(args.client, model_cfg, settings)
    result = bench_roleswap(client, task, inputs, args.max_tokens, args.turns, repeats=args.repeats)
    result.update(client=args.client, settings=settings, model=args.model, task=args.task, machine=_machine())
    client.close()
    print(f"role swapping, {result['conversations']} conversations x {args.turns} agent turns x {args.max_tokens} "
          f"tokens, {args.client} on {args.model}")
    print(f"  one at a time: {result['one_at_a_time_s']:.2f} s")
    print(f"  batched:       {result['batched_s']:.2f} s")
    print(f"  speed-up:      {result['speedup']:.1f}x (target >= 8x)")
    print(f"  identical conversations (greedy): {result['identical_conversations']}/{result['conversations']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _client_settings(kind: str) -> dict[str, Any]:
    """The client block of conf/synth/default.yaml (read without Hydra; its interpolations are not needed)."""
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(CONF / "synth" / "default.yaml").clients[kind]))


def _inputs(task, count: int) -> list[str]:
    """The task's built-in inputs (cycled with a suffix if there are fewer), else numbered placeholders."""
    lines: list[str] = []
    path = task.inputs_path() if hasattr(task, "inputs_path") else None
    if path is not None and Path(path).is_file():
        from genpi.tasks.parsers import read_inputs_file

        lines = list(read_inputs_file(path))
    if not lines:
        lines = [f"task input number {i}" for i in range(count)]
    return [lines[i % len(lines)] + ("" if i < len(lines) else f" (variant {i // len(lines)})") for i in range(count)]


def _machine() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform()}


if __name__ == "__main__":
    main()
