"""Synthesis on the tiny model through the `hf` client: every stage, role swapping, the store and resume,
bad input. The vLLM engine and the OpenAI-compatible client are in test_synth_clients.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genpi.data.records import COLUMNS, load_records
from genpi.synthesis.clients import ChatClient, Sampling
from genpi.synthesis.roleswap import role_swap
from genpi.synthesis.store import Shard, Store
from genpi.tasks import build_task
from genpi.tasks.base import Task, builtin_task
from genpi.utils.errors import GenpiError
from tests.helpers import CONF, compose_cfg

REPO = CONF.parent
GREEDY = Sampling(temperature=0.0, max_tokens=12)
ALL_STAGES = "synth.stages=[pseudo_inputs,outputs,reasons,conversations,teacher_logits]"


def small(n: int = 4, chunk: int = 4, turns: int = 2, tokens: int = 8) -> list[str]:
    """Overrides that keep a synth run on the tiny model to a second or two."""
    return [
        f"synth.pseudo_inputs.num_inputs={n}", f"synth.chunk_size={chunk}", f"synth.conversations.max_turns={turns}",
        f"synth.outputs.sampling.max_tokens={tokens}", f"synth.reasons.sampling.max_tokens={tokens}",
        f"synth.conversations.sampling.max_tokens={tokens}", f"synth.conversations.env_sampling.max_tokens={tokens}",
        "synth.progress=false", "synth.teacher_logits.top_k=5",
    ]



def synth(tmp_path: Path, overrides: list[str]) -> Path:
    from genpi.synth import run_synthesis

    return run_synthesis(compose_cfg("synth", overrides, tmp_path))


def card_of(folder: Path) -> dict:
    return json.loads((folder / "card.json").read_text())


class ScriptedClient(ChatClient):
    """A client whose answer is a function of the conversation; records every batched call."""

    name = "scripted"

    def __init__(self, reply, context_length: int | None = None):
        self.reply = reply
        self.calls: list[list[list[dict]]] = []
        self.context_length = context_length

    def chat(self, conversations, sampling, seeds=None):
        self.calls.append([list(c) for c in conversations])
        return [self.reply(c) for c in conversations for _ in range(sampling.n)]

    def prompt_lengths(self, conversations):
        return [sum(len(m["content"]) for m in c) for c in conversations]


def unit_task(**kw) -> Task:
    base = dict(name="unit", prompt_turns=[{"role": "system", "content": "You operate a shell."},
                                           {"role": "user", "content": "My problem is:"}],
                env_persona="You are a shell. The user's task: {input}", end_token="<END>", max_turns=4, parser=None,
                inputs_file="os.txt")
    base.update(kw)
    return Task(**base)


# -- role swapping ---------------------------------------------------------------------------------------
def _agent(conv):
    return f"act {sum(m['role'] == 'assistant' for m in conv)}"


def _env(conv):
    task_line = conv[0]["content"]
    turn = sum(m["role"] == "user" for m in conv)
    return "done <END> trailing" if "quick" in task_line and turn == 2 else f"out {turn}"


def test_role_swap_alternates_ends_on_token_and_turn_limit():
    task = unit_task()
    agent, env = ScriptedClient(_agent), ScriptedClient(_env)
    convs = role_swap(task, ["quick job", "long job", "other job"], agent, env, GREEDY, GREEDY)
    quick, long_, other = convs
    for c in convs:
        roles = [t["role"] for t in c.turns]
        assert roles[0] == "assistant" and all(a != b for a, b in zip(roles, roles[1:]))
    # the end token: text before it kept as the last environment turn, the rest dropped
    assert quick.ended_by == "end_token" and quick.turns[-1] == {"role": "user", "content": "done"}
    assert [t["content"] for t in quick.turns] == ["act 0", "out 1", "act 1", "done"]
    # the turn limit counts agent turns; the conversation ends on the agent
    assert long_.ended_by == other.ended_by == "max_turns"
    assert sum(t["role"] == "assistant" for t in long_.turns) == task.max_turns and long_.turns[-1]["role"] == "assistant"
    # one batched call per turn and side over the conversations still running
    assert [len(c) for c in agent.calls] == [3, 3, 2, 2]
    assert [len(c) for c in env.calls] == [3, 3, 2]
    # the agent sees the prompt then its own turns as assistant; the environment sees them swapped
    assert agent.calls[1][0][: len(task.teacher_messages("quick job"))] == task.teacher_messages("quick job")
    first_env = env.calls[0][0]
    assert first_env == [{"role": "system", "content": "You are a shell. The user's task: quick job"},
                         {"role": "user", "content": "act 0"}]
    assert env.calls[1][0][2] == {"role": "assistant", "content": "out 1"}


def test_role_swap_reuses_first_turns_and_respects_context():
    task = unit_task(max_turns=3)
    agent = ScriptedClient(_agent)
    convs = role_swap(task, ["a", "b"], agent, ScriptedClient(_env), GREEDY, GREEDY, first_turns=["T0", "T1"])
    assert [c.turns[0]["content"] for c in convs] == ["T0", "T1"]
    assert len(agent.calls) == 2  # turn 0 came from the teacher's answers
    # a context too small for the next prompt + max_tokens ends the conversation instead of failing the batch
    tight = ScriptedClient(_agent, context_length=40)
    convs = role_swap(task, ["a"], tight, ScriptedClient(_env), GREEDY, Sampling(max_tokens=1))
    assert convs[0].ended_by == "context" and convs[0].turns == []


@pytest.fixture(scope="module")
def hf_client(tiny_model, tiny_tokenizer):
    from genpi.synthesis.clients.hf import HFClient

    return HFClient(tiny_model, tiny_tokenizer, batch_size=32)


def test_hf_batched_equals_one_at_a_time(hf_client):
    task = builtin_task("os")
    inputs = ["list the files in /etc", "how much disk does /var use?", "count users", "x"]
    convs = [task.teacher_messages(x) for x in inputs] + [task.student_messages(x) for x in inputs]
    batched = hf_client.chat(convs, GREEDY)
    assert batched == [hf_client.chat([c], GREEDY)[0] for c in convs]
    hf_client.prefix_cache = False
    try:
        assert hf_client.chat(convs, GREEDY) == batched  # the shared-prompt cache changes nothing but speed
    finally:
        hf_client.prefix_cache = True
    sampled = hf_client.chat(convs[:2], Sampling(temperature=1.0, max_tokens=4, n=3, seed=1))
    assert len(sampled) == 6


def test_role_swap_batched_equals_sequential_greedy(hf_client):
    task = builtin_task("os")
    inputs = [f"find the largest file under /home/user{i}" for i in range(5)]
    s = Sampling(temperature=0.0, max_tokens=10)
    batched = role_swap(task, inputs, hf_client, hf_client, s, s, max_turns=3)
    single = [role_swap(task, [x], hf_client, hf_client, s, s, max_turns=3)[0] for x in inputs]
    assert [c.turns for c in batched] == [c.turns for c in single]
    assert all(sum(t["role"] == "assistant" for t in c.turns) <= 3 for c in batched)


@pytest.mark.parametrize("q", [1, 5], ids=["decode", "prefill"])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_shared_prefix_attention_equals_attention_over_the_whole_sequence(monkeypatch, mask_kind, q):
    import torch

    from genpi.synthesis.clients import prefix

    torch.manual_seed(0)
    b, hq, hkv, s, p, d = 3, 4, 2, 7, 11, 8
    query = torch.randn(b, hq, q, d)
    key, value = torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    kp, vp = torch.randn(1, hkv, p, d), torch.randn(1, hkv, p, d)
    allowed = torch.ones(b, 1, q, p + s, dtype=torch.bool)
    allowed[:, :, :, p:] = torch.arange(s)[None, :] <= torch.arange(q)[:, None] + (s - q)  # causal
    allowed[1, :, :, p : p + 2] = False  # row 1 is left-padded by two tokens
    if mask_kind == "none":
        allowed[1, :, :, p : p + 2] = True
        mask = None
    elif mask_kind == "float":
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    else:
        mask = allowed
    full_k = torch.cat([kp.expand(b, -1, -1, -1), key], 2).repeat_interleave(hq // hkv, 1)
    full_v = torch.cat([vp.expand(b, -1, -1, -1), value], 2).repeat_interleave(hq // hkv, 1)
    want = torch.nn.functional.scaled_dot_product_attention(query, full_k, full_v, attn_mask=allowed).transpose(1, 2)
    module = torch.nn.Module()
    module._genpi_prefix = (kp, vp)
    monkeypatch.setattr(prefix, "_QUERY_CHUNK_ELEMENTS", b * hq * (p + s) * 2)  # prefill in three query chunks
    got, _ = prefix.shared_prefix_attention(module, query, key, value, mask, scaling=d**-0.5)
    assert torch.allclose(got, want, atol=1e-5)


def test_hf_topk_matches_a_plain_forward_pass(hf_client, tiny_model):
    import torch

    seqs = [list(range(5, 40)), list(range(50, 62))]
    starts = [20, 4]
    got = hf_client.topk_logprobs(seqs, starts, k=4)
    for seq, start, (ids, lps) in zip(seqs, starts, got):
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(torch.tensor([seq])).logits[0].float(), -1)
        want_lp, want_ids = logp[start - 1 : len(seq) - 1].topk(4, -1)
        assert len(ids) == len(seq) - start
        assert ids == want_ids.tolist()
        assert torch.allclose(torch.tensor(lps), want_lp, atol=1e-4)


# -- the store -------------------------------------------------------------------------------------------
def test_shard_repairs_a_torn_tail_and_never_duplicates(tmp_path):
    shard = Shard(tmp_path / "s.jsonl")
    shard.append([{"record_id": "a", "v": 1}, {"record_id": "b", "v": 2}])
    with shard.path.open("ab") as f:
        f.write(b'{"record_id": "c", "v"')  # a run killed mid-write
    assert list(shard.load()) == ["a", "b"]
    shard.append([{"record_id": "c", "v": 3}, {"record_id": "a", "v": 9}])
    loaded = shard.load()
    assert list(loaded) == ["a", "b", "c"] and loaded["a"]["v"] == 1  # first write wins
    lines = shard.path.read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    shard.path.write_text('{"record_id": "a"}\nnot json\n{"record_id": "b"}\n')
    with pytest.raises(GenpiError, match="corrupt"):
        shard.load()


def test_store_lock_refuses_a_second_writer(tmp_path):
    with Store(tmp_path / "store"):
        with pytest.raises(GenpiError, match="another genpi-synth"):
            Store(tmp_path / "store").lock()
    Store(tmp_path / "store").lock().unlock()  # released on exit


# -- plans: bad settings fail before a model loads ------------------------------------------------------
def _plan(tmp_path, overrides, task: Task | None = None):
    from genpi.synthesis.plan import make_plan
    from genpi.utils.hydra_utils import to_dict

    cfg = compose_cfg("synth", overrides, tmp_path)
    return make_plan(task or build_task(**to_dict(cfg.task)), to_dict(cfg.synth), to_dict(cfg.model))


def test_stage_without_its_prerequisite_fails_at_load_time(tmp_path):
    with pytest.raises(GenpiError, match=r"needs the results of 'outputs'.*synth.stages=\[pseudo_inputs,outputs,reasons\]"):
        _plan(tmp_path, ["synth.stages=[reasons]"])
    with pytest.raises(GenpiError, match="needs the results of 'outputs'"):
        _plan(tmp_path, ["synth.stages=[pseudo_inputs,conversations]"])
    with pytest.raises(GenpiError, match="choose stages from"):
        _plan(tmp_path, ["synth.stages=[outputz]"])


def test_bad_settings_fail_at_load_time(tmp_path):
    with pytest.raises(GenpiError, match="n=2"):
        _plan(tmp_path, ["synth.outputs.sampling.n=2"])
    with pytest.raises(GenpiError, match="unknown"):
        _plan(tmp_path, ["synth.client=tgi"])
    with pytest.raises(GenpiError, match="may use only the fields"):
        _plan(tmp_path, ["synth.reasons.template='{prompt} {answer}'"])
    with pytest.raises(GenpiError, match="no pseudo-input parser"):
        _plan(tmp_path, ["synth.pseudo_inputs.source=generate", "synth.pseudo_inputs.num_inputs=3"],
              task=unit_task(parser=None))
    with pytest.raises(GenpiError, match="no environment persona"):
        _plan(tmp_path, [], task=unit_task(env_persona=""))
    with pytest.raises(GenpiError, match="not found"):
        _plan(tmp_path, ["synth.pseudo_inputs.file=/nonexistent/inputs.txt"])


# -- whole runs on the tiny model ----------------------------------------------------------------------
def test_every_stage_writes_a_trainable_dataset_and_reruns_from_the_store(tmp_path, tiny_path, tiny_tokenizer):
    from genpi.data.tokenize import response_ids

    out = synth(tmp_path, [ALL_STAGES, *small(n=5, chunk=2)])
    records = load_records(out)
    assert len(records) == 5 and set(COLUMNS) <= set(records[0])
    task = builtin_task("os")
    for r in records:
        assert r["context_id"] == task.prompt_id and r["context"] == task.prompt_text
        turns = r["teacher_output_conv"]
        assert turns and turns[0]["role"] == "assistant" and turns[0]["content"] == r["teacher_output_single"]
        assert sum(t["role"] == "assistant" for t in turns) <= 2
        n_resp = len(response_ids(tiny_tokenizer, r["teacher_output_single"]))
        assert len(r["teacher_topk_ids"]) == len(r["teacher_topk_logprobs"]) == n_resp
        assert all(len(row) == 5 for row in r["teacher_topk_ids"])
    assert len({r["record_id"] for r in records}) == 5
    card = card_of(out)
    assert card["records"] == 5 and card["has_teacher_topk"] and not card["empty_columns"]
    assert set(card["stages"]) == {"pseudo_inputs", "outputs", "reasons", "conversations", "teacher_logits"}
    for name in ("outputs", "reasons", "conversations", "teacher_logits"):
        stage = card["stages"][name]
        assert stage["computed"] == 5 and stage["seconds"] >= 0 and stage["model"] == "tiny"
    assert card["stages"]["outputs"]["sampling"]["max_tokens"] == 8
    assert card["mean_lengths"]["pseudo_input"] > 0 and card["length_unit"] == "tokens"
    assert "| outputs | computed | 5 |" in (out / "README.md").read_text()

    before = (out / "data.jsonl").read_text()
    again = synth(tmp_path, [ALL_STAGES, *small(n=5, chunk=2)])
    assert again == out and (out / "data.jsonl").read_text() == before
    assert all(s.get("computed", 0) == 0 for n, s in card_of(out)["stages"].items() if n != "pseudo_inputs")


def test_stages_run_alone_from_the_store_or_a_dataset(tmp_path, tiny_path):
    out = synth(tmp_path, ["synth.stages=[pseudo_inputs,outputs]", *small()])
    assert card_of(out)["empty_columns"] == ["reason", "teacher_output_conv"]
    synth(tmp_path, ["synth.stages=[reasons]", *small()])  # reads `outputs` from this folder's store
    card = card_of(out)
    assert card["stages"]["outputs"]["ran"] == "store" and card["stages"]["reasons"]["computed"] == 4
    assert card["empty_columns"] == ["teacher_output_conv"]
    # a changed stage config makes new records beside the old ones, never mixed with them
    synth(tmp_path, ["synth.stages=[reasons]", *small(), "synth.reasons.sampling.max_tokens=5"])
    assert card_of(out)["stages"]["reasons"]["computed"] == 4
    assert len(list((out / "store" / "reasons").glob("*.jsonl"))) == 2
    # later stages from another dataset, into another folder
    other = synth(tmp_path, ["synth.stages=[conversations]", f"synth.from_dataset={out}", "synth.name=conv",
                             *small()])
    records = load_records(other)
    assert other != out and len(records) == 4 and all(r["teacher_output_conv"] for r in records)
    assert [r["pseudo_input"] for r in records] == [r["pseudo_input"] for r in load_records(out)]


def test_pseudo_inputs_generate_dedups_oversamples_and_counts_failures(tmp_path, monkeypatch):
    from genpi.synthesis import clients

    replies = iter(["1. list files\n2. list files\n3. LIST  files", "nothing here", "1. count users\n2. df -h",
                    "1. uptime\n2. who", "1. never reached"])
    scripted = ScriptedClient(lambda conv: next(replies))
    monkeypatch.setattr(clients.ClientPool, "get", lambda self, kind, model: scripted)
    task = unit_task(parser="numbered_list", demonstrations=["free -m", "ls /tmp"])
    gen = ["synth.pseudo_inputs.source=generate", "synth.pseudo_inputs.num_inputs=5",
           "synth.pseudo_inputs.requests_per_round=2", "synth.pseudo_inputs.sampling.n=1",
           "synth.stages=[pseudo_inputs]", "synth.progress=false"]
    from genpi.synthesis.stages import StageContext, pseudo_inputs

    plan = _plan(tmp_path, gen, task=task)
    store = Store(plan.out_dir / "store")
    ctx = StageContext(task, plan.stages["pseudo_inputs"], clients.ClientPool({}), store, plan.out_dir)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    rows = pseudo_inputs(ctx)
    assert [r["pseudo_input"] for r in rows] == ["list files", "count users", "df -h", "uptime", "who"]
    s = ctx.stats
    assert (s["attempts"], s["failed_attempts"], s["candidates"]) == (4, 1, 7)
    assert (s["exact_duplicates"], s["normalized_duplicates"]) == (1, 1)
    assert [len(c) for c in scripted.calls] == [2, 2]  # two rounds of two requests
    assert "free -m" in scripted.calls[0][0][0]["content"] or "ls /tmp" in scripted.calls[0][0][0]["content"]
    assert json.loads((plan.out_dir / "failed_samples.jsonl").read_text().splitlines()[0])["text"] == "nothing here"
    # a rerun replays the stored rounds: same inputs, no generator call
    scripted.calls.clear()
    ctx = StageContext(task, plan.stages["pseudo_inputs"], clients.ClientPool({}), store, plan.out_dir)
    assert [r["pseudo_input"] for r in pseudo_inputs(ctx)] == [r["pseudo_input"] for r in rows]
    assert scripted.calls == []


# -- command line: bad input, resume after a kill --------------------------------------------------------
def _cli(args: list[str], log: Path | None = None) -> subprocess.Popen:
    """``python -m genpi.synth ARGS``; with ``log``, output goes to that file (nobody reads pipes while we poll)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = log.open("w") if log is not None else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "genpi.synth", *args], cwd=REPO, env=env, text=True,
                            stdout=out, stderr=subprocess.STDOUT if log is not None else subprocess.PIPE)


def test_nothing_parseable_exits_nonzero_with_counts(tmp_path, tiny_path):
    proc = _cli([f"paths.output_root={tmp_path}", "synth.pseudo_inputs.source=generate",
                 "synth.pseudo_inputs.num_inputs=4", "synth.pseudo_inputs.max_attempts=4",
                 "synth.pseudo_inputs.sampling.max_tokens=12", "synth.progress=false"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "4 generator outputs, 4 with nothing parseable" in err and "failed_samples.jsonl" in err
    assert len(list(tmp_path.rglob("failed_samples.jsonl"))) == 1
    assert "Traceback" not in err


RESUME = ["synth.stages=[pseudo_inputs,outputs,conversations]", *small(n=10, chunk=2, tokens=16)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_path) -> list[dict]:
    """The records of the resume test's config, synthesized in one go."""
    return load_records(synth(tmp_path_factory.mktemp("whole"), RESUME))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_without_losing_or_duplicating(tmp_path, uninterrupted, sig):
    killed = [f"paths.output_root={tmp_path / 'killed'}", *RESUME]
    proc = _cli(killed, log=tmp_path / "killed.log")
    shard_dir = tmp_path / "killed" / "synth" / "os" / "tiny" / "default" / "store" / "conversations"
    deadline = time.time() + 120
    lines = 0
    while time.time() < deadline and proc.poll() is None:
        shards = list(shard_dir.glob("*.jsonl"))
        lines = sum(len(s.read_text().splitlines()) for s in shards)
        if lines >= 2:  # at least one chunk stored, mid-stage
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode != 0 and 2 <= lines < 10, (proc.returncode, lines)

    rerun = _cli(killed)
    out, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, err
    assert out.strip().splitlines()[-1].startswith("dataset: ")
    folder = Path(out.strip().splitlines()[-1].split("dataset: ", 1)[1])
    card = card_of(folder)
    assert card["stages"]["conversations"]["from_store"] >= 2
    assert card["stages"]["conversations"]["computed"] == 10 - card["stages"]["conversations"]["from_store"]
    for shard in folder.glob("store/*/*.jsonl"):
        ids = [json.loads(line)["record_id"] for line in shard.read_text().splitlines()]
        assert len(ids) == len(set(ids)), shard

    assert load_records(folder) == uninterrupted


def test_pseudo_inputs_from_templates_are_held_out_and_extend_in_order(tmp_path, tiny_path):
    from genpi.tasks.generators import generate_examples

    out = synth(tmp_path, ["synth.stages=[pseudo_inputs]", "synth.pseudo_inputs.source=templates",
                           *small(n=6)])
    got = [r["pseudo_input"] for r in load_records(out / "data.jsonl", columns=("pseudo_input",))]
    assert got == [e["pseudo_input"] for e in generate_examples("os", 6, seed=0, split="heldout")]
    pretrain = {e["pseudo_input"] for e in generate_examples("os", 384, seed=0, split="pretrain")}
    assert not set(got) & pretrain
    assert card_of(out)["stages"]["pseudo_inputs"]["source"] == "templates"
    with pytest.raises(GenpiError, match="split"):
        synth(tmp_path / "bad", ["synth.pseudo_inputs.source=templates", "synth.pseudo_inputs.split=nope", *small()])


def test_synth_reports_its_card_to_wandb_as_a_synth_job(tmp_path, tiny_path, monkeypatch):
    from tests.helpers import wait_for_wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = synth(tmp_path, ["synth.stages=[pseudo_inputs,outputs]", "logger=wandb", "experiment_name=study",
                           *small(n=3)])
    (log,) = list((out / "wandb").glob("offline-run-*/*.wandb"))
    records = wait_for_wandb_records(log, ("run", "history"))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_group == "study" and run.job_type == "synth"
    logged = {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
              for i in r.history.item}
    assert {"synth/records", "synth/outputs/computed"} <= logged
    assert str(tmp_path) not in run.display_name  # run names say what, not where
