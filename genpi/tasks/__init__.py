"""Tasks: what to internalize. A task is a fixed prompt, input templates, a pseudo-input parser,
a format check and an environment persona; it knows nothing of models."""

from genpi.tasks.base import TASK_NAMES, Task, build_task

__all__ = ["TASK_NAMES", "Task", "build_task"]
