"""One OS Interaction episode: reset with a problem, step with the agent's replies, judge at the end.

The machine is a sandbox shell (:mod:`genpi.environments.sandbox`): ``init`` scripts run as their own processes,
``start`` and the agent's bash actions in the persistent interactive shell, the judge's ``check`` scripts as their own
processes in the same machine after the episode, so answers that depend on the machine's state are judged fairly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from genpi.environments.problems import Problem
from genpi.environments.protocol import Action, EnvText, parse_action

# How an episode ends (AgentBench's statuses); only a completed episode is judged.
COMPLETED, TASK_LIMIT, VALIDATION_FAILURE, CONTEXT_LIMIT, ENV_ERROR = (
    "completed", "task_limit", "validation_failure", "context_limit", "env_error")
ENDINGS = (COMPLETED, TASK_LIMIT, VALIDATION_FAILURE, CONTEXT_LIMIT, ENV_ERROR)


@dataclass
class Judgement:
    success: bool
    reason: str  # why it failed ("" on success): the first failing check and its output


@dataclass
class Episode:
    """The state of one episode. ``turns`` is the conversation after the prompt: the first user turn's description,
    then alternating agent replies (``assistant``) and observations (``user``)."""

    problem: Problem
    side: str  # teacher | student | floor | reference | ...
    text: EnvText
    round_limit: int = 8
    turns: list[dict[str, str]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    ending: str | None = None
    answer: str | None = None
    success: bool = False
    reason: str = ""
    shell: Any = None

    @property
    def done(self) -> bool:
        return self.ending is not None

    @property
    def rounds(self) -> int:
        return sum(1 for t in self.turns if t["role"] == "assistant")

    # -- reset ---------------------------------------------------------------------------
    def reset(self, shell) -> None:
        """Prepare the machine: ``init`` scripts one by one (each its own process), then ``start`` in the shell."""
        self.shell = shell
        self.turns = [{"role": "user", "content": self.problem.description}]
        for i, script in enumerate(self.problem.init):
            res = shell.execute(script.argv())
            if res.timed_out:
                self._fail_env(f"init script {i} timed out")
                return
        if self.problem.start is not None:
            # background processes started here keep running: the shell is the episode's session
            res = shell.run(self.problem.start.code if self.problem.start.language == "bash"
                            else python_in_shell(self.problem.start.code))
            if res.timed_out:
                self._fail_env("start script timed out")

    def _fail_env(self, why: str) -> None:
        self.ending, self.reason = ENV_ERROR, why

    # -- step ----------------------------------------------------------------------------
    def step(self, reply: str | None) -> str | None:
        """Take the agent's reply (None: the conversation no longer fits the model's context). Runs a bash action
        and returns the next user turn, or ends the episode and returns None."""
        if self.done:
            raise RuntimeError("step() on a finished episode")
        if reply is None:
            self.ending = CONTEXT_LIMIT
            return None
        self.turns.append({"role": "assistant", "content": reply})
        action = parse_action(reply)
        if action is None:
            self.ending = VALIDATION_FAILURE
            self.actions.append({"kind": None})
            return None
        if action.kind in ("finish", "answer"):
            self.answer = action.content
            self.ending = COMPLETED
            self.actions.append({"kind": action.kind, "content": action.content})
            return None
        observation = self.run_bash(action)
        self.turns.append({"role": "user", "content": observation})
        if self.rounds >= self.round_limit:
            self.ending = TASK_LIMIT
            return None
        return observation

    def run_bash(self, action: Action) -> str:
        res = self.shell.run(action.content or "")
        self.actions.append({"kind": "bash", "content": action.content, "exit_code": res.exit_code,
                             "timed_out": res.timed_out, "output": res.output})
        return self.text.observe(res.output)

    # -- judge ---------------------------------------------------------------------------
    def judge(self) -> Judgement:
        """Success or not, as AgentBench decides it; only a completed episode can succeed."""
        if self.ending != COMPLETED:
            j = Judgement(False, self.reason or self.ending or "not finished")
        else:
            j = judge(self.problem, self.answer, self.shell)
        self.success, self.reason = j.success, j.reason
        return j

    def record(self) -> dict[str, Any]:
        """The trajectory as one JSON line of ``episodes.jsonl``."""
        return {"problem": self.problem.id, "side": self.side, "labels": self.problem.labels,
                "description": self.problem.description, "ending": self.ending, "answer": self.answer,
                "success": self.success, "reason": self.reason, "rounds": self.rounds, "turns": self.turns,
                "actions": self.actions}


def python_in_shell(code: str) -> str:
    """A python ``start`` script as a shell command (quoted as one argument)."""
    return "python3 -c " + "'" + code.replace("'", "'\\''") + "'"


def judge(problem: Problem, answer: str | None, shell) -> Judgement:
    """AgentBench's judge. ``match``: the answer (stripped when ``strip``) equals ``answer``, or ``regex`` is found
    in it. ``check``: the scripts run one after another in the episode's machine, each with the answer followed by
    the outputs of the scripts before it; ``None`` runs the example (reference) script; all must exit 0."""
    if problem.match is not None:
        given = answer if answer is not None else ""
        if problem.match.get("strip", True):
            given = given.strip()
        if "answer" in problem.match:
            ok = given == problem.match["answer"]
        else:
            ok = re.search(problem.match["regex"], given) is not None
        return Judgement(ok, "" if ok else f"answer {_short(given)!r} does not match")
    outputs: list[str] = []
    for i, script in enumerate(problem.check or []):
        name = "example" if script is None else f"check {i}"
        script = problem.example if script is None else script
        res = shell.execute(script.argv(answer if answer is not None else "", *outputs))
        if res.timed_out or res.exit_code != 0:
            status = "timed out" if res.timed_out else f"exit {res.exit_code}"
            return Judgement(False, f"{name} {status}: {_short(res.output)}")
        outputs.append(res.output)
    return Judgement(True, "")


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
