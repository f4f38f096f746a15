"""Read a fixed prompt from a file: a `<USER>:` / `<AGENT>:` transcript (the GenPI release format) or plain text."""

from __future__ import annotations

import re
from pathlib import Path

from genpi.utils.errors import GenpiError

_MARKER = re.compile(r"^<(USER|AGENT|SYSTEM)>:[ \t]*", re.MULTILINE)
_ROLE = {"USER": "user", "AGENT": "assistant", "SYSTEM": "system"}


def parse_transcript(text: str) -> list[dict[str, str]]:
    """Split a transcript into chat turns ``[{"role", "content"}]``.

    Text without any turn marker is one user turn (a plain-text prompt). Whitespace around each
    turn is stripped; an empty trailing user turn is kept (it is where the task input goes).
    """
    matches = list(_MARKER.finditer(text))
    if not matches:
        body = text.strip()
        return [{"role": "user", "content": body}] if body else []
    turns = []
    lead = text[: matches[0].start()].strip()
    if lead:
        turns.append({"role": "system", "content": lead})
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        turns.append({"role": _ROLE[m.group(1)], "content": text[m.end() : end].strip()})
    return turns


def render_transcript(turns: list[dict[str, str]]) -> str:
    """Inverse of :func:`parse_transcript` (up to whitespace): the prompt as one text."""
    inv = {v: k for k, v in _ROLE.items()}
    return "\n\n".join(f"<{inv[t['role']]}>:\n{t['content']}".rstrip() for t in turns)


def load_prompt_file(path: str | Path) -> list[dict[str, str]]:
    """Load a prompt file; a missing file or one with no turns is a :class:`GenpiError`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise GenpiError(f"prompt file not found: {p} (set task.prompt_path to an existing file)")
    turns = parse_transcript(p.read_text(encoding="utf-8"))
    if not any(t["content"] for t in turns):
        raise GenpiError(
            f"prompt file {p} has no turns: write plain text, or a transcript with '<USER>:' / '<AGENT>:' lines"
        )
    return turns
