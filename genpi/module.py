"""The LightningModule: a student pass (no prompt) and a teacher pass (same weights, adapter off,
with the prompt), weighted into KL + SFT + PG."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytorch_lightning as pl
import torch

from genpi import losses
from genpi.data.tokenize import IGNORE
from genpi.errors import GenpiError
from genpi.models.prefix import (
    choose_teacher_attention,
    common_prefix_length,
    hidden_after_prefix,
    hidden_after_shared_prefix,
    prefix_kv,
    shared_prefix_hidden,
)
from genpi.schema import TeacherAttention, read

TERMS = ("kl", "sft", "pg")
# A shared prefix shorter than this is not worth a separate pass (chat headers, the PG instruction's first line).
MIN_SHARED_PREFIX = 64


def loss_weights(loss_cfg: dict[str, Any]) -> dict[str, float]:
    return {t: float((loss_cfg.get(t) or {}).get("weight", 0.0)) for t in TERMS}


def active_terms(loss_cfg: dict[str, Any]) -> tuple[str, ...]:
    """The sequences the data module must build for training: a term of weight 0 is not built."""
    w = loss_weights(loss_cfg)
    return tuple(t for t in TERMS if w[t] > 0)


class GenPIModule(pl.LightningModule):
    """GenPI training on one model.

    Args:
        model: a causal LM, usually a ``peft.PeftModel`` (the teacher is the base with the adapter off).
        loss: the ``conf/loss`` group as a dict: ``{kl: {weight, kind, beta, temperature, teacher,
            prefix_cache, teacher_attention}, sft: {weight}, pg: {weight, reason}, chunk_size}``.
        optim: ``{lr, weight_decay, betas, warmup_ratio, scheduler: cosine|linear|constant}``.
        teacher_prompt_ids: the prompt's token ids, a common prefix of every teacher sequence.
    """

    def __init__(self, model: torch.nn.Module, loss: dict[str, Any], optim: dict[str, Any],
                 teacher_prompt_ids: list[int]):
        super().__init__()
        self.model = model
        self.loss_cfg = loss
        self.optim_cfg = optim
        self.weights = loss_weights(loss)
        self.teacher_prompt_ids = list(teacher_prompt_ids)
        self.chunk_size = int(loss.get("chunk_size", 1024))
        kl = loss.get("kl") or {}
        self.kl_kind = kl.get("kind", "forward_kl")
        self.kl_beta = float(kl.get("beta", 0.5))
        self.kl_temperature = float(kl.get("temperature", 1.0))
        self.teacher_source = kl.get("teacher", "online")
        self.prefix_cache = bool(kl.get("prefix_cache", True))
        self.teacher_attention = read(kl, TeacherAttention, "loss.kl").requested
        self.last_teacher_path: tuple[str, str] | None = None  # (path, why) of the latest teacher pass
        self.has_adapter = hasattr(model, "disable_adapter")
        if self.weights["kl"] > 0 and self.teacher_source == "online" and not self.has_adapter:
            raise GenpiError(
                "loss.kl with an online teacher needs a LoRA adapter (the teacher is the base with the adapter off); "
                "set model.lora.enabled=true or loss.kl.teacher=cached"
            )
        self._prompt_kv: tuple[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        # Checkpoints hold only trainable weights (the adapter), so loading one must not demand the base.
        self.strict_loading = False
        self.save_hyperparameters({"loss": loss, "optim": optim})

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
    def ce_loss(self, part: dict[str, torch.Tensor]) -> torch.Tensor:
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
        return self._global_token_mean(loss, int(keep.sum()))

    def _global_token_mean(self, loss: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Rescale a rank's token mean so that DDP's gradient average is the mean over all ranks' tokens
        (the same as one process on the global batch), not a mean of per-rank means."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return loss
        n = torch.tensor(float(n_tokens), device=loss.device)
        total = self.trainer.strategy.reduce(n.clone(), reduce_op="sum")
        return loss * (n * trainer.world_size / total.clamp_min(1.0))

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

    def kl_loss(self, kl: dict[str, torch.Tensor], teacher: str | None = None) -> torch.Tensor:
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
        return self._global_token_mean(loss, student_h.shape[0])

    def compute(self, batch: dict[str, Any], val: bool = False) -> dict[str, torch.Tensor]:
        """Each active term on its own sequences; in validation ``kl`` (online) is measured whatever its weight."""
        out: dict[str, torch.Tensor] = {}
        for term in ("sft", "pg"):
            if self.weights[term] > 0 and term in batch:
                out[term] = self.ce_loss(batch[term])
        if "kl" in batch and (self.weights["kl"] > 0 or val):
            out["kl"] = self.kl_loss(batch["kl"], teacher="online" if val and self.has_adapter else None)
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
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.compute(batch, val=True)
        bs = _batch_size(batch)
        for k, v in out.items():
            self.log(f"val/{k}", v, on_step=False, on_epoch=True, prog_bar=k in ("loss", "kl"), batch_size=bs,
                     sync_dist=True)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise GenpiError("no trainable parameters: enable model.lora or full fine-tuning")
        opt = torch.optim.AdamW(params, lr=float(cfg.get("lr", 1e-4)), weight_decay=float(cfg.get("weight_decay", 0.0)),
                                betas=tuple(cfg.get("betas", (0.9, 0.999))))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(float(cfg.get("warmup_ratio", 0.03)) * total)
        kind = cfg.get("scheduler", "cosine")

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            if kind == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            if kind == "linear":
                return max(0.0, 1 - progress)
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen base weights are rebuilt from the model config; only what trains is saved.
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["genpi_trainable_keys"] = sorted(trainable)


def _batch_size(batch: dict[str, Any]) -> int:
    for part in batch.values():
        for v in part.values():
            return int(v.shape[0])
    return 0


def _tokens(batch: dict[str, Any]) -> int:
    n = 0
    for key, part in batch.items():
        if key == "kl":
            n += int(part["student_attention_mask"].sum()) + int(part["teacher_attention_mask"].sum())
        else:
            n += int(part["attention_mask"].sum())
    return n
