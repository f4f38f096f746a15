"""The one interface every client offers: chat turns in, answers out; token ids in, top-k log-probs out.

Clients run an LLM and know nothing of tasks, stages or records: a stage hands them lists of chat
messages (already built from the task) and gets texts back, in the same order.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from genpi.utils.errors import GenpiError

Message = dict[str, str]
# Per response token: the teacher's top-k token ids and their log-probabilities (same shape: [tokens][k]).
TopK = tuple[list[list[int]], list[list[float]]]


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters shared by every client. ``temperature == 0`` means greedy decoding.

    ``n`` answers are drawn per conversation; :meth:`ChatClient.chat` returns them flattened,
    conversation-major (``n`` answers of the first conversation, then of the second, ...).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1
    seed: int | None = 0

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any] | None, where: str = "sampling") -> Sampling:
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise GenpiError(f"{where} has unknown keys {unknown}; known keys are {sorted(known)}")
        out = cls(**cfg)
        if out.temperature < 0 or not 0 < out.top_p <= 1 or out.max_tokens < 1 or out.n < 1:
            raise GenpiError(
                f"{where} is out of range ({out}): need temperature >= 0, 0 < top_p <= 1, max_tokens >= 1, n >= 1"
            )
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def request_seed(*parts: Any) -> int:
    """A per-request seed from stable parts (base seed, record id, turn): the same on every rerun, so
    a resumed run samples what an uninterrupted one would have, whatever the batch it lands in."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class ChatClient(ABC):
    """An LLM behind a batched chat interface.

    Attributes:
        name: the client kind (``hf``, ``vllm``, ``openai``), recorded in the data card.
        model: what the client runs (a path or a served model name), recorded in the data card.
        context_length: the model's context in tokens, or ``None`` when unknown (remote servers).
    """

    name: str = "base"
    model: str = ""
    context_length: int | None = None

    @abstractmethod
    def chat(
        self, conversations: Sequence[list[Message]], sampling: Sampling, seeds: Sequence[int] | None = None
    ) -> list[str]:
        """Answer every conversation (a list of ``{"role", "content"}`` messages) in one batched call.

        Returns ``len(conversations) * sampling.n`` texts, conversation-major. ``seeds`` (one per
        conversation) make sampled answers independent of batching where the backend allows it.
        """

    def topk_logprobs(self, sequences: Sequence[list[int]], starts: Sequence[int], k: int) -> list[TopK]:
        """Top-k log-probabilities of the model at each position ``p >= start`` of each token sequence,
        i.e. its distribution over token ``p`` given tokens ``< p``.

        Returns per sequence ``(ids, logprobs)``, each of shape ``[len(seq) - start][k]``, best first.
        """
        raise GenpiError(
            f"the {self.name} client cannot compute teacher log-probabilities: set synth.teacher_logits.client=hf"
        )

    def prompt_lengths(self, conversations: Sequence[list[Message]]) -> list[int] | None:
        """Tokens of each conversation as the model will read it (with the generation prompt), or ``None``
        when the client has no tokenizer."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"client": self.name, "model": self.model}

    def close(self) -> None:  # noqa: B027 - optional: only clients that hold a model override it
        """Free the model (engines hold memory until closed)."""


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's EOS and the special token the chat template
    closes an assistant message with (``<|eot_id|>``, ``<|im_end|>``, ...), so generation stops at the turn's end."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    marker = "\u2063GENPI\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a tokenizer without a chat template still has its EOS
        return ids
    tail = text.split(marker, 1)[-1]
    special = set(tokenizer.all_special_ids)
    for tid in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if tid in special:
            if tid not in ids:
                ids.append(int(tid))
            break
    return ids
