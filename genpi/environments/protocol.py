"""The text protocol of an OS Interaction episode: how an agent's reply is read, and what the user turns say.

Facts from AgentBench's PROTOCOL (v0.2, the protocol the GenPI OS prompt was written for): in a reply, every
``Act: <action>`` counts and the last valid one wins; ``bash`` runs every block between a line ```` ```bash ```` and
a line ```` ``` ```` (joined by a blank line); ``answer(...)`` carries the text between the first ``(`` and the last
``)``; ``finish`` ends with no answer. Outputs longer than a limit are cut and marked. The wording of the user turns
is a setting (:class:`EnvText`), since genpi's own problems use the observation text genpi's models were trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ACT = re.compile(r"Act:[ \t]*(.+)")
_BASH_BLOCK = re.compile(r"^```bash[ \t]*\n(.*?)\n```[ \t]*$", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Action:
    """What the agent chose: ``kind`` is bash | finish | answer; ``content`` is the code or the answer."""

    kind: str
    content: str | None = None


def parse_action(reply: str) -> Action | None:
    """The action of one agent reply, or None when it holds no valid ``Act:`` line (a validation failure)."""
    for act in reversed(_ACT.findall(reply)):
        word = act.strip().lower()
        if word.startswith("bash"):
            return Action("bash", "\n\n".join(_BASH_BLOCK.findall(reply)))
        if word.startswith("finish"):
            return Action("finish")
        if word.startswith("answer"):
            rest = act.strip()[len("answer"):]
            left, right = rest.find("("), rest.rfind(")")
            if left == -1 or right == -1 or right < left:
                continue  # an answer without its parentheses is not a valid action; an earlier one may be
            return Action("answer", rest[left + 1 : right])
    return None


@dataclass(frozen=True)
class EnvText:
    """The wording of an environment's user turns (the ``env`` config group states them)."""

    lead_separator: str = "\n\n"  # between the prompt's open user turn and the problem's description (teacher)
    observation: str = "The output of the OS:\n\n{output}"
    empty_observation: str = "The output of the OS is empty."
    output_limit: int = 800  # outputs longer than this many characters are cut ...
    output_keep: int = 780  # ... to their first characters ...
    truncation_note: str = "\n[truncated because the output is too long]"  # ... followed by this

    def truncate(self, output: str) -> str:
        if len(output) > self.output_limit:
            return output[: self.output_keep] + self.truncation_note
        return output

    def observe(self, output: str) -> str:
        """The user turn that reports a bash action's output."""
        if not output.strip():
            return self.empty_observation
        return self.observation.format(output=self.truncate(output))
