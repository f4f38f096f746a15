"""Hydra glue shared by the entry points: resolvers, config -> plain dict, run-folder bookkeeping."""

from __future__ import annotations

import os
import re
import secrets
from typing import Any

from omegaconf import DictConfig, OmegaConf


def _unique() -> str:
    """A token unique to this launch, inherited by the jobs it starts (submitit children, Slurm tasks).

    Two sweeps started in the same second still get different folders: the token is random, and it
    travels in the environment so that every job of one sweep agrees on it.
    """
    tok = os.environ.get("GENPI_LAUNCH_ID")
    if not tok:
        tok = secrets.token_hex(3)
        os.environ["GENPI_LAUNCH_ID"] = tok
    return tok


def _slug(*parts: Any) -> str:
    """Join non-empty parts with '__' into a folder-safe name."""
    text = "__".join(str(p) for p in parts if p not in (None, ""))
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "-", text)[:200] or "run"


def _short(name: Any) -> str:
    """Short model name for run names: the last path component, lowercased."""
    return str(name).rstrip("/").split("/")[-1].lower()


def _rank_suffix() -> str:
    """'' on rank 0, '_rank<r>' on the other ranks of a data-parallel job: each rank logs to its own file."""
    from genpi.launching import rank_suffix

    return rank_suffix()


def register_resolvers() -> None:
    for name, fn in (("genpi_unique", _unique), ("genpi_slug", _slug), ("genpi_short", _short),
                     ("genpi_rank_suffix", _rank_suffix)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "genpi_unique")


def to_dict(cfg: DictConfig | dict | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


register_resolvers()
import genpi.runs  # noqa: E402,F401  (registers genpi_config_hash)
