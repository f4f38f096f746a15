"""genpi-eval end to end on a tiny trained run (transformers engine), and its refusals of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genpi.evaluation import artifacts, report
from genpi.utils.errors import GenpiError
from tests.test_eval_support import FAST_EVAL, assert_adapter_moved, compose_eval, trained_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_path) -> Path:
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluated(run_dir, tmp_path_factory) -> Path:
    """One evaluation of the run, shared by the tests that read its outputs."""
    from genpi.evaluate import run_evaluation

    out = tmp_path_factory.mktemp("eval")
    return run_evaluation(compose_eval(out, [f"run_dir={run_dir}", *FAST_EVAL]))


def test_evaluation_writes_metrics_report_and_plots(evaluated, run_dir):
    assert_adapter_moved(run_dir)
    folder = evaluated.parent
    assert evaluated.name == "report.md" and folder.parent.name == "eval"
    m = json.loads((folder / "metrics.json").read_text())
    n = len(json.loads((run_dir / "splits.json").read_text())["test"])
    assert m["n_examples"] == n and m["info"]["split"] == "test"
    for model in ("teacher", "student", "floor"):
        assert set(m[model]) == {"kl_forward", "kl_reverse", "exact_match", "token_f1", "rouge_l", "format_rate"}
    # the teacher is the reference: KL 0 and full agreement with itself
    assert m["teacher"]["kl_forward"] == 0.0 and m["teacher"]["exact_match"] == 1.0 and m["teacher"]["rouge_l"] == 1.0
    assert m["student"]["kl_forward"] > 0 and m["floor"]["kl_forward"] > 0
    # the student is not the floor: the adapter changed the model
    assert m["student"]["kl_forward"] != pytest.approx(m["floor"]["kl_forward"], rel=1e-6)
    gap = m["gap_closed"]["kl_forward"]
    assert gap == pytest.approx(1 - m["student"]["kl_forward"] / m["floor"]["kl_forward"])
    s = m["savings"]
    assert s["prompt_tokens_with"] > s["prompt_tokens_without"] > 0
    assert s["prefill_flops_saved"] == pytest.approx(2 * s["params"] * s["prompt_tokens_saved"])
    assert set(s["timing"]) == {"with_prompt", "without_prompt", "student_lora"}
    for png in ("training_curves.png", "kl_per_example.png", "agreement.png"):
        assert report.is_png(folder / png), png
    text = evaluated.read_text()
    assert "![Training curves (each loss term)](training_curves.png)" in text and "gap closed" in text
    rows = [json.loads(ln) for ln in (folder / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == n and {"student_kl_forward", "floor_kl_forward", "teacher", "student", "floor"} <= set(rows[0])


def test_student_kl_on_the_val_split_equals_trainings_val_kl(run_dir, tmp_path):
    """Evaluation and training measure the same thing: on the run's val split (one batch) the student's
    token-mean forward KL is the run's final val/kl."""
    from genpi.evaluate import run_evaluation

    path = run_evaluation(compose_eval(tmp_path, [f"run_dir={run_dir}", *FAST_EVAL, "eval.split=val",
                                                  "eval.savings.measure=false"]))
    m = json.loads((path.parent / "metrics.json").read_text())
    val_kl = json.loads((run_dir / "metrics.json").read_text())["val/kl"]
    assert m["info"]["kl_on"] == "the dataset's"
    assert m["student"]["kl_forward"] == pytest.approx(val_kl, rel=1e-4)


def test_later_agent_turns_are_judged_after_the_records_turns(run_dir, tmp_path):
    """eval.turns=3: every later agent turn of the records' conversations (at most two per record) is answered after
    the record's turns before it, by the teacher with the prompt and the student and floor without; their format
    rates are reported beside the first answer's."""
    from genpi.data.tokenize import teacher_prefix_ids
    from genpi.evaluate import later_turn_prompts, run_evaluation
    from genpi.models.factory import load_tokenizer
    from genpi.tasks.base import builtin_task

    path = run_evaluation(compose_eval(tmp_path, [f"run_dir={run_dir}", *FAST_EVAL, "eval.split=val", "eval.turns=3",
                                                  "eval.savings.measure=false"]))
    m = json.loads((path.parent / "metrics.json").read_text())
    assert 1 <= m["info"]["later_turns"] <= 2 * m["n_examples"]
    for side in ("teacher", "student", "floor"):
        assert 0.0 <= m[side]["format_rate_later_turns"] <= 1.0
    assert "format_rate_later_turns" in m["gap_closed"]
    # the prompts: a conversation of two agent turns gives one later prompt, its history the record's turns
    tok, task = load_tokenizer({"name_or_path": "tiny"}), builtin_task("os")
    conv = [{"role": "assistant", "content": "Act: bash\n\n```bash\nls /srv\n```"},
            {"role": "user", "content": "The terminal printed:\nwww-data-marker"},
            {"role": "assistant", "content": "Act: answer(www)"}]
    record = {"pseudo_input": "Which user owns /srv/www?", "teacher_output_conv": conv}
    (teacher, student), = later_turn_prompts(tok, task, [record], [record["pseudo_input"]], turns=3)
    assert later_turn_prompts(tok, task, [record], [record["pseudo_input"]], turns=1) == []
    first = teacher_prefix_ids(tok, task, record["pseudo_input"])
    assert teacher[: len(first)] == first and len(teacher) > len(student)
    text = tok.decode(student)
    assert "www-data-marker" in text and "ls /srv" in text and "answer(www)" not in text


def test_inputs_without_answers_use_the_teachers_greedy_answers(run_dir, tmp_path):
    from genpi.evaluate import run_evaluation

    f = tmp_path / "inputs.jsonl"
    f.write_text(json.dumps({"pseudo_input": "Which user owns /srv/www?"}) + "\n"
                 + json.dumps({"pseudo_input": "How many .log files are in /var/log?"}) + "\n")
    path = run_evaluation(compose_eval(tmp_path, [f"run_dir={run_dir}", *FAST_EVAL, f"eval.inputs_file={f}",
                                                  "eval.savings.measure=false"]))
    m = json.loads((path.parent / "metrics.json").read_text())
    assert m["n_examples"] == 2 and m["info"]["kl_on"] == "greedy" and m["info"]["split"] is None
    rows = [json.loads(ln) for ln in (path.parent / "examples.jsonl").read_text().splitlines()]
    assert all(r["kl_answer"] == r["teacher"] for r in rows)


def test_other_task_is_refused_with_both_names(run_dir, tmp_path):
    from genpi.evaluate import run_evaluation

    with pytest.raises(GenpiError, match=r"trained for task os.*task webshop"):
        run_evaluation(compose_eval(tmp_path, [f"run_dir={run_dir}", "task=webshop", *FAST_EVAL]))


def test_other_base_model_is_refused_with_both_names(run_dir, tmp_path):
    from genpi.evaluate import run_evaluation
    from genpi.models.factory import model_fingerprint

    foreign = tmp_path / "foreign_adapter"
    shutil.copytree(run_dir / "adapter", foreign)
    meta = json.loads((foreign / "genpi.json").read_text())
    meta["model"] = "meta-llama/Meta-Llama-3-8B-Instruct"
    (foreign / "genpi.json").write_text(json.dumps(meta))
    tiny = model_fingerprint({"name_or_path": "tiny"})
    with pytest.raises(GenpiError, match=rf"Meta-Llama-3-8B-Instruct.*{tiny}"):
        run_evaluation(compose_eval(tmp_path, [f"adapter={foreign}", *FAST_EVAL]))


def test_overlap_with_training_inputs_is_refused_unless_allowed(run_dir, tmp_path):
    art = artifacts.locate(run_dir, None, tmp_path, "os", "unused", tmp_path, None)
    with pytest.raises(GenpiError, match="were training inputs.*eval.allow_overlap=true"):
        artifacts.eval_records(art, None, split="train")
    records, source = artifacts.eval_records(art, None, split="train", allow_overlap=True, max_examples=2)
    assert len(records) == 2 and source["overlap_with_train"] > 0
    # an inputs file holding one training input is refused too
    train_input = records[0]["pseudo_input"]
    f = tmp_path / "inputs.txt"
    f.write_text(f"A brand new question about /srv?\n---\n{train_input}\n")
    with pytest.raises(GenpiError, match="1 of 2 evaluation inputs"):
        artifacts.eval_records(art, str(f))
    f.write_text("A brand new question about /srv?\n---\nAnother one: who owns /opt?\n")
    records, source = artifacts.eval_records(art, str(f))
    assert [r["pseudo_input"] for r in records][1] == "Another one: who owns /opt?" and source["split"] is None


def test_missing_adapter_names_the_run_folders_looked_in(run_dir, tmp_path):
    empty = tmp_path / "runs" / "os-genpi-tiny-s9"
    empty.mkdir(parents=True)
    with pytest.raises(GenpiError, match=rf"{empty}.*no adapter and no checkpoint"):
        artifacts.locate(empty, None, tmp_path, "os", "m", tmp_path, None)
    # no run_dir: every run folder searched is named
    (empty / "run.json").write_text(json.dumps({"task": "os", "model": "m"}))
    other = tmp_path / "runs" / "kg-genpi-tiny-s0"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"task": "kg", "model": "m"}))
    with pytest.raises(GenpiError) as err:
        artifacts.locate(None, None, tmp_path, "os", "m", tmp_path, None)
    assert str(empty) in str(err.value) and str(other) in str(err.value)
    with pytest.raises(GenpiError, match="no PEFT adapter at"):
        artifacts.locate(None, tmp_path / "nowhere", tmp_path, "os", "m", tmp_path, None)


def test_newest_matching_run_is_found_without_run_dir(run_dir, tmp_path):
    from genpi.models.factory import model_fingerprint

    root = run_dir.parents[1]  # <output_root>/runs/<run>
    art = artifacts.locate(None, None, root, "os", model_fingerprint({"name_or_path": "tiny"}), tmp_path, None)
    assert art.run_dir == run_dir and art.adapter_dir == run_dir / "adapter"


def test_adapter_is_rebuilt_from_the_checkpoint_when_missing(run_dir, tmp_path):
    from safetensors.torch import load_file

    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("adapter"))
    art = artifacts.locate(copy, None, tmp_path, "os", "m", tmp_path / "work", {"name_or_path": "tiny"})
    assert art.from_checkpoint == copy / "checkpoints" / "last.ckpt"
    rebuilt = load_file(str(art.adapter_dir / "adapter_model.safetensors"))
    original = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert rebuilt.keys() == original.keys()
    # last.ckpt is written at the last validation, after the final step, so it holds the saved adapter
    for k in original:
        assert (rebuilt[k] - original[k]).abs().max() < 1e-6, k
    assert art.adapter_meta["task"] == "os"


def test_eval_name_from_what_is_evaluated():
    assert artifacts.eval_name("/o/runs/os-genpi-tiny-s0", None, "os") == "os-genpi-tiny-s0"
    assert artifacts.eval_name(None, "/o/runs/os-genpi-tiny-s0/adapter", "os") == "os-genpi-tiny-s0"
    assert artifacts.eval_name("/o/multirun/x/2026-01-01_00-00-00-ab12/os-kl", None, "os") == \
        "2026-01-01_00-00-00-ab12__os-kl"
    assert artifacts.eval_name(None, None, "kg") == "latest-kg"


@pytest.mark.slow
def test_cli_prints_the_report_path(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "genpi.evaluate", f"run_dir={run_dir}", f"paths.output_root={tmp_path}",
                           *FAST_EVAL, "eval.savings.measure=false"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("report: ")][-1]
    path = Path(line.split(": ", 1)[1])
    # the evaluation's folder: what it evaluates (the run's name) and a hash of how
    assert path.is_file() and path.parent.parent == tmp_path / "eval"
    assert path.parent.name.startswith(f"{run_dir.name}-") and len(path.parent.name) == len(run_dir.name) + 9
    m = json.loads((path.parent / "metrics.json").read_text())
    assert "timing" not in m["savings"]


def test_a_run_evaluated_on_another_task_is_one_line_and_exit_2(run_dir, tmp_path, capsys):
    """In-process, through the wrapper the command runs (exit 2 through a real entry point: tests/test_train.py)."""
    from genpi.evaluate import run_evaluation
    from tests.helpers import run_bad

    code, lines, err, _ = run_bad(capsys, tmp_path, "eval", run_evaluation, [f"run_dir={run_dir}", "task=kg",
                                                                             *FAST_EVAL])
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("genpi: error:") and "task kg" in lines[0]
    assert not list(tmp_path.rglob("metrics.json"))


def test_genpi_vllm_processes_skip_torch_compile_without_a_gpu(monkeypatch):
    """Without CUDA genpi's vLLM processes run the sampler's few small ops eagerly (compiling them cost about 8 s per
    machine and 2 s per process here); a user's TORCH_COMPILE_DISABLE=0 is kept; with CUDA nothing is set."""
    from genpi.evaluation import generation

    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    monkeypatch.setattr(generation, "_cuda", lambda: False)
    assert generation.vllm_subprocess_env()["TORCH_COMPILE_DISABLE"] == "1"
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "0")
    assert generation.vllm_subprocess_env()["TORCH_COMPILE_DISABLE"] == "0"
    monkeypatch.delenv("TORCH_COMPILE_DISABLE")
    monkeypatch.setattr(generation, "_cuda", lambda: True)
    assert "TORCH_COMPILE_DISABLE" not in generation.vllm_subprocess_env()


def test_the_in_process_vllm_client_switches_compiling_off_unless_told_otherwise(monkeypatch):
    """genpi-synth's vLLM engine runs in its own process: torch's config is set there (the variable was read at
    torch's import), and the variable is set for an engine process it may start."""
    import torch._dynamo

    from genpi.synthesis.clients.vllm import no_compile_in_this_process

    monkeypatch.setattr(torch._dynamo.config, "disable", False)
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    no_compile_in_this_process()
    assert torch._dynamo.config.disable is True and os.environ["TORCH_COMPILE_DISABLE"] == "1"
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "0")
    no_compile_in_this_process()
    assert torch._dynamo.config.disable is False and os.environ["TORCH_COMPILE_DISABLE"] == "0"


def test_vllm_jobs_share_one_worker_on_cpu_and_get_one_each_on_a_gpu(tmp_path, monkeypatch):
    """Several engines run one after the other in one worker process on the CPU (vLLM imported once); on a GPU each
    gets its own process, whose end is what frees its memory. The worker itself is replaced by a stand-in here."""
    import json
    import subprocess

    from genpi.evaluation import generation

    calls = []

    def fake_run(cmd, **kwargs):
        job, result = json.loads(open(cmd[-2]).read()), cmd[-1]
        calls.append(job)
        jobs = job["jobs"] if "jobs" in job else [job]
        answer = [{"outputs": {}, "engine_start_s": 0.0, "name": j["name"]} for j in jobs]
        with open(result, "w") as f:
            json.dump({"results": answer} if "jobs" in job else answer[0], f)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(generation.subprocess, "run", fake_run)
    jobs = [{"name": "a"}, {"name": "b"}]
    for cuda, processes in ((False, 1), (True, 2)):
        calls.clear()
        monkeypatch.setattr(generation, "_cuda", lambda cuda=cuda: cuda)
        results = generation.run_vllm_worker(jobs, tmp_path / str(cuda))
        assert [r["name"] for r in results] == ["a", "b"] and len(calls) == processes
    assert generation.run_vllm_worker({"name": "c"}, tmp_path / "one")["name"] == "c"
