"""Synthesis clients beyond `hf`: the OpenAI-compatible client's retries against a scripted local server
(fast), the offline vLLM engine, and the OpenAI client against a real vLLM server (slow)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from genpi.data.records import load_records
from genpi.synthesis.clients import Sampling
from genpi.synthesis.clients.openai import OpenAIClient
from genpi.utils.errors import GenpiError
from tests.helpers import CONF, compose_cfg, vllm_env

REPO = CONF.parent
SECRET = "sk-genpi-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- retries against a scripted server ---------------------------------------------------------------------
class Scripted(BaseHTTPRequestHandler):
    """Answers POSTs with the next (status, body) of the server's script; repeats the last one."""

    def do_POST(self):  # noqa: N802 - the name http.server dispatches to
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append({"body": body, "auth": self.headers.get("Authorization")})
            status, payload = srv.script[min(len(srv.requests) - 1, len(srv.script) - 1)]
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output quiet
        pass


def completion(text: str, n: int = 1) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": f"{text}{i}"}}
                        for i in range(n)]}


@pytest.fixture
def scripted_server():
    servers = []

    def start(script):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
        srv.script, srv.requests, srv.lock = script, [], threading.Lock()
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def client_for(url: str, **kw) -> OpenAIClient:
    return OpenAIClient(base_url=url, model="m", api_key_env="GENPI_TEST_KEY", timeout=5, **kw)


def test_openai_client_retries_429_and_5xx_then_succeeds(scripted_server, monkeypatch, caplog):
    monkeypatch.setenv("GENPI_TEST_KEY", SECRET)
    err = {"error": {"message": "busy", "type": "x"}}
    srv, url = scripted_server([(429, err), (503, err), (500, err), (200, completion("ok", n=2))])
    with caplog.at_level(logging.WARNING):
        out = client_for(url, max_retries=4).chat([[{"role": "user", "content": "hi"}]], Sampling(n=2, seed=3))
    assert out == ["ok0", "ok1"]
    assert len(srv.requests) == 4
    assert all(r["auth"] == f"Bearer {SECRET}" for r in srv.requests)  # the key is read from the named variable
    assert srv.requests[-1]["body"]["seed"] == 3 and srv.requests[-1]["body"]["n"] == 2
    assert SECRET not in caplog.text


def test_openai_client_gives_up_with_a_clear_error(scripted_server, monkeypatch, caplog):
    monkeypatch.setenv("GENPI_TEST_KEY", SECRET)
    srv, url = scripted_server([(502, {"error": {"message": "bad gateway"}})])
    with pytest.raises(GenpiError, match=r"failed after 3 tries") as info:
        client_for(url, max_retries=2).chat([[{"role": "user", "content": "hi"}]], Sampling())
    assert len(srv.requests) == 3 and SECRET not in str(info.value) and SECRET not in caplog.text
    # a request the server rejects (4xx other than 408/409/429) is not retried
    srv, url = scripted_server([(400, {"error": {"message": "bad request"}})])
    with pytest.raises(GenpiError, match="HTTP 400"):
        client_for(url, max_retries=5).chat([[{"role": "user", "content": "hi"}]], Sampling())
    assert len(srv.requests) == 1


def test_openai_client_unreachable_server_fails_after_retries():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    t0 = time.time()
    with pytest.raises(GenpiError, match=r"failed after 3 tries.*base_url"):
        client_for(url, max_retries=2).chat([[{"role": "user", "content": "hi"}]], Sampling())
    assert time.time() - t0 < 10


def test_openai_client_masks_a_credential_in_base_url(scripted_server):
    srv, url = scripted_server([(400, {"error": {"message": "bad request"}})])
    with_cred = url.replace("http://", f"http://user:{SECRET}@")
    client = client_for(with_cred, max_retries=0)
    with pytest.raises(GenpiError, match="HTTP 400") as info:
        client.chat([[{"role": "user", "content": "hi"}]], Sampling())
    assert SECRET not in str(info.value) and "***@127.0.0.1" in str(info.value)
    assert SECRET not in json.dumps(client.describe())
    assert srv.requests[0]["auth"].startswith("Basic ")  # the credential still reaches the server, as basic auth


def test_openai_client_keeps_order_under_concurrency(scripted_server):
    srv, url = scripted_server([(200, completion("a"))])
    convs = [[{"role": "user", "content": str(i)}] for i in range(12)]
    out = client_for(url, max_concurrency=4).chat(convs, Sampling())
    assert out == ["a0"] * 12
    assert sorted(r["body"]["messages"][0]["content"] for r in srv.requests) == sorted(str(i) for i in range(12))


# -- the offline vLLM engine ----------------------------------------------------------------------------
VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from omegaconf import OmegaConf

    if __name__ == "__main__":
        from genpi.synthesis.clients import Sampling, make_client
        from genpi.synthesis.roleswap import role_swap
        from genpi.tasks import build_task

        task = build_task(**OmegaConf.to_container(OmegaConf.load(sys.argv[1]), resolve=True))
        model = OmegaConf.to_container(OmegaConf.load(sys.argv[3]), resolve=True)
        # float32: bf16 (the CPU default) lets batch shape change greedy argmaxes
        client = make_client("vllm", model, {"enforce_eager": True, "dtype": "float32"})
        s = Sampling(temperature=0.0, max_tokens=10)
        inputs = [f"delete the temporary files in /tmp/job{i}" for i in range(4)]
        batched = role_swap(task, inputs, client, client, s, s, max_turns=3)
        single = [role_swap(task, [x], client, client, s, s, max_turns=3)[0] for x in inputs]
        topk = client.topk_logprobs([list(range(5, 30))], [10], 4)
        json.dump({"same": [b.turns == o.turns for b, o in zip(batched, single)],
                   "turns": [len(b.turns) for b in batched], "topk": topk}, open(sys.argv[2], "w"))
    """
)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_role_swap_and_teacher_logits(tmp_path, tiny_path, tiny_model):
    import torch

    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    out = tmp_path / "out.json"
    args = [str(CONF / "task" / "os.yaml"), str(out), str(CONF / "model" / "tiny.yaml")]
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO,
                          env=vllm_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert all(res["same"]) and all(1 <= n <= 5 for n in res["turns"])
    ids, lps = res["topk"][0]
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(torch.tensor([list(range(5, 30))])).logits[0].float(), -1)
    want = logp[9:24].max(-1).values  # positions 9..23 predict tokens 10..24
    assert len(ids) == 15 and all(len(r) == 4 for r in ids)
    assert torch.allclose(torch.tensor([r[0] for r in lps]), want, atol=0.05)  # the engine may run in bf16


@pytest.mark.slow
@pytest.mark.vllm
def test_genpi_synth_with_vllm_writes_a_dataset_training_reads(tmp_path, tiny_path):
    args = [f"paths.output_root={tmp_path}", "task=os", "synth.client=vllm", "synth.teacher_logits.client=vllm",
            "synth.stages=[pseudo_inputs,outputs,reasons,conversations,teacher_logits]",
            "synth.pseudo_inputs.num_inputs=6", "synth.conversations.max_turns=2", "synth.progress=false",
            "synth.outputs.sampling.max_tokens=16", "synth.conversations.sampling.max_tokens=16",
            "synth.conversations.env_sampling.max_tokens=16", "synth.reasons.sampling.max_tokens=16"]
    proc = subprocess.run([sys.executable, "-m", "genpi.synth", *args], cwd=REPO, env=vllm_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("dataset: ")
    folder = Path(last.split("dataset: ", 1)[1])
    records = load_records(folder)
    assert len(records) == 6 and all(r["teacher_output_conv"] for r in records)
    assert all(len(r["teacher_topk_ids"]) >= 1 for r in records)
    card = json.loads((folder / "card.json").read_text())
    assert {s["client"] for n, s in card["stages"].items() if n != "pseudo_inputs"} == {"vllm"}


# -- the OpenAI client against a real vLLM server -------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_server(tiny_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_path),
             "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
             "--seed", "0"],
            env=vllm_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vLLM server not ready after 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.vllm
def test_openai_client_against_vllm_server(vllm_server, tiny_model):
    import torch

    client = OpenAIClient(base_url=vllm_server, model="tiny", max_concurrency=4)
    convs = [[{"role": "user", "content": f"list the files in /srv/{i}"}] for i in range(3)]
    greedy = client.chat(convs, Sampling(max_tokens=8))
    assert len(greedy) == 3 and greedy == client.chat(convs, Sampling(max_tokens=8))
    assert len(client.chat(convs[:2], Sampling(temperature=1.0, top_p=0.9, max_tokens=8, n=2, seed=1))) == 4
    ids, lps = client.topk_logprobs([list(range(5, 30))], [10], 3)[0]
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(torch.tensor([list(range(5, 30))])).logits[0].float(), -1)
    assert len(ids) == 15 and torch.allclose(torch.tensor([r[0] for r in lps]), logp[9:24].max(-1).values, atol=0.05)


@pytest.mark.slow
@pytest.mark.vllm
def test_synth_run_through_the_openai_client(vllm_server, tmp_path, tiny_path):
    from genpi.synth import run_synthesis

    cfg = compose_cfg("synth", [
        "synth.client=openai", f"synth.clients.openai.base_url={vllm_server}", "synth.clients.openai.model=tiny",
        "synth.stages=[pseudo_inputs,outputs,reasons,conversations]", "synth.pseudo_inputs.num_inputs=4",
        "synth.conversations.max_turns=2", "synth.progress=false", "synth.outputs.sampling.max_tokens=12",
        "synth.reasons.sampling.max_tokens=12", "synth.conversations.sampling.max_tokens=12",
        "synth.conversations.env_sampling.max_tokens=12",
    ], tmp_path)
    folder = run_synthesis(cfg)
    records = load_records(folder)
    assert len(records) == 4 and all(r["teacher_output_conv"][0]["role"] == "assistant" for r in records)
    card = json.loads((folder / "card.json").read_text())
    assert card["stages"]["outputs"]["client"] == "openai" and card["stages"]["outputs"]["computed"] == 4
