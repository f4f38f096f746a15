"""genpi-train: GenPI training on one task (``python -m genpi.train``)."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from genpi import launching, schema
from genpi.data.tokenize import teacher_prompt
from genpi.runs import (
    config_hash,
    differing_keys,
    identity_keys,
    last_checkpoint,
    read_json,
    update_json,
    wandb_run_id,
    write_json,
)
from genpi.synthesis.clients.base import end_of_turn_ids
from genpi.tasks import build_task
from genpi.tasks.base import task_fingerprint
from genpi.utils.errors import GenpiError
from genpi.utils.hydra_utils import to_dict
from genpi.utils.tracking import numeric_leaves
from genpi.utils.wrappers import launch_id, run_dir_of, task_wrapper

if TYPE_CHECKING:  # torch, Lightning and transformers load inside train(): --help and a bad config answer at once
    import pytorch_lightning as pl

    from genpi.data.datamodule import GenPIDataModule
    from genpi.module import GenPIModule

log = logging.getLogger("genpi.train")


def build_datamodule(spec: schema.Train, task, tokenizer) -> GenPIDataModule:
    from genpi.data.datamodule import GenPIDataModule

    data, loss = spec.data, spec.loss
    return GenPIDataModule(
        task, tokenizer, path=data.path, losses=loss.active_terms, batch_size=data.batch_size,
        eval_batch_size=data.eval_batch_size, val_size=data.val_size, test_size=data.test_size, seed=data.seed,
        limits=dataclasses.asdict(data.limits), pg_reason=loss.pg.reason, sft_source=loss.sft.source,
        w_prompt_drop_prob=loss.w_prompt.drop_prob if loss.w_prompt.enabled else None,
        group_by_length=data.group_by_length, max_records=data.max_records, num_workers=data.num_workers,
        overfit=data.overfit, drop_duplicates=data.drop_duplicates,
        kl_turns=loss.kl.sampling.turns if loss.kl.on_policy else 1,
    )


def resume_point(spec: schema.Train, run_dir: Path, identity: dict[str, Any], fdr: bool) -> Path | None:
    """The checkpoint this run continues from, after checking that the folder holds a run of the same config.

    A folder whose ``run.json`` records other identity keys is refused with the differing keys (``resume=force``
    continues anyway); a smoke test (``fast_dev_run``) never resumes; ``resume=false`` refuses an existing checkpoint.
    """
    if spec.ckpt_path:
        if not Path(spec.ckpt_path).is_file():
            raise GenpiError(f"checkpoint not found: {spec.ckpt_path} (set ckpt_path to an existing .ckpt, or null)")
        return Path(spec.ckpt_path)
    ckpt = None if fdr else last_checkpoint(run_dir)
    if ckpt is None:
        return None
    if spec.resume is False:
        raise GenpiError(f"run folder {run_dir} already holds a checkpoint: set resume=true to continue it, "
                         "or change run_name to start a new run")
    stored = (read_json(run_dir / "run.json").get("identity") or {}).get("keys")
    if stored is not None and spec.resume != "force":
        diff = differing_keys(stored, identity)
        if diff:
            raise GenpiError(f"run folder {run_dir} holds a run of another config ({'; '.join(diff[:6])}"
                             f"{'; ...' if len(diff) > 6 else ''}): change run_name or hydra.run.dir to start a new "
                             "run, or set resume=force to continue it under this config")
    return ckpt


def _loggers(cfg: DictConfig, run_dir: Path, identity_hash: str) -> list:
    out = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None:
            continue
        if name == "wandb":
            with open_dict(lcfg):
                lcfg.id = lcfg.id or wandb_run_id(run_dir, identity_hash, launch_id())
                lcfg.resume = "allow"
                lcfg.tags = list(cfg.get("tags") or []) + _override_tags()
            out.append(hydra.utils.instantiate(lcfg, _convert_="partial"))
            out[-1].experiment.config.update(_loggable_config(cfg), allow_val_change=True)
        else:
            out.append(hydra.utils.instantiate(lcfg))
    return out


def _override_tags() -> list[str]:
    """The command-line overrides as W&B tags: what distinguishes runs of one sweep at a glance.

    Paths (machine-specific, often long) and anything naming a key or token are left out; W&B refuses tags
    over 64 characters, so longer overrides are cut with an ellipsis.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    tags = []
    for o in HydraConfig.get().overrides.task:
        key = o.split("=", 1)[0].lower()
        if any(w in key for w in ("key", "token", "secret", "path", "dir", "root")):
            continue
        tags.append(o if len(o) <= 64 else o[:63] + "…")
    return tags[:64]


def _loggable_config(cfg: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg).items() if k not in ("hydra",)}


def _validate(trainer: pl.Trainer, module: GenPIModule, datamodule: GenPIDataModule) -> dict[str, float]:
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    if not results or not results[0]:
        raise GenpiError(f"the validation split of {datamodule.source} gave no batches "
                         f"({len(datamodule.datasets['val'])} records): raise data.val_size or synthesize more")
    return results[0]


def _check_on_policy_strategy(spec: schema.Train, trainer_cfg: DictConfig) -> None:
    """On-policy batches sample token by token on each rank, for as many steps as that rank's answers need: under
    FSDP every step would all-gather the sharded weights in lockstep, and ranks that stop at different lengths
    would wait for each other forever."""
    strategy = OmegaConf.select(trainer_cfg, "strategy")
    text = str(OmegaConf.to_container(strategy) if OmegaConf.is_config(strategy) else strategy).lower()
    if spec.loss.kl.on_policy and "fsdp" in text:
        raise GenpiError("loss.kl.on_policy=true cannot run under an FSDP strategy (sampling with sharded weights "
                         "would deadlock ranks whose answers end at different lengths): use trainer=ddp, or "
                         "loss.kl.on_policy=false")
    kl = spec.loss.kl
    if kl.on_policy and kl.sampling.engine == "vllm" and spec.model.load_in_4bit:
        # vLLM would load the full-precision base: its samples would not be the 4-bit student's
        raise GenpiError("loss.kl.sampling.engine=vllm samples from the full-precision base, not the 4-bit one "
                         "model.load_in_4bit=true trains: use loss.kl.sampling.engine=hf, or model.load_in_4bit=false")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Seed, build task, model, data, module, callbacks, loggers and trainer; fit; measure; save.

    Returns a dict with ``metrics`` and the objects built (for tests).
    """
    spec = schema.check(cfg, "train")  # every key typed and in range before any model loads
    _check_on_policy_strategy(spec, cfg.trainer)
    launching.check_launch(cfg.trainer, _choice("trainer"))  # a GPU trainer on a CPU machine: one line, no model
    import pytorch_lightning as pl
    import torch

    from genpi.models.factory import load_model_and_tokenizer, model_fingerprint
    from genpi.module import GenPIModule

    pl.seed_everything(spec.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    run_dir = run_dir_of(cfg)
    rank_zero = launching.process_rank() == 0  # the other ranks of a DDP job write no records and no W&B run
    identity = identity_keys(cfg)
    identity_hash = config_hash(identity)
    fdr = bool(cfg.trainer.get("fast_dev_run", False))
    ckpt = resume_point(spec, run_dir, identity, fdr)  # a folder of another config is refused before loading
    task = build_task(**to_dict(cfg.task))
    datamodule = build_datamodule(spec, task, tokenizer=None)
    datamodule.load()  # every record read and checked before any model loads
    model, tokenizer = load_model_and_tokenizer(cfg.model, for_training=True)
    datamodule.tokenizer = tokenizer
    if spec.loss.kl.teacher == "cached" and spec.loss.kl.weight > 0:
        datamodule.check_topk_tokenizer()
    datamodule.setup("fit")
    prompt = teacher_prompt(tokenizer, task)
    module = GenPIModule(model, spec.loss, spec.optim, prompt.ids, stop_ids=end_of_turn_ids(tokenizer),
                         pad_id=tokenizer.pad_token_id, seed=spec.seed, sample_engine=_sample_engine(spec, cfg, run_dir))
    resume_step = None
    if ckpt:  # before anything is written: a checkpoint of another setup is refused in one line
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
        module.check_checkpoint(checkpoint)
        resume_step = int(checkpoint.get("global_step", 0))
        del checkpoint

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [] if fdr or not rank_zero else _loggers(cfg, run_dir, identity_hash)
    for lg in loggers if resume_step is not None else []:  # history is appended to, each step once
        if hasattr(lg, "drop_rows_after_checkpoint"):
            dropped = lg.drop_rows_after_checkpoint(resume_step)
            if dropped:
                log.info("resuming at step %d: dropped %d metrics rows logged after the checkpoint", resume_step,
                         dropped)
    trainer: pl.Trainer = launching.build_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    metrics_path = run_dir / "metrics.json"
    state = read_json(metrics_path) if ckpt else {}  # a fresh start never keeps an earlier run's numbers
    metrics: dict[str, Any] = {"run/config_hash": identity_hash, **datamodule.data_report()}
    if spec.validate_before_fit and not fdr:
        if ckpt and "val/kl_start" in state:
            metrics.update({k: v for k, v in state.items() if k.endswith("_start")})
        else:
            start = _validate(trainer, module, datamodule)
            metrics.update({f"{k}_start": float(v) for k, v in start.items()})
    if not fdr and rank_zero:
        write_json(run_dir / "splits.json", datamodule.split_keys())
        write_json(run_dir / "run.json", {
            "task": task.name, "task_fingerprint": task_fingerprint(task), "prompt_id": task.prompt_id,
            "model": model_fingerprint(cfg.model), "data": str(datamodule.source), "run_name": spec.run_name,
            "lora": spec.model.lora.enabled, "config": _loggable_config(cfg),
            "identity": {"hash": identity_hash, "keys": identity},
        })
        write_json(metrics_path, metrics)

    log.info("training %s on %s (%d train / %d val records, terms %s)", task.name, datamodule.source,
             len(datamodule.datasets["train"]), len(datamodule.datasets["val"]), datamodule.losses)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    finally:  # the sampling engine's process ends with the fit, also one that fails
        if module.sampler is not None and module.sampler.engine is not None:
            module.sampler.engine.close()

    if not fdr:
        end = _validate(trainer, module, datamodule)
        metrics.update({k: float(v) for k, v in end.items()})
        for cb in callbacks:
            if hasattr(cb, "summary"):
                metrics.update(cb.summary())
        metrics.update({
            "train/steps": int(trainer.global_step),
            "data/padding_ratio": datamodule.padding_ratio(),
            "data/truncated": datamodule.truncation_counts(),
            "data/train_records": len(datamodule.datasets["train"]),
        })
        if rank_zero:
            metrics = update_json(metrics_path, **metrics)
        save_adapter(module, tokenizer, run_dir / "adapter", cfg)
        if spec.post_eval and trainer.global_rank == 0:
            metrics = update_json(metrics_path, **post_evaluate(cfg, run_dir))
        for lg in loggers:
            if hasattr(lg, "log_metrics"):
                lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
                               step=trainer.global_step)
        if rank_zero:
            log.info("metrics: %s", metrics_path)
    return {"metrics": metrics, "run_dir": run_dir, "trainer": trainer, "module": module, "datamodule": datamodule,
            "task": task, "tokenizer": tokenizer}


def _sample_engine(spec: schema.Train, cfg: DictConfig, run_dir: Path) -> Any:
    """The colocated vLLM engine of on-policy sampling (``loss.kl.sampling.engine=vllm``), one per rank; None for
    transformers sampling. Its process starts at the first on-policy batch."""
    kl = spec.loss.kl
    if not (kl.on_policy and kl.sampling.engine == "vllm"):
        return None
    from genpi.models.factory import resolve_model_path
    from genpi.onpolicy_vllm import VLLMEngine

    v = kl.sampling.vllm
    return VLLMEngine(resolve_model_path(cfg.model), spec.model.lora.r,
                      run_dir / "opcd_vllm" / f"rank{launching.process_rank()}",
                      refresh_every=kl.sampling.refresh_every, dtype=str(cfg.model.get("dtype") or "auto"),
                      seed=spec.seed, max_model_len=v.max_model_len, gpu_memory_utilization=v.gpu_memory_utilization,
                      kvcache_gb=v.kvcache_gb, timeout_s=v.timeout_s)


def post_evaluate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run genpi-eval on this run's held-out split in a fresh process; its metrics come back as ``eval/*``.

    A separate process keeps the evaluation's own Hydra run (and vLLM, if used) apart from this one.
    """
    import json
    import subprocess
    import sys

    args = [sys.executable, "-m", "genpi.evaluate", f"run_dir={_quoted(run_dir)}",
            f"paths.output_root={_quoted(cfg.paths.output_root)}", f"task={cfg.task.name}", *_model_overrides(),
            *(cfg.get("post_eval_overrides") or [])]  # schema-checked in train()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
        raise GenpiError(f"post-training evaluation failed (exit {proc.returncode}): "
                         f"{(lines or ['no output'])[-1]} (command: python -m genpi.evaluate {' '.join(args[3:])})")
    report = next((ln.split(":", 1)[1].strip() for ln in proc.stdout.splitlines() if ln.startswith("report:")), None)
    if not report:
        raise GenpiError("post-training evaluation printed no 'report:' line")
    return {"eval/report": report, **numeric_leaves(json.loads((Path(report).parent / "metrics.json").read_text()),
                                                    "eval")}


def _quoted(value: Any) -> str:
    """A value as a Hydra override literal: sweep folder names hold '=' and ',' that would split it."""
    text = str(value).replace("'", "\\'")
    return f"'{text}'"


def _choice(group: str) -> str | None:
    """The option picked for a config group (``trainer`` -> ``ddp``), when Hydra runs us."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def _model_overrides() -> list[str]:
    """What makes evaluation load the same base model and task and evaluate as asked: the model and task options
    chosen (on the command line or by an experiment file), then the command line's ``model.*`` and ``task.*``
    overrides."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hc = HydraConfig.get()
    chosen = [f"{group}={hc.runtime.choices[group]}" for group in ("model", "task") if hc.runtime.choices.get(group)]
    return chosen + [o for o in hc.overrides.task if o.startswith(("model.", "task."))]


def save_adapter(module: GenPIModule, tokenizer, folder: Path, cfg: DictConfig) -> None:
    """The trained adapter in PEFT format (or the full model under full fine-tuning), with the tokenizer."""
    import pytorch_lightning as pl

    from genpi.models.factory import model_fingerprint

    if isinstance(module.trainer.strategy, pl.strategies.FSDPStrategy):
        log.warning("FSDP run: export the adapter from the sharded checkpoint with genpi-export")
        return
    if module.trainer.global_rank != 0:
        return
    module.model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    write_json(folder / "genpi.json", {"model": model_fingerprint(cfg.model), "task": cfg.task.name,
                                       "config": OmegaConf.to_container(cfg.model, resolve=True)})


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@task_wrapper
def _hydra_main(cfg: DictConfig) -> float | None:
    with launching.ddp_job():  # the ranks Lightning starts for this job re-enter it, not the sweep
        out = train(cfg)
    if launching.process_rank() == 0:
        print(f"run folder: {out['run_dir']}")
    return out["metrics"].get(cfg.optimized_metric or "val/kl")


def main() -> None:
    sys.argv = launching.reenter_job(sys.argv)  # a rank Lightning re-launched runs rank 0's job, not its sweep
    _hydra_main()


if __name__ == "__main__":
    main()
