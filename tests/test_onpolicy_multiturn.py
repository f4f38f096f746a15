"""On-policy distillation over several turns (issue 13, item 3; ``loss.kl.sampling.turns``): the student samples
the agent's turns, the environment's turns come from the record's conversation, and both passes score the whole
trajectory at the sampled tokens only.

The scoring sequences are checked against the chat template's own rendering of the conversation (genpi's tiny
model and the real-tokenizer models), the loss against a direct float64 computation, the sampler's stops, its
determinism across a checkpoint, a ``fast_dev_run`` of ``genpi-train`` and the refusal of a bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genpi.data.datamodule import Collator, GenPIDataModule
from genpi.data.tokenize import IGNORE, chat_segments, encode_chat, response_ids
from genpi.models.factory import load_model
from genpi.module import GenPIModule
from genpi.onpolicy import conversation_batch, prompt_parts, turn_seed
from genpi.synthesis.clients.base import end_of_turn_ids
from genpi.tasks.base import builtin_task
from tests.conftest import REAL_VOCAB_FAMILIES
from tests.helpers import compose_cfg

LORA = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}


def _tokenizer(name: str, tiny_tokenizer, real_tokenizers):
    return tiny_tokenizer if name == "tiny" else real_tokenizers[name]


def _data(tok, task_name: str, turns: int, n: int = 3):
    """A data module of the task's sample data whose training KL examples carry their environment turns, and the
    first ``n`` training rows: ``(records, collated batch)``."""
    dm = GenPIDataModule(builtin_task(task_name), tok, losses=("kl",), batch_size=n, val_size=1, test_size=1,
                         kl_turns=turns)
    dm.setup()
    dm.add_conversations("train", dm.kl_turns)
    ds = dm.datasets["train"]
    return dm, dm.splits["train"][:n], Collator(tok.pad_token_id)([ds[i] for i in range(n)])


def _trajectory(rec: dict, texts: list[str]) -> list[dict]:
    """Agent turns ``texts`` with the record's environment turns between them (the user message that followed
    each agent turn in the record's conversation)."""
    conv, out = rec["teacher_output_conv"], []
    for k, text in enumerate(texts):
        if k:
            assert conv[2 * k - 1]["role"] == "user"
            out.append({"role": "user", "content": conv[2 * k - 1]["content"]})
        out.append({"role": "assistant", "content": text})
    return out


def _turn_texts(rows: int, counts: list[int]) -> list[list[str]]:
    """Made-up agent turns (not the record's), a different number per row."""
    return [[f"Thought:\nrow {i}, turn {k}: I look at the page again.\n\nAction:\nclick[item {k}{i}]"
             for k in range(counts[i])] for i in range(rows)]


def _chat_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of true positions."""
    runs: list[tuple[int, int]] = []
    for i in torch.nonzero(mask_row).flatten().tolist():
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


# -- the scoring batch is the chat template's rendering ------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", *REAL_VOCAB_FAMILIES])
def test_scoring_batch_is_the_templates_rendering_and_masks_exactly_the_sampled_turns(name, tiny_tokenizer,
                                                                                       real_tokenizers):
    tok = _tokenizer(name, tiny_tokenizer, real_tokenizers)
    dm, recs, batch = _data(tok, "webshop", turns=3)
    task = dm.task
    texts = _turn_texts(3, [3, 1, 2])
    answers = [[response_ids(tok, t) for t in row] for row in texts]
    kl = batch["kl"]
    assert all(len(env) == 2 for env in kl["env_student"])  # webshop's records have 4 agent turns; 3 kept -> 2 gaps
    student, teacher = prompt_parts(kl)
    scored = conversation_batch(student, teacher, answers, kl["env_student"], kl["env_teacher"], tok.pad_token_id)
    for i, rec in enumerate(recs):
        conv = _trajectory(rec, texts[i])
        for side, head in (("student", task.student_messages(rec["pseudo_input"])),
                           ("teacher", task.teacher_messages(rec["pseudo_input"]))):
            n = int(scored[f"{side}_attention_mask"][i].sum())
            seq = scored[f"{side}_input_ids"][i, :n].tolist()
            want = _chat_ids(tok, head + conv)
            # the template's own ids, up to the last sampled turn's end-of-turn (ChatML writes a newline after it)
            assert seq == want[:n] and tok.decode(want[n:]).strip() == "", (side, i)
            if side == "teacher":
                assert seq[: len(dm.encoder.prompt.ids)] == dm.encoder.prompt.ids  # the prefix cache's prompt
            # the masked positions predict exactly the sampled turns, each decoding to the agent's turn as the
            # template writes it (content + end of turn); environment turns and headers stay unmasked
            runs = _runs(scored[f"{side}_response_mask"][i])
            assert [seq[a + 1 : b + 1] for a, b in runs] == answers[i]
            decoded = [tok.decode(seq[: b + 1])[len(tok.decode(seq[: a + 1])):] for a, b in runs]
            labels = [t for t, lab in chat_segments(tok, head + conv, label_from=len(head)) if lab]
            assert decoded == labels, (side, i)
            assert all(texts[i][k] in d for k, d in enumerate(decoded))
            assert int(scored[f"{side}_response_mask"][i].sum()) == sum(len(a) for a in answers[i])
        # after the views, the two sides hold the same tokens (sampled turns and environment turns alike)
        n_s, n_t = (int(scored[f"{side}_attention_mask"][i].sum()) for side in ("student", "teacher"))
        assert (scored["student_input_ids"][i, len(student[i]) : n_s].tolist()
                == scored["teacher_input_ids"][i, len(teacher[i]) : n_t].tolist())


# -- the loss ---------------------------------------------------------------------------------------------------
def _module(tok, model_name: str, kl: dict, init_seed: int = 0, stop_ids=None, task_name: str = "os"):
    torch.manual_seed(init_seed)
    model = load_model({"name_or_path": model_name, "lora": LORA}, for_training=True)
    for pname, p in model.named_parameters():  # a non-zero adapter: the student differs from the teacher
        if "lora_B" in pname:
            torch.nn.init.normal_(p, std=0.05)
    from genpi.data.tokenize import teacher_prompt

    loss = {"kl": {"weight": 1.0, "kind": "reverse_kl", "on_policy": True, **kl}}
    return GenPIModule(model, loss, {}, teacher_prompt(tok, builtin_task(task_name)).ids,
                       stop_ids=stop_ids if stop_ids is not None else end_of_turn_ids(tok), pad_id=tok.pad_token_id)


def _float64_reverse_kl(module, tok, task, recs, texts) -> float:
    """Per-token KL(student || teacher) over the agent turns of each trajectory, each sequence alone (no padding,
    no prompt cache), built by the chat template (not by genpi's scoring batch), distributions in float64."""
    total, n = 0.0, 0
    for rec, row in zip(recs, texts):
        conv = _trajectory(rec, row)
        logps = []
        for head, adapter in ((task.student_messages(rec["pseudo_input"]), True),
                              (task.teacher_messages(rec["pseudo_input"]), False)):
            ids, labels = encode_chat(tok, head + conv, label_from=len(head))
            last = max(i for i, lab in enumerate(labels) if lab != IGNORE) + 1
            positions = [i - 1 for i, lab in enumerate(labels[:last]) if lab != IGNORE]
            with torch.no_grad():
                if adapter:
                    logits = module.model(torch.tensor([ids[:last]])).logits[0]
                else:
                    with module.model.disable_adapter():
                        logits = module.model(torch.tensor([ids[:last]])).logits[0]
            logps.append(logits.double().log_softmax(-1)[positions])
        s, t = logps
        total, n = total + float((s.exp() * (s - t)).sum()), n + s.shape[0]
    return total / n


@pytest.mark.parametrize("name", ["tiny", "tiny_llama3_vocab"])
def test_multi_turn_loss_equals_a_float64_reverse_kl_over_the_sampled_tokens(name, tiny_tokenizer, real_tokenizers):
    tok = _tokenizer(name, tiny_tokenizer, real_tokenizers)
    module = _module(tok, name, {"sampling": {"turns": 3, "max_new_tokens": 8}}).eval()
    dm, recs, batch = _data(tok, "os", turns=3)
    texts = _turn_texts(3, [2, 1, 2])  # os records have 2 agent turns
    answers = [[response_ids(tok, t) for t in row] for row in texts]
    got = float(module.on_policy_kl_loss(batch["kl"], answers=answers))
    want = _float64_reverse_kl(module, tok, dm.task, recs, texts)
    assert want > 0 and got == pytest.approx(want, rel=1e-4)
    assert module.opcd_stats["turns"] == pytest.approx(5 / 3)
    assert module.opcd_stats["sampled_len"] == pytest.approx(sum(len(a) for row in answers for a in row) / 3)
    assert module.opcd_stats["reverse_kl"] == pytest.approx(got)


def test_turns_1_is_the_single_turn_loss_and_one_sampled_turn_per_row_gives_it_too(tiny_tokenizer):
    single = _module(tiny_tokenizer, "tiny", {"sampling": {"max_new_tokens": 6}}).eval()
    multi = _module(tiny_tokenizer, "tiny", {"sampling": {"max_new_tokens": 6, "turns": 3}}, init_seed=1).eval()
    multi.model.load_state_dict(single.model.state_dict())
    _, _, batch = _data(tiny_tokenizer, "os", turns=3)
    assert single.sampled_turns == 1 and multi.sampled_turns == 3
    # turns=1 reads only the single-answer views: the environment turns in the batch change nothing
    plain = {k: v for k, v in batch["kl"].items() if not k.startswith("env_")}
    g = torch.Generator().manual_seed(3)
    answers = [torch.randint(10, 4000, (n,), generator=g).tolist() for n in (4, 1, 6)]
    one = single.on_policy_kl_loss(batch["kl"], answers=answers)
    assert torch.equal(one, single.on_policy_kl_loss(plain, answers=answers))
    assert torch.equal(one, multi.on_policy_kl_loss(batch["kl"], answers=[[a] for a in answers]))
    assert multi.opcd_stats["turns"] == 1.0 and multi.opcd_stats["sampled_len"] == pytest.approx(11 / 3)
    # the first sampled turn is the single-turn sample of the same seed
    prompts = prompt_parts(batch["kl"])[0]
    first = [row[0] for row in multi.sampler.sample_turns(multi.model, prompts, batch["kl"]["env_student"], 11)]
    assert first == multi.sampler.sample(multi.model, prompts, 11) and turn_seed(11, 0) == 11
    with pytest.raises(Exception, match="kl_turns=3"):  # a batch without the environment turns is refused
        multi.on_policy_kl_loss(plain, seed=0)


# -- the sampler ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("task_name", "turns", "want"), [("webshop", 3, 3), ("os", 3, 2), ("webshop", 1, 1)],
                         ids=["stops_at_N", "stops_at_the_conversations_end", "turns_1"])
def test_sampler_stops_at_n_and_at_the_conversations_end_with_the_records_env_turns(tiny_tokenizer, monkeypatch,
                                                                                      task_name, turns, want):
    module = _module(tiny_tokenizer, "tiny", {"sampling": {"turns": turns}}, task_name=task_name)
    dm, recs, batch = _data(tiny_tokenizer, task_name, turns=turns)
    eot = tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    calls = []

    def fake_sample(model, prompts, seed):  # every turn closed by the end of turn, except row 2's second
        calls.append(([list(p) for p in prompts], seed))
        return [[50 + len(calls), 60 + i, eot] if not (len(calls) == 2 and i == len(prompts) - 1) else [70, 71]
                for i in range(len(prompts))]

    monkeypatch.setattr(module.sampler, "sample", fake_sample)
    prompts = prompt_parts(batch["kl"])[0]
    if turns == 1:  # the data module adds no environment turns: nothing reads them
        assert "env_student" not in batch["kl"]
        out = module.sampler.sample_turns(module.model, prompts, [[[1, 2]]] * 3, seed=5)
        assert [len(row) for row in out] == [1, 1, 1] and len(calls) == 1
        return
    envs = batch["kl"]["env_student"]
    out = module.sampler.sample_turns(module.model, prompts, envs, seed=5)
    lengths = [len(row) for row in out]
    assert lengths == [want, want, 2]  # row 2's second turn ran out of tokens: its trajectory ends there
    assert len(calls) == want and [s for _, s in calls] == [turn_seed(5, k) for k in range(want)]
    for k in range(1, want):  # turn k+1 follows [input, turn 1, env 1, ..., turn k, env k], env from the record
        for i, context in enumerate(calls[k][0]):
            expect = list(prompts[i])
            for j in range(k):
                expect += out[i][j] + envs[i][j]
            assert context == expect
            env_text = tiny_tokenizer.decode(envs[i][k - 1])
            assert recs[i]["teacher_output_conv"][2 * k - 1]["content"] in env_text
            assert recs[i]["teacher_output_conv"][2 * k]["content"] not in env_text  # the record's agent turn is not
    n_agent = sum(m["role"] == "assistant" for m in recs[0]["teacher_output_conv"])
    assert all(len(env) == min(turns, n_agent) - 1 for env in envs)


HALF_VOCAB_STOPS = list(range(0, 4000, 2))  # a sampled turn ends at its first even id: turns of 1-4 tokens


def test_same_sampler_state_samples_the_same_multi_turn_tokens_after_a_checkpoint(tiny_tokenizer, monkeypatch):
    """A run killed after some batches and resumed from its checkpoint (the sampler's generator in it) samples the
    same trajectories, of several turns, as the run that went on."""
    kl = {"sampling": {"turns": 3, "max_new_tokens": 4}}
    going = _module(tiny_tokenizer, "tiny", kl, stop_ids=HALF_VOCAB_STOPS)
    resumed = _module(tiny_tokenizer, "tiny", kl, init_seed=1, stop_ids=HALF_VOCAB_STOPS)
    other = _module(tiny_tokenizer, "tiny", kl, init_seed=1, stop_ids=HALF_VOCAB_STOPS)
    _, _, batch = _data(tiny_tokenizer, "webshop", turns=3, n=4)
    for _ in range(3):  # the batches before the checkpoint
        going.sampler.draw()
    checkpoint = {"state_dict": going.state_dict()}
    going.on_save_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"], strict=False)
    resumed.on_load_checkpoint(checkpoint)
    other.model.load_state_dict(going.model.state_dict())  # same weights, the generator where it started
    trajectories = {}
    for name, module in (("going", going), ("resumed", resumed), ("other", other)):
        real = module.sampler.sample_turns

        def spy(*a, _name=name, _real=real, **k):
            rng = torch.get_rng_state()
            trajectories[_name] = _real(*a, **k)
            assert torch.equal(torch.get_rng_state(), rng)  # sampling leaves the global RNG where it was
            return trajectories[_name]

        monkeypatch.setattr(module.sampler, "sample_turns", spy)
        module.compute(batch)
    assert trajectories["resumed"] == trajectories["going"]
    assert trajectories["other"] != trajectories["going"]
    assert max(len(row) for row in trajectories["going"]) >= 2  # several turns were sampled
    assert all(1 <= len(row) <= 3 for row in trajectories["going"])
    for key in ("sampled_len", "turns", "reverse_kl"):
        assert going.opcd_stats[key] == resumed.opcd_stats[key], key


# -- genpi-train ---------------------------------------------------------------------------------------------------
def test_fast_dev_run_with_three_turns(tmp_path, tiny_path, monkeypatch):
    from genpi.onpolicy import OnPolicySampler
    from genpi.train import train

    seen = []
    real = OnPolicySampler.sample_turns
    monkeypatch.setattr(OnPolicySampler, "sample_turns",
                        lambda self, model, prompts, envs, seed, turns=None:
                        seen.append((self.turns, [len(e) for e in envs])) or real(self, model, prompts, envs, seed))
    out = train(compose_cfg("train", ["loss=opcd", "task=webshop", "loss.kl.sampling.turns=3",
                                      "loss.kl.sampling.max_new_tokens=6", "debug=fdr"], tmp_path))
    assert out["trainer"].global_step == 1
    logged = out["trainer"].logged_metrics
    assert float(logged["train/opcd_on_policy"]) == 1.0
    assert 1 <= float(logged["train/opcd_turns"]) <= 3
    assert 1 <= float(logged["train/opcd_sampled_len"]) <= 3 * 6
    # the data module gave the training batch the records' environment turns (webshop: 4 agent turns, 3 kept)
    assert seen and seen[0][0] == 3 and all(n == 2 for n in seen[0][1])


@pytest.mark.parametrize(("value", "names"), [("0", "loss.kl.sampling.turns=0"), ("-2", "loss.kl.sampling.turns=-2"),
                                              ("1.5", "loss.kl.sampling.turns=1.5"), ("two", "'two'")])
def test_bad_turns_is_refused_in_one_line_before_any_model_loads(capsys, tmp_path, monkeypatch, value, names):
    import genpi.models.factory as factory
    from genpi.train import train
    from genpi.utils.wrappers import task_wrapper

    monkeypatch.setattr(factory, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("a model loaded"))
    cfg = compose_cfg("train", ["loss=opcd", f"loss.kl.sampling.turns={value}"], tmp_path / "out")
    with pytest.raises(SystemExit) as info:
        task_wrapper(train)(cfg)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert info.value.code == 2 and len(lines) == 1 and lines[0].startswith("genpi: error: "), err
    assert names in lines[0] and "Traceback" not in err
    written = {p.name for p in Path(cfg.hydra.run.dir).rglob("*")} if Path(cfg.hydra.run.dir).exists() else set()
    assert not written & {"metrics.json", "run.json", "adapter", "last.ckpt"}
