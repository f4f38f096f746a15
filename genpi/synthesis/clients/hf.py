"""In-process transformers client: batched ``generate`` with left padding, and exact top-k log-probs."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any

import torch

from genpi.synthesis.clients.base import ChatClient, Message, Sampling, TopK, end_of_turn_ids
from genpi.synthesis.clients.prefix import prefix_cache, shared_prefix, supports_shared_prefix


class HFClient(ChatClient):
    """Runs a causal LM with transformers in this process.

    Prompts are rendered with the tokenizer's chat template, sorted by length and generated in batches
    of ``batch_size`` with LEFT padding (so every row's next token sits in the last column); greedy when
    ``temperature == 0``. The key/value cache of a long prefix shared by a whole batch (the task's
    prompt) is computed once and attended to at batch size 1 (``prefix_cache``, see
    :mod:`genpi.synthesis.clients.prefix`). Sampling is seeded once per call with ``sampling.seed``:
    per-request seeds are not possible inside one ``generate`` batch, so a sampled run is reproducible
    for the same batches only.
    """

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 32, model_name: str = "", logits_batch_size: int = 8,
                 prefix_cache: bool = True, min_prefix_tokens: int = 64):
        self.hf_model = model.eval()
        self.prefix_cache = bool(prefix_cache)
        self.min_prefix_tokens = int(min_prefix_tokens)
        self._prefixes: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._encoded: dict[str, list[int]] = {}
        self.shared_attention = supports_shared_prefix(model)
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.logits_batch_size = int(logits_batch_size)
        self.model = model_name or str(getattr(model.config, "_name_or_path", ""))
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    @classmethod
    def from_model_cfg(cls, model_cfg: dict[str, Any], **settings: Any) -> HFClient:
        from genpi.models.factory import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(model_cfg, for_training=False)
        return cls(model, tokenizer, model_name=str(model_cfg.get("name_or_path", "")), **settings)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def _encode(self, conversations: Sequence[list[Message]]) -> list[list[int]]:
        """Token ids of each conversation with the generation prompt. Memoized for one round: role swapping
        measures prompts (``prompt_lengths``) right before it sends them."""
        keys = [json.dumps(c, ensure_ascii=False) for c in conversations]
        missing = [i for i, k in enumerate(keys) if k not in self._encoded]
        if len(self._encoded) + len(missing) > 4096:
            self._encoded.clear()
            missing = list(range(len(keys)))
        for i in missing:
            text = self.tokenizer.apply_chat_template(conversations[i], tokenize=False, add_generation_prompt=True)
            # The template already writes BOS; adding special tokens again would double it.
            self._encoded[keys[i]] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self._encoded[k] for k in keys]

    def prompt_lengths(self, conversations: Sequence[list[Message]]) -> list[int]:
        return [len(ids) for ids in self._encode(conversations)]

    @torch.inference_mode()
    def chat(
        self, conversations: Sequence[list[Message]], sampling: Sampling, seeds: Sequence[int] | None = None
    ) -> list[str]:
        prompts = self._encode(conversations)
        # Length-sorted batches keep padding low; results go back to the callers' order.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        answers: list[list[str]] = [[] for _ in prompts]
        if not sampling.greedy and sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            texts = self._generate([prompts[i] for i in idx], sampling)
            for j, i in enumerate(idx):
                answers[i] = texts[j * sampling.n : (j + 1) * sampling.n]
        return [a for per_conv in answers for a in per_conv]

    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[str]:
        # Rows are repeated n times here rather than with num_return_sequences, so that a shared prefix
        # cache has the batch size of the rows it serves.
        prompts = [p for p in prompts for _ in range(sampling.n)]
        n_prefix, prefix_kv = self._shared_prefix(prompts)
        suffixes = [p[n_prefix:] for p in prompts]
        width = max(len(s) for s in suffixes)
        # Layout per row: [shared prefix][left padding][own suffix]; padding is masked out and position ids
        # follow the mask, so a row reads exactly its own prompt.
        input_ids = torch.full((len(prompts), n_prefix + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), n_prefix + width), dtype=torch.long)
        for row, (p, suf) in enumerate(zip(prompts, suffixes)):
            input_ids[row, :n_prefix] = torch.tensor(p[:n_prefix], dtype=torch.long)
            input_ids[row, n_prefix + width - len(suf) :] = torch.tensor(suf, dtype=torch.long)
            mask[row, :n_prefix] = 1
            mask[row, n_prefix + width - len(suf) :] = 1
        kwargs: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if not sampling.greedy:
            kwargs = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": None}
        context: Any = contextlib.nullcontext()
        if prefix_kv is not None and self.shared_attention:
            # The prefix stays at batch 1; rows cache only their own tokens (see clients/prefix.py).
            kwargs["past_key_values"] = prefix_cache(len(prefix_kv), n_prefix)
            context = shared_prefix(self.hf_model, prefix_kv)
        elif prefix_kv is not None:
            from transformers import StaticCache

            rows = len(prompts)
            # Preallocated: a growing cache would copy every row's whole prefix at every new token.
            cache = StaticCache(config=self.hf_model.config, max_cache_len=n_prefix + width + sampling.max_tokens)
            for layer, (k, v) in enumerate(prefix_kv):
                cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), layer)
            kwargs["past_key_values"] = cache
        elif len(prompts) > 1:
            kwargs["cache_implementation"] = "static"
        with context:
            out = self.hf_model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=sampling.max_tokens,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                **kwargs,
            )
        new = out[:, n_prefix + width :].tolist()
        return [self.tokenizer.decode(self._cut(ids), skip_special_tokens=True).strip() for ids in new]

    def _shared_prefix(self, prompts: list[list[int]]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The longest token prefix shared by every prompt of a batch, with its key/value cache.

        The task's prompt opens every teacher and agent request; its keys and values are computed once
        (batch 1) and reused by every batch that starts with it, as vLLM's prefix caching does. A cached
        prefix is reused as long as it still covers most of the batch's shared part; a prompt keeps at
        least one token of its own, which generate needs to produce the first logits.
        """
        if not self.prefix_cache or len(prompts) < 2:
            return 0, None
        first = prompts[0]
        n = min(len(p) for p in prompts) - 1
        for p in prompts[1:]:
            i = 0
            while i < n and p[i] == first[i]:
                i += 1
            n = i
        if n < self.min_prefix_tokens:
            return 0, None
        best = max((k for k in self._prefixes if len(k) <= n and tuple(first[: len(k)]) == k), key=len, default=None)
        if best is not None and n - len(best) < self.min_prefix_tokens:
            return len(best), self._prefixes[best]
        key = tuple(first[:n])
        out = self.hf_model(input_ids=torch.tensor([key], device=self.device), use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        if len(self._prefixes) >= 8:  # a handful of prompts per run; keep memory bounded all the same
            self._prefixes.pop(next(iter(self._prefixes)))
        self._prefixes[key] = kv
        return n, kv

    def _cut(self, ids: list[int]) -> list[int]:
        """The answer up to (not including) its first stop token; later columns are padding."""
        for pos, tid in enumerate(ids):
            if tid in self.stop_ids:
                return ids[:pos]
        return ids

    @torch.inference_mode()
    def topk_logprobs(self, sequences: Sequence[list[int]], starts: Sequence[int], k: int) -> list[TopK]:
        """Exact top-k from one forward pass per batch, in float32 log-softmax.

        Sequences are LEFT padded with explicit position ids, so every response ends in the last column and
        only the last ``max(len - start) + 1`` positions need logits (``logits_to_keep``): memory grows with
        the response, not with prompt x vocabulary.
        """
        results: list[TopK] = [([], []) for _ in sequences]
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        for b in range(0, len(order), self.logits_batch_size):
            idx = order[b : b + self.logits_batch_size]
            seqs = [list(sequences[i]) for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[row, width - len(s) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            keep = max(len(s) - starts[i] for s, i in zip(seqs, idx)) + 1
            logits = self.hf_model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device), logits_to_keep=keep, use_cache=False,
            ).logits.float()
            # Column c of `logits` is position width - keep + c; position p - 1 predicts token p.
            top_lp, top_ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
            for row, i in enumerate(idx):
                n_resp = len(seqs[row]) - starts[i]
                first = keep - 1 - n_resp  # column predicting the first response token
                results[i] = (top_ids[row, first : first + n_resp].tolist(), top_lp[row, first : first + n_resp].tolist())
        return results

    def close(self) -> None:
        self._prefixes.clear()
        self.hf_model = None
