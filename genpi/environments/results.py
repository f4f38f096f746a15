"""What an environment evaluation reports: success rates with Wilson intervals, the gap closed, the count of each
ending, a per-label breakdown, and every trajectory as a line of ``episodes.jsonl``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from genpi.environments.episode import ENDINGS


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    """The Wilson score interval of a binomial proportion (95% for z = 1.96); (None, None) when n = 0."""
    if n <= 0:
        return None, None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def gap_closed(floor: float | None, student: float | None, teacher: float | None) -> float | None:
    """(student - floor) / (teacher - floor) for a higher-is-better rate; None when the teacher does not beat the
    floor (no gap to close) or a side is missing."""
    if floor is None or student is None or teacher is None or teacher - floor <= 1e-12:
        return None
    return (student - floor) / (teacher - floor)


def summarize(records: Sequence[dict[str, Any]], sides: Sequence[str]) -> dict[str, Any]:
    """Per side: ``success_rate``, its 95% Wilson interval, ``n``, ``successes``, the count of each ending, mean
    rounds, and ``labels`` -> {success_rate, n}; plus ``gap_closed/success_rate`` when all three sides ran."""
    out: dict[str, Any] = {}
    for side in sides:
        rows = [r for r in records if r["side"] == side]
        n, wins = len(rows), sum(1 for r in rows if r["success"])
        lo, hi = wilson_interval(wins, n)
        labels: dict[str, dict[str, Any]] = {}
        for r in rows:
            for label in r.get("labels") or ["(none)"]:
                slot = labels.setdefault(label, {"n": 0, "successes": 0})
                slot["n"] += 1
                slot["successes"] += int(bool(r["success"]))
        for slot in labels.values():
            slot["success_rate"] = slot["successes"] / slot["n"]
        out[side] = {
            "success_rate": wins / n if n else None, "success_rate_ci_low": lo, "success_rate_ci_high": hi,
            "n": n, "successes": wins,
            "endings": {e: sum(1 for r in rows if r["ending"] == e) for e in ENDINGS},
            "rounds_mean": sum(r["rounds"] for r in rows) / n if n else None,
            "labels": dict(sorted(labels.items())),
        }
    if all(s in out for s in ("teacher", "student", "floor")):
        out["gap_closed"] = {"success_rate": gap_closed(out["floor"]["success_rate"], out["student"]["success_rate"],
                                                        out["teacher"]["success_rate"])}
    return out


class EpisodeLog:
    """``episodes.jsonl``, one line per judged episode, written as each one ends (a crash keeps what was done)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def __call__(self, episode) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(episode.record(), ensure_ascii=False) + "\n")


def read_episodes(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _ci(side: dict[str, Any]) -> str:
    lo, hi = side.get("success_rate_ci_low"), side.get("success_rate_ci_high")
    return "–" if lo is None else f"{100 * lo:.1f}–{100 * hi:.1f}%"


def success_table(summary: dict[str, Any], sides: Sequence[str]) -> str:
    """Markdown: success rate, interval and ending counts per side."""
    head = "| agent | success | 95% Wilson | n | " + " | ".join(e.replace("_", " ") for e in ENDINGS) + " | rounds |"
    lines = [head, "|" + " --- |" * (5 + len(ENDINGS))]
    for side in sides:
        s = summary.get(side)
        if not s:
            continue
        ends = " | ".join(str(s["endings"][e]) for e in ENDINGS)
        rounds = "–" if s["rounds_mean"] is None else f"{s['rounds_mean']:.2f}"
        lines.append(f"| {side} | {_pct(s['success_rate'])} | {_ci(s)} | {s['n']} | {ends} | {rounds} |")
    gap = (summary.get("gap_closed") or {}).get("success_rate")
    if "gap_closed" in summary:
        lines.append(f"\nGap closed (success rate): {_pct(gap)}")
    return "\n".join(lines)


def label_table(summary: dict[str, Any], sides: Sequence[str]) -> str:
    labels = sorted({lab for side in sides if side in summary for lab in summary[side]["labels"]})
    present = [s for s in sides if s in summary]
    lines = ["| label | n | " + " | ".join(present) + " |", "|" + " --- |" * (2 + len(present))]
    for lab in labels:
        n = max(summary[s]["labels"].get(lab, {}).get("n", 0) for s in present)
        cells = [_pct(summary[s]["labels"].get(lab, {}).get("success_rate")) for s in present]
        lines.append(f"| {lab} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trajectory_text(record: dict[str, Any], limit: int = 600) -> str:
    """A trajectory for the report: every turn after the problem, each cut at ``limit`` characters."""
    parts = []
    for t in record["turns"][1:]:
        who = "agent" if t["role"] == "assistant" else "env"
        body = t["content"] if len(t["content"]) <= limit else t["content"][:limit] + " ..."
        parts.append(f"[{who}] {body}")
    parts.append(f"=> {record['ending']}, {'success' if record['success'] else 'failure'}"
                 + (f" ({record['reason']})" if record.get("reason") else ""))
    return "\n".join(parts)
