"""genpi-export: the adapter (PEFT) and the merged model load in transformers and vLLM and answer greedily
exactly as the trained model does."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genpi.utils.errors import GenpiError
from tests.test_eval_support import eval_prompts, greedy_reference, trained_run

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 24


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_path) -> Path:
    return trained_run(tmp_path_factory)


def _compose_export(tmp_path: Path, overrides: list[str]):
    import genpi.export  # noqa: F401  (registers the genpi_eval_name resolver through genpi.evaluation)
    from tests.helpers import compose_cfg

    return compose_cfg("export", overrides, tmp_path)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> dict[str, Path]:
    from genpi.export import export

    out = tmp_path_factory.mktemp("export")
    return export(_compose_export(out, [f"run_dir={run_dir}", "export.merged=true"]))


@pytest.fixture(scope="module")
def reference(run_dir) -> dict[str, list[list[int]]]:
    """The trained model's greedy answers (base + the run's adapter, transformers), student view (no prompt)."""
    _, student = eval_prompts()
    return {"prompts": student, "answers": greedy_reference(run_dir, student, MAX_NEW)}


def test_export_writes_peft_adapter_and_merged_model(exported, run_dir):
    adapter, merged = exported["adapter"], exported["merged"]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "genpi.json"} <= {
        p.name for p in adapter.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "genpi.json"} <= {p.name for p in merged.iterdir()}
    assert not list(merged.glob("*.bin")) and not list(adapter.glob("*.bin"))  # safetensors only
    meta = json.loads((adapter / "genpi.json").read_text())
    assert meta["run_dir"] == str(run_dir) and meta["task"] == "os"
    assert adapter.parent.parent.name == "export"


def test_exported_adapter_and_merged_model_answer_like_the_trained_model_in_transformers(exported, reference):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from genpi.evaluation.generation import hf_generate
    from genpi.models.factory import load_model, load_tokenizer
    from genpi.synthesis.clients.base import end_of_turn_ids

    tok = load_tokenizer({"name_or_path": "tiny"})
    stop = end_of_turn_ids(tok)
    peft_model = PeftModel.from_pretrained(load_model({"name_or_path": "tiny"}, for_training=False),
                                           str(exported["adapter"])).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(exported["merged"]), dtype=torch.float32).eval()
    for model in (peft_model, merged):
        assert hf_generate(model, reference["prompts"], MAX_NEW, stop, tok.pad_token_id) == reference["answers"]
    # and the answers are the adapter's, not the base model's
    base = hf_generate(peft_model, reference["prompts"], MAX_NEW, stop, tok.pad_token_id, adapter=False)
    assert base != reference["answers"]


def test_evaluation_of_the_exported_adapter_finds_its_run(exported, run_dir, tmp_path):
    from genpi.evaluation import artifacts

    art = artifacts.locate(None, exported["adapter"], tmp_path, "os", "m", tmp_path, None)
    assert art.run_dir == run_dir and art.splits["test"]


def test_export_folder_is_named_like_a_run_folder_with_the_hash_of_what_changes_the_export(tmp_path):
    def folder(overrides: list[str]) -> Path:
        return Path(_compose_export(tmp_path, ["run_dir=/runs/os-genpi-tiny-s0-0123abcd", *overrides]).hydra.run.dir)

    plain = folder([])
    assert plain.parent == tmp_path / "export" and re.fullmatch(r"os-genpi-tiny-s0-0123abcd-[0-9a-f]{8}", plain.name)
    assert folder([]) == plain  # the same export finds its folder again
    others = [folder([o]) for o in ("export.merged=true", "export.dtype=bfloat16", "model.dtype=bfloat16")]
    assert len({plain, *others}) == 1 + len(others)  # different settings never share a folder
    assert folder(["seed=3", f"export.out_dir={tmp_path / 'elsewhere'}"]) == plain  # what export does not use


def test_export_refuses_another_base_model(run_dir, tmp_path):
    from genpi.export import export

    foreign = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", foreign)
    meta = json.loads((foreign / "genpi.json").read_text())
    (foreign / "genpi.json").write_text(json.dumps({**meta, "model": "Qwen/Qwen2.5-7B-Instruct"}))
    with pytest.raises(GenpiError, match="Qwen2.5-7B-Instruct.*tiny-"):
        export(_compose_export(tmp_path, [f"adapter={foreign}"]))


@pytest.mark.slow
@pytest.mark.vllm
def test_exported_adapter_and_merged_model_answer_like_the_trained_model_in_vllm(exported, reference, tmp_path):
    """Both exports in the real vLLM engine: the adapter as a LoRA request, the merged folder as the model (two
    engines in one worker process, as genpi-eval runs them on a CPU: vLLM is imported once)."""
    pytest.importorskip("vllm")
    from genpi.evaluation.generation import PromptSet, run_vllm_worker, vllm_job
    from genpi.models.factory import load_tokenizer, resolve_model_path
    from genpi.synthesis.clients.base import end_of_turn_ids

    stop = end_of_turn_ids(load_tokenizer({"name_or_path": "tiny"}))
    lora_job = vllm_job(resolve_model_path({"name_or_path": "tiny"}), "float32", exported["adapter"],
                        [PromptSet("student", reference["prompts"], adapter=True)], MAX_NEW, stop)
    merged_job = vllm_job(str(exported["merged"]), "float32", None,
                          [PromptSet("student", reference["prompts"], adapter=False)], MAX_NEW, stop)
    lora_res, merged_res = run_vllm_worker([lora_job, merged_job], tmp_path / "vllm")
    lora_out, merged_out = lora_res["outputs"]["student"], merged_res["outputs"]["student"]
    assert lora_out == reference["answers"]
    assert merged_out == reference["answers"]


@pytest.mark.slow
def test_export_cli_prints_both_folders(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "genpi.export", f"run_dir={run_dir}", f"paths.output_root={tmp_path}",
                           "export.merged=true"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(ln.split(": ", 1) for ln in proc.stdout.splitlines() if ln.startswith(("adapter: ", "merged: ")))
    folder = Path(lines["adapter"]).parent
    assert folder.parent == tmp_path / "export" and re.fullmatch(rf"{run_dir.name}-[0-9a-f]{{8}}", folder.name)
    assert Path(lines["adapter"]).name == "adapter"
    assert (Path(lines["merged"]) / "model.safetensors").is_file()
