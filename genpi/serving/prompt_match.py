"""Recognizing the internalized prompt at the start of a chat request, exactly, and rewriting the request.

A harness sends the task's prompt with every request, shaped in one of these ways (``H`` = the prompt's turns
before its open user turn, ``lead`` = the open user turn's text, e.g. AgentBench's "Now, I will start a new
problem in a new OS. My problem is:"):

- ``turns``: the messages begin with the ``H`` turns (same roles and texts), then a user message that begins with
  ``lead`` and goes on with the task input (AgentBench's OS episodes);
- ``system``: one system message holding the whole prompt (``H`` and ``lead``), then a user message with the input;
  or one system message holding ``H``, then a user message that begins with ``lead``;
- ``first_user``: the first user message begins with the whole prompt, then the input.

A prompt merged into one message is matched with its turns' texts joined by whitespace, or as the transcript
file renders it (``<USER>:`` / ``<AGENT>:`` markers). Matching is exact on normalized text and never fuzzy: runs of
spaces, tabs and newlines compare as one space, leading and trailing whitespace of each message is ignored, and
nothing else is forgiven; the prompt may not end inside a word of the message (``is`` is not the start of
``isn't``). A wrong
strip would silently change the agent, so anything else is forwarded unchanged.

Requests that are not stripped are classified for the logs: ``differs`` when the request looks like it carries a
prompt (its first message starts with the prompt's first words, or is at least half as long as the prompt's first
turn), else ``absent``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from genpi.tasks.base import Task
from genpi.tasks.transcript import render_transcript

_SPACE = re.compile(r"[ \t\r\n]+")
_WORD = re.compile(r"[^ \t\r\n]+")
# a request whose first message starts with this many of the prompt's words is an edited prompt, not no prompt
_LOOKALIKE_WORDS = 8

STRIPPED, ABSENT, DIFFERS, PRESENT, INJECTED = "stripped", "absent", "differs", "present", "injected"


def normalize(text: str) -> str:
    """Runs of spaces, tabs and newlines as one space; no leading or trailing whitespace."""
    return _SPACE.sub(" ", text).strip(" ")


def message_text(message: dict[str, Any]) -> str | None:
    """A chat message's text: its string content, or its text parts joined by newlines (OpenAI's list form).

    None when it holds anything but text (an image, a tool call without content): such a message is never matched.
    """
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "\n".join(str(p.get("text", "")) for p in content)
    return None


def _normalized_with_positions(text: str) -> tuple[str, list[int]]:
    """``normalize(text)`` and, for each of its characters, its position in ``text``."""
    chars: list[str] = []
    where: list[int] = []
    for m in _WORD.finditer(text):
        if chars:
            chars.append(" ")
            where.append(m.start() - 1)
        chars.extend(m.group())
        where.extend(range(m.start(), m.end()))
    return "".join(chars), where


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def strip_prefix(text: str, prefix: str) -> str | None:
    """The rest of ``text`` after ``prefix`` (compared whitespace-insensitively), stripped; None if ``text`` does
    not begin with it. The prefix may not end inside a word (``is`` does not match the start of ``isn't``)."""
    p = normalize(prefix)
    if not p:
        return text.strip(" \t\r\n")
    norm, where = _normalized_with_positions(text)
    if not norm.startswith(p):
        return None
    k = len(p)
    if k < len(norm) and norm[k] != " " and _word_char(p[-1]) and _word_char(norm[k]):
        return None
    return text[where[k - 1] + 1 :].strip(" \t\r\n")


def strip_suffix(text: str, suffix: str) -> str | None:
    """``text`` without ``suffix`` at its end (whitespace-insensitive), stripped; None if it does not end with it."""
    p = normalize(suffix)
    if not p:
        return text.strip(" \t\r\n")
    norm, where = _normalized_with_positions(text)
    if not norm.endswith(p):
        return None
    start = len(norm) - len(p)
    if start > 0 and norm[start - 1] != " " and _word_char(p[0]) and _word_char(norm[start - 1]):
        return None
    return text[: where[start]].strip(" \t\r\n")


@dataclass
class Decision:
    """What the server does with one chat request.

    ``action``: ``stripped`` (student/floor: the prompt was removed), ``injected`` (teacher: the prompt was added),
    ``present`` (teacher: the request already carries it), ``absent`` or ``differs`` (forwarded unchanged).
    """

    action: str
    messages: list[dict[str, Any]]
    form: str | None = None          # how the prompt was found: turns | system | first_user
    detail: str = ""                 # for the log: where a look-alike prompt departs from the internalized one
    task_input: str | None = None    # the input found after the prompt

    @property
    def changed(self) -> bool:
        return self.action in (STRIPPED, INJECTED)


@dataclass
class PromptMatcher:
    """The internalized prompt of ``task`` and the rewrites around it (see the module docstring)."""

    task: Task
    _forms: list[tuple[str, list[str]]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        turns = self.task.prompt_turns
        self.head, self.lead = (turns[:-1], turns[-1]["content"]) if turns[-1]["role"] == "user" else (turns, "")
        pre, post = self.task.teacher_template.split("{input}", 1)
        # what precedes the input in the open user turn (the teacher sees lead, a newline, then the template)
        self.opening = normalize(f"{self.lead} {pre}")
        self.closing = normalize(post)                          # what follows the input
        head_texts = [t["content"] for t in self.head]
        open_turn = [{"role": "user", "content": self.opening}]
        # the prompt merged into one message: its texts joined by whitespace, or as the transcript file renders it
        self.merged_full = [normalize(" ".join(head_texts + [self.opening])),
                            normalize(render_transcript(self.head + open_turn))]
        self.merged_head = ([normalize(" ".join(head_texts)), normalize(render_transcript(self.head))]
                            if self.head else [])
        first = normalize(turns[0]["content"]).split(" ")
        self.first_words = first[:_LOOKALIKE_WORDS]
        self.first_turn_words = len(first)

    # -- finding the prompt ---------------------------------------------------------------------------------
    def find(self, messages: list[dict[str, Any]]) -> tuple[str, int, str] | None:
        """``(form, index of the message holding the input, the input)`` when the request begins with the prompt."""
        texts = [message_text(m) for m in messages]
        roles = [m.get("role") for m in messages]
        n_head = len(self.head)
        # turns: the head turns as they are, then the open turn's text at the start of a user message
        if len(messages) > n_head and roles[n_head] == "user" and texts[n_head] is not None and all(
            roles[i] == t["role"] and texts[i] is not None and normalize(texts[i]) == normalize(t["content"])
            for i, t in enumerate(self.head)
        ):
            found = self._input(texts[n_head], self.opening)
            if found is not None:
                return "turns", n_head, found
        if messages and roles[0] == "system" and texts[0] is not None and len(messages) > 1 and roles[1] == "user" \
                and texts[1] is not None:
            system = normalize(texts[0])
            if system in self.merged_full:
                found = self._input(texts[1], "")
                if found is not None:
                    return "system", 1, found
            if system in self.merged_head:
                found = self._input(texts[1], self.opening)
                if found is not None:
                    return "system", 1, found
        if messages and roles[0] == "user" and texts[0] is not None:
            for merged in self.merged_full:
                found = self._input(texts[0], merged)
                if found is not None:
                    return "first_user", 0, found
        return None

    def _input(self, text: str, opening: str) -> str | None:
        rest = strip_prefix(text, opening)
        return None if rest is None else strip_suffix(rest, self.closing)

    def classify_miss(self, messages: list[dict[str, Any]]) -> tuple[str, str]:
        """``(absent | differs, detail)`` for a request the prompt was not found in."""
        first = next((message_text(m) for m in messages if message_text(m) is not None), None)
        if first is None:
            return ABSENT, "no text message"
        words = normalize(first).split(" ")
        lookalike = (self.first_words and words[: len(self.first_words)] == self.first_words) or (
            self.first_turn_words >= 2 * _LOOKALIKE_WORDS and len(words) * 2 >= self.first_turn_words)
        if not lookalike:
            return ABSENT, "the first message does not begin like the prompt"
        expected = normalize(self.task.prompt_turns[0]["content"]).split(" ")
        k = next((i for i, (a, b) in enumerate(zip(words, expected)) if a != b), min(len(words), len(expected)))
        got = words[k] if k < len(words) else "<end of message>"
        want = expected[k] if k < len(expected) else "<end of turn>"
        return DIFFERS, f"the first message departs from the prompt's first turn at word {k}: {got!r} instead of {want!r}"

    # -- rewriting ------------------------------------------------------------------------------------------
    def strip(self, messages: list[dict[str, Any]]) -> Decision:
        """The student's (and the floor's) view: the prompt removed and the input shaped by ``task.student_template``."""
        found = self.find(messages)
        if found is None:
            action, detail = self.classify_miss(messages)
            return Decision(action, messages, detail=detail)
        form, at, task_input = found
        opened = {**messages[at], "content": self.task.student_messages(task_input)[0]["content"]}
        return Decision(STRIPPED, [opened] + list(messages[at + 1 :]), form=form, task_input=task_input)

    def inject(self, messages: list[dict[str, Any]]) -> Decision:
        """The teacher's view: a request without the prompt gets it, as genpi's teacher sees it (the prompt's
        turns, then the open turn's text and ``task.teacher_template`` around the first user message)."""
        found = self.find(messages)
        if found is not None:
            return Decision(PRESENT, messages, form=found[0], task_input=found[2])
        action, detail = self.classify_miss(messages)
        at = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
        if action == DIFFERS or at is None or message_text(messages[at]) is None:
            return Decision(action, messages, detail=detail or "no user message")
        task_input = message_text(messages[at]).strip(" \t\r\n")
        teacher = self.task.teacher_messages(task_input)
        opened = {**messages[at], "content": teacher[-1]["content"]}
        return Decision(INJECTED, list(messages[:at]) + teacher[:-1] + [opened] + list(messages[at + 1 :]),
                        task_input=task_input)
