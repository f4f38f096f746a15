"""Run-folder bookkeeping: resume points, W&B ids, metrics files, failure records."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run folder's ``checkpoints/last.ckpt`` (what a killed or requeued run restarts from)."""
    p = run_dir / "checkpoints" / "last.ckpt"
    return p if p.is_file() else None


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder, created once and kept in ``wandb_id.txt``."""
    p = run_dir / "wandb_id.txt"
    if p.is_file():
        return p.read_text().strip()
    run_dir.mkdir(parents=True, exist_ok=True)
    rid = secrets.token_hex(4)
    p.write_text(rid + "\n")
    return rid


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
    return path


def update_json(path: Path, **values: Any) -> dict[str, Any]:
    data = read_json(path)
    data.update(values)
    write_json(path, data)
    return data
