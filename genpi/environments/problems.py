"""Problems of AgentBench's OS Interaction, read from an AgentBench checkout's ``data/os_interaction`` folder as it is.

The folder's layout (AgentBench's ``configs/tasks/os.yaml`` lists it): the ``dev`` split is ``data/dev.json`` with its
scripts in ``scripts/dev/``; the ``std`` split is ``data/1/*.json ... data/7/*.json`` with ``scripts/1/ ... 7/``.
A problem file holds one problem object or a list of them. Scripts given as ``{"file": ...}`` are read relative to
the problem's script folder, so a loaded :class:`Problem` is self-contained (it can travel to a worker process as JSON).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genpi.utils.errors import GenpiError

SPLITS = ("dev", "std")
STD_GROUPS = tuple(str(i) for i in range(1, 8))


@dataclass
class Script:
    """One script of a problem: bash or python source."""

    language: str  # bash | python
    code: str

    def argv(self, *args: str) -> list[str]:
        """The command line that runs this script as its own process, with ``args`` as its arguments.

        bash's ``-c`` takes the next word as ``$0``: ``--`` fills it so the first argument is ``$1``.
        """
        if self.language == "python":
            return ["python3", "-c", self.code, *args]
        return ["bash", "-c", self.code, "--", *args]


@dataclass
class Problem:
    """One episode's task. ``check`` entries that are ``None`` stand for the ``example`` script (the reference
    solution), as in AgentBench."""

    id: str
    description: str
    init: list[Script] = field(default_factory=list)
    start: Script | None = None
    match: dict[str, Any] | None = None  # {"answer": str, "strip": bool} or {"regex": str, "strip": bool}
    check: list[Script | None] | None = None
    example: Script | None = None
    labels: list[str] = field(default_factory=list)

    @property
    def needs_answer(self) -> bool:
        """Does success depend on the agent's answer (a ``match``, or a check that compares with the reference's
        output), rather than on the machine's state alone?"""
        return self.match is not None or any(s is None for s in (self.check or []))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        def script(s: dict[str, Any] | None) -> Script | None:
            return Script(**s) if s is not None else None

        return cls(id=d["id"], description=d["description"], init=[Script(**s) for s in d.get("init") or []],
                   start=script(d.get("start")), match=d.get("match"),
                   check=[script(s) for s in d["check"]] if d.get("check") is not None else None,
                   example=script(d.get("example")), labels=list(d.get("labels") or []))


def _script(raw: Any, script_dir: Path, where: str) -> Script:
    """A script as AgentBench writes it: a string of bash, or ``{language?, code | file}``."""
    if isinstance(raw, str):
        return Script("bash", raw)
    if isinstance(raw, dict):
        language = raw.get("language", "bash")
        if language not in ("bash", "python"):
            raise GenpiError(f"{where}: script language {language!r} is not bash or python")
        if "code" in raw:
            return Script(language, str(raw["code"]))
        if "file" in raw:
            path = script_dir / raw["file"]
            if not path.is_file():
                raise GenpiError(f"{where}: script file {path} is missing; point env.data_dir at AgentBench's "
                                 "data/os_interaction folder (it holds data/ and scripts/)")
            return Script(language, path.read_text())
    raise GenpiError(f"{where}: a script must be a string or an object with code or file, got {raw!r}")


def _scripts(raw: Any, script_dir: Path, where: str) -> list[Script]:
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    return [_script(r, script_dir, where) for r in items if r is not None]


def parse_problem(raw: dict[str, Any], problem_id: str, script_dir: Path, where: str) -> Problem:
    """One problem object of AgentBench's format as a :class:`Problem`."""
    if not isinstance(raw, dict) or "description" not in raw or "evaluation" not in raw:
        raise GenpiError(f"{where}: a problem needs 'description' and 'evaluation'")
    create = raw.get("create")
    # AgentBench reads `init` only from an object; one dev problem has a list in `create` (no init is run for it)
    init = _scripts(create.get("init"), script_dir, where) if isinstance(create, dict) else []
    start = _script(raw["start"], script_dir, where) if raw.get("start") is not None else None
    ev = raw["evaluation"]
    match = check = example = None
    if "match" in ev:
        m = ev["match"]
        match = {"answer": m, "strip": True} if isinstance(m, str) else {"strip": bool(m.get("strip", True)),
                                                                          **{k: m[k] for k in ("answer", "regex") if k in m}}
        if "answer" not in match and "regex" not in match:
            raise GenpiError(f"{where}: evaluation.match needs an answer or a regex")
    elif "check" in ev:
        items = ev["check"] if isinstance(ev["check"], list) else [ev["check"]]
        check = [None if c is None else _script(c, script_dir, where) for c in items]
    else:
        raise GenpiError(f"{where}: evaluation needs match or check")
    if ev.get("example") is not None:
        example = _script(ev["example"], script_dir, where)
    if check is not None and any(c is None for c in check) and example is None:
        raise GenpiError(f"{where}: its check refers to the example script (null), but evaluation.example is missing")
    return Problem(id=problem_id, description=str(raw["description"]), init=init, start=start, match=match,
                   check=check, example=example, labels=[str(x) for x in raw.get("labels") or []])


def _read_file(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GenpiError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    return data if isinstance(data, list) else [data]


def split_files(data_dir: str | Path, split: str) -> list[tuple[list[Path], Path, str]]:
    """``(problem files, script folder, id prefix)`` per group of a split, in AgentBench's order."""
    root = Path(data_dir).expanduser()
    if split == "dev":
        return [([root / "data" / "dev.json"], root / "scripts" / "dev", "dev-001-")]
    if split == "std":
        return [(sorted((root / "data" / g).glob("*.json")), root / "scripts" / g, f"std-00{g}-") for g in STD_GROUPS]
    raise GenpiError(f"env.split={split!r} is not allowed: one of {', '.join(SPLITS)}")


def load_problems(data_dir: str | Path | None, split: str) -> list[Problem]:
    """Every problem of ``split`` in ``data_dir`` (AgentBench's ``data/os_interaction`` folder, or one that a genpi
    command wrote in the same layout). Raises :class:`GenpiError` with the fix when the folder is not one."""
    if not data_dir:
        raise GenpiError("env.data_dir is not set: point it at AgentBench's data/os_interaction folder "
                         "(env.data_dir=/path/to/AgentBench/data/os_interaction)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise GenpiError(f"env.data_dir={str(data_dir)!r} is not a folder: point it at AgentBench's "
                         "data/os_interaction folder")
    groups = split_files(root, split)
    if not any(files and all(f.is_file() for f in files) for files, _, _ in groups):
        want = "data/dev.json" if split == "dev" else "data/1/*.json ... data/7/*.json"
        raise GenpiError(f"env.data_dir={str(data_dir)!r} has no {want} for env.split={split}: point it at "
                         "AgentBench's data/os_interaction folder")
    problems: list[Problem] = []
    for files, script_dir, prefix in groups:
        index = 0
        for path in (f for f in files if f.is_file()):
            for raw in _read_file(path):
                problems.append(parse_problem(raw, f"{prefix}{index}", script_dir, f"{path} (problem {index})"))
                index += 1
    return problems
