"""Episodes per second, batched in lockstep vs one episode at a time, on the same warm engine (``genpi-bench``).

The teacher (the model with the os prompt) plays ``n`` of genpi's own OS problems through the real sandbox twice:
with every episode in flight (one batched generation per round, the round's shell steps concurrent) and with one
episode at a time. Both runs use one engine, started and warmed up once; the figures are wall time of the whole
episode loop (sandbox included).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any


def bench_spec(model_cfg: dict[str, Any], n_episodes: int, max_new_tokens: int, backend: str, work: Path
               ) -> dict[str, Any]:
    from genpi import schema
    from genpi.environments import genpi_os
    from genpi.environments.agents import AgentView
    from genpi.environments.evaluate import make_spec, model_context_length, text_of
    from genpi.environments.problems import load_problems
    from genpi.tasks.base import builtin_task

    genpi_os.write_problems(work / "problems", n=n_episodes, seed=0)
    env = schema.Env(name="genpi_os", lead_separator="\n", observation="The terminal printed:\n{output}",
                     empty_observation="The terminal printed nothing.")
    task = builtin_task("os")
    return make_spec(problems=load_problems(work / "problems", "dev"), sides=["teacher"],
                     view=AgentView.from_turns(task.prompt_turns, env.lead_separator, task.student_template),
                     text=text_of(env), sandbox_cfg=schema.EnvSandbox(), backend=backend, round_limit=env.round_limit,
                     max_running=n_episodes, max_new_tokens=max_new_tokens,
                     max_model_len=model_context_length(model_cfg), model_cfg=model_cfg,
                     episodes_path=work / "episodes.jsonl")


def timed_runs(spec: dict[str, Any], generate, tokenizer, widths: list[int]) -> dict[str, Any]:
    """:func:`genpi.environments.evaluate.play` once per ``max_running`` width, after a warm-up generation."""
    from genpi.environments.evaluate import play

    generate([[tokenizer.bos_token_id or 0] * 8], [False])  # warm-up: first-call allocations out of the timing
    runs = {}
    for width in widths:
        t0 = time.perf_counter()
        out = play({**spec, "max_running": width, "episodes_path": f"{spec['episodes_path']}.{width}"}, generate,
                   tokenizer)
        seconds = time.perf_counter() - t0
        s = out["summary"]["teacher"]
        runs[str(width)] = {"seconds": seconds, "episodes_per_s": s["n"] / seconds, "rounds": out["stats"]["rounds"],
                            "generation_calls": out["stats"]["generation_calls"], "success_rate": s["success_rate"],
                            "rounds_mean": s["rounds_mean"], "seconds_generation": out["stats"]["seconds_generation"],
                            "seconds_shell": out["stats"]["seconds_shell"]}
    return runs


def bench_episodes(model: str = "tiny_agent", n_episodes: int = 32, max_new_tokens: int = 128, engine: str = "auto",
                   backend: str = "local") -> dict[str, Any]:
    """``{"batched": {...}, "one_at_a_time": {...}, "speedup": x, ...}`` for ``n_episodes`` teacher episodes."""
    from genpi.evaluation.generation import pick_engine

    engine = pick_engine(engine)
    model_cfg: dict[str, Any] = {"name_or_path": model, "dtype": "float32"}
    work = Path(tempfile.mkdtemp(prefix="genpi-bench-env-"))
    spec = bench_spec(model_cfg, n_episodes, max_new_tokens, backend, work)
    widths = [n_episodes, 1]
    if engine == "vllm":
        runs = _vllm_runs(spec, model_cfg, widths, work)
    else:
        from genpi.environments.evaluate import hf_generate_fn
        from genpi.models.factory import load_model, load_tokenizer

        tokenizer = load_tokenizer(model_cfg)
        model_obj = load_model(model_cfg, for_training=False).eval()
        runs = timed_runs(spec, hf_generate_fn(model_obj, tokenizer, max_new_tokens, n_episodes), tokenizer, widths)
    batched, single = runs[str(n_episodes)], runs["1"]
    return {"engine": engine, "model": model, "episodes": n_episodes, "max_new_tokens": max_new_tokens,
            "backend": backend, "batched": batched, "one_at_a_time": single,
            "speedup": batched["episodes_per_s"] / single["episodes_per_s"]}


def _vllm_runs(spec: dict[str, Any], model_cfg: dict[str, Any], widths: list[int], work: Path) -> dict[str, Any]:
    import subprocess
    import sys

    from genpi.evaluation.generation import vllm_subprocess_env
    from genpi.models.factory import resolve_model_path
    from genpi.utils.errors import GenpiError

    job = {"spec": spec, "model": resolve_model_path(model_cfg), "dtype": "float32", "adapter": None,
           "max_lora_rank": None, "bench_widths": widths}
    (work / "job.json").write_text(json.dumps(job))
    env = vllm_subprocess_env(kvcache_gb=1, multiprocessing=False)
    with (work / "worker.log").open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "genpi.environments.vllm_worker", str(work / "job.json"),
                               str(work / "result.json")], stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = (work / "worker.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise GenpiError("the episode benchmark's vLLM worker failed:\n" + "\n".join(tail))
    return json.loads((work / "result.json").read_text())["bench"]
