"""genpi-serve as users run it: a real vLLM server (CPU build) on the tiny model with an adapter trained on
AgentBench's own OS prompt (``../shared/agentbench/os.prompt.txt``; skipped when absent).

One student server for the module (with an API key), one teacher server for its test; the reference answers come
from genpi's own evaluation path (its vLLM worker on the exact token ids genpi-eval builds), in one worker run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.test_serve_match import AGENTBENCH, agentbench_first_request

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = AGENTBENCH / "os.prompt.txt"
API_KEY = "test-key-not-secret"
MAX_TOKENS = 24
PROBLEMS = ['tell me how many files are in the directory "/usr/lib"?',
            "What is the PID of the process listening on port 8080?"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cmd(output_root: Path, *overrides: str) -> list[str]:
    # no prefix caching: every request is computed in full, as genpi-eval's reference answers are (a cached prefix
    # may round differently, and a random tiny model's greedy choice can flip on such a difference)
    return [sys.executable, "-m", "genpi.serve", f"paths.output_root={output_root}", f"task.prompt_path={PROMPT}",
            "serve.echo_log=false", 'serve.extra_args=["--no-enable-prefix-caching"]',
            "serve.ready_timeout_s=3000", *overrides]  # a machine shared with other jobs can start vLLM slowly


class Server:
    """A genpi-serve process started as a user starts it; ``url`` once it printed its ``serving on`` line."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float = 3100) -> None:
        self.log_path = log_path
        self.stdout: list[str] = []
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True)
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.stdout.append(line)
                if line.startswith("serving on "):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(timeout_s)
        lines = [ln for ln in self.stdout if ln.startswith("serving on ")]
        if not lines:
            self.stop()
            raise RuntimeError(f"genpi-serve did not start; stdout: {''.join(self.stdout)[-2000:]}; stderr: "
                               f"{log_path.read_text()[-2000:]}")
        assert len(lines) == 1 and re.fullmatch(r"serving on http://127\.0\.0\.1:\d+\n", lines[0])
        self.url = lines[0].split()[-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log_text(self) -> str:
        run_logs = "".join(p.read_text() for p in Path(self.log_path).parent.glob("serve/*/vllm_server.log"))
        return self.log_path.read_text() + run_logs


def post(url: str, path: str, body: dict, key: str | None = API_KEY) -> tuple[int, dict, dict | list]:
    """``(status, headers, JSON body)``; a streamed body is returned as the list of its ``data:`` events."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            headers = {k.lower(): v for k, v in resp.headers.items()}
            raw = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, {"error": err.read().decode()}
    if body.get("stream"):
        events = [ln[len("data: "):] for ln in raw.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return status, headers, [json.loads(e) for e in events[:-1]]
    return status, headers, json.loads(raw)


def chat(url: str, messages: list[dict], model: str, stream: bool = False, key: str | None = API_KEY):
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return post(url, "/v1/chat/completions", body, key)


def reply_text(body) -> str:
    if isinstance(body, list):  # streamed
        return "".join((c["choices"][0]["delta"].get("content") or "") for c in body if c.get("choices"))
    return body["choices"][0]["message"]["content"]


def metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=60).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("genpi:"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# -- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def os_task():
    if not PROMPT.is_file():
        pytest.skip("../shared/agentbench/os.prompt.txt is absent")
    from omegaconf import OmegaConf

    from genpi.tasks import build_task

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "genpi" / "conf" / "task" / "os.yaml"))
    return build_task(**{**cfg, "prompt_path": str(PROMPT)})


@pytest.fixture(scope="module")
def output_root(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def run_dir(os_task, output_root):
    """A run whose adapter internalized AgentBench's OS prompt (two steps: the test is about serving, not skill).

    Its records are the built-in OS samples with their prompt label removed: genpi refuses records labelled with
    another prompt than the task's, and trains unlabelled ones as the task's."""
    data = output_root / "agentbench_os.jsonl"
    with (ROOT / "genpi" / "tasks" / "samples" / "os.jsonl").open(encoding="utf-8") as src:
        rows = [{**json.loads(line), "context": "", "context_id": ""} for line in src]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]), encoding="utf-8")
    from genpi.train import train
    from tests.helpers import compose_cfg

    # in this process: training's command line is tested elsewhere, and a process of its own imports for 6 s here
    out = train(compose_cfg("train", [f"task.prompt_path={PROMPT}", f"data.path={data}", "trainer.max_steps=2",
                                      "data.max_records=16", "validate_before_fit=false", "logger=csv"], output_root))
    found = list((output_root / "runs").glob("*/adapter/adapter_config.json"))
    assert len(found) == 1 and found[0].parent.parent == Path(out["run_dir"])
    return found[0].parent.parent


@pytest.fixture(scope="module")
def student(run_dir, output_root):
    server = Server(_serve_cmd(output_root, f"run_dir={run_dir}", f"serve.port={_free_port()}"),
                    {**_env(), "GENPI_SERVE_API_KEY": API_KEY}, output_root / "student.stderr")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer():
    from genpi.models.factory import load_tokenizer

    return load_tokenizer({"name_or_path": "tiny"})


def _greedy(tokenizer, sets, adapter_dir, workdir: Path) -> dict[str, list[str]]:
    """genpi-eval's greedy answers for these prompt sets, through its vLLM worker."""
    from genpi.evaluate import _stop_ids
    from genpi.evaluation import generation
    from genpi.models.factory import resolve_model_path

    job = generation.vllm_job(resolve_model_path({"name_or_path": "tiny"}), "float32", adapter_dir, sets, MAX_TOKENS,
                              _stop_ids(tokenizer))
    result = generation.run_vllm_worker(job, workdir, timeout_s=3000)
    return {s.name: [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in result["outputs"][s.name]]
            for s in sets}


@pytest.fixture(scope="module")
def prompt_ids(os_task, tokenizer):
    """The token ids genpi-eval builds: the student's (no prompt) and the teacher's (the prompt, then the input)."""
    from genpi.data.tokenize import encode, render, student_prefix_ids

    return {"student": [student_prefix_ids(tokenizer, os_task, x) for x in PROBLEMS],
            "teacher": [encode(tokenizer, render(tokenizer, os_task.teacher_messages(x), add_generation_prompt=True))
                        for x in PROBLEMS]}


@pytest.fixture(scope="module")
def references(run_dir, tokenizer, prompt_ids, output_root):
    """genpi-eval's greedy answers through one vLLM worker: the student (adapter, no prompt) and the teacher (the
    base with the prompt: the worker sends its requests without the adapter)."""
    from genpi.evaluation.generation import PromptSet

    return _greedy(tokenizer, [PromptSet("student", prompt_ids["student"], adapter=True),
                               PromptSet("teacher", prompt_ids["teacher"], adapter=False)],
                   run_dir / "adapter", output_root / "reference")


@pytest.fixture(scope="module")
def reference(references, prompt_ids):
    """What genpi's evaluation answers for the student, and the ids it reads."""
    return {"answers": {"student": references["student"]}, "student_ids": prompt_ids["student"],
            "teacher_ids": prompt_ids["teacher"]}


@pytest.fixture(scope="module")
def teacher_reference(references, prompt_ids):
    """What genpi's evaluation answers for the teacher (the base with the prompt)."""
    return {"answers": {"teacher": references["teacher"]}, "student_ids": prompt_ids["student"],
            "teacher_ids": prompt_ids["teacher"]}


@pytest.fixture(scope="module")
def teacher(os_task, output_root):
    server = Server(_serve_cmd(output_root, "serve.mode=teacher", f"serve.port={_free_port()}"), _env(),
                    output_root / "teacher.stderr")
    yield server
    server.stop()


# -- tests -----------------------------------------------------------------------------------------------------------
def _n_tokens(tokenizer, messages: list[dict]) -> int:
    from genpi.data.tokenize import encode, render

    return len(encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True)))


def test_agentbench_first_request_gets_the_students_answer(student, reference, os_task, tokenizer):
    for k, problem in enumerate(PROBLEMS):
        messages = agentbench_first_request(os_task, problem)
        status, headers, body = chat(student.url, messages, "genpi-student")
        assert status == 200, body
        assert headers["x-genpi-prompt"] == "stripped" and headers["x-genpi-prompt-stripped"] == "yes"
        # the model read exactly genpi's student input: the prompt's tokens were saved, and the header says how many
        assert body["usage"]["prompt_tokens"] == len(reference["student_ids"][k])
        assert int(headers["x-genpi-tokens-saved"]) == _n_tokens(tokenizer, messages) - len(reference["student_ids"][k])
        assert int(headers["x-genpi-tokens-saved"]) > 500
        assert reply_text(body).strip() == reference["answers"]["student"][k]


def test_edited_or_missing_prompt_is_forwarded_unchanged(student, reference, os_task, tokenizer):
    from genpi.data.tokenize import encode, render

    messages = agentbench_first_request(os_task, PROBLEMS[0])
    edited = [{**messages[0], "content": messages[0]["content"].replace("linux(ubuntu)", "linux(debian)")}] \
        + messages[1:]
    status, headers, body = chat(student.url, edited, "genpi-student")
    assert status == 200
    assert (headers["x-genpi-prompt"], headers["x-genpi-prompt-stripped"], headers["x-genpi-tokens-saved"]) == \
        ("differs", "no", "0")
    assert body["usage"]["prompt_tokens"] == len(encode(tokenizer, render(tokenizer, edited, add_generation_prompt=True)))
    deadline = time.monotonic() + 10
    while "linux(debian)" not in student.log_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert re.search(r"WARNING.*prompt not stripped.*'linux\(debian\)' instead of 'linux\(ubuntu\)'",
                     student.log_text())
    plain = [{"role": "user", "content": PROBLEMS[0]}]
    status, headers, body = chat(student.url, plain, "genpi-student")
    assert (status, headers["x-genpi-prompt"], headers["x-genpi-tokens-saved"]) == (200, "absent", "0")
    assert body["usage"]["prompt_tokens"] == len(reference["student_ids"][0])
    assert reply_text(body).strip() == reference["answers"]["student"][0]


def test_completions_pass_unchanged_and_the_key_is_required(student, os_task, tokenizer):
    text = os_task.prompt_text + "\n" + PROBLEMS[0]
    status, headers, body = post(student.url, "/v1/completions",
                                 {"model": "genpi-student", "prompt": text, "max_tokens": 4, "temperature": 0})
    assert status == 200 and "x-genpi-prompt" not in headers
    assert body["usage"]["prompt_tokens"] == len(tokenizer(text)["input_ids"])
    before = metrics(student.url)
    status, headers, _ = chat(student.url, agentbench_first_request(os_task, PROBLEMS[0]), "genpi-student", key=None)
    assert status == 401
    status, _, _ = chat(student.url, agentbench_first_request(os_task, PROBLEMS[0]), "genpi-student", key="wrong")
    assert status == 401
    assert metrics(student.url) == before  # refused requests are not counted
    assert API_KEY not in student.log_text()


def test_concurrent_requests_streaming_and_not_are_counted_exactly(student, reference, os_task, tokenizer):
    request = agentbench_first_request(os_task, PROBLEMS[0])
    saved = _n_tokens(tokenizer, request) - len(reference["student_ids"][0])
    before = metrics(student.url)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: chat(student.url, request, "genpi-student", stream=i % 2 == 0), range(16)))
    assert [r[0] for r in results] == [200] * 16
    for _, headers, body in results:
        assert headers["x-genpi-prompt-stripped"] == "yes" and int(headers["x-genpi-tokens-saved"]) == saved
        # batched decoding may round differently from a lone request: an answer is asked for, not the same answer
        assert reply_text(body).strip()
    streamed = [body for _, _, body in results if isinstance(body, list)]
    assert len(streamed) == 8 and all(len(b) > 2 for b in streamed)
    after = metrics(student.url)
    key = 'genpi:chat_requests_total{prompt="stripped"}'
    assert after[key] - before.get(key, 0) == 16
    assert after["genpi:prompt_tokens_saved_total"] - before.get("genpi:prompt_tokens_saved_total", 0) == 16 * saved
    assert any(line.startswith("vllm:") for line in
               urllib.request.urlopen(student.url + "/metrics", timeout=60).read().decode().splitlines())


def test_bad_inputs_fail_in_one_line(student, run_dir, output_root):
    port = student.url.rsplit(":", 1)[1]
    cases = {
        "run folder not found": [f"run_dir={output_root / 'no-such-run'}"],
        "was trained on base model": [f"run_dir={run_dir}", "model.tiny.seed=1", "serve.port=1"],
        f"port {port} on 127.0.0.1 is in use": [f"run_dir={run_dir}", f"serve.port={port}"],
        "serve.mode='coach' is not allowed": ["serve.mode=coach"],
    }
    # The table runs in-process (the checks genpi-serve makes before starting anything); one case goes through
    # the command line, for its one-line message and exit status.
    from genpi import schema
    from genpi.serve import plan_server
    from genpi.utils.errors import GenpiError
    from tests.helpers import compose_cfg

    for expected, overrides in cases.items():
        cfg = compose_cfg("serve", [f"task.prompt_path={PROMPT}", *overrides], output_root / "bad")
        with pytest.raises(GenpiError) as err:
            schema.read(cfg.get("serve"), schema.Serve, "serve")
            plan_server(cfg)
        assert expected in str(err.value) and "\n" not in str(err.value)
    proc = subprocess.run(_serve_cmd(output_root, *cases["serve.mode='coach' is not allowed"]), env=_env(),
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("genpi: error: ") and "serve.mode='coach'" in lines[0], proc.stderr
    assert "serving on" not in proc.stdout and "Traceback" not in proc.stderr


def test_the_server_runs_without_torch_compile_on_a_cpu(run_dir, output_root, monkeypatch):
    """As genpi's other vLLM processes (tests/test_eval.py): the sampler's small ops run eagerly without a GPU."""
    import torch

    from genpi.serve import plan_server
    from tests.helpers import compose_cfg

    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    cfg = compose_cfg("serve", [f"task.prompt_path={PROMPT}", f"run_dir={run_dir}"], output_root / "plan")
    env = plan_server(cfg).env
    assert env.get("TORCH_COMPILE_DISABLE") == (None if torch.cuda.is_available() else "1")


def test_teacher_mode_answers_as_the_teacher(teacher, teacher_reference, os_task):
    reference = teacher_reference
    for k, problem in enumerate(PROBLEMS):
        status, headers, body = chat(teacher.url, [{"role": "user", "content": problem}], "genpi-teacher",
                                     key=None)
        assert status == 200
        assert headers["x-genpi-prompt"] == "injected" and headers["x-genpi-prompt-stripped"] == "no"
        assert body["usage"]["prompt_tokens"] == len(reference["teacher_ids"][k])
        assert int(headers["x-genpi-tokens-injected"]) == len(reference["teacher_ids"][k]) - len(reference["student_ids"][k])
        assert reply_text(body).strip() == reference["answers"]["teacher"][k]
    # a request that carries the prompt already is answered as it is
    status, headers, body = chat(teacher.url, agentbench_first_request(os_task, PROBLEMS[0]), "genpi-teacher", key=None)
    assert headers["x-genpi-prompt"] == "present" and reply_text(body).strip() == reference["answers"]["teacher"][0]
