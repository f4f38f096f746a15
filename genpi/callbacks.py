"""Trainer callbacks of genpi."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class Throughput(pl.Callback):
    """Wall time per optimizer step and tokens per second over the run (the first step, which
    includes one-off work such as building the prompt cache, is left out)."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.tokens = 0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from genpi.module import _tokens

        dt = time.perf_counter() - self._t0
        if batch_idx > 0 or trainer.current_epoch > 0:
            self.step_times.append(dt)
            self.tokens += _tokens(batch)

    def summary(self) -> dict[str, float]:
        if not self.step_times:
            return {}
        total = sum(self.step_times)
        return {"perf/step_time_s": total / len(self.step_times), "perf/tokens_per_s": self.tokens / total}
