"""The evaluation report: ``metrics.json``, ``report.md`` and PNG plots in the evaluation's run folder.

Each plotting function returns the names of the series it drew, so callers (and tests) can check a
plot shows what it should without reading pixels.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from genpi.evaluation.metrics import MODELS
from genpi.evaluation.savings import paper_rows
from genpi.runs import write_json

METRIC_LABELS = {
    "kl_forward": ("KL(teacher || model) per token", "lower"),
    "kl_reverse": ("KL(model || teacher) per token", "lower"),
    "exact_match": ("exact match with the teacher", "higher"),
    "token_f1": ("word F1 with the teacher", "higher"),
    "rouge_l": ("ROUGE-L with the teacher", "higher"),
    "format_rate": ("task format check passed", "higher"),
}
LOSS_TERMS = ("loss", "kl", "sft", "pg")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- plots ------------------------------------------------------------------------------------------
def read_metrics_csv(csv_path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Lightning CSVLogger's ``metrics.csv`` -> metric -> [(step, value)] for the non-empty cells."""
    series: dict[str, list[tuple[float, float]]] = {}
    with Path(csv_path).open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = float(row.get("step") or "nan")
            except ValueError:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    v = float(value)
                except ValueError:
                    continue
                if math.isfinite(v) and math.isfinite(step):
                    series.setdefault(key, []).append((step, v))
    return series


def plot_training_curves(csv_path: str | Path, out_png: str | Path) -> list[str]:
    """One panel per loss term (``loss``, ``kl``, ``sft``, ``pg``) with its ``train/`` and ``val/`` curves.

    Returns the series drawn (e.g. ``["train/loss", "val/loss", "train/kl", "val/kl"]``); a term the run
    never logged gets no panel. Raises ``ValueError`` when the file holds no loss term at all.
    """
    series = read_metrics_csv(csv_path)
    terms = [t for t in LOSS_TERMS if f"train/{t}" in series or f"val/{t}" in series]
    if not terms:
        raise ValueError(f"{csv_path} holds no train/ or val/ loss term")
    plt = _plt()
    fig, axes = plt.subplots(1, len(terms), figsize=(3.4 * len(terms), 3.0), squeeze=False)
    drawn: list[str] = []
    for ax, term in zip(axes[0], terms):
        for split, style in (("train", "-"), ("val", "o--")):
            name = f"{split}/{term}"
            if name in series:
                xs, ys = zip(*series[name])
                ax.plot(xs, ys, style, label=name, markersize=4)
                drawn.append(name)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("training curves")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return drawn


def plot_per_example_kl(kl: dict[str, Any], out_png: str | Path, kind: str = "kl_forward") -> list[str]:
    """Per-example KL to the teacher of the floor and the student, examples sorted by the floor's KL.

    Args:
        kl: the output of :func:`genpi.evaluation.metrics.kl_to_teacher`.
    Returns:
        the series drawn: ``["floor", "student"]``.
    """
    floor, student = kl["floor"][kind], kl["student"][kind]
    order = sorted(range(len(floor)), key=lambda i: -floor[i])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(order) + 2), 3.4))
    xs = list(range(len(order)))
    drawn = []
    for name, values, style in (("floor", floor, "s"), ("student", student, "o")):
        ax.plot(xs, [values[i] for i in order], style, label=name, markersize=5)
        drawn.append(name)
    for x, i in zip(xs, order):  # the gap each example closes, as a thin line from floor to student
        ax.plot([x, x], [floor[i], student[i]], "-", color="0.7", linewidth=1, zorder=0)
    ax.set_xlabel("held-out example (sorted by the floor's KL)")
    ax.set_ylabel(METRIC_LABELS[kind][0])
    ax.set_title("per-example KL to the teacher (the teacher is at 0)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return drawn


def plot_model_metrics(table: dict[str, dict[str, Any]], out_png: str | Path) -> list[str]:
    """Grouped bars of the [0, 1] metrics (agreement, format rate) for teacher, student and floor."""
    metrics = [m for m in ("exact_match", "token_f1", "rouge_l", "format_rate") if table["teacher"].get(m) is not None]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 * len(metrics) + 2.5, 3.2))
    width = 0.8 / len(MODELS)
    drawn = []
    for i, model in enumerate(MODELS):
        vals = [table[model].get(m) for m in metrics]
        ax.bar([j + i * width for j in range(len(metrics))], [v if v is not None else 0.0 for v in vals], width,
               label=model)
        drawn.append(model)
    ax.set_xticks([j + width for j in range(len(metrics))], metrics)
    ax.set_ylim(0, 1.05)
    ax.set_title("agreement with the teacher's greedy answers, and the task's format rate", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return drawn


def make_plots(out_dir: str | Path, run_dir: str | Path | None, kl: dict[str, Any],
               table: dict[str, dict[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """Every plot of the report into ``out_dir``: the run's training curves (from its ``csv/metrics.csv``),
    the per-example KL, the agreement bars. Returns title -> file name, and notes on plots left out."""
    out, plots, notes = Path(out_dir), {}, []
    csv_path = Path(run_dir) / "csv" / "metrics.csv" if run_dir else None
    if csv_path is not None and csv_path.is_file():
        try:
            plot_training_curves(csv_path, out / "training_curves.png")
            plots["Training curves (each loss term)"] = "training_curves.png"
        except ValueError as err:
            notes.append(f"no training curves: {err}")
    else:
        notes.append("no training curves: the run's csv/metrics.csv was not found (train with logger=csv or many)")
    plot_per_example_kl(kl, out / "kl_per_example.png")
    plots["Per-example KL to the teacher: student vs floor"] = "kl_per_example.png"
    plot_model_metrics(table, out / "agreement.png")
    plots["Agreement with the teacher and format rate"] = "agreement.png"
    return plots, notes


def is_png(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.read_bytes()[:8] == PNG_SIGNATURE


# -- markdown ---------------------------------------------------------------------------------------
def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if pct:
        v = float(v) + 0.0  # no "-0.0%"
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def metrics_table(table: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per metric, columns teacher / student / floor / gap closed."""
    lines = ["| metric | better | teacher (prompt) | student (adapter, no prompt) | floor (no prompt) | gap closed |",
             "|---|---|---|---|---|---|"]
    for key in table["teacher"]:
        label, better = METRIC_LABELS.get(key, (key, ""))
        lines.append(f"| {label} | {better} | " + " | ".join(_fmt(table[m].get(key)) for m in MODELS)
                     + f" | {_fmt(table['gap_closed'].get(key), pct=True)} |")
    return "\n".join(lines)


def savings_table(savings: dict[str, Any]) -> str:
    s = savings
    rows = [
        ("prompt tokens per request", s["prompt_tokens_with"], s["prompt_tokens_without"],
         s["prompt_token_reduction"]),
        ("prefill FLOPs per request", s["prefill_flops_with"], s["prefill_flops_without"], s["prefill_flops_reduction"]),
        ("MACs per request (prefill + answer)", s["request_macs_with"], s["request_macs_without"],
         s["request_macs_reduction"]),
    ]
    timing = s.get("timing") or {}
    if timing:
        w, wo, lo = timing["with_prompt"], timing["without_prompt"], timing.get("student_lora")
        red = s.get("timing_reduction") or {}
        rows += [
            ("prefill latency (s, 1 token)", w["prefill_latency_s"], wo["prefill_latency_s"],
             red["without_prompt"]["prefill_latency_reduction"]),
            (f"latency per request (s, {s.get('timing_new_tokens', '?')} tokens)", w["latency_s"], wo["latency_s"],
             red["without_prompt"]["latency_reduction"]),
        ]
        if lo:
            rows.append(("latency per request, LoRA served (s)", w["latency_s"], lo["latency_s"],
                         red["student_lora"]["latency_reduction"]))
    lines = ["| | with the prompt | without | reduction |", "|---|---|---|---|"]
    lines += [f"| {name} | {_fmt(a)} | {_fmt(b)} | {_fmt(r, pct=True)} |" for name, a, b, r in rows]
    if timing:
        gain = (s.get("timing_reduction") or {}).get("without_prompt", {}).get("throughput_gain")
        lines.append(f"| throughput (generated tokens/s) | {_fmt(timing['with_prompt']['throughput_tok_s'])} | "
                     f"{_fmt(timing['without_prompt']['throughput_tok_s'])} | gain {_fmt(gain, pct=True)} |")
    return "\n".join(lines)


def paper_table(savings: dict[str, Any], task: str, model: str) -> str:
    lines = [f"| saving | ours ({task}, {model}) | the GenPI paper (up to) | how |", "|---|---|---|---|"]
    for what, ours, paper, how in paper_rows(savings):
        lines.append(f"| {what} | {_fmt(ours, pct=True)} | {_fmt(paper, pct=True)} | {how} |")
    return "\n".join(lines)


def _cell(text: str, limit: int = 300) -> str:
    """Text for one markdown table cell: newlines as <br>, pipes escaped, cut at ``limit`` characters."""
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "(empty)"


def story_section(metrics: dict[str, Any], examples: Sequence[dict[str, Any]]) -> list[str]:
    """The report's opening: does the student without the prompt behave as the teacher with it? One table
    (format rate and the KL gap closed, teacher / student / floor) and one held-out input side by side: the first
    one whose teacher answer passes the format check (the first input if none does)."""
    rows = [("answers in the task's format", "format_rate", True), ("KL to the teacher per token", "kl_forward", False)]
    lines = ["## In one table", "",
             "| | teacher (base + prompt) | student (base + adapter, no prompt) | floor (base, no prompt) | gap closed |",
             "|---|---|---|---|---|"]
    for label, key, pct in rows:
        if key in metrics.get("teacher", {}):
            lines.append(f"| {label} | " + " | ".join(_fmt(metrics[m].get(key), pct=pct) for m in MODELS)
                         + f" | {_fmt(metrics['gap_closed'].get(key), pct=True)} |")
    if examples:
        ex = next((e for e in examples if e.get("teacher_format_ok")), examples[0])
        lines += ["", "One held-out input (the first whose teacher answer is in the task's format):", "",
                  _quote(ex["input"]), "", "| teacher (prompt) | student (adapter, no prompt) | floor (no prompt) |",
                  "|---|---|---|",
                  "| " + " | ".join(("✓ " if ex.get(f"{m}_format_ok") else "✗ ") + _cell(ex[m]) for m in MODELS) + " |",
                  "", "✓ / ✗: the answer passes / fails the task's format check."]
    return lines + [""]


def _quote(text: str, limit: int = 400) -> str:
    text = text if len(text) <= limit else text[:limit] + " …"
    return "\n".join("    " + ln for ln in (text.splitlines() or [""]))


def write_report(out_dir: str | Path, metrics: dict[str, Any], examples: Sequence[dict[str, Any]],
                 plots: dict[str, str], n_show: int = 3) -> Path:
    """Write ``metrics.json`` and ``report.md`` into ``out_dir``; returns the report's path.

    Args:
        metrics: ``{teacher|student|floor|gap_closed: {metric: value}, savings: {...}, ...}`` (also the
            content of ``metrics.json``).
        examples: per-example rows (``input``, ``teacher``, ``student``, ``floor`` answers ...).
        plots: title -> PNG file name inside ``out_dir``.
    """
    out = Path(out_dir)
    write_json(out / "metrics.json", metrics)
    info = metrics["info"]
    lines = [
        f"# GenPI evaluation: {info['task']} on {info['model']}",
        "",
        f"- adapter: `{info['adapter']}`" + (f" (rebuilt from `{info['checkpoint']}`)" if info.get("checkpoint") else ""),
        f"- training run: `{info['run_dir']}`" if info.get("run_dir") else "- training run: unknown",
        f"- inputs: {info['n_examples']} held-out inputs from `{info['inputs']}`"
        + (f" (split `{info['split']}`)" if info.get("split") else ""),
        f"- generation: greedy, up to {info['max_new_tokens']} new tokens, engine `{info['engine']}`",
        f"- KL measured on {info['kl_on']} teacher answers",
        "",
        "Teacher = base model with the prompt; student = base + adapter without the prompt; floor = base without "
        "the prompt. Gap closed = (floor - student) / (floor - teacher): 100% = the student matches the teacher, "
        "0% = no better than the floor, negative = worse than the floor; – when the floor equals the teacher.",
        "",
        *story_section(metrics, examples),
        "## How close the student comes to the teacher",
        "",
        metrics_table(metrics),
        "",
        "## What dropping the prompt saves",
        "",
        savings_table(metrics["savings"]),
        "",
        f"Compute: 2 x {metrics['savings']['params']:,} parameters (the input embedding lookup excluded) x tokens; "
        f"the answer is the teacher's mean greedy length, {metrics['savings']['answer_tokens']:.1f} tokens.",
    ]
    timing = metrics["savings"].get("timing")
    if timing:
        lines.append(f"Timing: {metrics['savings'].get('timing_engine')} engine, best of "
                     f"{timing['with_prompt']['samples']} runs per condition (other processes only add time), "
                     "conditions interleaved; 'without' is the base model without the prompt (what a merged adapter "
                     "costs). Medians are in metrics.json.")
        lora = (metrics["savings"].get("timing_reduction") or {}).get("student_lora") or {}
        merged = (metrics["savings"].get("timing_reduction") or {}).get("without_prompt") or {}
        if (lora.get("latency_reduction") or 0) < (merged.get("latency_reduction") or 0):
            lines.append("Serving the adapter unmerged adds work to every token (the engine's LoRA kernels); merge it "
                         "(genpi-export export.merged=true) to serve at the 'without' figures.")
    else:
        lines.append("Timing: not measured (eval.savings.measure=false).")
    lines += ["", paper_table(metrics["savings"], info["task"], info["model"]), ""]
    if plots:
        lines += ["## Plots", ""]
        for title, name in plots.items():
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    for note in info.get("notes", []):
        lines.append(f"> {note}")
    if examples and n_show:
        lines += ["", "## Examples", ""]
        for ex in list(examples)[:n_show]:
            lines += ["**Input**", "", _quote(ex["input"]), ""]
            for m in MODELS:
                lines += [f"**{m}**" + (" (format ok)" if ex.get(f"{m}_format_ok") else ""), "", _quote(ex[m]), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def example_rows(inputs: Sequence[str], answers: dict[str, list[str]], kl_answers: Sequence[str],
                 per_example: dict[str, dict[str, list[float]]], kl: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per input: the three greedy answers, the answer KL was measured on, and every per-example value
    (``<model>_<metric>``, e.g. ``student_rouge_l``, ``floor_kl_forward``)."""
    rows = []
    for i, x in enumerate(inputs):
        row: dict[str, Any] = {"input": x, **{m: answers[m][i] for m in MODELS}, "kl_answer": kl_answers[i],
                               "answer_tokens": kl["tokens"][i]}
        for m in MODELS:
            for k, vals in per_example[m].items():
                row[f"{m}_{k}"] = vals[i]
        for m in ("student", "floor"):
            for k, vals in kl[m].items():
                row[f"{m}_{k}"] = vals[i]
        rows.append(row)
    return rows


def write_examples(out_dir: str | Path, examples: Sequence[dict[str, Any]]) -> Path:
    path = Path(out_dir) / "examples.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    return path
