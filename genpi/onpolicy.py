"""On-policy context distillation (issue 13): the student samples its own answers, the teacher scores them.

The pieces the training module glues together:

- :class:`OnPolicySampler` decides per batch whether it is on-policy (a coin of probability ``lmbda``) and draws the
  seed its sampling runs under, both from one seeded ``torch.Generator`` whose state goes into checkpoints: a run that
  is killed and resumed samples the same tokens as one that never stopped (given the same weights).
- :meth:`OnPolicySampler.sample` runs transformers ``generate`` on the student (the model as it is: adapter on,
  no prompt) under ``torch.no_grad()`` in a forked RNG, so sampling neither carries gradients nor moves the global
  RNG that dropout and the data order read.
- :func:`prompt_parts` and :func:`conversation_batch` take a KL batch of the data module apart into the student's
  and the teacher's views of each input, and put them back together around the sampled turns, in the data module's
  own layout (so the teacher's cached-prompt paths apply unchanged).
- Over several turns (``loss.kl.sampling.turns``), :meth:`OnPolicySampler.sample_turns` samples the agent's turns
  one after the other, each after the environment's turn that followed the previous one in the record's
  conversation (``env_student`` of the KL batch); the scored positions are those of the sampled tokens only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from genpi.evaluation.generation import cut_at_stop, left_pad


def prompt_parts(kl: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """The student's and the teacher's views of each input, without the synthesized answer: ``(student, teacher)``
    lists of token ids, from a right-padded KL batch (``student_input_ids`` ``[B, Ts]``, ``teacher_input_ids``
    ``[B, Tt]`` with their attention and response masks)."""
    n_answer = kl["student_response_mask"].sum(1).tolist()
    n_student = kl["student_attention_mask"].sum(1).tolist()
    n_teacher = kl["teacher_attention_mask"].sum(1).tolist()
    s_ids, t_ids = kl["student_input_ids"].tolist(), kl["teacher_input_ids"].tolist()
    student = [row[: n - a] for row, n, a in zip(s_ids, n_student, n_answer)]
    teacher = [row[: n - a] for row, n, a in zip(t_ids, n_teacher, n_answer)]
    return student, teacher


def conversation_batch(student_prompts: Sequence[Sequence[int]], teacher_prompts: Sequence[Sequence[int]],
                       turns: Sequence[Sequence[Sequence[int]]], student_env: Sequence[Sequence[Sequence[int]]],
                       teacher_env: Sequence[Sequence[Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """A KL batch in the data module's layout around sampled trajectories: row ``i`` of each side (``student``,
    ``teacher``) is its view, then ``turns[i][0]``, ``env[i][0]``, ``turns[i][1]``, ``env[i][1]``, ... up to its
    last sampled turn (no environment turn after it; one turn and no environment turns for a single answer), as
    ``{side}_input_ids`` ``[B, T]`` (right-padded) and ``{side}_attention_mask``; ``{side}_response_mask`` is true
    exactly at the positions whose logits predict a token of a sampled turn (environment turns and agent headers
    are context)."""
    out: dict[str, torch.Tensor] = {}
    for side, prompts, envs in (("student", student_prompts, student_env), ("teacher", teacher_prompts, teacher_env)):
        seqs, spans = [], []
        for prompt, row_turns, row_env in zip(prompts, turns, envs):
            if len(row_turns) > len(row_env) + 1:
                raise ValueError(f"{len(row_turns)} turns but only {len(row_env)} environment turns between them")
            seq, row_spans = list(prompt), []
            for k, turn in enumerate(row_turns):
                if k:
                    seq += list(row_env[k - 1])
                row_spans.append((len(seq), len(turn)))
                seq += list(turn)
            seqs.append(seq)
            spans.append(row_spans)
        ids = torch.full((len(seqs), max(len(s) for s in seqs)), int(pad_id), dtype=torch.long)
        mask = torch.zeros_like(ids)
        response = torch.zeros(ids.shape, dtype=torch.bool)
        for row, (seq, row_spans) in enumerate(zip(seqs, spans)):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
            for start, n in row_spans:
                response[row, start - 1 : start - 1 + n] = True
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_response_mask": response})
    return out


def _hashed_seed(key: str) -> int:
    """A seed in [0, 2**62) from a text key."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 2


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of agent turn ``turn`` (0-based) of a batch drawn with ``seed``: ``seed`` itself for the
    first (so its answers are those one-turn sampling gives), a hash of both for the next ones."""
    return int(seed) if turn == 0 else _hashed_seed(f"{int(seed)}:{int(turn)}")


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row`` of a batch sampled under ``seed`` by an engine that seeds each request (vLLM): a
    hash of both, so that rows, and ranks (whose batch seeds differ by their rank), never share one."""
    return _hashed_seed(f"{int(seed)}/{int(row)}")


class OnPolicySampler:
    """The student's sampling on on-policy batches, and the seeded choice of which batches those are.

    Args:
        lmbda: share of batches that are on-policy, in [0, 1].
        temperature: sampling temperature; 0 = greedy.
        top_p: nucleus sampling threshold in (0, 1]; top-k is always off (the full distribution).
        max_new_tokens: longest sampled answer.
        stop_ids: end-of-turn token ids; sampling stops at the first, which is kept.
        pad_id: fills the left padding of the prompts and the right padding of the scoring batch.
        seed: seeds the generator (every rank the same, so ranks agree on which batches are on-policy).
        turns: most agent turns sampled per conversation (:meth:`sample_turns`); 1 = the answer to the input only.
    """

    def __init__(self, lmbda: float, temperature: float, top_p: float, max_new_tokens: int, stop_ids: Sequence[int],
                 pad_id: int, seed: int = 0, turns: int = 1):
        self.turns = int(turns)
        self.lmbda = float(lmbda)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.max_new_tokens = int(max_new_tokens)
        self.stop_ids = [int(s) for s in stop_ids]
        self.pad_id = int(pad_id)
        self.generator = torch.Generator().manual_seed(int(seed))
        # a colocated vLLM engine (genpi.onpolicy_vllm.VLLMEngine) samples instead of transformers when set
        self.engine: Any = None

    def draw(self) -> tuple[bool, int]:
        """``(on_policy, sampling_seed)`` for the next training batch. Both are drawn on every batch, whatever
        ``lmbda`` is, so the generator's position depends only on the number of batches seen."""
        coin = float(torch.rand((), generator=self.generator))
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        return coin < self.lmbda, seed

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": self.generator.get_state()}
        if self.engine is not None:
            state["engine"] = self.engine.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if self.engine is not None and "engine" in state:
            self.engine.load_state_dict(state["engine"])

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], seed: int) -> list[list[int]]:
        """One sampled answer per prompt (token ids, cut after the first stop token).

        The model runs in eval mode (no dropout while sampling) and each module is put back in the mode it was in; the global
        RNG is forked and seeded with ``seed``, so the answers depend only on the weights, the prompts and ``seed``.
        With a colocated vLLM :attr:`engine`, the engine samples from the adapter it was last given, prompt ``i``
        under the seed :func:`row_seed` ``(seed, i)``.
        """
        if self.engine is not None:
            seeds = [row_seed(seed, i) for i in range(len(prompts))]
            return self.engine.sample(prompts, seeds, self.temperature, self.top_p, self.max_new_tokens,
                                      self.stop_ids)
        from transformers import GenerationConfig

        device = next(model.parameters()).device
        ids, mask = left_pad(prompts, self.pad_id)
        width = ids.shape[1]
        greedy = self.temperature == 0
        # Every sampling key set: generate fills unset (None) keys from the model's generation_config and then
        # from transformers' defaults (top_k=50), which would silently truncate the distribution.
        config = GenerationConfig(do_sample=not greedy, temperature=None if greedy else self.temperature,
                                  top_p=None if greedy else self.top_p, top_k=0, min_p=None, typical_p=1.0,
                                  repetition_penalty=1.0, max_new_tokens=self.max_new_tokens,
                                  eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        # Each module's own mode is restored (not model.train()): a loaded base sits in eval mode under a training
        # adapter, and flipping it would change what the training passes compute.
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config)
        finally:
            for m, mode in modes:
                m.training = mode
        # The stop is kept: it is a sampled token too, and the student learns where to end.
        return [cut_at_stop(row, self.stop_ids, keep_stop=True) for row in out[:, width:].tolist()]

    def sample_turns(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                     envs: Sequence[Sequence[Sequence[int]]], seed: int,
                     turns: int | None = None) -> list[list[list[int]]]:
        """The student's own trajectory per prompt: agent turn 1 sampled after the prompt, then, for as long as
        the row has a next environment turn (``envs[i][k]``: the record's, see
        :meth:`genpi.data.tokenize.RecordEncoder.kl_conversation`) and fewer than ``turns`` (default
        :attr:`turns`) turns are sampled, turn ``k + 2`` after [prompt, turn 1, env 1, ..., turn k + 1, env k + 1].

        A turn that ends without a stop token (``max_new_tokens`` reached) ends its row's trajectory: the next
        environment turn would follow an answer the template never closes. Each turn is one :meth:`sample` call
        over the rows still going, seeded with :func:`turn_seed`, so the result depends only on the weights, the
        prompts, the environment turns and ``seed``; turn 1 is what :meth:`sample` gives with ``seed``.
        """
        turns = self.turns if turns is None else int(turns)
        stops = set(self.stop_ids)
        contexts = [list(p) for p in prompts]
        out: list[list[list[int]]] = [[] for _ in prompts]
        going = list(range(len(prompts)))
        for k in range(turns):
            if not going:
                break
            answers = self.sample(model, [contexts[i] for i in going], turn_seed(seed, k))
            still = []
            for i, answer in zip(going, answers):
                out[i].append(answer)
                if k + 1 < turns and k < len(envs[i]) and answer and answer[-1] in stops:
                    contexts[i] += answer + list(envs[i][k])
                    still.append(i)
            going = still
        return out
