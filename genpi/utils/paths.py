"""Where genpi keeps things: a cache for models it builds, and the repository root.

Nothing machine-specific is written here: the cache follows ``$GENPI_CACHE`` (e.g. a shared scratch folder on a
cluster) and falls back to the user's home.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """genpi's cache folder: ``$GENPI_CACHE`` if set (``~`` expanded), else ``~/.cache/genpi``. Not created here."""
    env = os.environ.get("GENPI_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "genpi"


def repo_root() -> Path:
    """The folder holding the ``genpi`` package (the repository root in a source checkout)."""
    return Path(__file__).resolve().parents[1]
