"""The ASGI middleware genpi-serve adds to vLLM's OpenAI-compatible server (``--middleware``).

Why inside vLLM's server rather than a proxy in front: one process and one port (no second hop to configure,
secure or keep alive), streaming responses pass through untouched, and genpi's counters land in the same
Prometheus registry as vLLM's own, so ``/metrics`` shows them side by side.

Only ``POST /v1/chat/completions`` is looked at; every other route (``/v1/completions`` included: a raw text
prompt has no turns to recognize) passes unchanged. For a chat request the body is read, its ``messages`` are
rewritten by :class:`genpi.serving.prompt_match.PromptMatcher` as the serving mode says (student / floor: strip
the prompt; teacher: inject it when absent), and the response carries the headers

- ``X-Genpi-Prompt``: ``stripped`` | ``absent`` | ``differs`` | ``present`` | ``injected``;
- ``X-Genpi-Prompt-Stripped``: ``yes`` | ``no``;
- ``X-Genpi-Tokens-Saved``: prompt tokens the model did not read because of the strip (0 otherwise);
- ``X-Genpi-Tokens-Injected``: prompt tokens added in teacher mode (0 otherwise).

The server's configuration comes from the JSON file named by ``$GENPI_SERVE_SPEC`` (written by genpi-serve).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any

from genpi.serving.prompt_match import DIFFERS, INJECTED, STRIPPED, Decision, PromptMatcher, message_text

log = logging.getLogger("genpi.serve")

SPEC_ENV = "GENPI_SERVE_SPEC"
CHAT_PATH = "/v1/chat/completions"

_COUNTERS: dict[str, Any] = {}


def counters() -> dict[str, Any]:
    """genpi's Prometheus counters, created once per process in the registry vLLM's ``/metrics`` serves.

    ``genpi:chat_requests_total{prompt=...}``: answered chat requests by what happened to the prompt;
    ``genpi:prompt_tokens_saved_total`` / ``genpi:prompt_tokens_injected_total``: prompt tokens removed / added.
    Counted when the response starts with a status below 400, so a request vLLM refused is not counted.
    """
    if not _COUNTERS:
        from prometheus_client import Counter

        _COUNTERS["requests"] = Counter("genpi:chat_requests", "Chat requests answered, by what happened to the "
                                        "internalized prompt", ["prompt"])
        _COUNTERS["saved"] = Counter("genpi:prompt_tokens_saved", "Prompt tokens removed from chat requests")
        _COUNTERS["injected"] = Counter("genpi:prompt_tokens_injected", "Prompt tokens added to chat requests "
                                        "(teacher mode)")
    return _COUNTERS


class ServeState:
    """What the middleware needs, built once from the spec file: the matcher, the mode and a tokenizer to count
    the tokens a rewrite saves."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        from genpi.tasks.base import build_task

        self.mode = spec["mode"]
        self.matcher = PromptMatcher(build_task(**spec["task"]))
        self.tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
        if spec.get("chat_template"):
            self.tokenizer.chat_template = spec["chat_template"]
        if not log.handlers:  # vLLM configures only its own loggers: give genpi's lines a handler beside them
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [genpi.serve] %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
        key = os.environ.get("VLLM_API_KEY") or ""
        self.key_hash = hashlib.sha256(key.encode()).digest() if key else None

    @classmethod
    def from_env(cls) -> ServeState:
        path = os.environ.get(SPEC_ENV)
        if not path or not Path(path).is_file():
            raise RuntimeError(f"${SPEC_ENV} must name the spec file genpi-serve writes (got {path!r})")
        return cls(json.loads(Path(path).read_text()))

    def decide(self, messages: list[dict[str, Any]]) -> Decision:
        return self.matcher.inject(messages) if self.mode == "teacher" else self.matcher.strip(messages)

    def n_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of the chat as the model reads it up to its answer (the chat template of the served model)."""
        plain = [{"role": m.get("role"), "content": message_text(m) or ""} for m in messages]
        ids = self.tokenizer.apply_chat_template(plain, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """The request's bearer token is the server's API key (or no key is set). An unauthorized request is left
        to vLLM's own check, untouched and uncounted."""
        if self.key_hash is None:
            return True
        value = dict(headers).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(hashlib.sha256(token.encode()).digest(),
                                                                   self.key_hash)


class PromptMiddleware:
    """Pure ASGI middleware (no buffering of responses, so streaming works): see the module docstring."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = ServeState.from_env()
        counters()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or scope["path"].removeprefix(scope.get("root_path", "")) != CHAT_PATH
                or not self.state.authorized(scope.get("headers", []))):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending its body
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        decision, saved, injected = self._rewrite(body)
        if decision is not None and decision.changed:
            payload = json.loads(body)
            payload["messages"] = decision.messages
            body = json.dumps(payload).encode()
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                     + [(b"content-length", str(len(body)).encode())]}
        action = decision.action if decision is not None else "absent"
        extra = [(b"x-genpi-prompt", action.encode()),
                 (b"x-genpi-prompt-stripped", b"yes" if action == STRIPPED else b"no"),
                 (b"x-genpi-tokens-saved", str(saved).encode()),
                 (b"x-genpi-tokens-injected", str(injected).encode())]

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + extra}
                if message.get("status", 500) < 400 and decision is not None:
                    c = counters()
                    c["requests"].labels(prompt=action).inc()
                    if saved:
                        c["saved"].inc(saved)
                    if injected:
                        c["injected"].inc(injected)
            await send(message)

        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive),
                       send_with_headers)

    def _rewrite(self, body: bytes) -> tuple[Decision | None, int, int]:
        """The decision for a request body, and the prompt tokens it saves / adds. A body that is not a chat
        request genpi can read is left for vLLM to answer (and refuse) as it would."""
        try:
            payload = json.loads(body)
            messages = payload["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                return None, 0, 0
        except (ValueError, KeyError, TypeError):
            return None, 0, 0
        decision = self.state.decide(messages)
        saved = injected = 0
        if decision.action == STRIPPED:
            saved = self.state.n_tokens(messages) - self.state.n_tokens(decision.messages)
            log.info("prompt stripped (%s): %d prompt tokens saved", decision.form, saved)
        elif decision.action == INJECTED:
            injected = self.state.n_tokens(decision.messages) - self.state.n_tokens(messages)
            log.info("prompt injected: %d prompt tokens added", injected)
        elif decision.action == DIFFERS:
            log.warning("prompt not stripped: the request carries a prompt that differs from the internalized one "
                        "(%s); forwarded unchanged", decision.detail)
        else:
            log.debug("no prompt in the request (%s): forwarded unchanged", decision.detail)
        return decision, saved, injected


def _replay(messages: list[dict[str, Any]], receive: Any):
    """A ``receive`` that first hands out ``messages``, then defers to the original (for disconnects)."""
    pending = list(messages)

    async def receive_again() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        return await receive()

    return receive_again
