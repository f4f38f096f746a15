"""genpi-export: a trained adapter as files other tools load as they are (``python -m genpi.export run_dir=...``).

- ``<out>/adapter``: the adapter in PEFT format with the tokenizer, loadable by ``PeftModel.from_pretrained``
  and by vLLM as a ``LoRARequest`` (rebuilt from the run's last checkpoint when the run has no adapter yet);
- ``<out>/merged`` (``export.merged=true``): base + adapter merged into one model folder with the tokenizer,
  which ``AutoModelForCausalLM.from_pretrained`` and ``vllm.LLM(model=...)`` load like any other model.

See ``conf/export.yaml`` for every option.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from genpi import schema
from genpi.evaluation import artifacts
from genpi.models.factory import load_model, load_tokenizer, model_fingerprint
from genpi.runs import read_json, write_json
from genpi.utils.errors import GenpiError
from genpi.utils.hydra_utils import to_dict
from genpi.utils.wrappers import run_dir_of, task_wrapper

log = logging.getLogger("genpi.export")

# What an adapter folder written by genpi-train holds besides Hydra's files: copied as they are.
_SKIP = {"README.md"}


def export_adapter(art: artifacts.RunArtifacts, out_dir: str | Path) -> Path:
    """Copy the adapter (safetensors weights, ``adapter_config.json``, tokenizer) to ``out_dir``.

    ``genpi.json`` is rewritten to name the training run, so that genpi-eval on the exported folder still
    finds the run's splits (and refuses inputs it trained on).
    """
    src, out = Path(art.adapter_dir), Path(out_dir)
    if not (src / "adapter_model.safetensors").is_file():
        raise GenpiError(f"{src} has no adapter_model.safetensors; genpi exports safetensors only (no pickled weights)")
    if out.resolve() == src.resolve():
        raise GenpiError(f"export folder {out} is the adapter folder itself: choose another export.out_dir")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in _SKIP:
            shutil.copy2(f, out / f.name)
    meta = {**art.adapter_meta, "run_dir": str(art.run_dir) if art.run_dir else art.adapter_meta.get("run_dir"),
            "exported_from": str(src)}
    if art.from_checkpoint:
        meta["checkpoint"] = str(art.from_checkpoint)
    write_json(out / artifacts.ADAPTER_META, meta)
    return out


def export_merged(adapter_dir: str | Path, model_cfg: Any, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Merge the adapter into the base weights and save a plain model folder with the tokenizer.

    Args:
        adapter_dir: a PEFT adapter folder.
        model_cfg: the ``model`` config group of the base the adapter was trained on.
        dtype: the saved weights' dtype (``float32``, ``bfloat16``, ``float16``); None = ``model.dtype``.
    """
    import torch
    from peft import PeftModel

    cfg = dict(to_dict(model_cfg))
    if dtype:
        cfg["dtype"] = dtype
    if cfg.get("load_in_4bit"):
        # Merging into 4-bit weights would round the adapter away: merge into full-precision weights instead.
        raise GenpiError("cannot merge into a 4-bit model: export with model.load_in_4bit=false (the merged model is "
                         "saved in model.dtype; quantize it afterwards if you need to)")
    base = load_model(cfg, for_training=False)
    merged = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).merge_and_unload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        merged.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(cfg).save_pretrained(str(out))
    meta = read_json(Path(adapter_dir) / artifacts.ADAPTER_META)
    write_json(out / artifacts.ADAPTER_META, {"model": meta.get("model"), "task": meta.get("task"),
                                               "run_dir": meta.get("run_dir"), "merged_from": str(adapter_dir)})
    return out


def export(cfg: DictConfig) -> dict[str, Path | None]:
    """Find the adapter (as genpi-eval does), check it was trained on ``model``, write the requested folders."""
    spec = schema.check(cfg, "export")  # every key typed and in range before any model loads
    out_dir = Path(spec.export.out_dir) if spec.export.out_dir else run_dir_of(cfg)
    model_name = model_fingerprint(cfg.model)
    art = artifacts.locate(cfg.get("run_dir"), cfg.get("adapter"), cfg.paths.output_root, cfg.task.name, model_name,
                           out_dir, cfg.model)
    trained_on = art.adapter_meta.get("model") or art.run_info.get("model")
    if trained_on and trained_on != model_name:
        raise GenpiError(f"adapter {art.adapter_dir} was trained on base model {trained_on}, but export loads "
                         f"{model_name}: set model= (or model.name_or_path=) to the base it was trained on")
    paths: dict[str, Path | None] = {"adapter": None, "merged": None}
    if spec.export.write_adapter:
        paths["adapter"] = export_adapter(art, out_dir / "adapter")
    if spec.export.merged:
        paths["merged"] = export_merged(art.adapter_dir, cfg.model, out_dir / "merged", spec.export.dtype)
    # An adapter rebuilt from a checkpoint was a temporary: the exported copy is the one to keep.
    tmp = out_dir / "adapter_from_checkpoint"
    if art.from_checkpoint and tmp.is_dir() and paths["adapter"] is not None:
        shutil.rmtree(tmp)
    return paths


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@task_wrapper
def _hydra_main(cfg: DictConfig) -> None:
    paths = export(cfg)
    for kind, path in paths.items():
        if path is not None:
            print(f"{kind}: {path}", flush=True)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
