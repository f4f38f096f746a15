"""The sandbox interface: a backend opens one fresh machine state per episode; a shell runs commands in it.

An episode of AgentBench's OS Interaction needs three things of a machine (see its PROTOCOL.md): the problem's
``init`` scripts run first, each as its own process; the agent's bash actions run one after another in one
*interactive* shell whose state (working directory, variables, background jobs) persists across rounds; the
``check`` scripts run afterwards in the same machine, each as its own process, with arguments. :meth:`Shell.run`
serves the second, :meth:`Shell.execute` the first and third. Closing the shell discards the machine state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass
class ShellResult:
    """What one command did.

    ``output``: stdout and stderr interleaved as the terminal shows them, cut at the output limit;
    ``exit_code``: the command's status, ``None`` when it did not end (timed out, or the machine went away);
    ``timed_out``: the command hit its wall-time limit (or the episode's) and was interrupted;
    ``truncated``: the output passed the limit and the rest was discarded (never buffered).
    """

    output: str
    exit_code: int | None
    timed_out: bool
    truncated: bool


@runtime_checkable
class Shell(Protocol):
    """One episode's machine and its interactive shell; state (cwd, variables, background jobs) persists."""

    def run(self, command: str, timeout: float | None = None) -> ShellResult:
        """Run ``command`` (any bash, several lines allowed) in the interactive shell, as a user typing it would."""
        ...

    def execute(self, argv: list[str], timeout: float | None = None) -> ShellResult:
        """Run ``argv`` as a separate process in the same machine (fresh environment, cwd ``/root``).

        For the problem's ``init`` and ``check`` scripts: ``["bash", "-c", code, "--", answer, ...]`` or
        ``["python3", "-c", code, answer, ...]``. It does not touch the interactive shell's state.
        """
        ...

    def close(self) -> None:
        """End every process of the episode and discard its machine state. Idempotent."""
        ...

    def __enter__(self) -> Shell: ...

    def __exit__(self, *exc: Any) -> None: ...


@runtime_checkable
class Sandbox(Protocol):
    """A backend: opens a fresh machine state per episode, discarded when its shell closes."""

    name: str

    def open(self) -> Shell:
        """A fresh machine; use ``with sandbox.open() as shell:`` so it is discarded even on errors."""
        ...


def make_sandbox(cfg: Any = None, backend: str | None = None) -> Sandbox:
    """The sandbox that ``cfg`` describes.

    ``cfg``: the env group's sandbox settings (``env.sandbox``: a dict, DictConfig or
    :class:`genpi.schema.EnvSandbox`; ``None`` for the defaults); ``backend`` (``local`` | ``docker``) overrides
    ``cfg.backend`` so a caller can pass ``env.backend``. Raises :class:`genpi.utils.errors.GenpiError` (one line, before
    anything starts) when the settings are invalid or the backend cannot run on this machine.
    """
    from genpi.environments.sandbox.factory import build

    return build(cfg, backend)


class ShellBase:
    """Context-manager plumbing shared by the backends' shells."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError
