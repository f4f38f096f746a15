"""LLM clients for synthesis: ``hf`` (transformers in-process), ``vllm`` (offline engine), ``openai``
(any OpenAI-compatible server). All share :class:`ChatClient`; :class:`ClientPool` builds them from config
and shares one loaded model between the stages that use it."""

from __future__ import annotations

import json
import logging
from typing import Any

from genpi.synthesis.clients.base import ChatClient, Message, Sampling, TopK, end_of_turn_ids, request_seed
from genpi.utils.errors import GenpiError

log = logging.getLogger(__name__)
CLIENTS = ("hf", "vllm", "openai")

__all__ = ["CLIENTS", "ChatClient", "ClientPool", "Message", "Sampling", "TopK", "end_of_turn_ids", "make_client",
           "request_seed"]


def make_client(kind: str, model_cfg: dict[str, Any], settings: dict[str, Any] | None = None, seed: int = 0) -> ChatClient:
    """Build a client of ``kind`` for the model ``model_cfg`` (a ``conf/model`` dict) with ``settings``
    (that client's block of ``synth.clients``)."""
    settings = dict(settings or {})
    if kind == "hf":
        from genpi.synthesis.clients.hf import HFClient

        return HFClient.from_model_cfg(model_cfg, **settings)
    if kind == "vllm":
        from genpi.models.factory import resolve_model_path
        from genpi.synthesis.clients.vllm import VLLMClient

        return VLLMClient(resolve_model_path(model_cfg), seed=seed, model_name=str(model_cfg.get("name_or_path", "")),
                          **settings)
    if kind == "openai":
        from genpi.synthesis.clients.openai import OpenAIClient

        served = settings.pop("model", None) or model_cfg.get("name_or_path")
        return OpenAIClient(model=str(served or ""), **settings)
    raise GenpiError(f"synth client {kind!r} is unknown: choose one of {list(CLIENTS)}")


class ClientPool:
    """Clients by (kind, model): stages that use the same model share one loaded copy.

    At most one vLLM engine lives at a time (an engine holds its KV cache until closed), so a stage
    that needs another model through vLLM closes the previous engine first.
    """

    def __init__(self, settings: dict[str, dict[str, Any]], seed: int = 0):
        self.settings = settings
        self.seed = seed
        self.clients: dict[str, ChatClient] = {}

    def get(self, kind: str, model_cfg: dict[str, Any]) -> ChatClient:
        key = json.dumps([kind, model_cfg], sort_keys=True, default=str)
        if key not in self.clients:
            if kind == "vllm":
                for old in [k for k in self.clients if json.loads(k)[0] == "vllm"]:
                    self.clients.pop(old).close()
            log.info("loading %s client for %s", kind, model_cfg.get("name_or_path"))
            self.clients[key] = make_client(kind, model_cfg, self.settings.get(kind), seed=self.seed)
        return self.clients[key]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()
