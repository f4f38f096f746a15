"""Parsers that pull pseudo task inputs out of a generator model's free text."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

_ITEM = re.compile(r"^\s*(?:[-*•]\s+|\(?\d{1,3}[.):]\s+|(?:input|question|task|instruction)\s*#?\s*\d{1,3}\s*[:.)-]\s*)",
                   re.IGNORECASE)
_PREAMBLE = re.compile(r"^\s*(sure|here (are|is)|certainly|of course|below are|okay|ok)\b.*:?\s*$", re.IGNORECASE)
_CLOSING = re.compile(r"^\s*(i hope|let me know|these (inputs|questions|tasks)|feel free|note:)", re.IGNORECASE)


def _clean(item: str) -> str:
    item = item.strip()
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "\"'`":
        item = item[1:-1].strip()
    return item


def parse_numbered_list(text: str) -> list[str]:
    """Items of a numbered or bulleted list; a line that does not start an item continues the last one.

    Chatty lines before the first item ("Sure! Here are ...") and after the last ("I hope ...") are dropped.
    """
    items: list[list[str]] = []
    for line in text.splitlines():
        m = _ITEM.match(line)
        if m:
            items.append([line[m.end():]])
        elif items and line.strip():
            if _CLOSING.match(line) or _PREAMBLE.match(line):
                continue
            items[-1].append(line.rstrip())
    out = [_clean("\n".join(parts)) for parts in items]
    return [o for o in out if o]


def parse_json_list(text: str) -> list[str]:
    """A JSON array of strings, possibly inside a fenced code block; [] when none parses."""
    fence = re.search(r"```(?:json)?\s*(\[.*?\])\s*```", text, re.DOTALL)
    candidates = [fence.group(1)] if fence else []
    start, end = text.find("["), text.rfind("]")
    if start >= 0 and end > start:
        candidates.append(text[start : end + 1])
    for c in candidates:
        try:
            data = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(data, list):
            return [_clean(str(x)) for x in data if isinstance(x, (str, int, float)) and str(x).strip()]
    return []


def parse_delimited(text: str) -> list[str]:
    """Multi-line inputs separated by lines of ``###`` or ``---``, or headed ``Input N:``."""
    parts = re.split(r"^\s*(?:#{3,}|-{3,}|input\s*\d+\s*:)\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
    if len(parts) <= 1:
        return []
    return [p.strip() for p in parts if p.strip() and not _PREAMBLE.match(p.strip().splitlines()[0])]


PARSERS: dict[str, Callable[[str], list[str]]] = {
    "numbered_list": parse_numbered_list,
    "json_list": parse_json_list,
    "delimited": parse_delimited,
}


def normalize_for_dedup(text: str) -> str:
    """Whitespace- and case-normalized text: two inputs equal under it are duplicates."""
    return " ".join(text.lower().split())


def read_inputs_file(path: str | Path) -> list[str]:
    """Inputs from a file: blocks separated by lines of ``---``, else one input per non-empty line."""
    from genpi.utils.errors import GenpiError

    p = Path(path)
    if not p.is_file():
        raise GenpiError(f"inputs file not found: {p} (set synth.pseudo_inputs.file to an existing file)")
    text = p.read_text(encoding="utf-8")
    if re.search(r"^---\s*$", text, re.MULTILINE):
        items = [b.strip() for b in re.split(r"^---\s*$", text, flags=re.MULTILINE)]
    else:
        items = [ln.strip() for ln in text.splitlines()]
    return [i for i in items if i]
