"""Role swapping: the agent (the model with the task's prompt) talks to an environment played by an LLM.

Every conversation still running advances by one turn per batched client call: one call for all agent
turns, then one call for all environment turns, and so on. A conversation ends when

- the environment's answer contains ``task.end_token`` (the text before the token is kept as its
  last turn, dropped if empty): ``ended_by == "end_token"``;
- the agent has spoken ``max_turns`` times (``task.max_turns`` unless given): ``"max_turns"``;
- the next prompt would not fit the model's context with room for ``max_tokens``: ``"context"``.

The agent sees ``task.teacher_messages(x)`` followed by the conversation (its turns as ``assistant``,
the environment's as ``user``). The environment sees ``task.env_persona`` as its system message (with
``{input}`` replaced by the task input, if the persona has that placeholder) followed by the same turns
with the roles swapped: the agent's turns are its ``user`` messages, its own turns are ``assistant``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from genpi.synthesis.clients.base import ChatClient, Message, Sampling, request_seed
from genpi.tasks.base import Task


@dataclass
class Conversation:
    """One role-swapped conversation: ``turns`` start with the agent and alternate."""

    pseudo_input: str
    key: str
    turns: list[Message] = field(default_factory=list)
    ended_by: str = ""

    @property
    def done(self) -> bool:
        return bool(self.ended_by)


def agent_view(task: Task, conv: Conversation) -> list[Message]:
    return task.teacher_messages(conv.pseudo_input) + [dict(t) for t in conv.turns]


def env_view(task: Task, conv: Conversation) -> list[Message]:
    return task.env_messages(conv.pseudo_input, conv.turns)


def _fits(client: ChatClient, views: list[list[Message]], max_tokens: int) -> list[bool]:
    if client.context_length is None:
        return [True] * len(views)
    lengths = client.prompt_lengths(views)
    if lengths is None:
        return [True] * len(views)
    return [n + max_tokens <= client.context_length for n in lengths]


def _step(
    task: Task, active: list[Conversation], client: ChatClient, sampling: Sampling, side: str, turn: int,
    view: Callable[[Task, Conversation], list[Message]],
) -> tuple[list[Conversation], list[str]]:
    """One batched call for ``side`` over every active conversation that still fits the context."""
    views = [view(task, c) for c in active]
    fits = _fits(client, views, sampling.max_tokens)
    for c, ok in zip(active, fits):
        if not ok:
            c.ended_by = "context"
    go = [c for c in active if not c.done]
    seeds = [request_seed(sampling.seed, c.key, turn, side) for c in go]
    texts = client.chat([v for v, ok in zip(views, fits) if ok], sampling, seeds=seeds) if go else []
    return go, texts


def role_swap(
    task: Task,
    inputs: Sequence[str],
    agent: ChatClient,
    env: ChatClient,
    agent_sampling: Sampling,
    env_sampling: Sampling,
    max_turns: int | None = None,
    first_turns: Sequence[str] | None = None,
    keys: Sequence[str] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[Conversation]:
    """Run one conversation per input, all advancing together.

    Args:
        inputs: the task inputs, one conversation each.
        agent, env: clients for the agent and the environment (may be the same object).
        max_turns: the agent's turn limit; ``None`` uses ``task.max_turns``.
        first_turns: the agent's first answers, if already known (the teacher's single-turn answers);
            the first agent call is then skipped.
        keys: a stable key per conversation (record id) for per-request seeds; default the index.
        on_done: called with the number of conversations that just ended (for progress bars).

    Returns the conversations in input order; ``n`` samples per request is not supported here (n=1).
    """
    if agent_sampling.n != 1 or env_sampling.n != 1:
        raise ValueError("role swapping draws one answer per turn: sampling.n must be 1")
    limit = task.max_turns if max_turns is None else int(max_turns)
    keys = list(keys) if keys is not None else [str(i) for i in range(len(inputs))]
    convs = [Conversation(x, k) for x, k in zip(inputs, keys)]
    active = list(convs)
    turn = 0
    while active:
        if turn == 0 and first_turns is not None:
            go, texts = active, list(first_turns)  # every conversation is active before the first turn
        else:
            go, texts = _step(task, active, agent, agent_sampling, "agent", turn, agent_view)
        for c, text in zip(go, texts):
            c.turns.append({"role": "assistant", "content": text})
        turn += 1
        if turn >= limit:
            for c in go:
                c.ended_by = "max_turns"
        active = _report(active, on_done)
        if not active:
            break
        go, texts = _step(task, active, env, env_sampling, "env", turn, env_view)
        for c, text in zip(go, texts):
            if task.end_token and task.end_token in text:
                text = text.split(task.end_token, 1)[0].strip()
                c.ended_by = "end_token"
            if text or not c.done:
                c.turns.append({"role": "user", "content": text})
        active = _report(active, on_done)
    return convs


def _report(active: list[Conversation], on_done: Callable[[int], None] | None) -> list[Conversation]:
    still = [c for c in active if not c.done]
    if on_done is not None and len(still) < len(active):
        on_done(len(active) - len(still))
    return still
