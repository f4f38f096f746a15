"""The LightningModule: a student pass (no prompt) and a teacher pass (same weights, adapter off,
with the prompt), weighted into KL + SFT + PG."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from genpi import losses, onpolicy, schema
from genpi.models.prefix import (
    choose_teacher_attention,
    common_prefix_length,
    hidden_after_prefix,
    hidden_after_shared_prefix,
    prefix_kv,
    shared_prefix_hidden,
)
from genpi.utils.constants import IGNORE
from genpi.utils.errors import GenpiError

# A shared prefix shorter than this is not worth a separate pass (chat headers, the PG instruction's first line).
MIN_SHARED_PREFIX = 64


def _typed_loss(loss: schema.Loss | dict[str, Any]) -> schema.Loss:
    return loss if isinstance(loss, schema.Loss) else schema.Loss.partial(loss)


def _typed_optim(optim: schema.Optim | dict[str, Any]) -> schema.Optim:
    return optim if isinstance(optim, schema.Optim) else schema.read(optim, schema.Optim, "optim")


def active_terms(loss: schema.Loss | dict[str, Any]) -> tuple[str, ...]:
    """The sequences the data module must build for training: a term of weight 0 is not built."""
    return _typed_loss(loss).active_terms


class GenPIModule(pl.LightningModule):
    """GenPI training on one model.

    Args:
        model: a causal LM, usually a ``peft.PeftModel`` (the teacher is the base with the adapter off).
        loss: the ``loss`` group, typed (:class:`genpi.schema.Loss`) or as a partial dict in which a term not
            named is off (``{"kl": {"weight": 1.0}}``).
        optim: the ``optim`` group (:class:`genpi.schema.Optim`, or a dict read into it).
        teacher_prompt_ids: the prompt's token ids, a common prefix of every teacher sequence.
        stop_ids: end-of-turn token ids, where the student's sampling stops (``loss.kl.on_policy``); None = the
            model's ``generation_config.eos_token_id``.
        pad_id: the padding id of sampled batches; None = the model's pad (else its first stop id).
        seed: seeds the on-policy generator (which batches are on-policy, and their sampling).
    """

    def __init__(self, model: torch.nn.Module, loss: schema.Loss | dict[str, Any],
                 optim: schema.Optim | dict[str, Any], teacher_prompt_ids: list[int],
                 stop_ids: Sequence[int] | None = None, pad_id: int | None = None, seed: int = 0,
                 sample_engine: Any = None):
        super().__init__()
        self.model = model
        self.loss_cfg = _typed_loss(loss)
        self.optim_cfg = _typed_optim(optim)
        self.weights = self.loss_cfg.weights
        self.teacher_prompt_ids = list(teacher_prompt_ids)
        self.chunk_size = self.loss_cfg.chunk_size
        kl = self.loss_cfg.kl
        self.kl_kind = kl.kind
        self.kl_beta = kl.beta
        self.kl_temperature = kl.temperature
        self.teacher_source = kl.teacher
        self.prefix_cache = kl.prefix_cache
        self.teacher_attention = kl.requested_teacher_attention
        self.last_teacher_path: tuple[str, str] | None = None  # (path, why) of the latest teacher pass
        self.has_adapter = hasattr(model, "disable_adapter")
        if self.weights["kl"] > 0 and self.teacher_source == "online" and not self.has_adapter:
            raise GenpiError(
                "loss.kl with an online teacher needs a LoRA adapter (the teacher is the base with the adapter off); "
                "set model.lora.enabled=true or loss.kl.teacher=cached"
            )
        self._prompt_kv: tuple[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.sampler = self._make_sampler(kl, stop_ids, pad_id, seed) if kl.on_policy and kl.weight > 0 else None
        if self.sampler is not None:
            self.sampler.engine = sample_engine  # None = transformers generate in this process
        self.opcd_stats: dict[str, float] = {}  # the latest training batch's on-policy figures, logged as train/opcd_*
        self._backward_start: float | None = None
        # Checkpoints hold only trainable weights (the adapter), so loading one must not demand the base.
        self.strict_loading = False
        self.save_hyperparameters({"loss": dataclasses.asdict(self.loss_cfg),
                                   "optim": dataclasses.asdict(self.optim_cfg)})

    def _make_sampler(self, kl: schema.KLLoss, stop_ids: Sequence[int] | None, pad_id: int | None,
                      seed: int) -> onpolicy.OnPolicySampler:
        if kl.teacher != "online" or not self.has_adapter:
            raise GenpiError("loss.kl.on_policy=true needs an online teacher and a LoRA adapter (the teacher is the "
                             "base with the adapter off, scoring the student's own samples): set "
                             "loss.kl.teacher=online and model.lora.enabled=true")
        gen = getattr(self.causal_lm, "generation_config", None)
        if stop_ids is None:
            eos = getattr(gen, "eos_token_id", None)
            stop_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if not stop_ids:
            raise GenpiError("loss.kl.on_policy=true: the model names no end-of-turn token to stop sampling at; "
                             "give the tokenizer an eos_token")
        if pad_id is None:
            pad_id = getattr(gen, "pad_token_id", None)
            pad_id = stop_ids[0] if pad_id is None else pad_id
        s = kl.sampling
        return onpolicy.OnPolicySampler(kl.lmbda, s.temperature, s.top_p, s.max_new_tokens, stop_ids, pad_id, seed,
                                        turns=s.turns)

    @property
    def sampled_turns(self) -> int:
        """Agent turns an on-policy batch samples per conversation (``loss.kl.sampling.turns``); 1 without
        on-policy sampling. The data module reads it to give the training KL examples their environment turns."""
        return self.sampler.turns if self.sampler is not None else 1

    # -- model pieces -------------------------------------------------------------------
    @property
    def causal_lm(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def decoder(self) -> torch.nn.Module:
        return self.causal_lm.get_decoder()

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.causal_lm.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` (the LM head is applied later, in chunks, where needed)."""
        return self.decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).last_hidden_state

    def adapter_off(self):
        return self.model.disable_adapter() if self.has_adapter else contextlib.nullcontext()

    # -- losses --------------------------------------------------------------------------
    def ce_loss(self, part: dict[str, torch.Tensor], window_tokens: int | None = None,
                accumulate: int = 1) -> torch.Tensor:
        """Token cross-entropy on the labelled positions of an SFT or PG batch.

        When every sequence starts with the same long untrained prefix (the prompt, in the ``w_prompt`` baseline),
        that prefix runs once for the batch, gradients included (:mod:`genpi.models.prefix`)."""
        ids, mask, labels = part["input_ids"], part["attention_mask"], part["labels"]
        p = common_prefix_length(ids, mask, labels) if self.prefix_cache else 0
        if p >= MIN_SHARED_PREFIX:
            h = shared_prefix_hidden(self.decoder(), self.causal_lm.config, ids, mask, p)
            labels = labels[:, p:]
        else:
            h = self.hidden(ids, mask)
        keep = labels != IGNORE
        weight, bias = self.lm_head()
        loss = losses.chunked_token_cross_entropy(h[keep], weight, labels[keep],
                                                  chunk_size=self.chunk_size, lm_head_bias=bias)
        return self._global_token_mean(loss, int(keep.sum()), window_tokens, accumulate)

    def _global_token_mean(self, loss: torch.Tensor, n_tokens: int, window_tokens: int | None = None,
                           accumulate: int = 1) -> torch.Tensor:
        """Rescale a micro-batch's token mean so that the optimizer step's gradient is the mean over every token
        of its accumulation window and of all DDP ranks (as one process on the whole step's batch would compute),
        not a mean of per-batch or per-rank means.

        ``window_tokens`` is this rank's token total over the window's ``accumulate`` micro-batches (Lightning
        divides each micro-batch's loss by ``accumulate``); None outside training, where the batch is the unit.
        """
        local = window_tokens if window_tokens is not None else n_tokens
        scale = torch.tensor(float(n_tokens * (accumulate if window_tokens is not None else 1)) / max(local, 1),
                             device=loss.device)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            mine = torch.tensor(float(local), device=loss.device)
            total = self.trainer.strategy.reduce(mine.clone(), reduce_op="sum")
            scale = scale * mine * trainer.world_size / total.clamp_min(1.0)
        return loss * scale

    @torch.no_grad()
    def teacher_hidden(self, kl: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher hidden states at the response positions ``[N, H]``: adapter off, prompt on."""
        ids, mask, resp = kl["teacher_input_ids"], kl["teacher_attention_mask"], kl["teacher_response_mask"]
        with self.adapter_off():
            n_prompt = len(self.teacher_prompt_ids)
            path = "naive"
            if self.teacher_attention != "naive" and n_prompt and self.has_adapter:
                self.last_teacher_path = choose_teacher_attention(self.teacher_attention, self.causal_lm.config,
                                                                  mask, n_prompt)
                path = self.last_teacher_path[0]
            if path == "shared":
                h = hidden_after_shared_prefix(self.decoder(), self._prompt_cache(ids.device), ids, mask)
                return h[resp[:, n_prompt:]]
            if path == "cached":
                h = hidden_after_prefix(self.decoder(), self.causal_lm.config, self._prompt_cache(ids.device), ids,
                                        mask)
                return h[resp[:, n_prompt:]]
            return self.hidden(ids, mask)[resp]

    def _prompt_cache(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prompt's keys and values, computed once per device (the teacher is frozen)."""
        key = (device, len(self.teacher_prompt_ids))
        if self._prompt_kv is None or self._prompt_kv[0] != key:
            self._prompt_kv = (key, prefix_kv(self.decoder(), torch.tensor([self.teacher_prompt_ids], device=device)))
        return self._prompt_kv[1]

    def kl_loss(self, kl: dict[str, torch.Tensor], teacher: str | None = None, window_tokens: int | None = None,
                accumulate: int = 1) -> torch.Tensor:
        """Distillation on the teacher's answer tokens: teacher after (prompt + input), student after (input)."""
        teacher = teacher or self.teacher_source
        student_h = self.hidden(kl["student_input_ids"], kl["student_attention_mask"])[kl["student_response_mask"]]
        weight, bias = self.lm_head()
        if teacher == "cached":
            if "teacher_topk_ids" not in kl:
                raise GenpiError("loss.kl.teacher=cached needs records with teacher_topk_ids: run the synth "
                                 "teacher_logits stage, or set loss.kl.teacher=online")
            loss = losses.chunked_topk_forward_kl(student_h, weight, kl["teacher_topk_ids"],
                                                  kl["teacher_topk_logprobs"], chunk_size=self.chunk_size,
                                                  lm_head_bias=bias)
        else:
            teacher_h = self.teacher_hidden(kl)
            loss = losses.chunked_distill_loss(student_h, teacher_h, weight, kind=self.kl_kind, beta=self.kl_beta,
                                               temperature=self.kl_temperature, chunk_size=self.chunk_size,
                                               lm_head_bias=bias)
        return self._global_token_mean(loss, student_h.shape[0], window_tokens, accumulate)

    def on_policy_kl_loss(self, kl: dict[str, torch.Tensor], seed: int = 0,
                          answers: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """On-policy distillation on one KL batch: the student (adapter on, no prompt) samples an answer to each
        input, then the student and the teacher (adapter off, cached prompt) score the sampled tokens in one pass
        each; the divergence (``loss.kl.kind``, ``beta``, ``temperature``) is averaged over the sampled positions.

        Only the inputs of ``kl`` are used (its synthesized answers are dropped). ``answers`` (token ids per row)
        replaces the sampling, for tests and benchmarks. No gradient goes through the sampling; the figures of
        the batch land in :attr:`opcd_stats` (``sampled_len``: sampled tokens per row, all turns; ``turns``:
        sampled turns per row).

        With ``loss.kl.sampling.turns`` N > 1 the student samples up to N agent turns of each row's conversation,
        the environment's turns taken from the record (``env_student`` / ``env_teacher`` of ``kl``,
        :meth:`onpolicy.OnPolicySampler.sample_turns`); both passes run over the whole trajectory and the
        divergence is taken at the sampled tokens of every turn only. ``answers`` then holds per row a list of
        turns.
        """
        student_prompts, teacher_prompts = onpolicy.prompt_parts(kl)
        turns = self.sampled_turns
        engine = self.sampler.engine if self.sampler is not None else None
        engine_stats: dict[str, float] = {}
        if engine is not None and answers is None:  # the colocated engine gets the adapter every refresh_every steps
            engine.maybe_refresh(self.model, self.global_step)
            engine_stats = {"staleness": float(engine.staleness(self.global_step)),
                            "refresh_s": float(engine.stats.get("refresh_s", 0.0))}
        if turns > 1 and "env_student" not in kl:
            raise GenpiError(f"loss.kl.sampling.turns={turns}: the KL batch carries no environment turns; build "
                             f"the data module with kl_turns={turns} (genpi-train does)")
        # one layout for one turn and several: per row, its sampled turns, the environment's turns between them
        no_env = [[] for _ in student_prompts]
        env_student, env_teacher = (kl["env_student"], kl["env_teacher"]) if turns > 1 else (no_env, no_env)
        start = time.perf_counter()
        if answers is None:  # one turn: sample_turns makes exactly one sample call, under seed itself
            trajectories = self.sampler.sample_turns(self.model, student_prompts, env_student, seed + self.global_rank)
        else:
            trajectories = answers if turns > 1 else [[a] for a in answers]
        sampled = time.perf_counter()
        pad_id = self.sampler.pad_id if self.sampler is not None else 0
        device = kl["student_input_ids"].device
        batch = onpolicy.conversation_batch(student_prompts, teacher_prompts, trajectories, env_student, env_teacher,
                                            pad_id)
        n_sampled = [sum(len(t) for t in row) for row in trajectories]
        scored = {k: v.to(device) for k, v in batch.items()}
        student_h = self.hidden(scored["student_input_ids"], scored["student_attention_mask"])
        student_h = student_h[scored["student_response_mask"]]
        teacher_h = self.teacher_hidden(scored)
        weight, bias = self.lm_head()
        loss = losses.chunked_distill_loss(student_h, teacher_h, weight, kind=self.kl_kind, beta=self.kl_beta,
                                           temperature=self.kl_temperature, chunk_size=self.chunk_size,
                                           lm_head_bias=bias)
        if self.kl_kind == "reverse_kl" and self.kl_temperature == 1.0:
            reverse = loss.detach()
        else:
            with torch.no_grad():
                reverse = losses.chunked_distill_loss(student_h.detach(), teacher_h, weight.detach(),
                                                      kind="reverse_kl", chunk_size=self.chunk_size,
                                                      lm_head_bias=None if bias is None else bias.detach())
        scored_at = time.perf_counter()
        self.opcd_stats = {"sample_s": sampled - start, "score_s": scored_at - sampled,
                           "sampled_len": sum(n_sampled) / max(1, len(trajectories)),
                           "turns": sum(len(row) for row in trajectories) / max(1, len(trajectories)),
                           "reverse_kl": float(reverse),
                           **engine_stats}
        # Token mean over this batch's sampled tokens (and over the ranks'): the window's token totals the data
        # module counts are those of the synthesized answers, which an on-policy batch does not use.
        return self._global_token_mean(loss, student_h.shape[0])

    def compute(self, batch: dict[str, Any], val: bool = False) -> dict[str, torch.Tensor]:
        """Each active term on its own sequences; in validation ``kl`` (online) is measured whatever its weight."""
        out: dict[str, torch.Tensor] = {}
        window = {} if val else (batch.get("window") or {})
        k = int(window.get("accumulate", 1))
        for term in ("sft", "pg"):
            if self.weights[term] > 0 and term in batch:
                out[term] = self.ce_loss(batch[term], window.get(term), k)
        self.opcd_stats = {}
        if "kl" in batch and (self.weights["kl"] > 0 or val):
            on_policy, seed = self.sampler.draw() if self.sampler is not None and not val else (False, 0)
            if on_policy:
                out["kl"] = self.on_policy_kl_loss(batch["kl"], seed)
            elif not val:
                out["kl"] = self.kl_loss(batch["kl"], window_tokens=window.get("kl"), accumulate=k)
            elif self.has_adapter:
                out["kl"] = self.kl_loss(batch["kl"], teacher="online")
            elif "teacher_topk_ids" in batch["kl"]:
                # full fine-tuning: the model with its adapter "off" is the trained model itself, so the only
                # teacher left to compare with is the one stored at synthesis
                out["kl"] = self.kl_loss(batch["kl"], teacher="cached")
        total = sum(self.weights[t] * v for t, v in out.items() if self.weights[t] > 0)
        out["loss"] = total if torch.is_tensor(total) else torch.zeros((), device=self.device)
        return out

    # -- Lightning hooks ---------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.compute(batch)
        bs = _batch_size(batch)
        for k, v in out.items():
            self.log(f"train/{k}", v.detach(), on_step=True, on_epoch=False, prog_bar=k == "loss", batch_size=bs)
        self.log("train/tokens", float(_tokens(batch)), on_step=True, reduce_fx="sum", batch_size=bs)
        if self.sampler is not None:
            self.log("train/opcd_on_policy", float(bool(self.opcd_stats)), on_step=True, on_epoch=False,
                     batch_size=bs)
            for k, v in self.opcd_stats.items():
                self.log(f"train/opcd_{k}", float(v), on_step=True, on_epoch=False, batch_size=bs)
        return out["loss"]

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._backward_start = time.perf_counter() if self.opcd_stats else None

    def on_after_backward(self) -> None:
        if self._backward_start is not None:  # the backward pass of an on-policy batch
            self.log("train/opcd_backward_s", time.perf_counter() - self._backward_start, on_step=True,
                     on_epoch=False, batch_size=1)
            self._backward_start = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.compute(batch, val=True)
        bs = _batch_size(batch)
        for k, v in out.items():
            self.log(f"val/{k}", v, on_step=False, on_epoch=True, prog_bar=k in ("loss", "kl"), batch_size=bs,
                     sync_dist=True)

    def configure_optimizers(self):
        from transformers import get_scheduler

        cfg = self.optim_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise GenpiError("no trainable parameters: enable model.lora or full fine-tuning")
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        # transformers' schedules: linear warm-up from 0, then cosine / linear decay to 0, or constant
        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
        sched = get_scheduler(name, opt, num_warmup_steps=int(cfg.warmup_ratio * total), num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)
        if self.sampler is not None and "genpi_opcd_sampler" in checkpoint:
            self.sampler.load_state_dict(checkpoint["genpi_opcd_sampler"])

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint holds only the trainable weights, loaded non-strictly: check by name that they are this
        run's (another LoRA rank, target set or full fine-tuning would otherwise load partly and silently)."""
        stored = checkpoint.get("genpi_trainable_keys")
        if stored is None:
            return
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(trainable - set(stored)), sorted(set(stored) - trainable)
        shapes = {n: tuple(p.shape) for n, p in self.named_parameters() if p.requires_grad}
        reshaped = sorted(k for k, v in (checkpoint.get("state_dict") or {}).items()
                          if k in shapes and tuple(v.shape) != shapes[k])
        if missing or unexpected or reshaped:
            example = (missing or unexpected or reshaped)[0]
            raise GenpiError(f"the checkpoint holds the trainable weights of another setup ({len(missing)} of this "
                             f"run's missing, {len(unexpected)} unknown, {len(reshaped)} of another shape, e.g. {example}): resume it with the model and "
                             "model.lora settings it was trained with, or start a new run (another run_name)")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen base weights are rebuilt from the model config; only what trains is saved.
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["genpi_trainable_keys"] = sorted(trainable)
        if self.sampler is not None:  # a resumed run continues the same draws, so it samples the same tokens
            checkpoint["genpi_opcd_sampler"] = self.sampler.state_dict()
            if self.sampler.engine is not None:  # the checkpoint needs only the adapter snapshot in use
                self.sampler.engine.prune()


def _batch_size(batch: dict[str, Any]) -> int:
    for key, part in batch.items():
        if key == "window":
            continue
        for v in part.values():
            return int(v.shape[0])
    return 0


def _tokens(batch: dict[str, Any]) -> int:
    n = 0
    for key, part in batch.items():
        if key == "window":
            continue
        if key == "kl":
            n += int(part["student_attention_mask"].sum()) + int(part["teacher_attention_mask"].sum())
        else:
            n += int(part["attention_mask"].sum())
    return n
