"""Sandboxes for agents' shell commands: ``local`` (Linux namespaces + overlays) and ``docker``."""

from genpi.environments.sandbox.base import Sandbox, Shell, ShellResult, make_sandbox

__all__ = ["Sandbox", "Shell", "ShellResult", "make_sandbox"]
