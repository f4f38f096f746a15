"""The data card of a synthesized dataset: ``card.json`` for programs, ``README.md`` for people, and the
summary table printed at the end of a run."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genpi import __version__

LENGTH_COLUMNS = ("pseudo_input", "teacher_output_single", "student_output_single", "reason")


def token_counter(model_cfg: dict[str, Any]) -> tuple[Callable[[str], int], str]:
    """Count tokens with the run's tokenizer; whitespace words when it cannot be loaded (a remote-only model)."""
    try:
        from genpi.models.factory import load_tokenizer

        tok = load_tokenizer(model_cfg)
        return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0), "tokens"
    except Exception:  # the card must not fail a finished run; words are an honest fallback, labelled as such
        return (lambda text: len(text.split())), "words"


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def build_card(
    task_info: dict[str, Any], records: list[dict[str, Any]], reports: dict[str, dict[str, Any]],
    count: Callable[[str], int], unit: str, out_dir: Path, config: dict[str, Any],
    shards: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Counts per stage, parse yield, duplicate rate, mean lengths, models and sampling, time per stage, and
    ``shards``: per-shard counts and times and the whole run's throughput (see :func:`genpi.synth.shard_summary`)."""
    lengths: dict[str, Any] = {}
    for col in LENGTH_COLUMNS:
        vals = [count(r[col]) for r in records if r.get(col)]
        lengths[col] = _mean(vals)
    convs = [r["teacher_output_conv"] for r in records if r.get("teacher_output_conv")]
    lengths["teacher_output_conv"] = _mean([sum(count(t["content"]) for t in c) for c in convs])
    lengths["conversation_turns"] = _mean([len(c) for c in convs])
    pi = reports.get("pseudo_inputs", {})
    # A column is missing when its stage neither ran nor was found; an empty answer from a model is counted apart.
    produced_by = {"teacher_output_single": "outputs", "student_output_single": "outputs", "reason": "reasons",
                   "teacher_output_conv": "conversations"}
    missing = [c for c, stage in produced_by.items() if stage not in reports]
    empty_texts = {c: sum(1 for r in records if not r.get(c)) for c, stage in produced_by.items() if stage in reports}
    return {
        "genpi_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": str(out_dir),
        "task": task_info,
        "records": len(records),
        "empty_columns": missing,
        "empty_texts": empty_texts,
        "has_teacher_topk": bool(records) and all("teacher_topk_ids" in r for r in records),
        "pseudo_inputs": {k: pi.get(k) for k in ("source", "requested", "attempts", "failed_attempts", "parse_yield",
                                                   "candidates", "exact_duplicates", "normalized_duplicates",
                                                   "duplicate_rate") if k in pi},
        "mean_lengths": lengths,
        "length_unit": unit,
        "conversations_ended_by": (reports.get("conversations") or {}).get("ended_by"),
        "stages": reports,
        "shards": shards,
        "config": config,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def summary_rows(card: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, rep in card["stages"].items():
        rows.append([name, str(rep.get("ran", "")).split(" ")[0], _fmt(rep.get("records")), _fmt(rep.get("computed")),
                     _fmt(rep.get("from_store")), _fmt(rep.get("seconds")), _fmt(rep.get("model")),
                     _fmt(rep.get("client"))])
    return rows


SUMMARY_HEADER = ["stage", "ran", "records", "computed", "from store", "seconds", "model", "client"]
SHARD_HEADER = ["shard", "host", "started", "records", "seconds", "records/s", "computed per stage"]


def shard_rows(card: dict[str, Any]) -> list[list[str]]:
    return [[str(s["shard"]), _fmt(s.get("host")), _fmt(s.get("started")), _fmt(s.get("records")),
             _fmt(s.get("seconds")), _fmt(s.get("records_per_second")),
             ", ".join(f"{k} {v}" for k, v in (s.get("computed") or {}).items()) or "-"]
            for s in (card.get("shards") or {}).get("per_shard") or []]


def render_readme(card: dict[str, Any]) -> str:
    """The card as Markdown."""
    t = card["task"]
    lines = [
        f"# GenPI dataset: {t.get('name')}",
        "",
        f"{card['records']} records synthesized by genpi {card['genpi_version']} on {card['created']} for the prompt "
        f"`{t.get('prompt_id')}` of task `{t.get('name')}`. Load it with `genpi.data.records.load_records(folder)` "
        "or train on it with `genpi-train data.path=<this folder>`.",
        "",
        "## Stages",
        "",
        "| " + " | ".join(SUMMARY_HEADER) + " |",
        "|" + "---|" * len(SUMMARY_HEADER),
        *("| " + " | ".join(r) + " |" for r in summary_rows(card)),
        "",
    ]
    pi = card.get("pseudo_inputs") or {}
    if pi:
        lines += ["## Pseudo inputs", "", "| measure | value |", "|---|---|",
                  *(f"| {k} | {_fmt(v)} |" for k, v in pi.items()), ""]
    lines += [f"## Mean lengths ({card['length_unit']})", "", "| column | mean |", "|---|---|",
              *(f"| {k} | {_fmt(v)} |" for k, v in card["mean_lengths"].items()), ""]
    sh = card.get("shards") or {}
    if sh.get("per_shard"):
        lines += ["## Shards", "",
                  f"{sh['num_shards']} shard(s) ({sh.get('engines_per_job', 1)} engine(s) per job): {sh['records']} records "
                  f"in {_fmt(sh.get('wall_seconds'))} s of wall time from the first start to the last finish, "
                  f"{_fmt(sh.get('records_per_second'))} records/s.", "",
                  "| " + " | ".join(SHARD_HEADER) + " |", "|" + "---|" * len(SHARD_HEADER),
                  *("| " + " | ".join(r) + " |" for r in shard_rows(card)), ""]
    if card.get("conversations_ended_by"):
        lines += ["## How conversations ended", "", "| reason | count |", "|---|---|",
                  *(f"| {k} | {v} |" for k, v in sorted(card["conversations_ended_by"].items())), ""]
    if card.get("empty_columns"):
        lines += ["## Empty columns", "", "These columns hold no data (their stages did not run): "
                  + ", ".join(f"`{c}`" for c in card["empty_columns"]) + ".", ""]
    lines += ["## Models and sampling per stage", ""]
    for name, rep in card["stages"].items():
        settings = {k: v for k, v in rep.items() if k not in ("ran", "records", "computed", "from_store", "seconds")}
        lines += [f"### {name}", "", "```json", json.dumps(settings, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def write_card(out_dir: Path, card: dict[str, Any]) -> None:
    (out_dir / "card.json").write_text(json.dumps(card, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(render_readme(card), encoding="utf-8")


def print_summary(card: dict[str, Any]) -> None:
    """A table of the stages and the headline numbers, for the end of a run."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"genpi-synth: {card['records']} records for task {card['task'].get('name')}")
    for h in SUMMARY_HEADER:
        table.add_column(h, justify="right" if h in ("records", "computed", "from store", "seconds") else "left")
    for row in summary_rows(card):
        table.add_row(*row)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    console.print(table)
    pi = card.get("pseudo_inputs") or {}
    notes = []
    if pi.get("parse_yield") is not None:
        notes.append(f"parse yield {pi['parse_yield']:.0%} of {pi.get('attempts')} generator outputs")
    if pi.get("duplicate_rate") is not None:
        notes.append(f"duplicate rate {pi['duplicate_rate']:.0%}")
    if card.get("conversations_ended_by"):
        notes.append("conversations ended by " + ", ".join(f"{k}: {v}" for k, v in
                                                           sorted(card["conversations_ended_by"].items())))
    if card.get("empty_columns"):
        notes.append("empty columns (their stages did not run): " + ", ".join(card["empty_columns"]))
    sh = card.get("shards") or {}
    if (sh.get("num_shards") or 1) > 1:
        notes.append(f"{sh['num_shards']} shards: {sh['records']} records in {_fmt(sh.get('wall_seconds'))} s "
                     f"({_fmt(sh.get('records_per_second'))} records/s)")
    empty = {k: v for k, v in (card.get("empty_texts") or {}).items() if v}
    if empty:
        notes.append("empty answers: " + ", ".join(f"{k} {v}/{card['records']}" for k, v in empty.items()))
    for n in notes:
        console.print(n)
