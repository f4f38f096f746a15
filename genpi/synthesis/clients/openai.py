"""Client for any OpenAI-compatible server (vLLM's server, SGLang, OpenAI itself).

Requests run in a bounded thread pool. Retries are the OpenAI SDK's own (exponential backoff with jitter, the
server's ``Retry-After`` honoured, on 408/409/429, 5xx, timeouts and refused connections); what is left after them
ends in one clear error. The API key comes from the environment variable named in the config and is never logged
or written anywhere; a credential inside ``base_url`` (``http://user:secret@host/v1``) is masked wherever the URL
is shown (:func:`genpi.utils.redact.mask_url`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from genpi.synthesis.clients.base import ChatClient, Message, Sampling, TopK
from genpi.utils.errors import GenpiError
from genpi.utils.redact import mask_url

log = logging.getLogger(__name__)
T = TypeVar("T")


class OpenAIClient(ChatClient):
    """Chat completions over HTTP.

    Args:
        base_url: the server's ``/v1`` URL.
        model: the served model name sent with every request.
        api_key_env: name of the environment variable holding the key; unset means a placeholder key
            (local servers accept any).
        max_concurrency: requests in flight at once.
        timeout: seconds per request before it counts as a (retryable) timeout.
        max_retries: retries per request after the first try (the SDK's; its delays start at 0.5 s and double up
            to 8 s, or follow the server's ``Retry-After``).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 5,
    ):
        import openai

        if not model:
            raise GenpiError("synth client openai needs a model name: set synth.clients.openai.model or model.name_or_path")
        self.base_url = mask_url(base_url)  # what is shown; the client alone holds the URL as given
        self.model = model
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_retries = max(0, int(max_retries))
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY",
                                    timeout=float(timeout), max_retries=self.max_retries)

    # -- errors left after the SDK's retries ----------------------------------------------------
    def _retrying(self, call: Callable[[], T]) -> T:
        import openai

        try:
            return call()
        except (openai.APIConnectionError, openai.APITimeoutError) as err:  # includes timeouts
            last: Exception = err
        except openai.APIStatusError as err:
            if err.status_code not in (408, 409, 429) and err.status_code < 500:  # the SDK retries none of these
                raise GenpiError(
                    f"server {self.base_url} refused the request with HTTP {err.status_code}: {_short(err)}"
                ) from None
            last = err
        raise GenpiError(
            f"server {self.base_url} failed after {self.max_retries + 1} tries ({_short(last)}): start it, or set "
            "synth.clients.openai.base_url to a running OpenAI-compatible server"
        )

    def _map(self, fn: Callable[[int], T], count: int) -> list[T]:
        if count == 0:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, count)) as pool:
            return list(pool.map(fn, range(count)))

    # -- interface --------------------------------------------------------------------------
    def chat(
        self, conversations: Sequence[list[Message]], sampling: Sampling, seeds: Sequence[int] | None = None
    ) -> list[str]:
        def one(i: int) -> list[str]:
            kwargs: dict[str, Any] = {
                "model": self.model, "messages": conversations[i], "n": sampling.n,
                "temperature": sampling.temperature, "max_tokens": sampling.max_tokens,
            }
            if not sampling.greedy:
                kwargs["top_p"] = sampling.top_p
            seed = seeds[i] if seeds is not None else sampling.seed
            if seed is not None:
                kwargs["seed"] = int(seed)
            resp = self._retrying(lambda: self.client.chat.completions.create(**kwargs))
            texts = [(c.message.content or "").strip() for c in sorted(resp.choices, key=lambda c: c.index)]
            if len(texts) != sampling.n:
                raise GenpiError(f"server {self.base_url} returned {len(texts)} choices for n={sampling.n}")
            return texts

        return [t for per_conv in self._map(one, len(conversations)) for t in per_conv]

    def topk_logprobs(self, sequences: Sequence[list[int]], starts: Sequence[int], k: int) -> list[TopK]:
        """Top-k via the completions endpoint's ``prompt_logprobs``, a vLLM server extension."""

        def one(i: int) -> TopK:
            resp = self._retrying(lambda: self.client.completions.create(
                model=self.model, prompt=list(sequences[i]), max_tokens=1, temperature=0.0,
                extra_body={"prompt_logprobs": int(k)},
            ))
            rows = getattr(resp.choices[0], "prompt_logprobs", None)
            if rows is None:
                raise GenpiError(
                    f"server {self.base_url} returns no prompt_logprobs (a vLLM server extension): "
                    "set synth.teacher_logits.client=hf"
                )
            ids, lps = [], []
            for pos in range(starts[i], len(sequences[i])):
                entry = rows[pos] or {}
                ranked = sorted(entry.items(), key=lambda kv: (kv[1].get("rank") or 1 << 30, -kv[1]["logprob"]))[:k]
                ids.append([int(t) for t, _ in ranked])
                lps.append([float(v["logprob"]) for _, v in ranked])
            return ids, lps

        return self._map(one, len(sequences))

    def describe(self) -> dict[str, Any]:
        return {"client": self.name, "model": self.model, "base_url": self.base_url}

    def close(self) -> None:
        self.client.close()


def _short(err: Exception | None) -> str:
    text = str(err).splitlines()[0] if err is not None and str(err) else type(err).__name__
    return mask_url(text)[:200]
