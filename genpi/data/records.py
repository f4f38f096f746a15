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

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from genpi.utils.errors import GenpiError

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


TEXT_COLUMNS = ("context", "pseudo_input", "teacher_output_single", "student_output_single", "reason")


class Records(list):
    """Records read from one source, with where each came from (``file:line``, ``file[i]``) for error messages."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), where: list[str] | None = None, source: str = ""):
        super().__init__(rows)
        self.where = list(where) if where is not None else [f"{source}[{i}]" for i in range(len(self))]
        self.source = source


def validate_records(records: list[dict[str, Any]], source: str, columns: Iterable[str] = COLUMNS,
                     where: list[str] | None = None, nonempty: Iterable[str] = ("pseudo_input",)) -> None:
    """Every record has every column of ``columns`` with a value of the right type, and a non-empty text in each
    column of ``nonempty``; the first problem is one line naming the record's ``file:line``."""
    if not records:
        raise GenpiError(f"dataset {source} is empty: synthesize data first (genpi-synth) or point data.path elsewhere")
    columns, nonempty = tuple(columns), tuple(nonempty)
    where = where or [f"{source}[{i}]" for i in range(len(records))]
    for rec, at in zip(records, where):
        if not isinstance(rec, dict):
            raise GenpiError(f"{at}: a record must be a JSON object with the columns {list(COLUMNS)}, "
                             f"not a {type(rec).__name__}")
        for col in columns:
            if col not in rec:
                raise GenpiError(f"{at}: the record has no column {col!r} (it has {sorted(rec)}); genpi expects "
                                 f"{list(COLUMNS)}")
        for col in TEXT_COLUMNS:
            if col in rec and not isinstance(rec[col], str):
                if col in columns or rec[col] is not None:
                    raise GenpiError(f"{at}: column {col!r} must be a string, not "
                                     f"{'null' if rec[col] is None else type(rec[col]).__name__}")
        if not isinstance(rec.get("context_id", ""), (str, int)):
            raise GenpiError(f"{at}: column 'context_id' must be a string or a whole number, not "
                             f"{type(rec.get('context_id')).__name__}")
        conv = rec.get("teacher_output_conv")
        if "teacher_output_conv" in columns and not isinstance(conv, (str, list)):
            raise GenpiError(f"{at}: column 'teacher_output_conv' must be a list of turns (or a JSON string of one), "
                             f"not {'null' if conv is None else type(conv).__name__}")
        if isinstance(conv, list) and not all(isinstance(t, dict) and isinstance(t.get("content", ""), str)
                                              for t in conv):
            raise GenpiError(f"{at}: teacher_output_conv must hold turns {{'role': ..., 'content': '...'}}")
        topk = rec.get("teacher_topk_ids")
        if topk is not None and (not isinstance(topk, list) or not isinstance(rec.get("teacher_topk_logprobs"), list)
                                 or len(topk) != len(rec["teacher_topk_logprobs"])):
            raise GenpiError(f"{at}: teacher_topk_ids and teacher_topk_logprobs must be lists of equal length "
                             "(one row per answer token)")
        for col in nonempty:
            value = rec.get(col)
            empty = not value or (isinstance(value, str) and not value.strip())
            if empty:
                raise GenpiError(f"{at}: column {col!r} is empty, and this run trains on it; drop the record, "
                                 "synthesize that stage, or turn off the loss that needs it")


def load_records(path: str | Path, columns: Iterable[str] = COLUMNS,
                 nonempty: Iterable[str] = ("pseudo_input",)) -> Records:
    """Read and validate records from a JSONL file, a ``.json`` file holding an array of records, a genpi dataset
    folder (``data.jsonl``) or a ``datasets`` ``save_to_disk`` folder. Every record is checked
    (:func:`validate_records`); problems name the record's ``file:line``."""
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
    elif p.suffix == ".json":
        records = _read_json_array(p)
    else:
        records = _read_jsonl(p)
    validate_records(records, str(p), columns, records.where, nonempty)
    for r, at in zip(records, records.where):
        try:
            r["teacher_output_conv"] = normalize_conversation(r.get("teacher_output_conv"))
        except GenpiError as err:
            raise GenpiError(f"{at}: {err}") from None
    return records


def _decode_line(raw: bytes, p: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GenpiError(f"{p}:{lineno} is not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}): "
                         "save the file as UTF-8") from None


def _read_jsonl(p: Path) -> Records:
    rows, where = [], []
    with p.open("rb") as f:
        head = f.read(1024)
        if b"\x00" in head:
            raise GenpiError(f"{p} is a binary file, not JSONL (one JSON record per line): point data.path at the "
                             "dataset's data.jsonl or its folder")
        f.seek(0)
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, p, lineno)
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                hint = " (a whole JSON array? save it as a .json file)" if lineno == 1 and line.lstrip().startswith(
                    "[") else ""
                raise GenpiError(f"{p}:{lineno} is not valid JSON ({err.msg}){hint}; fix or delete that line") from None
            if isinstance(value, list):
                raise GenpiError(f"{p}:{lineno} is a JSON array; JSONL holds one record (a JSON object) per line: "
                                 "write one record per line, or save the array as a .json file")
            rows.append(value)
            where.append(f"{p}:{lineno}")
    return Records(rows, where, str(p))


def _read_json_array(p: Path) -> Records:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise GenpiError(f"{p}:{line} is not UTF-8 (byte 0x{raw[err.start]:02x}): save the file as UTF-8") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{") and err.msg == "Extra data":
            return _read_jsonl(p)  # JSONL saved under a .json name
        raise GenpiError(f"{p}:{err.lineno} is not valid JSON ({err.msg}); fix the file") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise GenpiError(f"{p} holds a JSON {type(value).__name__}; expected an array of records (JSON objects)")
    return Records(value, [f"{p}[{i}]" for i in range(len(value))], str(p))


def _read_hf(p: Path) -> Records:
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return Records([dict(r) for r in ds], source=str(p))


def input_key(pseudo_input: str) -> str:
    """Whitespace/case-normalized hash of an input: the unit of splitting and of overlap checks."""
    return hashlib.sha256(" ".join(pseudo_input.lower().split()).encode()).hexdigest()[:16]


def duplicate_inputs(records: list[dict[str, Any]], key) -> list[int]:
    """Indices of records whose input (by ``key(pseudo_input)``) repeats an earlier record's."""
    seen: set[str] = set()
    dups = []
    for i, r in enumerate(records):
        k = key(r["pseudo_input"])
        if k in seen:
            dups.append(i)
        seen.add(k)
    return dups


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
