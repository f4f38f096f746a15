"""genpi-pipeline: one composed config, every stage on the same task, model and seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genpi.pipeline import _literal, plan_stages, split_overrides

REPO = Path(__file__).resolve().parents[1]


def _value(args: list[str], key: str) -> str | None:
    found = [a.split("=", 1)[1] for a in args if a.lstrip("+").split("=", 1)[0] == key]
    return found[-1] if found else None


def test_overrides_are_routed_by_their_first_word():
    parts = split_overrides(["task=kg", "synth.client=vllm", "eval.engine=hf", "loss.kl.weight=1", "+synth.x=1"])
    assert parts == {"synth": ["synth.client=vllm", "+synth.x=1"], "eval": ["eval.engine=hf"],
                     "pipeline": ["task=kg", "loss.kl.weight=1"]}


def test_an_experiment_reaches_every_stage():
    """`experiment=paper_os` picks Llama-3-8B and os for training; synthesis and evaluation get them too."""
    plan = plan_stages(["experiment=paper_os"])
    for stage in ("synth", "eval"):
        assert _value(plan[stage], "model") == "llama3_8b", plan[stage]
        assert _value(plan[stage], "task") == "os", plan[stage]
        assert _value(plan[stage], "experiment_name") == "'paper_os'"
    assert plan["train"] == ["experiment=paper_os"]


def test_an_experiment_file_sets_synthesis_and_evaluation_too():
    plan = plan_stages(["experiment=demo"])
    assert _value(plan["synth"], "synth.name") == "'demo'"
    assert _value(plan["synth"], "model") == "tiny_agent"
    assert _value(plan["eval"], "eval.max_new_tokens") == "96"


def test_model_and_task_keys_changed_on_the_command_line_reach_every_stage():
    plan = plan_stages(["model=tiny_agent", "task=kg", "model.dtype=bfloat16", "task.end_token=DONE", "seed=3",
                        "synth.client=vllm", "eval.engine=hf"])
    for stage in ("synth", "eval"):
        assert _value(plan[stage], "model.dtype") == "'bfloat16'"
        assert _value(plan[stage], "task.end_token") == "'DONE'"
        assert _value(plan[stage], "seed") == "3"
    assert _value(plan["synth"], "synth.client") == "'vllm'"
    assert _value(plan["eval"], "eval.engine") == "hf"
    assert not any(a.startswith("synth.") for a in plan["train"] + plan["eval"])


def test_a_bad_override_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "genpi.pipeline", "loss=nope", "--cfg", "job"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "nope" in out.stderr


@pytest.mark.parametrize("value", [None, True, 3, 0.5, "a b", "it's", [1, "x"]])
def test_literals_round_trip_through_hydra(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([f"k={_literal(value)}"])[0]
    assert parsed.value() == value


@pytest.mark.slow
def test_the_pipeline_runs_the_demo_on_one_model_and_task_and_the_student_learns_the_format(tmp_path):
    """`genpi-pipeline experiment=demo` in a reduced setting (64 synthesized m2w inputs, context distillation alone,
    3 epochs, transformers generation, answers of up to 48 tokens): the three stages ran on the same model and task;
    without the prompt the student follows the task's format far more than the floor and closes most of the KL gap
    to the teacher (the method working, end to end, on model=tiny_agent; when this setting was chosen the student
    followed the format on every held-out input, the floor on none, and closed 99% of the gap, far above the
    thresholds here); a second call reuses the finished run and evaluation."""
    args = [sys.executable, "-m", "genpi.pipeline", "experiment=demo", "task=m2w", "loss=kl",
            "synth.pseudo_inputs.num_inputs=64", "trainer.max_epochs=3", "validate_before_fit=false",
            "eval.engine=hf", "eval.savings.measure=false", "eval.max_new_tokens=48"]
    env = {**os.environ, "GENPI_OUTPUT_ROOT": str(tmp_path / "out"), "WANDB_MODE": "offline"}
    env.pop("GENPI_LAUNCH_ID", None)
    first = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    lines = dict(ln.split(": ", 1) for ln in first.stdout.splitlines()[-3:])
    dataset, run_dir, report = Path(lines["dataset"]), Path(lines["run folder"]), Path(lines["report"])
    card = json.loads((dataset / "card.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    evaluation = json.loads((report.parent / "metrics.json").read_text())
    from genpi.models.factory import model_fingerprint

    agent = model_fingerprint({"name_or_path": "tiny_agent"})
    assert run["model"] == agent and evaluation["info"]["model"] == agent
    synth_model = card["config"]["model"]["name_or_path"]
    assert synth_model == "tiny_agent" or Path(synth_model).name == agent
    assert card["task"]["name"] == run["task"] == evaluation["info"]["task"] == "m2w"
    assert "## In one table" in report.read_text()
    assert evaluation["teacher"]["format_rate"] >= 0.5
    assert evaluation["student"]["format_rate"] >= evaluation["floor"]["format_rate"] + 0.4
    assert evaluation["gap_closed"]["kl_forward"] > 0.5

    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the finished run" in again.stdout and "reusing the evaluation" in again.stdout
    assert again.stdout.splitlines()[-2:] == first.stdout.splitlines()[-2:]
