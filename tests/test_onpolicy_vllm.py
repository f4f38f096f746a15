"""On-policy sampling through a colocated vLLM engine (``loss.kl.sampling.engine=vllm``, genpi/onpolicy_vllm.py).

The refresh schedule, the checkpointed state and the resume rule are checked on a stand-in engine process; one
real engine (vLLM's CPU build, its own process, as in training) serves the module's other tests: greedy samples
equal transformers' on the same adapter, seeded samples repeat, a stale adapter samples as the weights it was
given, and a short training run logs the staleness.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from genpi.onpolicy_vllm import VLLMEngine, keep_stop
from genpi.schema import GenpiError
from tests.helpers import compose_cfg

STOP = [7, 9]


@pytest.mark.parametrize(("ids", "finish", "reason", "want"), [
    ([1, 2, 7, 3], "stop", 7, [1, 2, 7]),   # the engine kept the stop token (and anything after is cut)
    ([1, 2], "stop", 9, [1, 2, 9]),         # the engine dropped it: put back
    ([1, 2], "length", None, [1, 2]),       # no stop: the answer ran to max tokens
    ([1, 2], "stop", "</s>", [1, 2]),       # a stop string is not a stop id
])
def test_keep_stop_ends_an_answer_with_its_stop_token(ids, finish, reason, want):
    assert keep_stop(ids, finish, reason, STOP) == want


class FakeModel:
    """Writes a marker file where an adapter would be saved (what ``PeftModel.save_pretrained`` writes)."""

    def __init__(self):
        self.version = 0

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "adapter_config.json").write_text(str(self.version))


def fake_engine(tmp_path: Path, refresh_every: int, asked: list) -> VLLMEngine:
    engine = VLLMEngine("base", 8, tmp_path, refresh_every=refresh_every)
    engine.start = lambda: None  # no process: the requests are recorded
    engine._ask = lambda msg: asked.append(msg) or {"ok": True}
    return engine


def test_refresh_schedule_staleness_and_snapshots(tmp_path):
    asked: list = []
    model = FakeModel()
    engine = fake_engine(tmp_path, 3, asked)
    seen = []
    for step in range(7):
        model.version = step
        engine.maybe_refresh(model, step)
        seen.append((engine.staleness(step), engine.refreshed_at))
    assert seen == [(0, 0), (1, 0), (2, 0), (0, 3), (1, 3), (2, 3), (0, 6)]
    # one adapter per refresh, each a new LoRA id, read from the snapshot of its step
    assert [(m["id"], Path(m["path"]).name) for m in asked] == [(1, "adapter-step0"), (2, "adapter-step3"),
                                                                (3, "adapter-step6")]
    # snapshots stay until a checkpoint is saved (a resume from an older checkpoint needs its own); then only the
    # one in use is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter-step0", "adapter-step3", "adapter-step6"]
    engine.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter-step6"]
    assert (tmp_path / "adapter-step6" / "adapter_config.json").read_text() == "6"


def test_a_resumed_run_samples_from_the_snapshot_the_interrupted_run_used(tmp_path):
    asked: list = []
    model = FakeModel()
    engine = fake_engine(tmp_path, 4, asked)
    early = None
    for step in range(6):  # refreshed at 0 and 4, a checkpoint after step 2, then killed after step 5
        model.version = step
        engine.maybe_refresh(model, step)
        if step == 2:
            early = engine.state_dict()
            engine.prune()  # what saving that checkpoint does
    # resumed from the checkpoint of step 2, which a refresh after it did not invalidate: step 3 samples from the
    # adapter of step 0, as the interrupted run did
    back = fake_engine(tmp_path, 4, resumed := [])
    back.load_state_dict(early)
    back.maybe_refresh(model, 3)
    assert [Path(m["path"]).name for m in resumed] == ["adapter-step0"] and back.staleness(3) == 3
    assert (tmp_path / "adapter-step0" / "adapter_config.json").read_text() == "0"
    state = engine.state_dict()
    again = fake_engine(tmp_path, 4, asked := [])
    again.load_state_dict(state)
    model.version = 99  # the weights as the checkpoint restored them: newer than those the engine sampled from
    again.maybe_refresh(model, 6)
    assert [Path(m["path"]).name for m in asked] == ["adapter-step4"] and again.staleness(6) == 2
    assert (tmp_path / "adapter-step4" / "adapter_config.json").read_text() == "4"  # not overwritten
    again.maybe_refresh(model, 8)  # the next refresh is due on the interrupted run's schedule
    assert [Path(m["path"]).name for m in asked] == ["adapter-step4", "adapter-step8"]
    # the snapshot is gone: one line that says why the samples cannot be reproduced, and how to go on
    gone = fake_engine(tmp_path / "other", 4, [])
    gone.load_state_dict({"refreshed_at": 4})
    with pytest.raises(GenpiError, match="adapter snapshot .* is gone.*refresh_every=1"):
        gone.maybe_refresh(model, 5)


def test_row_seeds_differ_across_rows_and_ranks():
    from genpi.onpolicy import row_seed

    # rank r samples its batch under seed + r: no row of one rank shares a seed with a row of another
    seeds = [row_seed(1000 + rank, row) for rank in range(4) for row in range(64)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**62 for s in seeds)


def test_vllm_sampling_of_a_4bit_model_is_refused_before_it_loads(tmp_path):
    from genpi.train import train

    cfg = compose_cfg("train", ["loss=opcd", "loss.kl.sampling.engine=vllm", "model.load_in_4bit=true"], tmp_path)
    with pytest.raises(GenpiError, match="full-precision base.*loss.kl.sampling.engine=hf"):
        train(cfg)


@pytest.mark.parametrize(("override", "needle"), [
    ("loss.kl.sampling.engine=sglang", "loss.kl.sampling.engine"),
    ("loss.kl.sampling.refresh_every=0", "loss.kl.sampling.refresh_every"),
    ("loss.kl.sampling.vllm.gpu_memory_utilization=1.5", "loss.kl.sampling.vllm.gpu_memory_utilization"),
    ("loss.kl.sampling.vllm.kvcache_gb=0", "loss.kl.sampling.vllm.kvcache_gb"),
])
def test_bad_engine_settings_are_one_line(tmp_path, override, needle):
    from genpi import schema

    with pytest.raises(GenpiError) as err:
        schema.check(compose_cfg("train", ["loss=opcd", override], tmp_path), "train")
    assert needle in str(err.value) and "\n" not in str(err.value)


# -- one real engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def student(tiny_path):
    """The tiny model with a LoRA adapter whose weights move its greedy answers, the prompts, stop ids and pad."""
    pytest.importorskip("vllm")
    from peft import LoraConfig, get_peft_model

    from genpi.data.tokenize import student_prefix_ids
    from genpi.models.factory import load_model, load_tokenizer
    from genpi.synthesis.clients.base import end_of_turn_ids
    from genpi.tasks.base import builtin_task

    tok = load_tokenizer({"name_or_path": "tiny"})
    torch.manual_seed(0)
    model = get_peft_model(load_model({"name_or_path": "tiny"}, for_training=False),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)).eval()
    task = builtin_task("os")
    prompts = [student_prefix_ids(tok, task, x) for x in ["How many files are in /etc?", "Who is logged in?",
                                                           "Print the disk usage of /var"]]
    return model, prompts, end_of_turn_ids(tok), tok.pad_token_id


def _move(model, seed: int) -> None:
    """A training step's worth of change: new random LoRA B weights (A @ B != 0, so answers change)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def engine(student, tiny_path, tmp_path_factory):
    eng = VLLMEngine(str(tiny_path), 8, tmp_path_factory.mktemp("opcd_vllm"), refresh_every=2, dtype="float32")
    yield eng
    eng.close()


def _hf(student, temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    from genpi.onpolicy import OnPolicySampler

    model, prompts, stop, pad = student
    return OnPolicySampler(1.0, temperature, 1.0, 12, stop, pad).sample(model, prompts, seed)


@pytest.mark.slow
@pytest.mark.vllm
def test_engine_samples_as_transformers_and_as_the_adapter_it_was_given(student, engine):
    model, prompts, stop, _ = student
    from genpi.onpolicy import OnPolicySampler

    sampler = OnPolicySampler(1.0, 0.0, 1.0, 12, stop, student[3])
    sampler.engine = engine
    _move(model, 1)
    engine.maybe_refresh(model, 0)
    first = _hf(student)
    assert sampler.sample(model, prompts, seed=5) == first  # greedy: the same tokens as transformers
    _move(model, 2)
    second = _hf(student)
    assert second != first  # the move changed the answers
    engine.maybe_refresh(model, 1)  # not due (refresh_every=2): the engine samples the step-0 adapter
    assert engine.staleness(1) == 1 and sampler.sample(model, prompts, seed=5) == first
    engine.maybe_refresh(model, 2)
    assert engine.staleness(2) == 0 and sampler.sample(model, prompts, seed=5) == second
    # sampled (temperature 1): the same seeds give the same tokens, other seeds other tokens
    sampler.temperature = 1.0
    a, b, c = (sampler.sample(model, prompts, seed=s) for s in (11, 11, 12))
    assert a == b and a != c
    assert all(len(x) <= 12 and (len(x) == 12 or x[-1] in stop) for x in a)
    # several turns (loss.kl.sampling.turns), the environment's turns between them: each turn is one engine call.
    # Half the vocabulary stops a turn, so that the random model ends its turns and several are sampled.
    halves = list(range(0, 4096, 2))
    envs = [[[5, 6, 7], [8, 9]]] * len(prompts)
    by_hf = OnPolicySampler(1.0, 0.0, 1.0, 6, halves, student[3], turns=3)
    by_vllm = OnPolicySampler(1.0, 0.0, 1.0, 6, halves, student[3], turns=3)
    by_vllm.engine = engine
    want = by_hf.sample_turns(model, prompts, envs, seed=3)
    assert max(len(t) for t in want) >= 2
    assert by_vllm.sample_turns(model, prompts, envs, seed=3) == want


@pytest.mark.slow
@pytest.mark.vllm
def test_training_with_the_engine_logs_staleness_and_refreshes(tmp_path, tiny_path):
    from tests.test_train import run_train

    out = run_train(tmp_path, ["loss=opcd", "loss.kl.sampling.engine=vllm", "loss.kl.sampling.refresh_every=2",
                               "loss.kl.sampling.max_new_tokens=8", "trainer.max_steps=3", "data.max_records=16",
                               "data.batch_size=4", "validate_before_fit=false", "logger=csv"])
    run_dir = Path(out["run_dir"])
    (metrics_csv,) = run_dir.rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("train/opcd_staleness")]
    assert [float(r["train/opcd_staleness"]) for r in rows] == [0.0, 1.0, 0.0]
    assert all(0 < float(r["train/opcd_sampled_len"]) <= 8 for r in rows)
    # the snapshot of the latest refresh is kept for a resume; the engine's process ended with the fit
    assert sorted(p.name for p in (run_dir / "opcd_vllm" / "rank0").glob("adapter-step*")) == ["adapter-step2"]
    engine = out["module"].sampler.engine
    assert engine.proc is None and engine.refreshed_at == 2
