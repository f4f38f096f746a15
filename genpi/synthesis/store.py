"""The resumable store: append-only JSONL shards, one per (stage, stage config).

Layout under a dataset folder::

    store/<stage>/<fingerprint>.jsonl   records of that stage under that config, keyed by ``record_id``
    store/<stage>/<fingerprint>.json    the config the fingerprint was computed from (for people)
    store/.lock                         held by the running synth process

A batch of records is written with one ``write`` and ``fsync``-ed before the run moves on, so a run
killed at any moment loses at most the batch in flight. A torn last line (killed mid-write) is cut off
when the shard is next opened. Records are keyed by a hash of their inputs and the stage's config, so
rerunning skips what exists, never writes a record twice, and a changed config writes to a new shard
instead of mixing old and new records.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from genpi.errors import GenpiError


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Hex digest of JSON-serialized parts (dict keys sorted): equal inputs give equal ids on every machine."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


class Shard:
    """One append-only JSONL file of records that each carry a ``record_id``."""

    def __init__(self, path: Path):
        self.path = path

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def load(self) -> dict[str, dict[str, Any]]:
        """Records by id, in the order first written. Repairs a torn last line."""
        if not self.path.is_file():
            return {}
        self._repair_tail()
        records: dict[str, dict[str, Any]] = {}
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise GenpiError(
                        f"store shard {self.path}:{lineno} is corrupt; delete that shard to recompute its stage"
                    ) from None
                records.setdefault(rec["record_id"], rec)
        return records

    def _repair_tail(self) -> None:
        """Cut a last line that a killed run left half-written (no newline, or not JSON)."""
        data = self.path.read_bytes()
        if not data:
            return
        keep = len(data)
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
        else:
            start = data.rfind(b"\n", 0, len(data) - 1) + 1
            try:
                json.loads(data[start:])
            except json.JSONDecodeError:
                keep = start
        if keep != len(data):
            with self.path.open("r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Append records durably (one write, then fsync); returns how many were written."""
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        if not lines:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            f.write("".join(lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        return len(lines)


class Store:
    """Shards of one dataset folder, with a lock so that two runs never write the same folder at once."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock_file = None

    def shard(self, stage: str, fingerprint: str, kind: str = "") -> Shard:
        name = f"{fingerprint}.{kind}.jsonl" if kind else f"{fingerprint}.jsonl"
        return Shard(self.root / stage / name)

    def write_meta(self, stage: str, fingerprint: str, config: dict[str, Any]) -> None:
        path = self.root / stage / f"{fingerprint}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")

    def lock(self) -> Store:
        self.root.mkdir(parents=True, exist_ok=True)
        f = (self.root / ".lock").open("w")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise GenpiError(
                f"another genpi-synth is writing to {self.root.parent}: wait for it, or set synth.name to another name"
            ) from None
        self._lock_file = f
        return self

    def unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> Store:
        return self.lock()

    def __exit__(self, *exc: Any) -> None:
        self.unlock()
