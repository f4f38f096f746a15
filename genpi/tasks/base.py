"""The Task object built from a ``conf/task/*.yaml`` group."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genpi.tasks import formats, parsers
from genpi.tasks.transcript import load_prompt_file, render_transcript
from genpi.utils.errors import GenpiError

TASK_DIR = Path(__file__).parent
TASK_NAMES = ("os", "webshop", "m2w", "kg")

Message = dict[str, str]


@dataclass
class Task:
    """A fixed prompt ``P`` and everything needed to build teacher / student inputs around it.

    ``prompt_turns`` are chat turns; the last one is a user turn (possibly with text such as
    "My problem is:") that the task input completes in the teacher's view.
    """

    name: str
    prompt_turns: list[Message]
    student_template: str = "{input}"
    teacher_template: str = "{input}"
    env_persona: str = ""
    end_token: str = "<END>"
    max_turns: int = 10
    parser: str | None = "numbered_list"
    format: str | None = None
    demonstrations: list[str] = field(default_factory=list)
    sample_data: str | None = None
    inputs_file: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_turns or not any(t["content"] for t in self.prompt_turns):
            raise GenpiError(f"task {self.name!r} has an empty prompt: set task.prompt_path to a prompt file")
        for key in ("student_template", "teacher_template"):
            if "{input}" not in getattr(self, key):
                raise GenpiError(f"task.{key} must contain '{{input}}', got {getattr(self, key)!r}")
        if self.parser is not None and self.parser not in parsers.PARSERS:
            raise GenpiError(f"task.parser={self.parser!r} is unknown; choose one of {sorted(parsers.PARSERS)}")
        if self.format is not None and self.format not in formats.FORMAT_CHECKS:
            raise GenpiError(f"task.format={self.format!r} is unknown; choose one of {sorted(formats.FORMAT_CHECKS)}")

    # -- views of the prompt -------------------------------------------------------------
    @property
    def prompt_text(self) -> str:
        """The prompt as one text (the prompt-generation target)."""
        return render_transcript(self.prompt_turns)

    @property
    def prompt_id(self) -> str:
        """A stable id of the prompt's content (the ``context_id`` of records)."""
        return hashlib.sha256(self.prompt_text.encode()).hexdigest()[:16]

    def _closing_turns(self) -> tuple[list[Message], str]:
        """Prompt turns before the open user turn, and that turn's leading text."""
        turns = [dict(t) for t in self.prompt_turns]
        if turns[-1]["role"] == "user":
            return turns[:-1], turns[-1]["content"]
        return turns, ""

    def teacher_messages(self, pseudo_input: str) -> list[Message]:
        """Chat messages the teacher sees: the prompt, then the input in the prompt's open user turn."""
        head, lead = self._closing_turns()
        body = self.teacher_template.format(input=pseudo_input)
        content = f"{lead}\n{body}" if lead else body
        return head + [{"role": "user", "content": content}]

    def teacher_prompt_messages(self) -> tuple[list[Message], str]:
        """The part of :meth:`teacher_messages` shared by every input: full turns and the open turn's text.

        ``teacher_messages(x)[-1]["content"]`` starts with the returned text; the data layer uses it to
        tokenize the prompt once so that its token ids are a common prefix of every teacher sequence.
        """
        head, lead = self._closing_turns()
        body = self.teacher_template.split("{input}")[0]
        return head, (f"{lead}\n{body}" if lead else body)

    def env_messages(self, pseudo_input: str, turns: list[Message]) -> list[Message]:
        """What the environment persona sees in role swapping, given the conversation so far (``turns`` start
        with the agent, as ``assistant``): the persona as its system message (``{input}`` filled in, if used),
        then the same turns with the roles swapped, so the agent's turns are its ``user`` messages."""
        persona = self.env_persona.replace("{input}", pseudo_input)
        swap = {"assistant": "user", "user": "assistant"}
        return [{"role": "system", "content": persona}] + [
            {"role": swap[t["role"]], "content": t["content"]} for t in turns
        ]

    def student_messages(self, pseudo_input: str) -> list[Message]:
        """Chat messages the student sees: the input alone, no prompt."""
        return [{"role": "user", "content": self.student_template.format(input=pseudo_input)}]

    # -- behaviour -----------------------------------------------------------------------
    def parse_pseudo_inputs(self, text: str) -> list[str]:
        if self.parser is None:
            raise GenpiError(
                f"task {self.name!r} has no pseudo-input parser: set task.parser to one of {sorted(parsers.PARSERS)}"
                " or use synth.pseudo_inputs.source=file"
            )
        return parsers.PARSERS[self.parser](text)

    def check_format(self, answer: str) -> bool:
        """Does an agent answer follow this task's output format?"""
        if self.format is None:
            raise GenpiError(f"task {self.name!r} has no format check: set task.format")
        return formats.FORMAT_CHECKS[self.format](answer)

    @property
    def format_check(self) -> Callable[[str], bool]:
        return self.check_format

    def sample_data_path(self) -> Path | None:
        if self.sample_data is None:
            return None
        p = Path(self.sample_data)
        return p if p.is_absolute() else TASK_DIR / "samples" / p

    def inputs_path(self) -> Path | None:
        """The task's built-in pseudo inputs (blocks separated by ``---`` lines), for ``source: file``."""
        if self.inputs_file is None:
            return None
        p = Path(self.inputs_file)
        return p if p.is_absolute() else TASK_DIR / "inputs" / p

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "prompt_id": self.prompt_id, "turns": len(self.prompt_turns)}


def build_task(
    name: str,
    prompt_path: str | None = None,
    builtin_prompt: str | None = None,
    **kwargs: Any,
) -> Task:
    """Build a task from its config group: ``prompt_path`` (any file) wins over the built-in prompt."""
    if prompt_path:
        turns = load_prompt_file(prompt_path)
    elif builtin_prompt:
        turns = load_prompt_file(TASK_DIR / "prompts" / builtin_prompt)
    else:
        raise GenpiError(f"task {name!r} names no prompt: set task.prompt_path=FILE")
    demos = kwargs.pop("demonstrations", None) or []
    return Task(name=name, prompt_turns=turns, demonstrations=list(demos), **kwargs)


def builtin_task(name: str) -> Task:
    """A built-in task exactly as its config group ``conf/task/<name>.yaml`` defines it."""
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "conf" / "task" / f"{name}.yaml"
    if not path.is_file():
        raise GenpiError(f"no built-in task {name!r} ({path} not found): choose one of {list(TASK_NAMES)}")
    return build_task(**OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def task_fingerprint(task: Task) -> str:
    """A hash of everything about a task that changes the data built from it."""
    blob = json.dumps(
        [task.prompt_turns, task.student_template, task.teacher_template, task.env_persona, task.end_token],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
