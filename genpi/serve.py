"""genpi-serve: the internalized student behind vLLM's OpenAI-compatible server, the prompt stripped on the way in
(``python -m genpi.serve run_dir=...``). See ``conf/serve.yaml`` for every option and :mod:`genpi.serving` for how.

Every input is checked before anything loads: the serve options, the run or adapter (and that it was trained on
this base model, this task and this prompt), the port. Then the server starts and ``serving on http://HOST:PORT``
is printed once it answers.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from genpi import schema
from genpi.evaluation import artifacts  # also registers the genpi_eval_name resolver serve.yaml's run_name uses
from genpi.serving.server import MIDDLEWARE, ServePlan, check_port, run, server_module
from genpi.tasks import build_task
from genpi.utils.errors import GenpiError
from genpi.utils.hydra_utils import to_dict
from genpi.utils.wrappers import run_dir_of, task_wrapper

log = logging.getLogger("genpi.serve")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_trained_on(where: Path, meta: dict, info: dict, task, model_name: str) -> None:
    """Refuse a student trained on another base model, for another task, or on another prompt of the task."""
    trained_model = meta.get("model") or info.get("model")
    if trained_model and trained_model != model_name:
        raise GenpiError(f"{where} was trained on base model {trained_model}, but genpi-serve loads {model_name}: "
                         "set model= (or model.name_or_path=) to the base it was trained on")
    trained_task = meta.get("task") or info.get("task")
    if trained_task and trained_task != task.name:
        raise GenpiError(f"{where} was trained for task {trained_task}, but genpi-serve would strip the prompt of "
                         f"task {task.name}: set task={trained_task}")
    prompt_id = info.get("prompt_id")
    if prompt_id and prompt_id != task.prompt_id:
        raise GenpiError(f"{where} internalized prompt {prompt_id} of task {task.name}, but the configured prompt is "
                         f"{task.prompt_id}: set task.prompt_path to the prompt the run was trained on")


def plan_server(cfg: DictConfig) -> ServePlan:
    """Check the config and decide what vLLM serves; nothing is loaded and nothing is started here."""
    opts = schema.read(cfg.get("serve"), schema.Serve, "serve")
    server_module()
    from genpi.evaluation.generation import VLLM_DTYPES, lora_rank, vllm_engine_vars, vllm_max_lora_rank
    from genpi.models.factory import model_fingerprint, resolve_model_path

    task = build_task(**to_dict(cfg.task))
    model_name = model_fingerprint(cfg.model)
    workdir = run_dir_of(cfg)

    adapter_dir: Path | None = None
    model_path: str | None = None
    if opts.merged:
        merged = Path(opts.merged).expanduser()
        if not (merged / "config.json").is_file():
            raise GenpiError(f"no model folder at serve.merged={merged} (looked for {merged / 'config.json'}): set it "
                             "to the merged/ folder genpi-export wrote with export.merged=true")
        meta = artifacts.read_json(merged / artifacts.ADAPTER_META)
        run_info = artifacts.read_json(Path(meta["run_dir"]) / "run.json") if meta.get("run_dir") else {}
        _check_trained_on(merged, meta, run_info, task, model_name)
        model_path = str(merged.resolve())
    elif opts.mode == "student":
        art = artifacts.locate(cfg.get("run_dir"), opts.adapter, cfg.paths.output_root, task.name, model_name,
                               workdir, cfg.model)
        _check_trained_on(art.adapter_dir, art.adapter_meta, art.run_info, task, model_name)
        adapter_dir = Path(art.adapter_dir).resolve()
    elif cfg.get("run_dir"):
        rd = Path(str(cfg.run_dir)).expanduser()
        if not (rd / "run.json").is_file():
            raise GenpiError(f"run folder not found: {rd} (no run.json; set run_dir= to a genpi-train run folder, or "
                             f"leave it out: serve.mode={opts.mode} serves the base model)")
        info = artifacts.read_json(rd / "run.json")
        _check_trained_on(rd, {}, info, task, model_name)

    check_port(opts.host, opts.port)
    base_path = resolve_model_path(cfg.model)
    model_path = model_path or base_path
    name = opts.served_model_name or f"genpi-{opts.mode}"
    dtype = opts.dtype or str(cfg.model.dtype)
    if dtype not in VLLM_DTYPES:
        raise GenpiError(f"model.dtype={dtype!r} has no vLLM equivalent: set serve.dtype to auto, float32, bfloat16 "
                         "or float16")
    cuda = _cuda()
    args = ["--model", model_path, "--host", opts.host, "--port", str(opts.port), "--dtype", VLLM_DTYPES[dtype],
            "--seed", str(opts.seed), "--tensor-parallel-size", str(opts.tensor_parallel_size),
            "--middleware", MIDDLEWARE]
    if opts.max_model_len:
        args += ["--max-model-len", str(opts.max_model_len)]
    if opts.enforce_eager if opts.enforce_eager is not None else not cuda:
        args.append("--enforce-eager")
    rank = None
    if adapter_dir is not None:
        rank = vllm_max_lora_rank(lora_rank(adapter_dir))
        # the student is the LoRA module clients name; the bare base stays reachable under <name>-base
        args += ["--served-model-name", f"{name}-base", "--enable-lora", "--max-loras", "1",
                 "--max-lora-rank", str(rank), "--lora-modules", f"{name}={adapter_dir}"]
    else:
        args += ["--served-model-name", name]
    chat_template = cfg.model.get("chat_template")
    if chat_template:
        template_file = workdir / "chat_template.jinja"
        workdir.mkdir(parents=True, exist_ok=True)
        template_file.write_text(str(chat_template))
        args += ["--chat-template", str(template_file)]
    args += list(opts.extra_args)

    env: dict[str, str] = {"TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")}
    env.update(vllm_engine_vars(cuda, opts.kvcache_gb, opts.multiprocessing))
    # The key travels only in the child's environment: never on its command line (visible to `ps`), never on disk.
    env["VLLM_API_KEY"] = os.environ.get(opts.api_key_env, "")

    spec = {"mode": opts.mode, "task": to_dict(cfg.task), "tokenizer": model_path,
            "chat_template": str(chat_template) if chat_template else None, "served_model_name": name,
            "model": model_name, "adapter": str(adapter_dir) if adapter_dir else None,
            "merged": model_path if opts.merged else None, "prompt_id": task.prompt_id}
    return ServePlan(opts.mode, model_path, name, opts.host, opts.port, spec, str(adapter_dir) if adapter_dir else None,
                     rank, args, env)


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
@task_wrapper
def _hydra_main(cfg: DictConfig) -> int:
    opts = schema.read(cfg.get("serve"), schema.Serve, "serve")
    plan = plan_server(cfg)
    workdir = run_dir_of(cfg)
    student = plan.spec["adapter"] or plan.spec["merged"] or "none (base model)"
    log.info("mode %s, student %s, model name %r, prompt %s of task %s", plan.mode, student, plan.served_model_name,
             plan.spec["prompt_id"], plan.spec["task"]["name"])
    (workdir / "serve.json").write_text(json.dumps({k: v for k, v in plan.spec.items() if k != "task"}, indent=2))
    code = run(plan, workdir, opts.ready_timeout_s, echo_log=opts.echo_log)
    if code not in (0, -2, -15):
        raise SystemExit(code)
    return code


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
