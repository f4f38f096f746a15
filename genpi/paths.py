"""Where genpi keeps things: a cache for built models, the repository root."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$GENPI_CACHE``, else ``~/.cache/genpi``."""
    return Path(os.environ.get("GENPI_CACHE") or Path.home() / ".cache" / "genpi").expanduser()


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
