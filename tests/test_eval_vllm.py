"""genpi-eval through the real vLLM engine: the same greedy answers as transformers, and the timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_eval_support import FAST_EVAL, compose_eval, trained_run

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
LONGER = ["eval.max_new_tokens=32"]  # a longer answer makes token-for-token equality a stronger check


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_path) -> Path:
    pytest.importorskip("vllm")
    return trained_run(tmp_path_factory)


def _evaluate(tmp_path: Path, run_dir: Path, overrides: list[str]) -> Path:
    from genpi.evaluate import run_evaluation

    return run_evaluation(compose_eval(tmp_path, [f"run_dir={run_dir}", *FAST_EVAL, *LONGER, *overrides])).parent


def test_vllm_and_transformers_give_the_same_greedy_answers_and_metrics(run_dir, tmp_path_factory):
    hf = _evaluate(tmp_path_factory.mktemp("hf"), run_dir, ["eval.savings.measure=false"])
    vllm = _evaluate(tmp_path_factory.mktemp("vllm"), run_dir, ["eval.engine=vllm"])
    hf_rows = [json.loads(ln) for ln in (hf / "examples.jsonl").read_text().splitlines()]
    vllm_rows = [json.loads(ln) for ln in (vllm / "examples.jsonl").read_text().splitlines()]
    for model in ("teacher", "student", "floor"):
        assert [r[model] for r in vllm_rows] == [r[model] for r in hf_rows], model
    assert any(r["student"] != r["floor"] for r in hf_rows), "the adapter should change some answer"
    m_hf, m_vllm = (json.loads((d / "metrics.json").read_text()) for d in (hf, vllm))
    for model in ("teacher", "student", "floor", "gap_closed"):
        assert m_vllm[model] == pytest.approx(m_hf[model], nan_ok=True), model
    # the timings came from the vLLM worker, all three conditions side by side
    s = m_vllm["savings"]
    assert m_vllm["info"]["engine"] == "vllm" and s["timing_engine"] == "vllm"
    assert set(s["timing"]) == {"with_prompt", "without_prompt", "student_lora"}
    assert all(t["latency_s"] > 0 and t["throughput_tok_s"] > 0 for t in s["timing"].values())
    assert (vllm / "vllm" / "vllm_worker.log").is_file()
