"""model=tiny_agent: the pre-trained prompt-following tiny model and its pre-training. Internalization on it, end to
end, is tested by tests/test_pipeline.py (the demo in a reduced setting)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genpi.models.tiny_agent import (
    DEFAULT_PRETRAIN,
    MARKER,
    VIEWS,
    agent_hash,
    encode_corpus,
    pretrain_config,
    read_card,
    recipe,
    shared_prefix_loss,
    view_messages,
)
from genpi.tasks.base import TASK_NAMES, builtin_task
from genpi.tasks.generators import generate_examples

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_agent_path():
    """The cached tiny_agent (pre-trained on first use: a few minutes once per cache)."""
    from genpi.models.factory import resolve_model_path

    return Path(resolve_model_path({"name_or_path": "tiny_agent"}))


def test_shared_prefix_loss_equals_the_plain_loss_and_its_gradients(tiny_path, tiny_tokenizer):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(tiny_path))
    groups = encode_corpus(tiny_tokenizer, {"os": builtin_task("os")}, 8, seed=0, max_tokens=1536)
    batch = groups[("os", "teacher")][:4]
    shared, n_shared = shared_prefix_loss(model, batch, tiny_tokenizer.pad_token_id)
    shared.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain, n_plain = shared_prefix_loss(model, batch, tiny_tokenizer.pad_token_id, min_prefix=10**9)
    plain.backward()
    assert n_shared == n_plain > 0
    assert float(shared) == pytest.approx(float(plain), abs=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5, rtol=1e-3), n


def test_views_train_on_the_right_turns(tiny_tokenizer):
    from genpi.data.tokenize import IGNORE, encode_chat

    task = builtin_task("kg")
    ex = generate_examples("kg", 1, seed=0, split="pretrain")[0]
    for view in VIEWS:
        messages, label_from = view_messages(task, ex, view)
        ids, labels = encode_chat(tiny_tokenizer, messages, label_from)
        trained = tiny_tokenizer.decode([t for t in labels if t != IGNORE])
        if view == "teacher":
            assert messages[0]["content"] == task.prompt_turns[0]["content"]
            assert "get_relations(" in trained and task.prompt_turns[0]["content"][:40] not in trained
        elif view == "student":
            assert len(messages) == 2 and ex["student_output_single"] in trained and "Action:" not in trained
        else:
            assert messages[0] == {"role": "system", "content": task.env_persona}
            assert "Observation:" in trained and "get_relations(" not in trained


def test_pretrain_config_and_hash():
    assert pretrain_config(None) == DEFAULT_PRETRAIN
    with pytest.raises(Exception, match="unknown keys"):
        pretrain_config({"stepz": 3})
    base = agent_hash({**_arch()}, pretrain_config(None))
    assert base == agent_hash({**_arch()}, pretrain_config(None))
    assert base != agent_hash({**_arch()}, pretrain_config({"steps": 7}))


def test_the_model_config_asks_for_the_default_recipe():
    """conf/model/tiny_agent.yaml and DEFAULT_PRETRAIN are written by hand, twice: if they differ, model=tiny_agent
    asks for a recipe the shipped weights were not made with and starts a 2.5-hour pre-training."""
    from omegaconf import OmegaConf

    from tests.helpers import CONF

    block = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny_agent.yaml"))["tiny_agent"]
    assert pretrain_config(block) == DEFAULT_PRETRAIN


def _arch():
    from genpi.models.tiny import arch_config

    return arch_config(None)


def test_pretraining_inputs_never_meet_the_study_inputs():
    for task in TASK_NAMES:
        pre = {e["pseudo_input"] for e in generate_examples(task, 384, seed=0, split="pretrain")}
        held = {e["pseudo_input"] for e in generate_examples(task, 160, seed=0, split="heldout")}
        assert len(pre) >= 150 and len(held) >= 150 and not pre & held  # kg's slot pools allow ~150 per split


def test_made_up_slot_values_are_new_and_change_only_the_pretrain_inputs_that_ask_for_them():
    from genpi.tasks import generators as g

    taken = g._taken()
    assert {"alice", "/var/log", "kevin", "/srv/site/ledger"} <= taken
    plain = generate_examples("os", 64, seed=0, split="pretrain")
    fresh = generate_examples("os", 64, seed=0, split="pretrain", fresh=True)
    assert plain == generate_examples("os", 64, seed=0, split="pretrain", fresh=False)
    assert len({e["pseudo_input"] for e in fresh}) == 64
    for ex in fresh:  # every slot value of the question is made up
        words = set(ex["pseudo_input"].replace("?", " ").replace("'", " ").split())
        assert not words & taken, words & taken
        assert not any(e["pseudo_input"] == ex["pseudo_input"] for e in plain)
    others = {e["pseudo_input"] for split in ("train", "heldout") for e in generate_examples("os", 160, seed=0, split=split)}
    assert not others & {e["pseudo_input"] for e in fresh}
    with pytest.raises(ValueError, match="pretrain split only"):
        generate_examples("os", 4, seed=0, split="heldout", fresh=True)
    with pytest.raises(ValueError, match="only the os task"):
        generate_examples("kg", 4, seed=0, split="pretrain", fresh=True)
    drill = g.copy_drill(20, seed=0)
    assert drill == g.copy_drill(20, seed=0) and len({d[0]["content"] for d in drill}) == 20
    for user, assistant in drill:
        assert user["content"] == "Repeat these exactly: " + assistant["content"]
        assert not set(assistant["content"].split()) & taken


def test_made_up_values_of_vocabulary_pieces_spell_only_those_pieces_and_never_a_taken_word():
    import random
    import re

    from genpi.tasks import generators as g

    pieces = ("led", "g", "er", "site", "up", "lo", "ads", "inbox")
    assert {"site", "inbox"} <= g._taken_words()  # words of genpi's problems' paths, which values must never be
    spelled = re.compile(r"^(?:" + "|".join(pieces) + r")+$")
    kept = {"var", "opt", "srv", "data", "usr", "local", "home", "bin", "sbin"}  # the pools' fixed path parts

    def check(value: str, name: str) -> None:
        assert value not in g._taken() and len(value) > 1
        if name == "EXTS":  # a piece's first 2-4 letters
            assert any(p.startswith(value) for p in pieces), value
            return
        words = [w for w in value.split("/") if w]
        if name == "PROCS":  # a word and one of the pool's endings
            words = [re.sub(r"(-server|3)$", "", words[0])]
            assert spelled.match(words[0]) or spelled.match(words[0][:-1]), value
        else:
            assert all(spelled.match(w) or w in kept for w in words), value
        assert not set(words) & (g._taken_words() - kept), value

    rng = random.Random(0)
    for name in sorted(g.ENV_SLOT_VALUES):
        for _ in range(200):
            check(g.fresh_value(rng, name, pieces), name)
    # a terminal's final newline on the os observations, and nothing else changed
    plain = generate_examples("os", 24, seed=0, split="train")
    ended = generate_examples("os", 24, seed=0, split="train", terminal_newline=True)
    observed = [(a["teacher_output_conv"][1]["content"], b["teacher_output_conv"][1]["content"])
                for a, b in zip(plain, ended)]
    assert all(b == a + "\n" and a.startswith(g.OS_OBSERVATION) for a, b in observed)
    assert [g.with_terminal_newline(a) for a in plain] == ended == [g.with_terminal_newline(b) for b in ended]
    assert generate_examples("kg", 8, seed=0, terminal_newline=True) == generate_examples("kg", 8, seed=0)
    fresh = generate_examples("os", 16, seed=0, split="pretrain", fresh=True, pieces=pieces)
    assert fresh != generate_examples("os", 16, seed=0, split="pretrain", fresh=True)
    drilled = [v for _, answer in g.copy_drill(50, seed=0, pieces=pieces) for v in answer["content"].split()]
    assert all(v not in g._taken() for v in drilled) and any(spelled.match(v) for v in drilled)


# the later settings switched off: the recipe of the first shipped weights, whose hash must not change
OFF = {"fresh_slots": "", "copy_steps": 0, "copy_mix": 0, "fresh_values": "words", "task_weights": "",
       "terminal_newline": False}


def test_later_pretraining_settings_are_checked_and_leave_the_recipe_when_off():
    from genpi.models.tiny_agent import recipe

    assert recipe(pretrain_config(OFF)) == {k: v for k, v in DEFAULT_PRETRAIN.items()
                                            if k not in ("fresh_slots", "copy_steps", "copy_batch_size", "copy_lr",
                                                         "copy_mix", "fresh_values", "task_weights",
                                                         "terminal_newline")}
    default = recipe(pretrain_config(None))  # the four-task recipe: every later setting on
    assert default["fresh_slots"] == "os" and default["copy_steps"] == 1500 and default["copy_mix"] == 3
    on = pretrain_config({**OFF, "fresh_slots": "[os]", "copy_steps": "300"})
    assert on["fresh_slots"] == "os" and recipe(on)["copy_steps"] == 300 and recipe(on)["copy_lr"] == 1e-3
    assert pretrain_config({"fresh_slots": ["os"]})["fresh_slots"] == "os" == pretrain_config({"fresh_slots": "'os'"})[
        "fresh_slots"]  # a list from a config, or a quoted string from a command line
    # no drill: its learning rate means nothing
    assert recipe(pretrain_config({**OFF, "copy_lr": 0.5})) == recipe(pretrain_config(OFF))
    assert agent_hash(_arch(), on) != agent_hash(_arch(), pretrain_config(OFF))
    for bad, what in [({"fresh_slots": "os,kg"}, "only os can take made-up slot values, not kg"),
                      ({"copy_steps": -1}, "copy_steps >= 0"), ({"copy_steps": 5, "copy_batch_size": 0}, "copy_batch_size"),
                      ({"copy_mix": -1}, "copy_mix=-1"), ({"fresh_values": "tokens"}, "choose one of"),
                      ({"steps": "abc"}, "steps='abc' is not a whole number"),
                      ({"terminal_newline": "maybe"}, "terminal_newline='maybe' is not valid"),
                      ({"task_weights": "os:0"}, "whole weights >= 1"), ({"task_weights": "shell:2"}, "task:weight")]:
        with pytest.raises(Exception, match=what):
            pretrain_config(bad)


def test_the_copy_drill_stage_trains_on_the_repeated_words(tiny_path, tiny_tokenizer):
    from transformers import LlamaForCausalLM

    from genpi.models.tiny_agent import _copy_drill

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(str(tiny_path))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = _copy_drill(model, tiny_tokenizer, pretrain_config({"copy_steps": 3, "copy_batch_size": 4}), lambda _m: None)
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def recipe_has_mix(pre) -> bool:
    from genpi.models.tiny_agent import recipe

    return "copy_mix" in recipe(pre)


def test_pretraining_passes_the_later_settings_on(tiny_path, monkeypatch, tmp_path):
    from genpi.models import tiny_agent
    from genpi.models.tiny import arch_config

    calls = {}

    def drill(_model, _tok, pre, _say, pieces=None, **_k):
        calls["drill"], calls["pieces"] = pre, pieces
        return [2.0]

    def train(_model, groups, _pre, _pad, _say, **_k):
        calls["corpus"] = groups
        return [1.0]

    monkeypatch.setattr(tiny_agent, "_copy_drill", drill)
    monkeypatch.setattr(tiny_agent, "_train", train)
    monkeypatch.setattr(tiny_agent, "format_rates", lambda *_a, **_k: {})
    pre = pretrain_config({**OFF, "fresh_slots": "os", "copy_steps": 2, "examples_per_task": 8, "copy_mix": 2,
                           "steps": 50, "view_weights": "2,1,1"})
    tiny_agent._pretrain_into(tmp_path, tiny_path, arch_config(None), pre, "x", lambda _m: None)
    assert calls["drill"]["copy_steps"] == 2
    # the drill mixed into the corpus: copy_mix steps in every cycle of the 4 tasks' views (2,1,1), each chat seen once
    cycle = tiny_agent._cycle(calls["corpus"], pre)
    assert len(cycle) == 4 * 4 + 2 and cycle.count(tiny_agent.DRILL_KEY) == 2
    # as many chats as the drill's steps spread evenly; the steps it really takes, counted over the schedule, are at
    # most copy_mix more (the drill leads each cycle), so a chat is seen at most twice
    chats = len(calls["corpus"][tiny_agent.DRILL_KEY]) // pre["batch_size"]
    taken = sum(cycle[step % len(cycle)] == tiny_agent.DRILL_KEY for step in range(pre["steps"]))
    assert chats * pre["batch_size"] == len(calls["corpus"][tiny_agent.DRILL_KEY]) and chats <= taken <= chats + 2
    assert recipe_has_mix(pre) and not recipe_has_mix(pretrain_config({**OFF, "copy_mix": 0}))
    assert calls["pieces"] is None  # fresh_values=words
    # task weights: the os task's views three times a cycle, the drill as before
    heavy = pretrain_config({**pre, "task_weights": {"os": 3}})
    assert heavy["task_weights"] == "os:3" == pretrain_config({"task_weights": "'os:3,kg:1'"})["task_weights"]
    assert pretrain_config({"task_weights": ["os:3", "kg:2"]})["task_weights"] == "kg:2,os:3"  # a list from a config
    cycle = tiny_agent._cycle(calls["corpus"], heavy)
    assert len(cycle) == 6 * 4 + 2 and cycle.count(("os", "teacher")) == 6 and cycle.count(("kg", "teacher")) == 2
    record = read_card(tmp_path)
    assert record["loss_first"][:2] == [2.0, 1.0] and record["pretrain"]["fresh_slots"] == "os"
    texts = calls["corpus"][("os", "teacher")]
    fresh = {e["pseudo_input"] for e in generate_examples("os", 8, seed=0, split="pretrain", fresh=True)}
    plain = {e["pseudo_input"] for e in generate_examples("os", 8, seed=0, split="pretrain")}
    from transformers import AutoTokenizer

    decoded = " ".join(AutoTokenizer.from_pretrained(str(tiny_path)).decode(ids) for ids, _ in texts)
    assert all(x in decoded for x in fresh) and not any(x in decoded for x in plain)


def test_cached_tiny_agent_follows_the_prompt_format(tiny_agent_path):
    """A handful of held-out inputs per task: the format with the prompt, plain answers without it."""
    from genpi.models.factory import load_model_and_tokenizer
    from genpi.synthesis.clients.base import Sampling
    from genpi.synthesis.clients.hf import HFClient

    card = read_card(tiny_agent_path)
    assert card["weights_sha256"] and (tiny_agent_path / MARKER).is_file()
    model, tok = load_model_and_tokenizer({"name_or_path": "tiny_agent"}, for_training=False)
    client = HFClient(model, tok)
    greedy = Sampling(temperature=0.0, max_tokens=96)
    with_prompt = without = total = 0
    for name in TASK_NAMES:
        task = builtin_task(name)
        inputs = [e["pseudo_input"] for e in generate_examples(name, 4, seed=7, split="heldout")]
        with_prompt += sum(map(task.check_format, client.chat([task.teacher_messages(x) for x in inputs], greedy)))
        without += sum(map(task.check_format, client.chat([task.student_messages(x) for x in inputs], greedy)))
        total += len(inputs)
    assert with_prompt / total >= 0.6, card["format_rates"]
    assert without / total <= 0.2
    for rates in card["format_rates"].values():
        assert rates["with_prompt"] > rates["without_prompt"]


def test_pieces_pretraining_makes_its_values_of_the_vocabulary(tiny_path, tiny_tokenizer, monkeypatch, tmp_path):
    from genpi.models import tiny_agent
    from genpi.models.tiny import arch_config

    calls = {}
    monkeypatch.setattr(tiny_agent, "_copy_drill", lambda _m, _t, _p, _s, pieces=None, **_k: calls.update(pieces=pieces) or [2.0])
    monkeypatch.setattr(tiny_agent, "_train", lambda _m, groups, *_a, **_k: calls.update(corpus=groups) or [1.0])
    monkeypatch.setattr(tiny_agent, "format_rates", lambda *_a, **_k: {})
    pre = pretrain_config({"fresh_slots": "os", "copy_steps": 2, "examples_per_task": 8, "fresh_values": "pieces",
                           "terminal_newline": "true"})
    # pieces with nothing made up (no made-up slots, no drill) would train the default model: not a new recipe
    assert recipe(pretrain_config({**OFF, "fresh_values": "pieces"})) == recipe(pretrain_config(OFF))
    assert recipe(pre)["fresh_values"] == "pieces" and agent_hash(_arch(), pre) != agent_hash(
        _arch(), {**pre, "fresh_values": "words"})
    tiny_agent._pretrain_into(tmp_path, tiny_path, arch_config(None), pre, "x", lambda _m: None)
    pieces = tiny_agent.vocab_pieces(tiny_tokenizer)
    assert calls["pieces"] == pieces and len(pieces) > 1000 and all(p.isalpha() and p.islower() for p in pieces)
    os_task = {"os": builtin_task("os")}
    want = encode_corpus(tiny_tokenizer, os_task, 8, 0, pre["max_tokens"], ["os"], pieces, terminal_newline=True)
    assert calls["corpus"][("os", "teacher")] == want[("os", "teacher")]
    assert want != encode_corpus(tiny_tokenizer, os_task, 8, 0, pre["max_tokens"], ["os"], pieces)
    decoded = " ".join(tiny_tokenizer.decode(ids) for ids, _ in want[("os", "teacher")])
    examples = generate_examples("os", 8, seed=0, split="pretrain", fresh=True, pieces=pieces)
    assert all(e["pseudo_input"] in decoded for e in examples)


def test_a_killed_pretraining_resumes_to_the_same_weights(tiny_path, monkeypatch, tmp_path):
    """A build killed in the drill, at the drill's end and in the corpus stage, restarted each time, ends with the
    weights and losses of a build never stopped (checkpoints every step here; every two minutes by default). A state
    of another build, or one that does not load, is set aside with a message; the build command removes the state
    once its folder is in place."""
    import hashlib
    import json

    from genpi.models import tiny_agent
    from genpi.models.tiny import arch_config

    monkeypatch.setattr(tiny_agent, "format_rates", lambda *_a, **_k: {})
    monkeypatch.setattr(tiny_agent.Checkpoints, "EVERY_S", 0.0)
    pre = pretrain_config({"copy_steps": 3, "copy_batch_size": 2, "copy_mix": 1, "examples_per_task": 4,
                           "batch_size": 2, "steps": 7, "warmup_steps": 2, "eval_inputs": 1})
    said = []

    def build(out: Path, resume: Path | None, recipe=pre) -> tuple[str, list[float]]:
        out.mkdir()
        tiny_agent._pretrain_into(out, tiny_path, arch_config(None), recipe, "x", said.append, resume)
        card = json.loads((out / MARKER).read_text())
        assert card["weights_sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
        return card["weights_sha256"], card["loss_first"]

    whole = build(tmp_path / "whole", None)

    saved = []
    real_save = tiny_agent.Checkpoints.save

    def save_then_die(self, stage, step, *args, **kwargs):
        real_save(self, stage, step, *args, **kwargs)
        saved.append((stage, step))
        if (stage, step) in {("drill", 2), ("corpus", 0), ("corpus", 4)}:
            raise KeyboardInterrupt  # stands in for a kill right after a checkpoint

    monkeypatch.setattr(tiny_agent.Checkpoints, "save", save_then_die)
    resume = tmp_path / ".x.resume"
    for attempt in range(3):
        with pytest.raises(KeyboardInterrupt):
            build(tmp_path / f"killed{attempt}", resume)
        assert (resume / tiny_agent.Checkpoints.FILE).is_file()
    assert saved == [("drill", 1), ("drill", 2), ("corpus", 0), *[("corpus", k) for k in range(1, 5)]]  # no repeat
    monkeypatch.setattr(tiny_agent.Checkpoints, "save", real_save)
    assert build(tmp_path / "resumed", resume) == whole
    assert not said or "starts over" not in " ".join(said)

    # a state of another recipe is not resumed: that build starts over and says so
    other = pretrain_config({**pre, "lr": 2e-3})
    build(tmp_path / "other", resume, other)
    assert any("saved by another build (recipe differ)" in m for m in said)
    # a state that does not load: the same
    (resume / tiny_agent.Checkpoints.FILE).write_bytes(b"truncated")
    assert build(tmp_path / "after_bad_file", resume) == whole
    assert any("does not load" in m for m in said)

    # the build command clears the state once the build is in place
    monkeypatch.setattr(tiny_agent, "build_tiny", lambda *_a, **_k: tiny_path)
    monkeypatch.setattr(tiny_agent, "_pretrain_into",
                        lambda tmp, *_a, **_k: (tmp / MARKER).write_text("{}"))
    folder = tiny_agent.agent_folder({"tiny_agent": pre}, tmp_path / "cache")
    kept = folder.parent / f".{folder.name}.resume"
    kept.mkdir(parents=True)
    (kept / tiny_agent.Checkpoints.FILE).write_bytes(b"state")
    assert tiny_agent.build_tiny_agent({"tiny_agent": pre}, tmp_path / "cache", None, use_shipped=False) == folder
    assert not kept.exists()
