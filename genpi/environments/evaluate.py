"""The environment evaluation: teacher, student and floor play every problem in the sandbox; success is judged.

:func:`play` runs the episodes given a ``generate`` function; :func:`run_env_evaluation` picks the engine:
transformers in this process, or vLLM in a worker process (``python -m genpi.environments.vllm_worker``) that
builds the engine under its ``__main__`` guard and runs the same :func:`play` there, so the episode loop sits next
to the engine and each round is one ``LLM.generate`` call per adapter state.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from genpi.environments import results
from genpi.environments.agents import SIDE_ADAPTER, AgentView, GenerateFn, ModelPolicy
from genpi.environments.problems import Problem
from genpi.environments.protocol import EnvText
from genpi.environments.runner import RunStats, run_episodes
from genpi.utils.errors import GenpiError

log = logging.getLogger(__name__)


def make_spec(*, problems: list[Problem], sides: list[str], view: AgentView, text: EnvText, sandbox_cfg: Any,
              backend: str, round_limit: int, max_running: int, max_new_tokens: int, max_model_len: int | None,
              model_cfg: dict[str, Any], episodes_path: str | Path) -> dict[str, Any]:
    """Everything :func:`play` needs, as plain JSON (it may travel to the vLLM worker)."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(sandbox_cfg):
        sandbox_cfg = asdict(sandbox_cfg)
    return {"problems": [p.to_dict() for p in problems], "sides": list(sides), "view": asdict(view),
            "text": asdict(text), "sandbox": sandbox_cfg, "backend": backend, "round_limit": int(round_limit),
            "max_running": int(max_running), "max_new_tokens": int(max_new_tokens), "max_model_len": max_model_len,
            "model_cfg": model_cfg, "episodes_path": str(episodes_path)}


def play(spec: dict[str, Any], generate: GenerateFn, tokenizer=None) -> dict[str, Any]:
    """Every (problem, side) episode in lockstep; ``episodes.jsonl`` written as they end. Returns the summary."""
    from genpi.environments.sandbox import make_sandbox
    from genpi.models.factory import load_tokenizer

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec["model_cfg"])
    problems = [Problem.from_dict(p) for p in spec["problems"]]
    policy = ModelPolicy(tokenizer, generate, AgentView(**spec["view"]), spec["max_new_tokens"], spec["max_model_len"])
    sandbox = make_sandbox(spec["sandbox"], spec["backend"])
    stats = RunStats()
    # side by side per problem, so a partial run still compares the three sides on the same problems
    jobs = [(p, side) for p in problems for side in spec["sides"]]
    episodes = run_episodes(jobs, policy, sandbox, EnvText(**spec["text"]), spec["round_limit"],
                            spec["max_running"], on_done=results.EpisodeLog(spec["episodes_path"]), stats=stats)
    records = [ep.record() for ep in episodes]
    return {"summary": results.summarize(records, spec["sides"]),
            "stats": {"rounds": stats.rounds, "generation_calls": stats.generation_calls, "episodes": stats.episodes,
                      "seconds": stats.seconds, "seconds_generation": stats.seconds_generation,
                      "seconds_shell": stats.seconds_shell}}


def hf_generate_fn(model, tokenizer, max_new_tokens: int, batch_size: int) -> GenerateFn:
    """Greedy generation with transformers: one call per adapter state in the batch (peft switches the adapter for
    the whole model)."""
    from genpi.evaluation.generation import hf_generate
    from genpi.synthesis.clients.base import end_of_turn_ids

    stop = end_of_turn_ids(tokenizer)
    has_adapter = hasattr(model, "disable_adapter")

    def generate(prompts: list[list[int]], adapters: list[bool]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        for flag in sorted(set(adapters)):
            idx = [i for i, a in enumerate(adapters) if a == flag]
            gen = hf_generate(model, [prompts[i] for i in idx], max_new_tokens, stop, tokenizer.pad_token_id,
                              adapter=flag if has_adapter else None, batch_size=batch_size)
            for i, g in zip(idx, gen):
                out[i] = g
        return out

    return generate


def model_context_length(model_cfg: dict[str, Any]) -> int | None:
    """The model's context window (``max_position_embeddings``), or None when its config does not say."""
    from transformers import AutoConfig

    from genpi.models.factory import resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path(model_cfg))
    return getattr(cfg, "max_position_embeddings", None)


def run_env_evaluation(spec: dict[str, Any], engine: str, model_cfg: dict[str, Any], adapter_dir: str | Path | None,
                       out_dir: str | Path, batch_size: int = 8, vllm_opts: dict[str, Any] | None = None,
                       model=None) -> dict[str, Any]:
    """Play the spec's episodes with ``engine`` (hf | vllm); returns ``{"summary", "stats", "engine"}``.

    ``model``: with ``hf``, an already loaded model to reuse (the peft student when the student side plays)."""
    if "student" in spec["sides"] and adapter_dir is None:
        raise GenpiError("the student side needs an adapter (run_dir= or adapter=); or set "
                         "eval.env.sides=[teacher,floor]")
    t0 = time.perf_counter()
    if engine == "vllm":
        out = run_vllm_worker(spec, model_cfg, adapter_dir, Path(out_dir) / "vllm_env", **(vllm_opts or {}))
    else:
        from genpi.models.factory import load_model, load_tokenizer

        tokenizer = load_tokenizer(model_cfg)
        if model is not None:
            pass
        elif adapter_dir is not None and any(SIDE_ADAPTER[s] for s in spec["sides"]):
            from peft import PeftModel

            model = PeftModel.from_pretrained(load_model(model_cfg, for_training=False), str(adapter_dir),
                                              is_trainable=False).eval()
        else:
            model = load_model(model_cfg, for_training=False).eval()
        out = play(spec, hf_generate_fn(model, tokenizer, spec["max_new_tokens"], batch_size), tokenizer)
    out["engine"] = engine
    out["stats"]["wall_s"] = time.perf_counter() - t0
    return out


def run_vllm_worker(spec: dict[str, Any], model_cfg: dict[str, Any], adapter_dir: str | Path | None,
                    workdir: Path, timeout_s: float | None = 3600, kvcache_gb: float | None = 1,
                    multiprocessing: bool | None = None, **_: Any) -> dict[str, Any]:
    """Run :func:`play` in ``python -m genpi.environments.vllm_worker`` (see :mod:`genpi.evaluation.generation`
    for why vLLM lives in its own process)."""
    from genpi.evaluation import generation
    from genpi.evaluation.generation import lora_rank, vllm_max_lora_rank
    from genpi.models.factory import resolve_model_path

    job = {"spec": spec, "model": resolve_model_path(model_cfg), "dtype": str(model_cfg.get("dtype", "float32")),
           "adapter": str(adapter_dir) if adapter_dir is not None else None,
           "max_lora_rank": vllm_max_lora_rank(lora_rank(adapter_dir)) if adapter_dir is not None else None}
    return generation.run_vllm_worker(job, workdir, timeout_s=timeout_s, kvcache_gb=kvcache_gb,
                                      multiprocessing=multiprocessing, worker="genpi.environments.vllm_worker",
                                      what="the vLLM environment worker")


# -- from the Hydra config ------------------------------------------------------------------------
def read_settings(cfg) -> tuple[Any, Any]:
    """``(env, eval.env)`` as typed settings (:class:`genpi.schema.Env`, :class:`genpi.schema.EvalEnv`); a bad value
    is a one-line :class:`GenpiError`."""
    from genpi import schema

    env = schema.read(cfg.get("env"), schema.Env, "env")
    ev = cfg.get("eval")
    ev_env = schema.read(ev.get("env") if ev is not None else None, schema.EvalEnv, "eval.env")
    return env, ev_env


def sandbox_cfg(env) -> dict[str, Any]:
    """``env.sandbox`` as the sandbox factory takes it; the docker image is built from the AgentBench checkout's
    ``res/dockerfiles/default`` unless a Dockerfile is named."""
    from dataclasses import asdict

    cfg = asdict(env.sandbox)
    if cfg.get("dockerfile") is None and env.data_dir:
        default = Path(env.data_dir).expanduser() / "res" / "dockerfiles" / "default"
        if default.is_file():
            cfg["dockerfile"] = str(default)
    return cfg


def text_of(env) -> EnvText:
    return EnvText(lead_separator=env.lead_separator, observation=env.observation,
                   empty_observation=env.empty_observation, output_limit=env.output_limit,
                   output_keep=env.output_keep, truncation_note=env.truncation_note)


def view_of(env, task) -> AgentView:
    """The teacher's prompt: ``env.prompt_path`` when set, else the task's (the prompt the adapter internalized)."""
    turns = task.prompt_turns
    if env.prompt_path:
        from genpi.tasks.transcript import load_prompt_file

        turns = load_prompt_file(env.prompt_path)
    return AgentView.from_turns(turns, env.lead_separator, task.student_template)


def problems_of(env) -> list[Problem]:
    from genpi.environments.problems import load_problems

    problems = load_problems(env.data_dir, env.split)
    return problems[: env.max_problems] if env.max_problems else problems


def prepare(cfg, task) -> dict[str, Any] | None:
    """Everything the environment evaluation needs, read and checked before any model loads; None when
    ``eval.env.enabled`` is false."""
    from genpi.utils.hydra_utils import to_dict

    env, ev_env = read_settings(cfg)
    if not ev_env.enabled:
        return None
    problems = problems_of(env)
    from genpi.environments.sandbox import make_sandbox

    make_sandbox(sandbox_cfg(env), env.backend)  # a backend this machine cannot run is refused now, in one line
    model_cfg = to_dict(cfg.model)
    max_len = ev_env.max_model_len or model_context_length(model_cfg)
    return {"env": env, "eval_env": ev_env, "problems": problems, "view": view_of(env, task), "model_cfg": model_cfg,
            "max_model_len": max_len}


def evaluate(prep: dict[str, Any], engine: str, adapter_dir: str | Path | None, out_dir: str | Path,
             batch_size: int = 8, vllm_opts: dict[str, Any] | None = None, model=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the prepared environment evaluation; ``episodes.jsonl`` goes into ``out_dir``. Returns the ``env``
    entry of ``metrics.json`` (the summary per side, ``gap_closed``, the run's figures) and its ``info``."""
    env, ev_env = prep["env"], prep["eval_env"]
    spec = make_spec(problems=prep["problems"], sides=list(ev_env.sides), view=prep["view"], text=text_of(env),
                     sandbox_cfg=sandbox_cfg(env), backend=env.backend, round_limit=env.round_limit,
                     max_running=ev_env.max_running, max_new_tokens=ev_env.max_new_tokens,
                     max_model_len=prep["max_model_len"], model_cfg=prep["model_cfg"],
                     episodes_path=Path(out_dir) / "episodes.jsonl")
    out = run_env_evaluation(spec, engine, prep["model_cfg"], adapter_dir, out_dir, batch_size, vllm_opts, model)
    summary = out["summary"]
    info = {"env": env.name, "split": env.split, "data_dir": str(env.data_dir), "backend": env.backend,
            "problems": len(prep["problems"]), "sides": list(ev_env.sides), "engine": out["engine"],
            "round_limit": env.round_limit, "max_new_tokens": ev_env.max_new_tokens,
            "max_model_len": prep["max_model_len"], "episodes": "episodes.jsonl",
            "show_trajectories": ev_env.show_trajectories}
    return {**summary, "run": out["stats"]}, info
