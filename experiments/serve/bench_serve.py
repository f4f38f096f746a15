"""Requests per second and prompt tokens per request: genpi-serve (the prompt stripped) vs a plain vLLM server that
is given the full prompt, side by side in one run.

Both servers load the same base model and the same LoRA adapter; both keep vLLM's defaults (prefix caching on, so
the plain server reads the shared prompt from its cache after the first request: the realistic baseline). Each
request is the first request of an AgentBench OS episode (the prompt's transcript, then the open turn with a
problem of the dev split), greedy, with a fixed answer length (``ignore_eos``) so both servers decode the same
number of tokens. Rounds alternate between the servers, so a slow-down of the machine hits both alike; the median
round is the figure to quote on a busy machine.

    python experiments/serve/bench_serve.py --run-dir <genpi-train run> --prompt ../shared/agentbench/os.prompt.txt \
        --problems ../shared/agentbench/os_interaction/data/dev.json

writes ``experiments/serve/results/serve_bench_prefix_cache_on.json`` (``--prefix-caching off``: ``..._off.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not answer within {timeout_s} s")


def chat(url: str, model: str, messages: list[dict], max_tokens: int) -> tuple[dict, dict]:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())


def load_round(url: str, model: str, requests: list[list[dict]], max_tokens: int, concurrency: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda m: chat(url, model, m, max_tokens), requests))
    wall = time.perf_counter() - t0
    prompt_tokens = [body["usage"]["prompt_tokens"] for _, body in results]
    saved = [int(h.get("x-genpi-tokens-saved", 0)) for h, _ in results]
    stripped = sum(h.get("x-genpi-prompt-stripped") == "yes" for h, _ in results)
    return {"wall_s": wall, "requests_per_s": len(requests) / wall, "prompt_tokens_mean": statistics.mean(prompt_tokens),
            "tokens_saved_mean": statistics.mean(saved), "stripped": stripped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a genpi-train run whose adapter internalized --prompt")
    ap.add_argument("--prompt", required=True, help="the prompt transcript the run internalized (task.prompt_path)")
    ap.add_argument("--problems", required=True, help="AgentBench OS data file (data/dev.json): the descriptions")
    ap.add_argument("--requests", type=int, default=32, help="requests per round")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    ap.add_argument("--max-tokens", type=int, default=32, help="answer tokens per request (end of turn ignored)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per server, alternating")
    ap.add_argument("--prefix-caching", choices=("on", "off"), default="on",
                    help="vLLM's prefix caching on both servers (on: vLLM's default)")
    ap.add_argument("--out", default=None, help="default: experiments/serve/results/serve_bench_prefix_cache_<on|off>.json")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from omegaconf import OmegaConf

    from genpi.evaluation.generation import lora_rank, vllm_max_lora_rank
    from genpi.models.factory import resolve_model_path
    from genpi.serving.server import server_module
    from genpi.tasks import build_task

    task_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "genpi" / "conf" / "task" / "os.yaml"))
    task = build_task(**{**task_cfg, "prompt_path": args.prompt})
    problems = [p["description"] for p in json.loads(Path(args.problems).read_text())]
    head, lead = task.prompt_turns[:-1], task.prompt_turns[-1]["content"]
    requests = [[dict(t) for t in head] + [{"role": "user", "content": f"{lead}\n\n{problems[i % len(problems)]}"}]
                for i in range(args.requests)]
    adapter = Path(args.run_dir).resolve() / "adapter"
    base = resolve_model_path({"name_or_path": "tiny"})

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "GENPI_SERVE_API_KEY": ""}
    args.out = args.out or str(ROOT / "experiments" / "serve" / "results"
                               / f"serve_bench_prefix_cache_{args.prefix_caching}.json")
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    genpi_port, plain_port = free_port(), free_port()
    genpi_cmd = [sys.executable, "-m", "genpi.serve", f"run_dir={args.run_dir}", f"task.prompt_path={args.prompt}",
                 f"serve.port={genpi_port}", "serve.echo_log=false", "serve.ready_timeout_s=3000",
                 f"paths.output_root={logs / 'genpi-serve-bench'}"]
    plain_cmd = [sys.executable, "-m", server_module(), "--model", base, "--port", str(plain_port), "--host",
                 "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--served-model-name", "plain-base",
                 "--enable-lora", "--max-loras", "1", "--max-lora-rank", str(vllm_max_lora_rank(lora_rank(adapter))),
                 "--lora-modules", f"plain-student={adapter}"]
    if args.prefix_caching == "off":
        genpi_cmd.append('serve.extra_args=["--no-enable-prefix-caching"]')
        plain_cmd.append("--no-enable-prefix-caching")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=(logs / f"bench-{name}.log").open("w"))
             for name, cmd in (("genpi", genpi_cmd), ("plain", plain_cmd))]
    servers = {"genpi_serve_stripped": (f"http://127.0.0.1:{genpi_port}", "genpi-student", procs[0]),
               "plain_vllm_full_prompt": (f"http://127.0.0.1:{plain_port}", "plain-student", procs[1])}
    try:
        for url, _, proc in servers.values():
            wait_healthy(url, proc, 3000)  # a busy machine can take many minutes to start vLLM
        for url, model, _ in servers.values():  # warm-up: LoRA loading, first allocations, the plain server's cache
            load_round(url, model, requests[:2], 2, 2)
        samples: dict[str, list[dict]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, (url, model, _) in servers.items():
                samples[name].append(load_round(url, model, requests, args.max_tokens, args.concurrency))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = {"setup": {"model": "tiny (1.8M-parameter Llama, float32)", "adapter": "LoRA r=16 via --lora-modules",
                        "requests_per_round": args.requests, "concurrency": args.concurrency,
                        "answer_tokens": args.max_tokens, "rounds": args.rounds, "prompt": Path(args.prompt).name,
                        "prefix_caching": f"{args.prefix_caching} for both servers (vLLM's default: on)",
                        "machine_cpus": os.cpu_count(), "load_average_1min_at_end": os.getloadavg()[0]}}
    for name, rows in samples.items():
        result[name] = {"requests_per_s_best": max(r["requests_per_s"] for r in rows),
                        "requests_per_s_median": statistics.median(r["requests_per_s"] for r in rows),
                        "prompt_tokens_per_request": rows[-1]["prompt_tokens_mean"],
                        "tokens_saved_per_request": rows[-1]["tokens_saved_mean"],
                        "stripped_per_round": rows[-1]["stripped"], "rounds": rows}
    g, p = result["genpi_serve_stripped"], result["plain_vllm_full_prompt"]
    result["speedup_requests_per_s_median"] = g["requests_per_s_median"] / p["requests_per_s_median"]
    result["prompt_tokens_ratio"] = p["prompt_tokens_per_request"] / g["prompt_tokens_per_request"]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in servers}, indent=2))
    for name in servers:
        print(name, {k: round(v, 2) for k, v in result[name].items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
