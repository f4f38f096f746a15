"""The resumable store: append-only JSONL files of records, one per (stage, stage config, shard).

Layout under a dataset folder::

    store/<stage>/<fingerprint>.jsonl                 records of that stage under that config (an unsharded run)
    store/<stage>/<fingerprint>.shard-I-of-K.jsonl    the records shard I of K computed (only that shard writes it)
    store/<stage>/<fingerprint>.json                  the config the fingerprint was computed from (for people)
    store/shards/<run key>/shard-I-of-K.json          each shard's status: running, done (with counts, times), failed
    store/.lock, store/.shard-I-of-K.lock             held by the process synthesizing that shard (.lock: unsharded)
    store/.merge.lock                                 held for the short steps that read every shard's work

A stage's records are the union of its files, so a sharded run resumes an unsharded one and the reverse, and
no two processes ever append to the same file. A batch of records is written with one ``write`` and
``fsync``-ed before the run moves on, so a run killed at any moment loses at most the batch in flight. A torn
last line (killed mid-write) is cut off by the file's writer when it next opens it; readers of another
shard's file skip it (that shard may still be writing it). Records are keyed by a hash of their inputs and
the stage's config, so rerunning skips what exists, never writes a record twice, and a changed config
writes to new files instead of mixing old and new records. Locks are ``filelock`` locks (``flock`` on
POSIX): the kernel drops them when their process dies, so a killed shard never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from genpi.utils.errors import GenpiError

# How long a shard waits for another one's short critical section (dedup, merge) before giving up.
MERGE_LOCK_TIMEOUT_S = 600
_SHARD_FILE = re.compile(r"\.shard-(\d+)-of-(\d+)\.jsonl$")
_SHARD_LOCK = re.compile(r"^\.shard-(\d+)-of-(\d+)\.lock$")


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Hex digest of JSON-serialized parts (dict keys sorted): equal inputs give equal ids on every machine."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def shard_of(record_id: str, num_shards: int) -> int:
    """The shard (0 .. num_shards-1) that owns a record: its hex id modulo the shard count, so the split
    depends on nothing but the record's content and the count (stable under resumption, on every machine)."""
    return int(record_id, 16) % num_shards if num_shards > 1 else 0


def shard_suffix(shard: int, num_shards: int) -> str:
    """``''`` for an unsharded run (its files keep their historic names), ``'.shard-I-of-K'`` otherwise."""
    return f".shard-{shard}-of-{num_shards}" if num_shards > 1 else ""


class Shard:
    """One append-only JSONL file of records that each carry a ``record_id``."""

    def __init__(self, path: Path):
        self.path = path

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def load(self, repair: bool = True) -> dict[str, dict[str, Any]]:
        """Records by id, in the order first written. ``repair``: cut a torn last line (only the file's own
        writer may; a reader of another process's file skips that line instead)."""
        if not self.path.is_file():
            return {}
        if repair:
            self._repair_tail()
        data = self.path.read_bytes()
        if not repair and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]  # the writer is mid-append: its last line is not ours to read
        records: dict[str, dict[str, Any]] = {}
        lines = data.decode("utf-8").split("\n")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if not repair and lineno >= len(lines) - 1:
                    continue
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


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write then rename, so a reader never sees half a file and a kill never leaves one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Store:
    """The store of one dataset folder, as seen by shard ``shard`` of ``num_shards`` (0 of 1: unsharded).

    The shard writes only its own files; it reads every shard's. :meth:`lock` makes sure one process at a
    time works on a shard (and that every shard of the folder uses the same shard count); :meth:`critical`
    is the store-wide lock held for the short steps that combine every shard's work (dedup, merge).
    """

    def __init__(self, root: str | Path, shard: int = 0, num_shards: int = 1):
        self.root = Path(root)
        self.shard_index = int(shard)
        self.num_shards = int(num_shards)
        self._lock: FileLock | None = None

    @property
    def sharded(self) -> bool:
        return self.num_shards > 1

    @property
    def label(self) -> str:
        return f"shard {self.shard_index} of {self.num_shards}" if self.sharded else "the unsharded run"

    # -- files -------------------------------------------------------------------------------------------
    def shard(self, stage: str, fingerprint: str, kind: str = "") -> Shard:
        """This shard's own file of ``stage`` records under ``fingerprint`` (the only one it appends to)."""
        return self.common(stage, fingerprint, kind + shard_suffix(self.shard_index, self.num_shards))

    def common(self, stage: str, fingerprint: str, kind: str = "") -> Shard:
        """A file every shard may write, under :meth:`critical` only (e.g. the deduplicated pseudo inputs)."""
        kind = kind.lstrip(".")
        name = f"{fingerprint}.{kind}.jsonl" if kind else f"{fingerprint}.jsonl"
        return Shard(self.root / stage / name)

    def files(self, stage: str, fingerprint: str, kind: str = "") -> list[Shard]:
        """Every file holding ``stage`` records under ``fingerprint``: the unsharded one first, then each
        shard's (any shard count), in shard order."""
        folder = self.root / stage
        base = f"{fingerprint}.{kind}" if kind else fingerprint
        found = [Shard(folder / f"{base}.jsonl")]
        sharded = []
        for path in folder.glob(f"{base}.shard-*-of-*.jsonl"):
            m = _SHARD_FILE.search(path.name)
            if m and path.name == f"{base}.shard-{m[1]}-of-{m[2]}.jsonl":
                sharded.append((int(m[2]), int(m[1]), path))
        found += [Shard(p) for _, _, p in sorted(sharded)]
        return [s for s in found if s.path.is_file()]

    def load(self, stage: str, fingerprint: str, kind: str = "") -> dict[str, dict[str, Any]]:
        """The union of every shard's records of ``stage``: this shard's own file repaired, others' read as
        they stand (a torn line of a shard still writing is skipped)."""
        own = self.shard(stage, fingerprint, kind).path
        out: dict[str, dict[str, Any]] = {}
        for f in self.files(stage, fingerprint, kind):
            for rid, rec in f.load(repair=f.path == own).items():
                out.setdefault(rid, rec)
        return out

    def has(self, stage: str, fingerprint: str) -> bool:
        return any(f.exists() for f in self.files(stage, fingerprint))

    def write_meta(self, stage: str, fingerprint: str, config: dict[str, Any]) -> None:
        path = self.root / stage / f"{fingerprint}.json"
        if not path.is_file():
            _write_json_atomic(path, config)

    # -- shard status --------------------------------------------------------------------------------------
    def status_path(self, run_key: str, shard: int | None = None) -> Path:
        i = self.shard_index if shard is None else shard
        return self.root / "shards" / run_key / f"shard-{i}-of-{self.num_shards}.json"

    def write_status(self, run_key: str, status: dict[str, Any]) -> None:
        _write_json_atomic(self.status_path(run_key), {
            "shard": self.shard_index, "num_shards": self.num_shards, "host": socket.gethostname(),
            "pid": os.getpid(), **status})

    def statuses(self, run_key: str) -> dict[int, dict[str, Any]]:
        """Each shard's last status under ``run_key`` (shards that never started are absent)."""
        out = {}
        for i in range(self.num_shards):
            path = self.status_path(run_key, i)
            if path.is_file():
                out[i] = json.loads(path.read_text(encoding="utf-8"))
        return out

    # -- locks -----------------------------------------------------------------------------------------------
    def _lock_path(self, shard: int, num_shards: int) -> Path:
        return self.root / (f"{shard_suffix(shard, num_shards)}.lock" if num_shards > 1 else ".lock")

    def lock(self) -> Store:
        """Take this shard's lock (refusing, in one line, when another process holds it or when a run with
        another shard count works in the folder)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self._lock_path(self.shard_index, self.num_shards), preserve_lock_file=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            who = ""
            if self.sharded:
                who = f"{self.label} "
            raise GenpiError(
                f"another genpi-synth is writing {who}to {self.root.parent}: wait for it, "
                + ("or run another synth.shard" if self.sharded else "or set synth.name to another name")
            ) from None
        self._lock = lock
        try:
            with self.critical():
                other = self._running_other_layout()
        except BaseException:
            self.unlock()
            raise
        if other is not None:
            self.unlock()
            i, k = other
            running = f"shard {i} of {k}" if k > 1 else "an unsharded run"
            raise GenpiError(
                f"{running} is writing to {self.root.parent}: every shard of a dataset uses the same shard count; "
                f"set synth.num_shards={k}, or wait for it to finish"
            )
        return self

    def _running_other_layout(self) -> tuple[int, int] | None:
        """A shard of another shard count that holds its lock now, if any."""
        layouts = [(0, 1, self.root / ".lock")]
        for path in self.root.glob(".shard-*-of-*.lock"):
            m = _SHARD_LOCK.match(path.name)
            if m:
                layouts.append((int(m[1]), int(m[2]), path))
        for i, k, path in layouts:
            if k == self.num_shards or not path.exists():
                continue
            probe = FileLock(path, preserve_lock_file=True)
            try:
                probe.acquire(timeout=0)
            except Timeout:
                return i, k
            probe.release()
        return None

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """The store-wide lock, for the short steps that read or write what every shard shares."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.root / ".merge.lock", preserve_lock_file=True)
        try:
            lock.acquire(timeout=MERGE_LOCK_TIMEOUT_S)
        except Timeout:
            raise GenpiError(
                f"{self.root / '.merge.lock'} was held for {MERGE_LOCK_TIMEOUT_S} s by another genpi-synth: "
                "is one stuck? stop it and rerun"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def __enter__(self) -> Store:
        return self.lock()

    def __exit__(self, *exc: Any) -> None:
        self.unlock()


def now() -> float:
    """Wall-clock seconds (epoch), for times that shards on different machines compare."""
    return time.time()
