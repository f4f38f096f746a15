"""Finding what to evaluate, and refusing what should not be evaluated.

- :func:`locate` finds the training run and its adapter (``adapter/``, or rebuilt from the run's last
  checkpoint when training stopped before saving it); a miss names every run folder it looked in.
- :func:`check_compatible` refuses an adapter trained on another base model or for another task.
- :func:`eval_records` reads the held-out inputs (the run's test split, or a file) and refuses inputs
  that training saw, unless allowed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from genpi.data.records import input_key
from genpi.runs import read_json
from genpi.utils.errors import GenpiError

log = logging.getLogger(__name__)

ADAPTER_META = "genpi.json"


@dataclass
class RunArtifacts:
    """A trained adapter and, when known, the training run it came from."""

    adapter_dir: Path
    run_dir: Path | None = None
    run_info: dict[str, Any] = field(default_factory=dict)      # the run's run.json
    adapter_meta: dict[str, Any] = field(default_factory=dict)  # the adapter's genpi.json
    from_checkpoint: Path | None = None                         # set when the adapter was rebuilt from it

    @property
    def splits(self) -> dict[str, list[str]]:
        """Input keys per split of the training run (``splits.json``); empty when unknown."""
        return read_json(self.run_dir / "splits.json") if self.run_dir else {}


def eval_name(run_dir: Any = None, adapter: Any = None, task: Any = None) -> str:
    """A folder name for an evaluation, derived from what it evaluates.

    The run folder's name (prefixed with its parent's when the run sits in a multirun sweep, whose job
    folders repeat across sweeps), the adapter folder's, or ``latest-<task>``.
    """
    for value in (run_dir, adapter):
        if value not in (None, "", "None"):
            p = Path(str(value).rstrip("/"))
            if p.name == "adapter" and p.parent.name:
                p = p.parent
            if p.parent.name and p.parent.name != "runs":
                return f"{p.parent.name}__{p.name}"
            return p.name
    return f"latest-{task}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("genpi_eval_name"):
        OmegaConf.register_new_resolver("genpi_eval_name", eval_name)


register_resolvers()


# -- locating the adapter ----------------------------------------------------------------------
def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def _checkpoint(run_dir: Path) -> Path | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return ckpts[-1] if ckpts and ckpts[-1].is_file() else None


def _candidate_runs(output_root: Path) -> list[Path]:
    """Training run folders under ``output_root`` (``runs/*`` and multirun jobs), newest first."""
    found = {p.parent for pattern in ("runs/*/run.json", "multirun/**/run.json") for p in output_root.glob(pattern)}
    return sorted(found, key=lambda p: (p / "run.json").stat().st_mtime, reverse=True)


def _from_run(run_dir: Path, workdir: Path, model_cfg: Any) -> RunArtifacts | None:
    info = read_json(run_dir / "run.json")
    if (run_dir / "adapter" / "config.json").is_file() and not is_adapter(run_dir / "adapter"):
        raise GenpiError(f"run {run_dir} was trained with full fine-tuning (model.lora.enabled=false): genpi-eval "
                         "compares an adapter with its own base model and does not evaluate full fine-tuning runs")
    if is_adapter(run_dir / "adapter"):
        return RunArtifacts(run_dir / "adapter", run_dir, info, read_json(run_dir / "adapter" / ADAPTER_META))
    ckpt = _checkpoint(run_dir)
    if ckpt is None:
        return None
    log.warning("run %s has no adapter/ folder: rebuilding the adapter from %s", run_dir, ckpt)
    lora = ((info.get("config") or {}).get("model") or {}).get("lora") or {}
    out = adapter_from_checkpoint(ckpt, model_cfg, lora, workdir / "adapter_from_checkpoint",
                                  meta={"model": info.get("model"), "task": info.get("task"), "run_dir": str(run_dir)})
    return RunArtifacts(out, run_dir, info, read_json(out / ADAPTER_META), from_checkpoint=ckpt)


def locate(run_dir: str | Path | None, adapter: str | Path | None, output_root: str | Path, task_name: str,
           model_name: str, workdir: str | Path, model_cfg: Any) -> RunArtifacts:
    """The adapter to evaluate and its training run.

    Args:
        run_dir: a training run folder (its ``adapter/``, else its last checkpoint).
        adapter: a PEFT adapter folder (e.g. genpi-export's); its ``genpi.json`` may name its run.
        output_root: where runs are searched when neither is given: the newest run for ``task_name`` and
            ``model_name`` under ``runs/`` and ``multirun/``.
        workdir: where an adapter rebuilt from a checkpoint is written.
    """
    workdir = Path(workdir)
    if adapter:
        a = Path(adapter).expanduser()
        if not is_adapter(a):
            raise GenpiError(f"no PEFT adapter at {a} (looked for {a / 'adapter_config.json'}); set adapter= to a "
                             "folder written by genpi-train (<run>/adapter) or genpi-export")
        meta = read_json(a / ADAPTER_META)
        rd = Path(run_dir).expanduser() if run_dir else (Path(meta["run_dir"]) if meta.get("run_dir") else None)
        if rd is not None and not (rd / "run.json").is_file():
            rd = None
        return RunArtifacts(a, rd, read_json(rd / "run.json") if rd else {}, meta)
    if run_dir:
        rd = Path(run_dir).expanduser()
        if not rd.is_dir():
            raise GenpiError(f"run folder not found: {rd} (set run_dir= to a genpi-train run folder)")
        found = _from_run(rd, workdir, model_cfg)
        if found is None:
            raise GenpiError(f"run folder {rd} holds no adapter and no checkpoint (looked for "
                             f"{rd / 'adapter' / 'adapter_config.json'} and {rd / 'checkpoints' / '*.ckpt'}): "
                             "did its training finish?")
        return found
    root = Path(output_root)
    looked: list[str] = []
    for rd in _candidate_runs(root):
        info = read_json(rd / "run.json")
        looked.append(str(rd))
        if info.get("task") != task_name or info.get("model") != model_name:
            continue
        found = _from_run(rd, workdir, model_cfg)
        if found is not None:
            log.info("evaluating the newest run of task %s on %s: %s", task_name, model_name, rd)
            return found
    where = ", ".join(looked) if looked else f"none found under {root / 'runs'} or {root / 'multirun'}"
    raise GenpiError(f"no trained adapter or checkpoint for task {task_name} on model {model_name}; run folders "
                     f"looked in: {where}. Train one (genpi-train task={task_name}) or set run_dir= / adapter=")


def adapter_from_checkpoint(ckpt: str | Path, model_cfg: Any, lora_cfg: dict[str, Any], out_dir: str | Path,
                            meta: dict[str, Any] | None = None) -> Path:
    """Rebuild a PEFT adapter folder from a genpi training checkpoint (which holds only the adapter's weights).

    The checkpoint is read with ``weights_only=True`` (no pickled code runs); every LoRA weight of the
    model must be found in it.
    """
    import torch

    from genpi.models.factory import apply_lora, load_model, load_tokenizer
    from genpi.runs import write_json

    ckpt = Path(ckpt)
    if ckpt.is_dir():
        raise GenpiError(f"{ckpt} is a sharded (FSDP) checkpoint; consolidate it first "
                         "(lightning.pytorch.utilities.consolidate_checkpoint) and point at the file")
    try:
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True)["state_dict"]
    except Exception as err:  # a truncated or foreign file: say which one
        raise GenpiError(f"cannot read checkpoint {ckpt}: {str(err).splitlines()[0]}") from None
    if not bool(lora_cfg.get("enabled", True)):
        raise GenpiError(f"checkpoint {ckpt} is from full fine-tuning: there is no adapter to rebuild")
    model = apply_lora(load_model(model_cfg, for_training=False), lora_cfg)
    # The LightningModule keeps the model as `self.model`: strip that prefix to get the peft model's keys.
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    missing = [n for n, _ in model.named_parameters() if "lora_" in n and n not in weights]
    if missing:
        raise GenpiError(f"checkpoint {ckpt} lacks {len(missing)} adapter weights (e.g. {missing[0]}): it was trained "
                         "with another model.lora config or another base model")
    model.load_state_dict(weights, strict=False)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(model_cfg).save_pretrained(str(out))
    write_json(out / ADAPTER_META, {**(meta or {}), "checkpoint": str(ckpt)})
    return out


# -- refusing mismatches -------------------------------------------------------------------------
def check_compatible(art: RunArtifacts, task, model_name: str) -> None:
    """Refuse an adapter trained on another base model or for another task (or another prompt of it)."""
    meta, info = art.adapter_meta, art.run_info
    trained_model = meta.get("model") or info.get("model")
    if trained_model and trained_model != model_name:
        raise GenpiError(f"adapter {art.adapter_dir} was trained on base model {trained_model}, but this evaluation "
                         f"loads {model_name}: set model= (or model.name_or_path=) to the base it was trained on")
    if not trained_model:
        base = json.loads((art.adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        log.warning("adapter %s does not say which genpi model it was trained on (PEFT's base_model_name_or_path: %s); "
                    "evaluating it on %s", art.adapter_dir, base, model_name)
    trained_task = meta.get("task") or info.get("task")
    if trained_task and trained_task != task.name:
        raise GenpiError(f"adapter {art.adapter_dir} was trained for task {trained_task}, but this evaluation is for "
                         f"task {task.name}: set task={trained_task}")
    prompt_id = info.get("prompt_id")
    if prompt_id and prompt_id != task.prompt_id:
        raise GenpiError(f"run {art.run_dir} internalized prompt {prompt_id} of task {task.name}, but this evaluation's "
                         f"prompt is {task.prompt_id}: set task.prompt_path to the prompt the run was trained on")


# -- the inputs ----------------------------------------------------------------------------------
def _dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for r in records:
        k = input_key(r["pseudo_input"])
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def read_inputs(path: str | Path) -> list[dict[str, Any]]:
    """Records from a dataset (JSONL or folder; only ``pseudo_input`` is required) or inputs from a text file
    (blocks separated by ``---`` lines, else one per line)."""
    from genpi.data.records import load_records
    from genpi.tasks.parsers import read_inputs_file

    p = Path(path).expanduser()
    if not p.exists():
        raise GenpiError(f"eval.inputs_file not found: {p}")
    if p.is_file() and p.suffix not in (".jsonl", ".json"):
        return [{"pseudo_input": x} for x in read_inputs_file(p)]
    return load_records(p, columns=("pseudo_input",))


def eval_records(art: RunArtifacts, inputs_file: str | None, split: str = "test", allow_overlap: bool = False,
                 max_examples: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The held-out records to evaluate on, and a description of where they came from.

    Without ``inputs_file``: the records of the run's dataset whose inputs fell in its ``split`` (by the
    input keys the run saved in ``splits.json``). Inputs that were training inputs of the run are refused
    unless ``allow_overlap``.
    """
    splits = art.splits
    if inputs_file:
        records = read_inputs(inputs_file)
        source = {"inputs": str(inputs_file), "split": None}
    else:
        if not splits or split not in splits:
            where = art.run_dir or art.adapter_dir
            raise GenpiError(f"no held-out split known for {where} (no splits.json with a {split!r} split): "
                             "set eval.inputs_file to a file of held-out inputs")
        data = art.run_info.get("data")
        if not data or not Path(data).exists():
            raise GenpiError(f"the dataset of run {art.run_dir} ({data}) is gone: set eval.inputs_file")
        from genpi.data.records import load_records

        keys = set(splits[split])
        records = [r for r in load_records(data) if input_key(r["pseudo_input"]) in keys]
        source = {"inputs": str(data), "split": split}
    records = _dedupe(records)
    if not records:
        raise GenpiError(f"no evaluation inputs in {source['inputs']}"
                         + (f" split {source['split']!r}: raise data.test_size when training" if source["split"] else ""))
    train_keys = set(splits.get("train", []))
    overlap = [r["pseudo_input"] for r in records if input_key(r["pseudo_input"]) in train_keys]
    if overlap and not allow_overlap:
        raise GenpiError(f"{len(overlap)} of {len(records)} evaluation inputs were training inputs of run {art.run_dir} "
                         f"(e.g. {overlap[0][:80]!r}): evaluate on held-out inputs, or set eval.allow_overlap=true")
    if not splits:
        log.warning("the adapter's training inputs are unknown (no run folder with splits.json): overlap not checked")
    if max_examples:
        records = records[: int(max_examples)]
    source.update(n_examples=len(records), overlap_with_train=len(overlap), overlap_checked=bool(splits))
    return records, source
