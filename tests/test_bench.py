"""genpi-bench runs end to end on a small setting and reports consistent figures (no timing is asserted here:
the speed targets are read from a full `make bench` run, see the README)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_small_setting_reports_every_figure(tmp_path, tiny_path):
    from genpi.bench import main

    out = tmp_path / "bench.json"
    main(["--prompt-tokens", "160", "--input-tokens", "24", "--response-tokens", "12", "--records", "12",
          "--batch-size", "4", "--steps", "1", "--mem-tokens", "2048", "--mem-vocab", "32000", "--chunk", "128",
          "--topk-model", "tiny", "--skip", "roleswap", "teacher_attention", "env", "real_vocab", "onpolicy", "--out",
          str(out)])
    report = json.loads(out.read_text())
    training = report["training"]
    assert training["teacher_pass"]["max_abs_diff"] < 1e-5  # the cached prompt gives the same teacher
    assert training["teacher_pass"]["shared_max_abs_diff"] < 1e-5  # so does shared-prefix attention
    assert set(training["step_s"]) >= {"genpi_kl_naive", "genpi_kl_prefix_cached", "genpi_kl_cached_logits",
                                       "genpi_no_kl", "sft_only"}
    assert all(v > 0 for v in training["step_s"].values())
    assert 0 <= training["padding_ratio"]["length_grouped"] <= training["padding_ratio"]["plain"] < 1
    memory = report["loss_memory"]["tokens"]
    assert set(memory) == {"256", "2048"}
    assert memory["2048"]["max_value_diff"] < 1e-4  # chunked and unchunked losses agree
    assert memory["2048"]["unchunked"]["delta_mb"] > memory["2048"]["chunked"]["delta_mb"]
    topk = report["topk"]["k"]
    assert topk["5"]["topk_forward_kl"] <= topk["20"]["topk_forward_kl"] + 1e-6 <= report["topk"]["full_forward_kl"] + 2e-6
    assert 0 < topk["50"]["teacher_mass_in_topk"] <= 1
    assert report["versions"]["torch"]


def test_onpolicy_section_times_both_steps_on_the_same_batch(tiny_path):
    """The onpolicy section (left out of the smoke test above) at a toy size: both steps timed, the on-policy one
    split into sampling, scoring and backward."""
    from genpi.bench import bench_onpolicy, parse_args

    args = parse_args(["--prompt-tokens", "64", "--input-tokens", "16", "--response-tokens", "8", "--records", "8",
                       "--batch-size", "2", "--steps", "1", "--onpolicy-new-tokens", "4", "--only", "onpolicy"])
    report = bench_onpolicy(args)
    assert set(report["step"]) == {"offpolicy_kl", "onpolicy_kl"}
    assert all(s["median_s"] > 0 and s["n"] == 1 for s in report["step"].values())
    split = report["onpolicy_split_median"]
    assert {"sample_s", "score_s", "backward_s"} <= set(split) and 1 <= split["sampled_len"] <= 4
