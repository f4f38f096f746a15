"""Gather run folders (or a W&B group) into one table (markdown + CSV) and a plot.

``python -m genpi.aggregate ROOT --rows loss --cols task --metrics val/kl eval/gap_closed/kl_forward``
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

from genpi.utils.errors import GenpiError, exit_on_error


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def collect_runs(root: str | Path) -> list[dict[str, Any]]:
    """One row per training run folder under ``root`` (any depth): its config values and metrics.

    Eval metrics written next to the run (``eval/metrics.json`` or ``metrics.json`` keys ``eval/*``) join
    the same row. Failed jobs (``error.txt``) appear with ``status=failed``.
    """
    root = Path(root)
    if not root.exists():
        raise GenpiError(f"no such folder: {root} (pass the multirun or runs folder of a study)")
    rows = []
    for run_json in sorted(root.rglob("run.json")):
        run_dir = run_json.parent
        info = json.loads(run_json.read_text())
        cfg = info.get("config", {})
        row: dict[str, Any] = {
            "run_dir": str(run_dir), "task": info.get("task"), "loss": (cfg.get("loss") or {}).get("name"),
            "model": info.get("model"), "seed": cfg.get("seed"), "run_name": info.get("run_name"),
            "experiment": cfg.get("experiment_name"), "status": "ok",
        }
        row.update({f"cfg.{k}": v for k, v in _flat(cfg.get("loss") or {}).items()})
        metrics_path = run_dir / "metrics.json"
        if metrics_path.is_file():
            row.update({k: v for k, v in json.loads(metrics_path.read_text()).items() if not isinstance(v, dict)})
        if (run_dir / "error.txt").is_file():
            row["status"] = "failed"
        rows.append(row)
    for err in sorted(root.rglob("error.txt")):
        if not (err.parent / "run.json").is_file():
            rows.append({"run_dir": str(err.parent), "status": "failed",
                         "error": err.read_text().strip().splitlines()[-1][:200]})
    return rows


def collect_wandb(group: str, project: str, entity: str | None = None) -> list[dict[str, Any]]:
    """Rows from the runs of a W&B group (needs network access to W&B)."""
    import wandb

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    rows = []
    for run in api.runs(path, filters={"group": group}):
        cfg = run.config
        row = {"run_dir": run.url, "task": (cfg.get("task") or {}).get("name"), "loss": (cfg.get("loss") or {}).get("name"),
               "seed": cfg.get("seed"), "status": run.state}
        row.update({k: v for k, v in run.summary.items() if isinstance(v, (int, float))})
        rows.append(row)
    return rows


REFERENCES = {"teacher": "teacher (base + prompt)", "floor": "floor (base, no prompt)"}


STUDENT = ("eval/student/", "eval/env/student/")      # the student's metrics, proxies and in the environment
GAP_CLOSED = ("eval/gap_closed/", "eval/env/gap_closed/")


def reference_rows(rows: list[dict[str, Any]], row_key: str) -> list[dict[str, Any]]:
    """Rows for the evaluation's two reference models, to read beside the students: for every metric
    ``eval/student/X`` (``eval/env/student/X``) the teacher's (floor's) ``eval/teacher/X`` (``eval/env/teacher/X``);
    the share of the gap closed is 1 for the teacher and 0 for the floor by definition."""
    out = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        for model, label in REFERENCES.items():
            ref = {k: v for k, v in r.items() if not k.startswith("eval/")}
            ref[row_key] = label
            for k, v in r.items():
                if k.startswith(STUDENT):
                    ref[k] = r.get(k.replace("/student/", f"/{model}/", 1))
                elif k.startswith(GAP_CLOSED) and isinstance(v, (int, float)):
                    ref[k] = 1.0 if model == "teacher" else 0.0
            out.append(ref)
    return out


def pivot(rows: list[dict[str, Any]], row_key: str, col_key: str, metric: str) -> tuple[list, list, dict]:
    """Mean of ``metric`` per (row value, column value) over seeds; returns row labels, column labels, cells."""
    rl, cl, stats = pivot_stats(rows, row_key, col_key, metric)
    return rl, cl, {k: mean for k, (mean, _sd, _n) in stats.items()}


def pivot_stats(rows: list[dict[str, Any]], row_key: str, col_key: str, metric: str) -> tuple[list, list, dict]:
    """As :func:`pivot`, each cell ``(mean, sample standard deviation or None for one run, number of runs)``: the
    spread over seeds (or any runs that share the row and column value)."""
    cells: dict[tuple[Any, Any], list[float]] = {}
    for r in rows:
        v = r.get(metric)
        if r.get("status") != "ok" or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        cells.setdefault((r.get(row_key), r.get(col_key)), []).append(float(v))
    refs = list(REFERENCES.values())
    row_labels = sorted({k[0] for k in cells}, key=lambda r: (r in refs, refs.index(r) if r in refs else 0, str(r)))
    col_labels = sorted({k[1] for k in cells}, key=str)
    return row_labels, col_labels, {k: _mean_sd(v) for k, v in cells.items()}


def _mean_sd(values: list[float]) -> tuple[float, float | None, int]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None, len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)), len(values)


def cell_text(stats: tuple[float, float | None, int]) -> str:
    """``0.594`` for one run, ``0.594 ± 0.031 (3)`` for the mean, standard deviation and count of several."""
    mean, sd, n = stats
    return f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f} ({n})"


def portable(value: Any) -> Any:
    """An absolute path under the current folder as a relative one, in a value or anywhere inside its dicts and
    lists: tables and records get committed and shared, and the folder a study ran in is nobody else's business."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        try:
            return str(Path(value).relative_to(Path.cwd()))
        except ValueError:
            return value
    return value


def write_tables(rows: list[dict[str, Any]], out_dir: Path, row_key: str, col_key: str,
                 metrics: list[str]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "results.csv"
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("task", "loss", "seed", "status"), k))
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows({k: portable(v) for k, v in r.items()} for r in rows)
    lines = []
    for metric in metrics:
        rl, cl, cells = pivot_stats(rows, row_key, col_key, metric)
        lines += [f"### {metric}", "", "| " + " | ".join([row_key, *map(str, cl)]) + " |",
                  "|" + "---|" * (len(cl) + 1)]
        for r in rl:
            # the references are the same models on the runs' inputs: their value, not a spread over seeds
            text = (lambda st: f"{st[0]:.3f}") if r in REFERENCES.values() else cell_text
            vals = [text(cells[(r, c)]) if (r, c) in cells else "–" for c in cl]
            lines.append("| " + " | ".join([str(r), *vals]) + " |")
        lines.append("")
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        lines += ["### Failed jobs", ""] + [f"- {portable(r['run_dir'])}: {r.get('error', 'see error.txt')}" for r in failed]
    md_path = out_dir / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def plot(rows: list[dict[str, Any]], out_path: Path, row_key: str, col_key: str, metric: str) -> Path:
    """Grouped bars: one group per column value (e.g. task), one bar per row value (e.g. loss); a bar of several
    runs (seeds) is their mean with a standard-deviation error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl, cl, cells = pivot_stats(rows, row_key, col_key, metric)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cl) + 4), 3.6))
    width = 0.8 / max(1, len(rl))
    for i, r in enumerate(rl):
        xs = [j + i * width for j in range(len(cl))]
        got = [cells.get((r, c), (float("nan"), None, 0)) for c in cl]
        ax.bar(xs, [m for m, _, _ in got], width, label=str(r),
               yerr=[sd or 0.0 for _, sd, _ in got] if any(sd for _, sd, _ in got) else None, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cl))], [str(c) for c in cl])
    ax.set_ylabel(metric)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title=row_key, title_fontsize=8)
    ax.set_title(f"{metric} by {col_key} and {row_key}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", help="folder holding the study's run folders")
    ap.add_argument("--wandb-group", help="read a W&B group instead of folders")
    ap.add_argument("--wandb-project", default="genpi")
    ap.add_argument("--wandb-entity", default=None)
    ap.add_argument("--rows", default="loss")
    ap.add_argument("--cols", default="task")
    ap.add_argument("--metrics", nargs="+", default=["val/kl", "val/kl_start"])
    ap.add_argument("--plots", nargs="+", default=None, metavar="METRIC",
                    help="metrics to plot, one figure each: the first as results.png, the others as "
                         "results_<metric with / as _>.png (default: the first of --metrics)")
    ap.add_argument("--out", default=None, help="output folder (default: ROOT/summary)")
    ap.add_argument("--reference-rows", action="store_true",
                    help="add rows for the teacher (base + prompt) and the floor (base, no prompt) of the evaluations")
    args = ap.parse_args(argv)
    if args.wandb_group:
        rows = collect_wandb(args.wandb_group, args.wandb_project, args.wandb_entity)
        out = Path(args.out or f"outputs/summary/{args.wandb_group}")
    elif args.root:
        rows = collect_runs(args.root)
        out = Path(args.out or Path(args.root) / "summary")
    else:
        raise GenpiError("give a study folder or --wandb-group NAME")
    if not rows:
        raise GenpiError(f"no run folders (run.json) under {args.root}: did the sweep run?")
    if args.reference_rows:
        rows = rows + reference_rows(rows, args.rows)
    md, csv_path = write_tables(rows, out, args.rows, args.cols, args.metrics)
    pngs = [plot(rows, out / plot_name(metric, first=i == 0), args.rows, args.cols, metric)
            for i, metric in enumerate(args.plots or args.metrics[:1])]
    print(md.read_text())
    print(f"table: {md}\ncsv: {csv_path}\nplot: " + " ".join(map(str, pngs)))


def plot_name(metric: str, first: bool) -> str:
    """The file of a metric's figure: ``results.png`` for the first, ``results_eval_env_student_success_rate.png``
    for ``eval/env/student/success_rate`` after it."""
    return "results.png" if first else "results_" + metric.replace("/", "_") + ".png"


if __name__ == "__main__":
    main()
