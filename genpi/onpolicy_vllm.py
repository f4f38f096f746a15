"""On-policy sampling through a colocated vLLM engine (``loss.kl.sampling.engine=vllm``, issue 13).

Transformers ``generate`` in the training process is simple and exact, but slow for large models. With
``engine=vllm`` the student's answers come from a vLLM engine that runs beside the trainer, on the same machine
(and GPU), in a process of its own:

- the engine holds the frozen base weights once; the student is a LoRA adapter on it, which the trainer saves to
  ``<run_dir>/opcd_vllm/rank<k>/adapter-step<N>`` and the engine loads as a new ``LoRARequest``;
- the adapter is refreshed every ``loss.kl.sampling.refresh_every`` optimizer steps, so a sample may come from
  weights up to ``refresh_every - 1`` steps old: that staleness is logged (``train/opcd_staleness``) with the
  time a refresh takes (``train/opcd_refresh_s``);
- each answer is sampled under its own seed (a hash of the batch's seed, drawn by the on-policy generator, and the
  row), and the step of the latest refresh is saved in the checkpoint with its adapter snapshot kept until a newer
  checkpoint no longer needs it, so a run resumed from a checkpoint samples from the adapter the interrupted run
  used at that point (whether vLLM then repeats its tokens exactly is vLLM's seeded sampling; tested on the CPU
  build within one engine, not across engine processes or on a GPU).

A process of its own keeps vLLM's state (its torch.distributed group, thread pinning, memory pools) away from the
trainer's: under DDP every rank has its own engine (on a GPU, the rank's device) and its own process group. The two
talk over the engine process's stdin and stdout, one JSON object per line (the engine's other output goes to its
log). ``python -m genpi.onpolicy_vllm CONFIG`` is that process.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from genpi.schema import GenpiError

log = logging.getLogger(__name__)

READY = "genpi-opcd-vllm ready"


def keep_stop(ids: Sequence[int], finish_reason: str | None, stop_reason: Any, stop_ids: Sequence[int]) -> list[int]:
    """A sampled answer up to and including its end-of-turn token, whether or not the engine kept that token in
    its output: an answer that stopped on a stop id (``finish_reason == "stop"``) ends with it."""
    from genpi.evaluation.generation import cut_at_stop

    out = cut_at_stop(ids, stop_ids, keep_stop=True)
    kept = bool(out) and out[-1] in {int(s) for s in stop_ids}
    if not kept and finish_reason == "stop" and isinstance(stop_reason, int) and stop_reason in stop_ids:
        out.append(int(stop_reason))
    return out


class VLLMEngine:
    """The trainer's side of a colocated vLLM sampling engine (one per rank).

    Args:
        base: the base model's folder (what vLLM loads; the adapter rides on it as a LoRA request).
        lora_rank: the adapter's rank (vLLM's ``max_lora_rank``).
        work_dir: where adapter snapshots and the engine's log go (``<run_dir>/opcd_vllm/rank<k>``).
        refresh_every: optimizer steps between two adapter refreshes (1 = sample from the current weights).
        dtype: the engine's weight dtype (the training model's).
        seed: the engine's seed (each request carries its own seed too).
        max_model_len: the engine's context length; None = the model's.
        gpu_memory_utilization: share of the GPU the engine may take (the trainer needs the rest).
        kvcache_gb: ``VLLM_CPU_KVCACHE_SPACE`` without a GPU (whole GiB).
        timeout_s: how long to wait for the engine to start, or for one batch of samples.
    """

    def __init__(self, base: str, lora_rank: int, work_dir: str | Path, refresh_every: int = 1, dtype: str = "auto",
                 seed: int = 0, max_model_len: int | None = None, gpu_memory_utilization: float = 0.3,
                 kvcache_gb: int = 1, timeout_s: float = 1800.0):
        self.base = str(base)
        self.lora_rank = int(lora_rank)
        self.work_dir = Path(work_dir)
        self.refresh_every = int(refresh_every)
        self.dtype = dtype
        self.seed = int(seed)
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = float(gpu_memory_utilization)
        self.kvcache_gb = int(kvcache_gb)
        self.timeout_s = float(timeout_s)
        self.refreshed_at: int | None = None  # optimizer step of the weights the engine samples from
        self.lora_id = 0
        self.proc: subprocess.Popen | None = None
        self.stats: dict[str, float] = {}

    # -- the engine process ------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        import torch

        from genpi.evaluation.generation import vllm_subprocess_env

        # the trainer's threads use the cores too: on the CPU the engine's threads are not pinned to them
        env = vllm_subprocess_env(self.kvcache_gb, None, None if torch.cuda.is_available() else "nobind")
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "NODE_RANK"):
            env.pop(k, None)  # the engine is not a rank of the trainer's process group
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # the rank's own GPU (a child process does not inherit torch.cuda.set_device)
            index = torch.cuda.current_device()
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            env["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
        return env

    def start(self) -> None:
        if self.proc is not None:
            return
        import torch

        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = {"model": self.base, "dtype": self.dtype, "seed": self.seed, "max_lora_rank": self.lora_rank,
                  "max_model_len": self.max_model_len, "cuda": torch.cuda.is_available(),
                  "gpu_memory_utilization": self.gpu_memory_utilization}
        cfg_path = self.work_dir / "engine.json"
        cfg_path.write_text(json.dumps(config))
        t0 = time.perf_counter()
        self._log = (self.work_dir / "engine.log").open("a")
        # its own session: closing it stops vLLM's engine-core child too (killpg)
        self.proc = subprocess.Popen([sys.executable, "-m", "genpi.onpolicy_vllm", str(cfg_path)], env=self._env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     bufsize=1, start_new_session=True)
        # one thread reads the replies into a queue: a read never blocks the trainer past the timeout
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc.stdout, self._lines), daemon=True).start()
        line = self._readline()
        if line.strip() != READY:
            self._fail(f"did not start (it printed {line.strip()[:200]!r})")
        self.stats["start_s"] = time.perf_counter() - t0
        log.info("on-policy vLLM engine started in %.1f s (log: %s)", self.stats["start_s"], self.work_dir / "engine.log")

    def _readline(self) -> str:
        assert self.proc is not None
        deadline = time.time() + self.timeout_s
        while True:
            try:
                line = self._lines.get(timeout=1.0)
            except queue.Empty:
                if self.proc.poll() is not None:
                    self._fail(f"exited with code {self.proc.returncode}")
                if time.time() > deadline:
                    self._fail(f"gave no answer within {self.timeout_s:.0f} s (loss.kl.sampling.vllm.timeout_s)")
                continue
            if line is None:
                self._fail("closed its output")
            if line.startswith("genpi-opcd-vllm"):
                return line

    def _fail(self, what: str) -> None:
        from genpi.evaluation.generation import log_tail

        path = self.work_dir / "engine.log"
        self.close()
        raise GenpiError(f"the on-policy vLLM engine {what}; see {path}; last lines:\n" + log_tail(path))

    def _ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._fail("is gone (its input is closed)")
        reply = json.loads(self._readline()[len("genpi-opcd-vllm "):])
        if "error" in reply:
            self._fail(f"refused {msg['op']}: {reply['error']}")
        return reply

    def close(self) -> None:
        proc, self.proc = self.proc, None
        self.lora_id = 0  # a new engine process holds no adapter yet
        if proc is None:
            return
        try:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.write(json.dumps({"op": "close"}) + "\n")
                proc.stdin.flush()
            proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
        finally:
            try:  # the engine's whole session: vLLM's engine-core process with it
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            if getattr(self, "_log", None) is not None:
                self._log.close()

    # -- the adapter ---------------------------------------------------------------------
    def snapshot_dir(self, step: int) -> Path:
        return self.work_dir / f"adapter-step{int(step)}"

    def staleness(self, step: int) -> int:
        return 0 if self.refreshed_at is None else int(step) - self.refreshed_at

    def maybe_refresh(self, model: Any, step: int) -> None:
        """Give the engine the adapter as it is at optimizer step ``step`` when ``refresh_every`` steps have passed
        since the last refresh (or none was made). After a resume, the snapshot the interrupted run last loaded is
        loaded again, so the samples are the same."""
        step = int(step)
        due = self.refreshed_at is None or step - self.refreshed_at >= self.refresh_every or step < self.refreshed_at
        if not due and self.lora_id > 0:
            self.stats = {**self.stats, "refresh_s": 0.0}
            return
        self.start()  # the engine's start is not part of a refresh's time (it is logged on its own)
        t0 = time.perf_counter()
        if due:
            path = self.snapshot_dir(step)
            if path.exists():
                shutil.rmtree(path)
            model.save_pretrained(str(path))
            self.refreshed_at = step  # older snapshots stay until a checkpoint no longer needs them (prune)
        else:  # resumed between two refreshes: the engine starts from the kept snapshot
            path = self.snapshot_dir(self.refreshed_at)
            if not (path / "adapter_config.json").is_file():
                raise GenpiError(f"resuming on-policy sampling: the adapter snapshot {path} of step "
                                 f"{self.refreshed_at} is gone; the resumed run cannot sample what the interrupted "
                                 "one would have (restore the folder, or set loss.kl.sampling.refresh_every=1)")
        self.lora_id += 1
        self._ask({"op": "lora", "id": self.lora_id, "path": str(path)})
        self.stats = {**self.stats, "refresh_s": time.perf_counter() - t0}

    def prune(self) -> None:
        """Delete every adapter snapshot but the one in use: called when a checkpoint is saved, which records that
        one (a run resumed from it needs no other)."""
        keep = None if self.refreshed_at is None else self.snapshot_dir(self.refreshed_at).name
        for path in self.work_dir.glob("adapter-step*"):
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)

    def state_dict(self) -> dict[str, Any]:
        return {"refreshed_at": self.refreshed_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refreshed_at = state.get("refreshed_at")

    # -- sampling --------------------------------------------------------------------------
    def sample(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], temperature: float, top_p: float,
               max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
        """One answer per prompt from the adapter the engine holds, each under its own seed; an answer ends with
        its stop token when it stopped on one."""
        if self.lora_id == 0:
            raise GenpiError("on-policy vLLM sampling before any adapter was loaded (maybe_refresh first)")
        reply = self._ask({"op": "generate", "prompts": [list(map(int, p)) for p in prompts],
                           "seeds": [int(s) for s in seeds], "temperature": float(temperature),
                           "top_p": float(top_p), "max_tokens": int(max_new_tokens),
                           "stop_ids": [int(s) for s in stop_ids]})
        return [keep_stop(o["ids"], o["finish_reason"], o["stop_reason"], stop_ids) for o in reply["outputs"]]


def _pump(stream: Any, lines: queue.Queue) -> None:
    """Every line of ``stream`` into ``lines``, then None at its end."""
    try:
        for line in stream:
            lines.put(line)
    finally:
        lines.put(None)


# -- the engine process ---------------------------------------------------------------------
def serve(config: dict[str, Any]) -> None:
    """Build the engine, say ``READY``, then answer one JSON request per stdin line until ``close``."""
    # the replies get the stdout pipe to themselves: file descriptor 1 (what vLLM, its engine-core child and C code
    # print to) becomes the log
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    engine: dict[str, Any] = {"enable_lora": True, "max_lora_rank": int(config["max_lora_rank"]), "max_loras": 1,
                              "enforce_eager": not config["cuda"], "enable_prefix_caching": False}
    if config.get("max_model_len"):
        engine["max_model_len"] = int(config["max_model_len"])
    if config["cuda"]:
        engine["gpu_memory_utilization"] = float(config["gpu_memory_utilization"])
    llm = LLM(model=config["model"], dtype=config["dtype"], seed=int(config["seed"]), **engine)
    lora: LoRARequest | None = None

    def reply(obj: dict[str, Any]) -> None:
        out.write("genpi-opcd-vllm " + json.dumps(obj) + "\n")
        out.flush()

    out.write(READY + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        try:
            if msg["op"] == "close":
                break
            if msg["op"] == "lora":
                if lora is not None:
                    llm.llm_engine.remove_lora(lora.lora_int_id)
                lora = LoRARequest(f"genpi_student_{msg['id']}", int(msg["id"]), msg["path"])
                reply({"ok": True})
            elif msg["op"] == "generate":
                greedy = msg["temperature"] == 0
                params = [SamplingParams(temperature=0.0 if greedy else msg["temperature"],
                                         top_p=1.0 if greedy else msg["top_p"], top_k=0,  # 0: the full distribution
                                         max_tokens=msg["max_tokens"], stop_token_ids=msg["stop_ids"],
                                         seed=seed, detokenize=False)
                          for seed in msg["seeds"]]
                res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in msg["prompts"]], params,
                                   lora_request=lora, use_tqdm=False)
                reply({"outputs": [{"ids": list(r.outputs[0].token_ids), "finish_reason": r.outputs[0].finish_reason,
                                    "stop_reason": r.outputs[0].stop_reason} for r in res]})
            else:
                reply({"error": f"unknown op {msg['op']!r}"})
        except Exception as err:  # noqa: BLE001 - the trainer reports it with the log
            reply({"error": f"{type(err).__name__}: {err}"})


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    serve(json.loads(Path(args[0]).read_text()))


if __name__ == "__main__":
    main()
