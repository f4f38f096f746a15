"""The record schema shared by synthesis, training and evaluation, and its readers/writers.

One record per pseudo input, with the column names of the GenPI release so that its saved
datasets load as they are:

- ``context_id``: id of the prompt the record was made for
- ``context``: the prompt text
- ``pseudo_input``: the task input
- ``teacher_output_single``: the teacher's (with prompt) first answer
- ``student_output_single``: the student's (no prompt) first answer
- ``reason``: why the prompt changes the answer
- ``teacher_output_conv``: the role-swapped conversation after the input, a list of
  ``{"role": "assistant"|"user", "content": str}`` turns starting with the agent (a JSON string of
  that list, or a plain string meaning one agent turn, is accepted too)

Optional: ``teacher_topk_ids`` / ``teacher_topk_logprobs`` (per response token, top-k of the teacher).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from genpi.errors import GenpiError

COLUMNS = (
    "context_id",
    "context",
    "pseudo_input",
    "teacher_output_single",
    "student_output_single",
    "reason",
    "teacher_output_conv",
)
OPTIONAL_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "record_id")


def normalize_conversation(value: Any) -> list[dict[str, str]]:
    """Turn a stored ``teacher_output_conv`` into a list of chat turns starting with the agent."""
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                return [{"role": "assistant", "content": value}]
        else:
            return [{"role": "assistant", "content": value}] if s else []
    turns = []
    for t in value:
        role = t.get("role")
        role = {"agent": "assistant", "environment": "user", "env": "user"}.get(role, role)
        if role not in ("assistant", "user"):
            raise GenpiError(f"teacher_output_conv turn has role {t.get('role')!r}; expected 'assistant' or 'user'")
        turns.append({"role": role, "content": str(t.get("content", ""))})
    return turns


def validate_records(records: list[dict[str, Any]], source: str, columns: Iterable[str] = COLUMNS) -> None:
    if not records:
        raise GenpiError(f"dataset {source} is empty: synthesize data first (genpi-synth) or point data.path elsewhere")
    have = set(records[0])
    for col in columns:
        if col not in have:
            raise GenpiError(
                f"dataset {source} is missing column {col!r} (has {sorted(have)}); "
                f"genpi expects {list(COLUMNS)}"
            )


def load_records(path: str | Path, columns: Iterable[str] = COLUMNS) -> list[dict[str, Any]]:
    """Read records from a ``save_to_disk`` folder, a genpi dataset folder, or a JSONL file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise GenpiError(f"dataset not found: {p} (set data.path to a JSONL file or a dataset folder)")
    if p.is_dir():
        if (p / "data.jsonl").is_file():
            records = _read_jsonl(p / "data.jsonl")
        elif (p / "dataset_info.json").is_file() or (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            records = _read_hf(p)
        else:
            raise GenpiError(f"{p} is a folder but neither a genpi dataset (data.jsonl) nor a `save_to_disk` folder")
    else:
        records = _read_jsonl(p)
    validate_records(records, str(p), columns)
    for r in records:
        r["teacher_output_conv"] = normalize_conversation(r.get("teacher_output_conv"))
    return records


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    records = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise GenpiError(f"{p}:{lineno} is not valid JSON ({err.msg}); fix or delete that line") from None
    return records


def _read_hf(p: Path) -> list[dict[str, Any]]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return [dict(r) for r in ds]


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(p)
    return p


def save_hf(records: list[dict[str, Any]], folder: str | Path) -> Path:
    """Write records as a ``datasets`` ``save_to_disk`` folder (the release's format)."""
    import datasets

    rows = [{k: (json.dumps(v) if k == "teacher_output_conv" else v) for k, v in r.items()} for r in records]
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return Path(folder)
