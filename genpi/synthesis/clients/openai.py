"""Client for any OpenAI-compatible server (vLLM's server, SGLang, OpenAI itself).

Requests run in a bounded thread pool; each one is retried with exponential backoff and jitter on
429, 408/409, 5xx, timeouts and connection errors. The API key comes from the environment variable
named in the config and is never logged or written anywhere.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from genpi.errors import GenpiError
from genpi.synthesis.clients.base import ChatClient, Message, Sampling, TopK

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_STATUS = {408, 409, 429}


class OpenAIClient(ChatClient):
    """Chat completions over HTTP.

    Args:
        base_url: the server's ``/v1`` URL.
        model: the served model name sent with every request.
        api_key_env: name of the environment variable holding the key; unset means a placeholder key
            (local servers accept any).
        max_concurrency: requests in flight at once.
        timeout: seconds per request before it counts as a (retryable) timeout.
        max_retries: retries per request after the first try.
        backoff: first retry delay in seconds, doubled on each retry (with jitter), capped at ``backoff_max``.
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
        backoff: float = 1.0,
        backoff_max: float = 30.0,
    ):
        import openai

        if not model:
            raise GenpiError("synth client openai needs a model name: set synth.clients.openai.model or model.name_or_path")
        self.base_url = base_url
        self.model = model
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        # The SDK's own retries are off: ours count every failure kind the same way and end in one clear error.
        self.client = openai.OpenAI(
            base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY", timeout=float(timeout), max_retries=0
        )

    # -- retries ---------------------------------------------------------------------------
    def _retrying(self, call: Callable[[], T]) -> T:
        import openai

        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except (openai.APIConnectionError, openai.APITimeoutError) as err:  # includes timeouts
                last, wait = err, None
            except openai.APIStatusError as err:
                if err.status_code not in RETRY_STATUS and err.status_code < 500:
                    raise GenpiError(
                        f"server {self.base_url} refused the request with HTTP {err.status_code}: {_short(err)}"
                    ) from None
                last, wait = err, _retry_after(err)
            if attempt < self.max_retries:
                delay = min(self.backoff_max, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
                if wait is not None:
                    delay = min(self.backoff_max, max(delay, wait))
                log.warning("request to %s failed (%s); retry %d/%d in %.1fs", self.base_url, _short(last),
                            attempt + 1, self.max_retries, delay)
                time.sleep(delay)
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


def _retry_after(err: Any) -> float | None:
    try:
        value = err.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def _short(err: Exception | None) -> str:
    text = str(err).splitlines()[0] if err is not None and str(err) else type(err).__name__
    return text[:200]
