"""The report: plots are valid PNGs with the expected series; metrics.json and report.md are written."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from genpi.evaluation import report, savings
from genpi.evaluation.metrics import gap_closed

CSV = """epoch,step,train/kl,train/loss,train/pg,train/sft,train/tokens,val/kl,val/loss,val/pg,val/sft
0,0,,,,,,0.5,2.0,3.0,4.0
0,0,0.6,2.1,3.1,4.1,1000,,,,
0,1,0.4,1.9,2.9,3.9,1000,,,,
0,2,0.3,1.7,2.7,3.7,1000,,,,
0,2,,,,,,0.25,1.5,2.5,3.5
"""


def _valid_png(path) -> bool:
    return report.is_png(path) and matplotlib.image.imread(str(path)).shape[0] > 10


def test_training_curves_plot_every_logged_loss_term(tmp_path):
    (tmp_path / "metrics.csv").write_text(CSV)
    drawn = report.plot_training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert drawn == ["train/loss", "val/loss", "train/kl", "val/kl", "train/sft", "val/sft", "train/pg", "val/pg"]
    assert _valid_png(tmp_path / "curves.png")


def test_training_curves_skip_terms_never_logged(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,step,train/kl,train/loss,val/kl\n0,0,0.5,0.5,\n0,1,,,0.4\n")
    assert report.plot_training_curves(tmp_path / "metrics.csv",
                                       tmp_path / "c.png") == ["train/loss", "train/kl", "val/kl"]
    (tmp_path / "empty.csv").write_text("epoch,step,lr\n0,0,0.1\n")
    with pytest.raises(ValueError):
        report.plot_training_curves(tmp_path / "empty.csv", tmp_path / "e.png")


def test_per_example_kl_plot_shows_floor_and_student(tmp_path):
    kl = {"tokens": [3, 4, 5], "student": {"kl_forward": [0.1, 0.0, 0.2], "kl_reverse": [0.1, 0.0, 0.2]},
          "floor": {"kl_forward": [0.9, 0.5, 1.2], "kl_reverse": [0.8, 0.4, 1.0]}}
    assert report.plot_per_example_kl(kl, tmp_path / "kl.png") == ["floor", "student"]
    assert _valid_png(tmp_path / "kl.png")


def _metrics() -> dict:
    table = {
        "teacher": {"kl_forward": 0.0, "kl_reverse": 0.0, "exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0,
                    "format_rate": 0.9},
        "student": {"kl_forward": 0.1, "kl_reverse": 0.12, "exact_match": 0.5, "token_f1": 0.8, "rouge_l": 0.7,
                    "format_rate": 0.85},
        "floor": {"kl_forward": 1.0, "kl_reverse": 0.9, "exact_match": 0.0, "token_f1": 0.1, "rouge_l": 0.1,
                  "format_rate": 0.05},
    }
    table["gap_closed"] = {k: gap_closed(table["floor"][k], table["student"][k], table["teacher"][k])
                           for k in table["teacher"]}
    sav = savings.compute_savings([1000, 1200], [40, 60], [50, 50], params=1_000_000)
    timing = {name: {"prefill_latency_s": p, "latency_s": lat, "throughput_tok_s": tp, "samples": 4}
              for name, p, lat, tp in (("with_prompt", 0.1, 1.0, 100.0), ("without_prompt", 0.02, 0.8, 150.0),
                                       ("student_lora", 0.03, 0.9, 120.0))}
    sav.update(timing=timing, timing_engine="vllm", timing_new_tokens=32, timing_reduction=savings.timing_savings(timing))
    info = {"task": "os", "model": "tiny-x", "adapter": "/a", "run_dir": "/r", "n_examples": 2, "inputs": "/d",
            "split": "test", "max_new_tokens": 16, "engine": "vllm", "kl_on": "the dataset's", "notes": ["a note"]}
    return {**table, "savings": sav, "info": info, "n_examples": 2}


def test_write_report_files_and_tables(tmp_path):
    m = _metrics()
    report.plot_model_metrics(m, tmp_path / "agreement.png")
    examples = [{"input": "count files", "teacher": "Act: finish", "student": "Act: finish", "floor": "hello",
                 "teacher_format_ok": 1.0}]
    path = report.write_report(tmp_path, m, examples, {"Agreement": "agreement.png"})
    assert path == tmp_path / "report.md" and _valid_png(tmp_path / "agreement.png")
    text = path.read_text()
    assert "| KL(teacher || model) per token | lower | 0 | 0.1 | 1 | 90.0% |" in text
    assert "![Agreement](agreement.png)" in text and "a note" in text
    assert "| MACs per request | " in text and "39.0%" in text and "17.0%" in text  # the paper's column
    assert "| latency per request (s, 32 tokens) | 1 | 0.8 | 20.0% |" in text
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["gap_closed"]["kl_forward"] == pytest.approx(0.9)
    assert saved["savings"]["prompt_tokens_saved"] == pytest.approx(1050)


def test_model_metrics_plot_series(tmp_path):
    assert report.plot_model_metrics(_metrics(), tmp_path / "a.png") == ["teacher", "student", "floor"]


def test_savings_arithmetic():
    s = savings.compute_savings([100], [20], [10], params=1000)
    assert s["prefill_flops_saved"] == 2 * 1000 * 80
    assert s["prompt_token_reduction"] == pytest.approx(0.8)
    assert s["request_macs_with"] == 1000 * 110 and s["request_macs_reduction"] == pytest.approx(1 - 30 / 110)
    t = savings.timing_savings({"with_prompt": {"latency_s": 2.0, "prefill_latency_s": 1.0, "throughput_tok_s": 10.0},
                                "without_prompt": {"latency_s": 1.5, "prefill_latency_s": 0.25,
                                                   "throughput_tok_s": 20.0}})
    assert t["without_prompt"] == {"latency_reduction": 0.25, "prefill_latency_reduction": 0.75, "throughput_gain": 1.0}


def test_aggregate_reference_rows_show_teacher_and_floor(tmp_path):
    from genpi.aggregate import REFERENCES, pivot, reference_rows

    rows = [{"loss": loss, "task": "os", "status": "ok", "eval/student/format_rate": s, "eval/teacher/format_rate": 0.9,
             "eval/floor/format_rate": 0.1, "eval/gap_closed/format_rate": (s - 0.1) / 0.8}
            for loss, s in (("genpi", 0.8), ("kl", 0.5))]
    rows += reference_rows(rows, "loss")
    labels, cols, cells = pivot(rows, "loss", "task", "eval/student/format_rate")
    assert labels == ["genpi", "kl", REFERENCES["teacher"], REFERENCES["floor"]] and cols == ["os"]
    assert cells[(REFERENCES["teacher"], "os")] == 0.9 and cells[(REFERENCES["floor"], "os")] == 0.1
    _, _, gap = pivot(rows, "loss", "task", "eval/gap_closed/format_rate")
    assert gap[(REFERENCES["teacher"], "os")] == 1.0 and gap[("genpi", "os")] == pytest.approx(0.875)


def test_aggregate_reports_the_spread_over_seeds_and_env_references(tmp_path):
    import statistics

    from genpi.aggregate import REFERENCES, cell_text, pivot_stats, reference_rows, write_tables

    rows = [{"loss": "opcd", "task": "os", "seed": seed, "status": "ok", "eval/env/student/success_rate": s,
             "eval/env/teacher/success_rate": 0.7, "eval/env/floor/success_rate": 0.0,
             "eval/env/gap_closed/success_rate": s / 0.7} for seed, s in enumerate((0.5, 0.6, 0.4))]
    rows.append({"loss": "genpi", "task": "os", "seed": 0, "status": "ok", "eval/env/student/success_rate": 0.3})
    rows += reference_rows(rows[:3], "loss")
    _, _, stats = pivot_stats(rows, "loss", "task", "eval/env/student/success_rate")
    mean, sd, n = stats[("opcd", "os")]
    assert n == 3 and mean == pytest.approx(0.5) and sd == pytest.approx(statistics.stdev([0.5, 0.6, 0.4]))
    assert stats[("genpi", "os")] == (0.3, None, 1) and cell_text(stats[("genpi", "os")]) == "0.300"
    assert stats[(REFERENCES["teacher"], "os")][0] == pytest.approx(0.7) and stats[(REFERENCES["floor"], "os")][0] == 0.0
    _, _, gap = pivot_stats(rows, "loss", "task", "eval/env/gap_closed/success_rate")
    assert gap[(REFERENCES["teacher"], "os")][0] == 1.0 and gap[(REFERENCES["floor"], "os")][0] == 0.0
    md, _ = write_tables(rows, tmp_path, "loss", "task", ["eval/env/student/success_rate"])
    text = md.read_text()
    assert "| opcd | 0.500 ± 0.100 (3) |" in text and "| genpi | 0.300 |" in text
    assert f"| {REFERENCES['teacher']} | 0.700 |" in text  # a reference: its value, no spread


def test_aggregate_draws_one_figure_per_metric_asked(tmp_path):
    from genpi.aggregate import main

    runs = tmp_path / "runs"
    for loss, fmt, success in (("genpi", 0.8, 0.6), ("opcd", 0.9, None)):
        run = runs / f"os-{loss}"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"task": "os", "config": {"loss": {"name": loss}, "seed": 0}}))
        metrics = {"eval/student/format_rate": fmt, **({} if success is None else
                                                      {"eval/env/student/success_rate": success})}
        (run / "metrics.json").write_text(json.dumps(metrics))
    main([str(runs), "--metrics", "eval/student/format_rate", "eval/env/student/success_rate", "--plots",
          "eval/student/format_rate", "eval/env/student/success_rate", "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "results.png", "results_eval_env_student_success_rate.png"]
    main([str(runs), "--metrics", "eval/student/format_rate", "--out", str(tmp_path / "one")])
    assert [p.name for p in (tmp_path / "one").glob("*.png")] == ["results.png"]
