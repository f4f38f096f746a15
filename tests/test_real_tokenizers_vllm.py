"""The real-tokenizer models in vLLM: the exported adapter of each family answers like the trained model in
transformers, and vLLM's chat tokenization equals the template's; every family's merged export loads as a plain
transformers folder with its tokenizer and answers alike (vLLM on a merged folder: tests/test_export.py, on the tiny
model); ``genpi-synth`` through vLLM on a real tokenizer. Split from ``test_real_tokenizers.py`` so that the two halves can run on separate test workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from genpi.tasks.base import builtin_task
from tests.helpers import compose_cfg, vllm_env
from tests.test_real_tokenizers import FAMILIES, REPO, SMALL_SYNTH, _chat_ids

pytest.importorskip("llama_models")
pytest.importorskip("mistral_common")


VLLM_SCRIPT = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    jobs = json.load(open(sys.argv[1]))
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    results = {}
    for name, job in jobs.items():
        prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
        res = {}
        llm = LLM(model=job["base"], enforce_eager=True, dtype="float32", max_model_len=2048, seed=0,
                  enable_lora=True, max_lora_rank=16)
        lora = LoRARequest("student", 1, job["adapter"])
        res["lora"] = [o.outputs[0].token_ids
                       for o in llm.generate(prompts, greedy, lora_request=lora, use_tqdm=False)]
        res["chat"] = llm.chat([{"role": "user", "content": "List the files"}], greedy,
                               use_tqdm=False)[0].prompt_token_ids
        del llm
        results[name] = res
    json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def vllm_exports(trained_runs, real_tokenizers, tmp_path_factory):
    """Every family's base + adapter, answered greedily by vLLM in ONE process (vLLM's import costs about 10 s here,
    an engine at a 128k vocabulary about as much again), beside the trained model's answers in transformers, the
    prompts and the family's merged export: ``{family: (want, got, prompts, merged folder)}``."""
    pytest.importorskip("vllm")
    import torch
    from peft import PeftModel

    import genpi.export  # noqa: F401  (registers the export config's resolvers)
    from genpi.data.tokenize import student_prefix_ids
    from genpi.evaluation.generation import hf_generate
    from genpi.export import export
    from genpi.models.factory import load_model, resolve_model_path
    from genpi.synthesis.clients.base import end_of_turn_ids

    tmp = tmp_path_factory.mktemp("vllm_exports")
    task = builtin_task("os")
    jobs, want, merged = {}, {}, {}
    for name in FAMILIES:
        tok = real_tokenizers[name]
        folders = export(compose_cfg("export", [f"model={name}", f"run_dir={trained_runs(name)}",
                                                "export.merged=true"], tmp / name))
        prompts = [student_prefix_ids(tok, task, x) for x in ["How many files are in /etc?", "Who is logged in?"]]
        torch.manual_seed(0)
        model = PeftModel.from_pretrained(load_model({"name_or_path": name}, for_training=False),
                                          str(trained_runs(name) / "adapter")).eval()
        want[name] = hf_generate(model, prompts, 12, end_of_turn_ids(tok), tok.pad_token_id)
        merged[name] = Path(folders["merged"])
        jobs[name] = {"base": resolve_model_path({"name_or_path": name}),
                      "adapter": str(folders["adapter"]), "prompts": prompts}
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    script = tmp / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp / "jobs.json"), str(tmp / "out.json")], cwd=REPO,
                          env=vllm_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp / "out.json").read_text())
    return {name: (want[name], got[name], jobs[name]["prompts"], merged[name]) for name in FAMILIES}


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_in_vllm_and_answers_like_transformers(name, vllm_exports, real_tokenizers):
    """The base + adapter in vLLM give the trained model's greedy answers; vLLM's chat tokenization equals the
    template's."""
    want, got, _, _ = vllm_exports[name]
    assert got["lora"] == want
    assert got["chat"] == _chat_ids(real_tokenizers[name], [{"role": "user", "content": "List the files"}],
                                    add_generation_prompt=True)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("name", FAMILIES)
def test_merged_export_is_a_plain_transformers_folder_that_answers_like_the_trained_model(name, vllm_exports,
                                                                                         real_tokenizers):
    """Every family's merged folder carries its tokenizer (the same chat ids as the family's) and, loaded by plain
    transformers, gives the trained model's greedy answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genpi.evaluation.generation import hf_generate
    from genpi.synthesis.clients.base import end_of_turn_ids

    want, _, prompts, folder = vllm_exports[name]
    tok = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "List the files"}]
    assert _chat_ids(tok, chat, add_generation_prompt=True) == _chat_ids(real_tokenizers[name], chat,
                                                                         add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype="float32").eval()
    assert hf_generate(model, prompts, 12, end_of_turn_ids(tok), tok.pad_token_id) == want


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("name", ["tiny_mistral_vocab"])
def test_genpi_synth_with_vllm_on_a_real_tokenizer(name, tmp_path):
    """``genpi-synth synth.client=vllm`` writes a dataset with top-k rows that trains. One family here (a process that
    imports vLLM and starts an engine costs about 20 s on 2 cores): SentencePiece, whose leading-space handling differs most from genpi's
    own tokenizer; the tiktoken families are loaded by vLLM in the export test above. Add the others with
    ``-k``-free parametrization when a GPU runner makes engines cheap."""
    pytest.importorskip("vllm")
    from genpi.data.records import load_records

    args = [f"paths.output_root={tmp_path / name}", f"model={name}", "synth.client=vllm",
            "synth.teacher_logits.client=vllm", *SMALL_SYNTH]
    proc = subprocess.run([sys.executable, "-m", "genpi.synth", *args], cwd=REPO, env=vllm_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = Path(proc.stdout.strip().splitlines()[-1].split("dataset: ", 1)[1])
    records = load_records(folder)
    assert len(records) == 3 and all(r["teacher_topk_ids"] for r in records), name
