"""The training module's passes: the teacher's cached prompt prefix and the shared prompt of w_prompt batches give
exactly what the plain passes give; a term of weight 0 runs no pass."""

from __future__ import annotations

import pytest
import torch

from genpi.data.datamodule import Collator, GenPIDataModule
from genpi.models.factory import load_model
from genpi.module import GenPIModule
from genpi.tasks.base import builtin_task

LORA = {"name_or_path": "tiny", "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}}


def _module(tiny_tokenizer, loss: dict, prefix_cache: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = load_model(LORA, for_training=True)
    for name, p in model.named_parameters():  # a non-zero adapter, so that "adapter off" is a real switch
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    task = builtin_task("os")
    loss = {**loss, "kl": {**loss.get("kl", {}), "prefix_cache": prefix_cache}}
    from genpi.data.tokenize import teacher_prompt

    return GenPIModule(model, loss, {}, teacher_prompt(tiny_tokenizer, task).ids), task


def _batch(tiny_tokenizer, task, losses, drop_prob=None, n=4):
    dm = GenPIDataModule(task, tiny_tokenizer, losses=losses, batch_size=n, val_size=1, test_size=1,
                         w_prompt_drop_prob=drop_prob)
    dm.setup()
    return Collator(tiny_tokenizer.pad_token_id)([dm.datasets["train"][i] for i in range(n)])


def test_prefix_cached_teacher_equals_the_uncached_teacher(tiny_tokenizer):
    cached, task = _module(tiny_tokenizer, {"kl": {"weight": 1.0}}, prefix_cache=True)
    plain, _ = _module(tiny_tokenizer, {"kl": {"weight": 1.0}}, prefix_cache=False)
    plain.model.load_state_dict(cached.model.state_dict())
    batch = _batch(tiny_tokenizer, task, ("kl",))
    a, b = cached.teacher_hidden(batch["kl"]), plain.teacher_hidden(batch["kl"])
    assert a.shape == b.shape and a.shape[0] == int(batch["kl"]["teacher_response_mask"].sum())
    weight = cached.lm_head()[0]
    assert torch.allclose(a @ weight.T, b @ weight.T, atol=1e-5)
    # the teacher is the base: switching the adapter off matters, and the student differs from it
    with torch.no_grad():
        student = cached.hidden(batch["kl"]["student_input_ids"], batch["kl"]["student_attention_mask"])
    assert student[batch["kl"]["student_response_mask"]].shape == a.shape
    assert float(cached.kl_loss(batch["kl"])) > 0


def test_shared_prompt_in_w_prompt_batches_gives_the_same_loss_and_gradients(tiny_tokenizer):
    shared, task = _module(tiny_tokenizer, {"sft": {"weight": 1.0}}, prefix_cache=True)
    plain, _ = _module(tiny_tokenizer, {"sft": {"weight": 1.0}}, prefix_cache=False)
    plain.model.load_state_dict(shared.model.state_dict())
    batch = _batch(tiny_tokenizer, task, ("sft",), drop_prob=0.0)
    prompt_len = len(shared.teacher_prompt_ids)
    assert (batch["sft"]["input_ids"][:, :prompt_len] == torch.tensor(shared.teacher_prompt_ids)).all()
    losses = []
    for module in (shared, plain):
        loss = module.ce_loss(batch["sft"])
        loss.backward()
        losses.append((float(loss), {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}))
    assert losses[0][0] == pytest.approx(losses[1][0], abs=1e-5)
    for name, grad in losses[0][1].items():
        assert torch.allclose(grad, losses[1][1][name], atol=1e-5, rtol=1e-3), name


def test_a_term_of_weight_zero_runs_no_pass(tiny_tokenizer, monkeypatch):
    module, task = _module(tiny_tokenizer, {"sft": {"weight": 1.0}, "pg": {"weight": 0.0}, "kl": {"weight": 0.0}},
                           prefix_cache=True)
    batch = _batch(tiny_tokenizer, task, ("sft", "pg", "kl"))
    calls = []
    monkeypatch.setattr(module, "kl_loss", lambda *a, **k: calls.append("kl") or torch.zeros(()))
    real_ce = module.ce_loss
    monkeypatch.setattr(module, "ce_loss", lambda part, *a: calls.append("ce") or real_ce(part, *a))
    out = module.compute(batch)
    assert calls == ["ce"] and set(out) == {"sft", "loss"}


def test_gradient_accumulation_2x4_equals_one_batch_of_8(tiny_tokenizer):
    """Token-exact accumulation: two micro-batches of 4, each weighted by its share of the window's tokens, give the
    loss and the gradients of one batch of 8 (a mean of the two per-batch means would not: their token counts
    differ)."""
    from genpi.data.datamodule import LengthGroupedBatchSampler, TokenWindowSampler

    module, task = _module(tiny_tokenizer, {"sft": {"weight": 0.7}, "pg": {"weight": 0.3}, "kl": {"weight": 1.0}},
                           prefix_cache=True)
    dm = GenPIDataModule(task, tiny_tokenizer, losses=("sft", "pg", "kl"), batch_size=4, val_size=1, test_size=1)
    dm.setup()
    ds = dm.datasets["train"]
    windows = TokenWindowSampler(LengthGroupedBatchSampler(ds.lengths(), 4, seed=0), ds, accumulate=2)
    first, second = list(windows)[:2]
    collate = Collator(tiny_tokenizer.pad_token_id)
    micro = [collate([ds[key] for key in batch]) for batch in (first, second)]
    assert micro[0]["window"] == micro[1]["window"] and micro[0]["window"]["accumulate"] == 2
    n_sft = [int((m["sft"]["labels"] != -100).sum()) for m in micro]
    assert n_sft[0] != n_sft[1]  # unequal token counts: where a mean of means would be wrong

    params = [p for p in module.model.parameters() if p.requires_grad]
    accumulated = 0.0
    for batch in micro:  # what Lightning does with accumulate_grad_batches=2: backward of loss / 2, grads summed
        loss = module.compute(batch)["loss"] / 2
        loss.backward()
        accumulated += float(loss)
    grads_accumulated = [p.grad.clone() for p in params]
    module.model.zero_grad(set_to_none=True)
    whole = collate([ds[i] for i, _ in first + second])
    loss = module.compute(whole)["loss"]
    loss.backward()
    assert accumulated == pytest.approx(float(loss), abs=1e-5)
    for a, b in zip(grads_accumulated, [p.grad for p in params]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# --- on-policy distillation (issue 13) ---
ON_POLICY = {"kl": {"weight": 1.0, "kind": "reverse_kl", "on_policy": True,
                    "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6}}}


def _float64_divergence(module, ds, rows, answers, kind: str, beta: float = 0.5) -> float:
    """Per-token divergence at the sampled positions, each sequence run alone (no padding, no prompt cache) and the
    distributions taken in float64: the teacher is the base (adapter off) after prompt + input, the student the
    adapter after the input alone."""
    total, n = 0.0, 0
    for i, answer in zip(rows, answers):
        ex = ds[i]["kl"]
        views = {side: ex[f"{side}_input_ids"][: len(ex[f"{side}_input_ids"]) - ex["response_len"]]
                 for side in ("student", "teacher")}
        with torch.no_grad():
            s = module.model(torch.tensor([views["student"] + answer])).logits[0].double()
            with module.model.disable_adapter():
                t = module.model(torch.tensor([views["teacher"] + answer])).logits[0].double()
        s = s[len(views["student"]) - 1 : -1].log_softmax(-1)  # the positions that predict the answer's tokens
        t = t[len(views["teacher"]) - 1 : -1].log_softmax(-1)
        if kind == "reverse_kl":
            per_token = (s.exp() * (s - t)).sum(-1)
        else:
            m = (beta * t.exp() + (1 - beta) * s.exp()).log()
            per_token = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
        total, n = total + float(per_token.sum()), n + len(answer)
    return total / n


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_on_policy_loss_on_fixed_answers_equals_float64_divergence(tiny_tokenizer, kind):
    module, task = _module(tiny_tokenizer, {"kl": {**ON_POLICY["kl"], "kind": kind, "beta": 0.5}},
                           prefix_cache=True)
    module.eval()
    dm = GenPIDataModule(task, tiny_tokenizer, losses=("kl",), batch_size=3, val_size=1, test_size=1)
    dm.setup()
    ds = dm.datasets["train"]
    batch = Collator(tiny_tokenizer.pad_token_id)([ds[i] for i in range(3)])
    g = torch.Generator().manual_seed(1)
    eot = tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    # answers of different lengths (padding in the scoring batch), one closed by the end of turn
    answers = [torch.randint(10, 4000, (n,), generator=g).tolist() for n in (5, 1, 3)]
    answers[2] += [eot]
    got = float(module.on_policy_kl_loss(batch["kl"], answers=answers))
    want = _float64_divergence(module, ds, range(3), answers, kind)
    assert got == pytest.approx(want, rel=1e-4) and want > 0
    assert module.opcd_stats["sampled_len"] == pytest.approx(10 / 3)
    if kind == "reverse_kl":
        assert module.opcd_stats["reverse_kl"] == pytest.approx(got)
    else:  # the logged reverse KL is the reverse KL whatever the trained divergence
        assert module.opcd_stats["reverse_kl"] == pytest.approx(_float64_divergence(module, ds, range(3), answers,
                                                                                    "reverse_kl"), rel=1e-4)


def test_no_gradient_flows_through_the_sampling(tiny_tokenizer, monkeypatch):
    module, task = _module(tiny_tokenizer, ON_POLICY, prefix_cache=True)
    module.train()
    batch = _batch(tiny_tokenizer, task, ("kl",))
    modes = {n: m.training for n, m in module.model.named_modules()}
    seen = {}
    real_generate = module.model.generate

    def generate(*args, **kwargs):
        seen["grad"], seen["training"] = torch.is_grad_enabled(), module.model.training
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(module.model, "generate", generate)
    real_sample = module.sampler.sample
    monkeypatch.setattr(module.sampler, "sample", lambda *a: seen.setdefault("answers", real_sample(*a)))
    params = [p for p in module.model.parameters() if p.requires_grad]
    module.on_policy_kl_loss(batch["kl"], seed=7).backward()
    sampled_grads = [p.grad.clone() for p in params]
    assert seen["grad"] is False and seen["training"] is False  # sampled under no_grad, without dropout
    assert {n: m.training for n, m in module.model.named_modules()} == modes  # each module's mode given back
    eot = tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for answer in seen["answers"]:
        assert 1 <= len(answer) <= 6 and eot not in answer[:-1]  # cut after the first end of turn
    # the gradient is exactly that of the loss on the same tokens given as fixed data
    module.model.zero_grad(set_to_none=True)
    module.on_policy_kl_loss(batch["kl"], answers=seen["answers"]).backward()
    for a, b in zip(sampled_grads, [p.grad for p in params]):
        assert torch.equal(a, b)
    # the same seed samples the same tokens; sampling leaves the global RNG where it was
    state = torch.get_rng_state()
    assert real_sample(module.model, *_student_prompts(batch), 7) == seen["answers"]
    assert torch.equal(torch.get_rng_state(), state)


def _student_prompts(batch):
    from genpi.onpolicy import prompt_parts

    return (prompt_parts(batch["kl"])[0],)


def test_lmbda_zero_is_exactly_the_off_policy_kl_step(tiny_tokenizer, monkeypatch):
    on, task = _module(tiny_tokenizer, {"kl": {**ON_POLICY["kl"], "lmbda": 0.0}}, prefix_cache=True)
    off, _ = _module(tiny_tokenizer, {"kl": {"weight": 1.0, "kind": "reverse_kl"}}, prefix_cache=True)
    off.model.load_state_dict(on.model.state_dict())
    monkeypatch.setattr(on.sampler, "sample", lambda *a: pytest.fail("lmbda=0 sampled"))
    batch = _batch(tiny_tokenizer, task, ("kl",))
    results = []
    for module in (on, off):
        out = module.compute(batch)
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad for p in module.model.parameters() if p.requires_grad]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert on.opcd_stats == {}
