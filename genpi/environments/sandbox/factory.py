"""``make_sandbox``: the settings read through the typed schema, then the backend they name."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass, replace
from typing import Any

from genpi import schema


def settings_of(cfg: Any = None, backend: str | None = None) -> schema.EnvSandbox:
    """``cfg`` (``env.sandbox``: dict, DictConfig, EnvSandbox or None) as a validated :class:`schema.EnvSandbox`."""
    if is_dataclass(cfg):
        cfg = asdict(cfg)
    settings = schema.read(cfg, schema.EnvSandbox, "env.sandbox")
    if backend is not None:
        settings = replace(settings, backend=schema.read({"backend": backend}, schema.EnvSandbox, "env").backend)
    return settings


def build(cfg: Any = None, backend: str | None = None):
    settings = settings_of(cfg, backend)
    if settings.backend == "docker":
        from genpi.environments.sandbox.docker import DockerSandbox

        return DockerSandbox(settings)
    from genpi.environments.sandbox.local import LocalSandbox

    return LocalSandbox(settings)
