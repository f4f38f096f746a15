"""Per-task format checks: does an agent answer follow the output format its prompt asks for?"""

from __future__ import annotations

import re
from collections.abc import Callable

_OS_THINK = re.compile(r"^\s*Think:\s*\S", re.MULTILINE)
_OS_ACT = re.compile(r"^\s*Act:\s*(.*)$", re.MULTILINE)
_BASH_BLOCK = re.compile(r"```(?:bash|sh)?\s*\n(.*?)```", re.DOTALL)


def os_action(text: str) -> str | None:
    """``bash:<code>``, ``finish`` or ``answer:<value>`` when the answer is Think + exactly one valid Act."""
    if not _OS_THINK.search(text):
        return None
    acts = _OS_ACT.findall(text)
    if len(acts) != 1:
        return None
    act = acts[0].strip()
    if act == "bash":
        blocks = _BASH_BLOCK.findall(text.split("Act:", 1)[1])
        return f"bash:{blocks[0].strip()}" if len(blocks) == 1 and blocks[0].strip() else None
    if act == "finish":
        return "finish"
    m = re.fullmatch(r"answer\((.*)\)", act, re.DOTALL)
    return f"answer:{m.group(1).strip()}" if m and m.group(1).strip() else None


_WS_ACTION = re.compile(r"(search|click)\[([^\]\n]*)\]")


def webshop_action(text: str) -> str | None:
    """``search[...]`` (non-empty) or ``click[...]``: exactly one, after ``Action:`` when there is such a line."""
    m = re.search(r"Action:\s*(.*)", text, re.DOTALL)
    body = m.group(1) if m else text
    actions = _WS_ACTION.findall(body)
    if len(actions) != 1:
        return None
    kind, arg = actions[0]
    arg = arg.strip()
    if not arg:
        return None
    return f"{kind}[{arg}]"


def m2w_action(text: str) -> str | None:
    """``<LETTER>`` or ``<LETTER>:<ACTION>[:<value>]`` from ``Answer: X.`` and ``Action: CLICK|TYPE|SELECT``."""
    m = re.search(r"Answer:\s*([A-Z])\b\.?", text)
    if not m:
        return None
    letter = m.group(1)
    if letter == "A":
        return "A"
    act = re.search(r"Action:\s*(CLICK|TYPE|SELECT)\b", text)
    if not act:
        return None
    if act.group(1) in ("TYPE", "SELECT"):
        value = re.search(r"Value:\s*(\S.*)", text)
        if not value:
            return None
        return f"{letter}:{act.group(1)}:{value.group(1).strip()}"
    return f"{letter}:CLICK"


KG_TOOLS = {"get_relations": 1, "get_neighbors": 2, "intersection": 2, "get_attributes": 1, "argmax": 2,
            "argmin": 2, "count": 1}
_KG_CALL = re.compile(r"Action:\s*([a-z_]+)\((.*)\)\s*$", re.MULTILINE)


def kg_action(text: str) -> str | None:
    """A single known Freebase tool call with the right number of arguments, or ``Final Answer: #N``."""
    final = re.search(r"Final Answer:\s*(#\d+)", text)
    calls = _KG_CALL.findall(text)
    if final and not calls:
        return f"final:{final.group(1)}"
    if len(calls) != 1 or final:
        return None
    name, args = calls[0]
    if name not in KG_TOOLS:
        return None
    parts = [a.strip() for a in args.split(",")] if args.strip() else []
    if len(parts) != KG_TOOLS[name] or not all(parts):
        return None
    return f"{name}({', '.join(parts)})"


ACTIONS: dict[str, Callable[[str], str | None]] = {
    "os": os_action, "webshop": webshop_action, "m2w": m2w_action, "kg": kg_action,
}


def _follows(action: Callable[[str], str | None]) -> Callable[[str], bool]:
    return lambda text: action(text) is not None


FORMAT_CHECKS: dict[str, Callable[[str], bool]] = {k: _follows(f) for k, f in ACTIONS.items()}


def extract_action(task_format: str, text: str) -> str | None:
    """The normalized action of an answer in ``task_format``, or None when it does not parse."""
    return ACTIONS[task_format](text)
