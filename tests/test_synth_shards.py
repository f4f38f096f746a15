"""Sharded synthesis: K jobs (a Slurm array; here submitit's local launcher) build one dataset that equals an
unsharded run's; a killed shard resumes; a merge names what is missing; the store's locks refuse a second writer.

Greedy decoding everywhere (the default of every stage but pseudo-input generation), so a record's text does not
depend on which other records share its batch: the hf client's batched greedy output equals one-at-a-time output
(``test_synth.py::test_hf_batched_equals_one_at_a_time``). Sampled text from the hf client would differ with the
batch (it seeds once per call, not per request); vLLM and OpenAI-compatible servers seed each request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from genpi.data.records import load_records
from genpi.synthesis.clients import ChatClient
from genpi.synthesis.stages import input_id
from genpi.synthesis.store import Store, shard_of
from genpi.utils.errors import GenpiError
from tests.helpers import CONF, compose_cfg
from tests.test_synth import small, unit_task

REPO = CONF.parent
# Greedy, three later stages, small enough for seconds per shard on the tiny model; chunk 1 stores record by record.
RUN = ["synth.stages=[pseudo_inputs,outputs,reasons,conversations]", *small(n=8, chunk=1, turns=2, tokens=6)]


def synth(root: Path, overrides: list[str]):
    from genpi.synth import synthesize

    return synthesize(compose_cfg("synth", overrides, root))


def dataset_dir(root: Path) -> Path:
    return root / "synth" / "os" / "tiny" / "default"


def cli(args: list[str], log: Path | None = None) -> subprocess.Popen:
    """``python -m genpi.synth ARGS`` from the repository (with ``log``: output to that file, for polling)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    out = log.open("w") if log is not None else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "genpi.synth", *args], cwd=REPO, env=env, text=True,
                            stdout=out, stderr=subprocess.STDOUT if log is not None else subprocess.PIPE)


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory, tiny_path) -> list[dict]:
    """The records of ``RUN`` synthesized by one unsharded process."""
    root = tmp_path_factory.mktemp("unsharded")
    assert synth(root, RUN).merged
    return load_records(dataset_dir(root))


def owners(records: list[dict], num_shards: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in records:
        s = shard_of(input_id(r["pseudo_input"]), num_shards)
        counts[s] = counts.get(s, 0) + 1
    return counts


# -- in process: shards one after the other, the merge, the schema ----------------------------------------------
def test_two_shards_in_turn_equal_one_run_and_merge_names_the_missing_shard(tmp_path, unsharded):
    assert set(owners(unsharded, 2)) == {0, 1}  # both shards have work: the split is not degenerate
    first = synth(tmp_path, [*RUN, "synth.num_shards=2", "synth.shard=0"])
    folder = dataset_dir(tmp_path)
    assert not first.merged and first.pending == [1] and not (folder / "data.jsonl").exists()
    # shard 0 wrote only its own records, to its own files
    for path in (folder / "store").glob("[ocr]*/*.jsonl"):
        assert path.name.endswith(".shard-0-of-2.jsonl"), path
        ids = [json.loads(line)["pseudo_input"] for line in path.read_text().splitlines()]
        assert {shard_of(input_id(x), 2) for x in ids} == {0}
    with pytest.raises(GenpiError, match=r"shard 1 of 2 has not run: rerun it with `genpi-synth .*synth\.shard=1`"):
        synth(tmp_path, [*RUN, "synth.num_shards=2", "synth.merge_only=true"])
    assert not (folder / "data.jsonl").exists()
    last = synth(tmp_path, [*RUN, "synth.num_shards=2", "synth.shard=1"])
    assert last.merged
    assert load_records(folder) == unsharded  # ids, order and text
    card = json.loads((folder / "card.json").read_text())
    per_shard = card["shards"]["per_shard"]
    assert [s["shard"] for s in per_shard] == [0, 1]
    assert [s["records"] for s in per_shard] == [owners(unsharded, 2)[0], owners(unsharded, 2)[1]]
    assert all(s["computed"]["outputs"] == s["records"] and s["seconds"] > 0 for s in per_shard)
    assert card["stages"]["outputs"]["computed"] == card["records"] == len(unsharded)
    assert card["shards"]["records_per_second"] > 0 and "## Shards" in (folder / "README.md").read_text()
    # merge_only now succeeds and writes the same dataset
    assert synth(tmp_path, [*RUN, "synth.num_shards=2", "synth.merge_only=true"]).merged
    assert load_records(folder) == unsharded


def test_shard_settings_are_checked_before_any_model_loads(tmp_path):
    from genpi.synth import plan_from_cfg

    with pytest.raises(GenpiError, match=r"^synth\.shard=4 is not allowed: 0 <= synth\.shard < synth\.num_shards \(4\)$"):
        plan_from_cfg(compose_cfg("synth", ["synth.num_shards=4", "synth.shard=4"], tmp_path))
    with pytest.raises(GenpiError, match=r"^synth\.num_shards=0 is not allowed: >= 1$"):
        plan_from_cfg(compose_cfg("synth", ["synth.num_shards=0"], tmp_path))
    with pytest.raises(GenpiError, match="synth.data_parallel_size"):
        plan_from_cfg(compose_cfg("synth", ["synth.data_parallel_size=two"], tmp_path))


def test_locks_refuse_a_second_writer_of_a_shard_and_another_shard_count(tmp_path):
    with Store(tmp_path / "store", 1, 4):
        with pytest.raises(GenpiError, match=r"another genpi-synth is writing shard 1 of 4 to .*run another synth.shard"):
            Store(tmp_path / "store", 1, 4).lock()
        Store(tmp_path / "store", 2, 4).lock().unlock()  # another index of the same count is welcome
        with pytest.raises(GenpiError, match=r"shard 1 of 4 is writing .* set synth.num_shards=4"):
            Store(tmp_path / "store", 0, 2).lock()
        with pytest.raises(GenpiError, match=r"shard 1 of 4 is writing .* set synth.num_shards=4"):
            Store(tmp_path / "store").lock()
    Store(tmp_path / "store", 1, 4).lock().unlock()  # released with its holder


def test_two_processes_on_one_shard_index_refuse_with_one_line(tmp_path, tiny_path):
    root = tmp_path / "out"
    store = Store(dataset_dir(root) / "store", 1, 4)
    with store:  # this test's process is the first writer of shard 1 of 4
        proc = cli([f"paths.output_root={root}", *RUN, "synth.num_shards=4", "synth.shard=1"])
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.startswith("genpi: error:")]
    assert len(lines) == 1 and "another genpi-synth is writing shard 1 of 4" in lines[0], err
    assert "Traceback" not in err
    assert not list((dataset_dir(root) / "store").glob("*/*.jsonl"))  # nothing computed, nothing written


# -- generated pseudo inputs: rounds sharded, one dedup -------------------------------------------------------------
class SeededLists(ChatClient):
    """A generator whose numbered list is a function of the request's seed (so of its round and index), with
    duplicates across rounds, as a sampling LLM's would be."""

    name = "seeded"

    def __init__(self):
        self.rounds_seen: list[int] = []
        self.lock = threading.Lock()

    def chat(self, conversations, sampling, seeds=None):
        return [f"1. task {s % 11}\n2. TASK  {s % 7}\n3. job {s % 13}" for s in seeds for _ in range(sampling.n)]


def _rounds_cfg(tmp_path):
    return compose_cfg("synth", ["synth.pseudo_inputs.source=generate", "synth.pseudo_inputs.num_inputs=12",
                                 "synth.pseudo_inputs.requests_per_round=2", "synth.pseudo_inputs.sampling.n=1",
                                 "synth.stages=[pseudo_inputs]", "synth.progress=false"], tmp_path)


def _pseudo_inputs(tmp_path, shard: int, num_shards: int, client: ChatClient, wait_minutes: float = 1.0, cfg=None):
    from genpi.synthesis import clients
    from genpi.synthesis.plan import make_plan
    from genpi.synthesis.stages import StageContext, pseudo_inputs
    from genpi.utils.hydra_utils import to_dict

    cfg = cfg if cfg is not None else _rounds_cfg(tmp_path)  # Hydra's compose is not thread-safe: threads get one
    task = unit_task(parser="numbered_list", demonstrations=["free -m", "ls /tmp"])
    plan = make_plan(task, to_dict(cfg.synth), to_dict(cfg.model))
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    pool = clients.ClientPool({})
    pool.clients = {}
    pool.get = lambda kind, model: client  # type: ignore[method-assign]
    ctx = StageContext(task, plan.stages["pseudo_inputs"], pool, Store(plan.out_dir / "store", shard, num_shards),
                       plan.out_dir, wait_minutes=wait_minutes, poll_seconds=0.01)
    return pseudo_inputs(ctx), ctx, plan


def test_generated_rounds_are_sharded_and_deduplicated_once_as_one_run(tmp_path):
    whole, whole_ctx, _ = _pseudo_inputs(tmp_path / "one", 0, 1, SeededLists())
    results: dict[int, list] = {}
    failures: dict[int, BaseException] = {}
    cfg = _rounds_cfg(tmp_path / "three")

    def run(i: int) -> None:
        try:
            results[i] = _pseudo_inputs(tmp_path / "three", i, 3, SeededLists(), wait_minutes=10.0, cfg=cfg)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread below
            failures[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not failures, failures
    assert sorted(results) == [0, 1, 2]
    for rows, ctx, _ in results.values():
        assert [r["pseudo_input"] for r in rows] == [r["pseudo_input"] for r in whole]
        assert ctx.stats["duplicate_rate"] == whole_ctx.stats["duplicate_rate"] > 0
    _, _, plan = results[0]
    folder = plan.out_dir / "store" / "pseudo_inputs"
    generated = 0
    for i in range(3):
        (path,) = folder.glob(f"*.rounds.shard-{i}-of-3.jsonl")
        rounds = [json.loads(line)["round"] for line in path.read_text().splitlines()]
        assert all(r % 3 == i for r in rounds) and len(rounds) == len(set(rounds))
        generated += len(rounds)
    assert generated >= whole_ctx.stats["rounds"]  # every round the unsharded run needed, a few more at most
    (final,) = [p for p in folder.glob("*.jsonl") if ".rounds" not in p.name]
    ids = [json.loads(line)["record_id"] for line in final.read_text().splitlines()]
    assert ids == [r["ids"]["pseudo_inputs"] for r in whole]  # written once, in order, no duplicate


def test_a_shard_waiting_for_missing_rounds_names_their_shards(tmp_path):
    with pytest.raises(GenpiError, match=r"shard 0 of 2 waited .* for rounds \[1, 3.* of shards \[1\]"):
        _pseudo_inputs(tmp_path, 0, 2, SeededLists(), wait_minutes=0.002)


# -- several engines in one job ----------------------------------------------------------------------------------
def test_gpu_groups_of_data_parallel_engines(monkeypatch):
    from genpi.synth import gpu_groups

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert gpu_groups(2, 2) == ["4,5", "6,7"]
    assert gpu_groups(4, 1) == ["4", "5", "6", "7"]
    with pytest.raises(GenpiError, match="needs 6 GPUs; this job sees 4"):
        gpu_groups(3, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_groups(2, 1) is None  # no GPU: the engines share the CPU


# -- command line: a multirun of shards with submitit's local launcher; kill, merge, rerun ------------------------
@pytest.mark.slow
def test_four_shards_as_one_multirun_equal_one_run(tmp_path, unsharded):
    root = tmp_path / "four"
    proc = cli(["-m", "hydra/launcher=local", f"paths.output_root={root}", *RUN, "synth.num_shards=4",
                "synth.shard=0,1,2,3"], log=tmp_path / "multirun.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "multirun.log").read_text()[-3000:]
    assert not list(root.rglob("error.txt")), (tmp_path / "multirun.log").read_text()[-3000:]
    folder = dataset_dir(root)
    assert load_records(folder) == unsharded
    card = json.loads((folder / "card.json").read_text())
    assert card["shards"]["num_shards"] == 4
    assert {s["shard"]: s["records"] for s in card["shards"]["per_shard"]} == {
        i: owners(unsharded, 4).get(i, 0) for i in range(4)}
    for stage in ("outputs", "reasons", "conversations"):
        files = list((folder / "store" / stage).glob("*.shard-*-of-4.jsonl"))
        ids = [json.loads(line)["record_id"] for f in files for line in f.read_text().splitlines()]
        assert len(ids) == len(set(ids)) == len(unsharded)


@pytest.mark.slow
def test_a_killed_shard_is_named_by_the_merge_and_resumes_alone(tmp_path, unsharded):
    root = tmp_path / "killed"
    counts = owners(unsharded, 4)
    victim = max(counts, key=lambda s: counts[s])
    assert counts[victim] >= 2
    args = [f"paths.output_root={root}", *RUN, "synth.num_shards=4"]
    proc = cli([*args, f"synth.shard={victim}"], log=tmp_path / "victim.log")
    outputs_dir = dataset_dir(root) / "store" / "outputs"
    deadline, lines = time.time() + 300, 0
    while time.time() < deadline and proc.poll() is None:
        lines = sum(len(f.read_text().splitlines()) for f in outputs_dir.glob(f"*.shard-{victim}-of-4.jsonl"))
        if lines >= 1:  # a record of its first later stage is stored: mid-stage
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    lines = 0  # what the store holds now (a record may have landed between the poll and the kill)
    for f in outputs_dir.glob(f"*.shard-{victim}-of-4.jsonl"):
        for line in f.read_text().splitlines():
            try:
                json.loads(line)
                lines += 1
            except json.JSONDecodeError:  # a line torn by the kill: the rerun cuts it off
                pass
    assert proc.returncode == -signal.SIGKILL and 1 <= lines < counts[victim], (proc.returncode, lines)

    others = ",".join(str(i) for i in range(4) if i != victim)
    sweep = cli(["-m", "hydra/launcher=local", *args, f"synth.shard={others}"], log=tmp_path / "others.log")
    assert sweep.wait(timeout=900) == 0, (tmp_path / "others.log").read_text()[-3000:]
    assert not (dataset_dir(root) / "data.jsonl").exists()  # the killed shard is not done: nobody merged

    merge = cli([*args, "synth.merge_only=true"])
    _, err = merge.communicate(timeout=300)
    assert merge.returncode == 2 and "Traceback" not in err, err
    assert f"shard {victim} of 4 has not finished" in err and f"synth.shard={victim}`" in err, err
    assert not (dataset_dir(root) / "data.jsonl").exists()

    rerun = cli([*args, f"synth.shard={victim}"])
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert out.strip().splitlines()[-1] == f"dataset: {dataset_dir(root)}"
    assert load_records(dataset_dir(root)) == unsharded
    card = json.loads((dataset_dir(root) / "card.json").read_text())
    (mine,) = [s for s in card["shards"]["per_shard"] if s["shard"] == victim]
    assert mine["computed"]["outputs"] == counts[victim] - lines  # resumed: what was stored is not recomputed
    for f in (dataset_dir(root) / "store").glob("*/*.jsonl"):
        ids = [json.loads(line)["record_id"] for line in f.read_text().splitlines()]
        assert len(ids) == len(set(ids)), f


@pytest.mark.slow
def test_data_parallel_engines_in_one_job_equal_one_run(tmp_path, unsharded):
    root = tmp_path / "dp"
    proc = cli([f"paths.output_root={root}", *RUN, "synth.data_parallel_size=2"])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == f"dataset: {dataset_dir(root)}"
    assert load_records(dataset_dir(root)) == unsharded
    card = json.loads((dataset_dir(root) / "card.json").read_text())
    assert card["shards"]["num_shards"] == 2 and card["shards"]["engines_per_job"] == 2


def test_shard_keys_in_the_yaml_agree_with_the_schema():
    from omegaconf import OmegaConf

    from genpi.schema import SynthShards, defaults

    yaml = OmegaConf.to_container(OmegaConf.load(CONF / "synth" / "default.yaml"))
    assert {k: yaml[k] for k in defaults(SynthShards)} == defaults(SynthShards)
    text = (CONF / "synth" / "default.yaml").read_text()
    assert all(f"\n{k}:" in text and "#" in text.split(f"\n{k}:", 1)[1].splitlines()[0] for k in defaults(SynthShards))
