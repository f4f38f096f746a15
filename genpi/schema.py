"""The typed config schema: every key genpi reads, with its type, allowed values, range and default, in one place.

Hydra composes the YAML files of ``genpi/conf/`` (where every key is documented for users); :func:`check` then reads
the composed config into the dataclasses below, before any model loads. Each violation is one line that names the
key, the value given and what is allowed (:class:`genpi.errors.GenpiError`, exit 2). Code downstream reads typed
fields (``schema.Loss.kl.kind``) instead of ``cfg.get(key, default)``: a default lives here and in the YAML beside
the key, and a test checks that the two agree.

How to declare a key: a dataclass field with a type (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``list[X]``,
``Literal[...]`` for an enum, another dataclass for a nested block) and, where a range applies, ``metadata`` made by
:func:`rng` (``ge``/``gt``/``le``/``lt``). A check across keys goes in the dataclass's ``validate(self, at)``
method, which raises :func:`bad` for the first problem.

Groups added by later features (environments, serving, on-policy sampling, shards) declare their dataclass here too.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from genpi.errors import GenpiError

T = typing.TypeVar("T")


def rng(*, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
        **extra: Any) -> dict[str, Any]:
    """Field metadata for a numeric range: ``field(default=1.0, metadata=rng(gt=0))``."""
    return {"ge": ge, "gt": gt, "le": le, "lt": lt, **extra}


def bad(key: str, value: Any, allowed: str) -> GenpiError:
    """The one-line error for a bad value: ``loss.kl.kind='foo' is not allowed: one of forward_kl, ...``."""
    return GenpiError(f"{key}={_show(value)} is not allowed: {allowed}")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _range_text(meta: dict[str, Any]) -> str:
    parts = []
    for op, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if meta.get(op) is not None:
            parts.append(f"{sym} {meta[op]}")
    return " and ".join(parts)


def _in_range(value: float, meta: dict[str, Any]) -> bool:
    checks = (("gt", lambda a, b: a > b), ("ge", lambda a, b: a >= b), ("lt", lambda a, b: a < b),
              ("le", lambda a, b: a <= b))
    return all(meta.get(op) is None or fn(value, meta[op]) for op, fn in checks)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}" if get_args(tp) else "a list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a block of keys"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` read as type ``tp`` (YAML gives ints for floats, strings for Literals), or a GenpiError."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except GenpiError:
                continue
        raise bad(key, value, _type_name(tp))
    if origin is Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise bad(key, value, _type_name(tp))
    if origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = get_args(tp) or (Any,)
            return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        raise bad(key, value, _type_name(tp))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return read(value, tp, key)
        raise bad(key, value, _type_name(tp))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad(key, value, "a whole number")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad(key, value, "a string")
    if tp is dict or get_origin(tp) is dict:
        if isinstance(value, dict):
            return value
        raise bad(key, value, "a block of keys")
    return value


def read(section: Any, cls: type[T], at: str) -> T:
    """``section`` (a plain dict, a DictConfig or None) as the dataclass ``cls``; ``at`` is its key path for errors.

    Missing keys take the dataclass defaults; keys the dataclass does not declare are kept out (Hydra refuses
    unknown keys at composition already, the YAML being the list of keys).
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    section = dict(section or {})
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{at}.{f.name}" if at else f.name
        if f.name not in section:
            continue
        value = _convert(section[f.name], hints[f.name], key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and f.metadata:
            if not _in_range(value, f.metadata):
                raise bad(key, value, _range_text(f.metadata))
        values[f.name] = value
    obj = cls(**values)
    check_fn = getattr(obj, "validate", None)
    if callable(check_fn):
        check_fn(at)
    return obj


def defaults(cls: type) -> dict[str, Any]:
    """The defaults of a dataclass as a plain dict (nested blocks included), for the YAML agreement test."""
    return dataclasses.asdict(cls())


__all__ = ["Any", "GenpiError", "Literal", "bad", "dataclass", "defaults", "field", "read", "rng"]


# --- env (issue 11) ---
ENV_SIDES = ("teacher", "student", "floor")


@dataclass
class Env:
    """``conf/env/*.yaml``: where agents act (see the YAML for what each key means)."""

    name: str = "os_interaction"
    data_dir: str | None = None
    split: Literal["dev", "std"] = "dev"
    backend: Literal["local", "docker"] = "local"
    round_limit: int = field(default=8, metadata=rng(ge=1))
    prompt_path: str | None = None
    lead_separator: str = "\n\n"
    observation: str = "The output of the OS:\n\n{output}"
    empty_observation: str = "The output of the OS is empty."
    output_limit: int = field(default=800, metadata=rng(ge=1))
    output_keep: int = field(default=780, metadata=rng(ge=0))
    truncation_note: str = "\n[truncated because the output is too long]"
    max_problems: int | None = field(default=None, metadata=rng(ge=1))
    sandbox: EnvSandbox = field(default_factory=lambda: EnvSandbox())

    def validate(self, at: str) -> None:
        if "{output}" not in self.observation:
            raise bad(f"{at}.observation", self.observation, "a text containing {output}")
        if self.output_keep > self.output_limit:
            raise bad(f"{at}.output_keep", self.output_keep, f"<= {at}.output_limit ({self.output_limit})")


@dataclass
class EvalEnv:
    """``eval.env`` in ``conf/eval.yaml``: the environment evaluation of ``genpi-eval``."""

    enabled: bool = False
    sides: list[str] = field(default_factory=lambda: list(ENV_SIDES))
    max_new_tokens: int = field(default=256, metadata=rng(ge=1))
    max_model_len: int | None = field(default=None, metadata=rng(ge=1))
    max_running: int = field(default=32, metadata=rng(ge=1))
    show_trajectories: int = field(default=1, metadata=rng(ge=0))

    def validate(self, at: str) -> None:
        if not self.sides or len(set(self.sides)) != len(self.sides) or not set(self.sides) <= set(ENV_SIDES):
            raise bad(f"{at}.sides", self.sides, "a non-empty list of distinct sides among " + ", ".join(ENV_SIDES))


# --- env.sandbox (issue 11, part A) ---
@dataclass
class EnvSandbox:
    """``env.sandbox``: the machine each episode's commands run in (:mod:`genpi.environments.sandbox`)."""

    backend: Literal["local", "docker"] = "local"
    command_timeout: float = field(default=60.0, metadata=rng(gt=0))
    episode_timeout: float = field(default=600.0, metadata=rng(gt=0))
    memory_mb: int = field(default=2048, metadata=rng(ge=64))
    pids_max: int = field(default=512, metadata=rng(ge=16))
    output_limit: int = field(default=65536, metadata=rng(ge=1024))
    tmpfs_mb: int = field(default=1024, metadata=rng(ge=16))
    workdir: str = "/root"
    docker_image: str = "genpi-agentbench-os"
    dockerfile: str | None = None

    def validate(self, at: str) -> None:
        if not self.workdir.startswith("/"):
            raise bad(f"{at}.workdir", self.workdir, "an absolute path inside the sandbox")
        if self.command_timeout > self.episode_timeout:
            raise bad(f"{at}.command_timeout", self.command_timeout,
                      f"<= {at}.episode_timeout ({self.episode_timeout})")
