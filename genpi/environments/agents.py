"""The agent side of an episode: what each agent sees, and the policies that write its replies.

Three sides play every problem (greedy, through genpi's engines): the **teacher** (base model, the prompt turns
then the problem in the prompt's open user turn, as the benchmark sends it), the **student** (base + adapter, the
problem alone, as the task's student template frames it) and the **floor** (base, the problem alone). A policy
answers a batch of running episodes at once, which is what lets the runner advance all of them in lockstep.
The scripted policies of ``genpi-env-check`` (the reference agent and the wrong-answer replay) are policies too,
so the self-check goes through the same loop and judge as a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from genpi.environments.episode import Episode, python_in_shell

Message = dict[str, str]
SIDES = ("teacher", "student", "floor")
# Which sides read the prompt and which use the adapter (None: a base model without an adapter loaded).
SIDE_PROMPT = {"teacher": True, "student": False, "floor": False}
SIDE_ADAPTER = {"teacher": False, "student": True, "floor": False}


@dataclass
class AgentView:
    """How an agent side frames a conversation: ``head`` = prompt turns before the open user turn, ``lead`` = that
    turn's text (the problem is appended after ``separator``); without the prompt, ``student_template`` frames the
    problem alone."""

    head: list[Message]
    lead: str
    separator: str = "\n\n"
    student_template: str = "{input}"

    @classmethod
    def from_turns(cls, prompt_turns: Sequence[Message], separator: str, student_template: str = "{input}"):
        turns = [dict(t) for t in prompt_turns]
        if turns and turns[-1]["role"] == "user":
            return cls(turns[:-1], turns[-1]["content"], separator, student_template)
        return cls(turns, "", separator, student_template)

    def messages(self, episode: Episode, with_prompt: bool) -> list[Message]:
        """Chat messages for the agent's next reply."""
        first, rest = episode.turns[0]["content"], [dict(t) for t in episode.turns[1:]]
        if with_prompt:
            opening = f"{self.lead}{self.separator}{first}" if self.lead else first
            return [*self.head, {"role": "user", "content": opening}, *rest]
        return [{"role": "user", "content": self.student_template.format(input=first)}, *rest]


class Policy(Protocol):
    def reply(self, episodes: Sequence[Episode]) -> list[str | None]:
        """One reply per episode (None = its conversation no longer fits the model's context)."""
        ...


# generate(prompts as token ids, adapter flag per prompt) -> generated token ids per prompt (end of turn excluded)
GenerateFn = Callable[[list[list[int]], list[bool]], list[list[int]]]


class ModelPolicy:
    """Replies of a language model: every running episode's conversation rendered with the chat template, then ONE
    batched greedy generation call for the whole round (the engine groups by adapter where it must)."""

    def __init__(self, tokenizer, generate: GenerateFn, view: AgentView, max_new_tokens: int,
                 max_model_len: int | None):
        self.tokenizer = tokenizer
        self.generate = generate
        self.view = view
        self.max_new_tokens = max_new_tokens
        self.max_model_len = max_model_len
        self.calls = 0  # generation calls made (one per round; tests and the benchmark read it)

    def prompt_ids(self, episode: Episode) -> list[int]:
        from genpi.data.tokenize import encode, render

        msgs = self.view.messages(episode, SIDE_PROMPT[episode.side])
        return encode(self.tokenizer, render(self.tokenizer, msgs, add_generation_prompt=True))

    def reply(self, episodes: Sequence[Episode]) -> list[str | None]:
        ids = [self.prompt_ids(ep) for ep in episodes]
        fits = [self.max_model_len is None or len(p) + self.max_new_tokens <= self.max_model_len for p in ids]
        todo = [i for i, ok in enumerate(fits) if ok]
        out: list[str | None] = [None] * len(episodes)
        if todo:
            self.calls += 1
            gen = self.generate([ids[i] for i in todo], [SIDE_ADAPTER[episodes[i].side] for i in todo])
            for i, g in zip(todo, gen):
                out[i] = self.tokenizer.decode(g, skip_special_tokens=True).strip()
        return out


# -- scripted agents of genpi-env-check -----------------------------------------------------------
WRONG_ANSWER = "genpi-wrong-answer"


def _bash_reply(code: str) -> str:
    return f"Think: I run the reference solution.\n\nAct: bash\n\n```bash\n{code}\n```"


class ReferencePolicy:
    """The scripted reference agent. For a ``match`` problem without an example it answers the match answer. Else
    it runs the problem's ``example`` script as its bash action, then answers with that output when success depends
    on the answer (a match, or a check that compares with the reference), or finishes (the check inspects the
    machine's state). A python example runs as ``python3 -c``."""

    def reply(self, episodes: Sequence[Episode]) -> list[str | None]:
        return [self._one(ep) for ep in episodes]

    def _one(self, ep: Episode) -> str:
        p = ep.problem
        if p.match is not None and p.example is None:
            return f"Think: I know the answer.\n\nAct: answer({p.match.get('answer', '')})"
        if ep.rounds == 0 and p.example is not None:
            code = p.example.code if p.example.language == "bash" else python_in_shell(p.example.code)
            return _bash_reply(code)
        if not p.needs_answer:
            return "Think: The reference solution ran.\n\nAct: finish"
        output = ep.actions[-1].get("output", "") if ep.actions else ""
        return f"Think: The output is the answer.\n\nAct: answer({output.strip()})"


class WrongPolicy:
    """The wrong-answer replay: a fixed wrong answer where success depends on the answer; ``finish`` without the
    reference's changes where it depends on the machine's state. Every episode must fail."""

    def reply(self, episodes: Sequence[Episode]) -> list[str | None]:
        return [f"Think: A guess.\n\nAct: answer({WRONG_ANSWER})" if ep.problem.needs_answer
                else "Think: Nothing to do.\n\nAct: finish" for ep in episodes]

