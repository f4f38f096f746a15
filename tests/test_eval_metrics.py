"""Evaluation metrics on hand-made cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from genpi import losses
from genpi.evaluation import metrics
from genpi.evaluation.metrics import exact_match, gap_closed, lcs_length, rouge_l, token_f1
from genpi.tasks import TASK_NAMES, build_task
from tests.helpers import CONF


# -- agreement -------------------------------------------------------------------------------------
def test_identical_answers_agree_fully():
    text = "Think: count them.\nAct: bash\n```bash\nls /etc | wc -l\n```"
    assert exact_match(text, text) == token_f1(text, text) == rouge_l(text, text) == 1.0
    assert exact_match("  same\n", "same") == 1.0  # surrounding whitespace does not count


def test_disjoint_answers_agree_not_at_all():
    assert exact_match("a b c", "d e f") == token_f1("a b c", "d e f") == rouge_l("a b c", "d e f") == 0.0


def test_token_f1_known_value():
    # overlap {the, cat} = 2; precision 2/3, recall 2/4 -> F1 = 2*(2/3)*(1/2)/(2/3+1/2) = 4/7
    assert token_f1("the cat sat", "the cat is here") == pytest.approx(4 / 7)
    # multiset overlap: "a a" vs "a" shares one "a"
    assert token_f1("a a", "a") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_rouge_l_known_value():
    # LCS("a b c d e", "a c e f") = "a c e" = 3; P = 3/5, R = 3/4 -> F = 2/3
    assert lcs_length("abcde", "acef") == 3
    assert rouge_l("a b c d e", "a c e f") == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    # order matters for ROUGE-L but not for F1
    assert token_f1("b a", "a b") == 1.0
    assert rouge_l("b a", "a b") == pytest.approx(0.5)


def test_empty_answers():
    assert token_f1("", "") == rouge_l("", "") == exact_match("", "") == 1.0
    assert token_f1("", "x") == rouge_l("x", "") == 0.0


def test_agreement_lists_per_example():
    out = metrics.agreement(["a b", "c"], ["a b", "d"])
    assert out == {"exact_match": [1.0, 0.0], "token_f1": [1.0, 0.0], "rouge_l": [1.0, 0.0]}
    with pytest.raises(ValueError):
        metrics.agreement(["a"], [])


# -- gap closed ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("floor,teacher", [(0.2, 0.9), (0.0, 1.0), (2.5, 0.0)])  # higher- and lower-is-better
def test_gap_closed_is_one_for_a_perfect_student_and_zero_for_the_floor(floor, teacher):
    assert gap_closed(floor, teacher, teacher) == pytest.approx(1.0)
    assert gap_closed(floor, floor, teacher) == pytest.approx(0.0)
    halfway = (floor + teacher) / 2
    assert gap_closed(floor, halfway, teacher) == pytest.approx(0.5)


def test_gap_closed_keeps_its_sign_and_guards_zero_gaps():
    assert gap_closed(1.0, 1.5, 0.0) == pytest.approx(-0.5)  # KL worse than the floor: negative
    assert gap_closed(0.2, 1.0, 0.6) == pytest.approx(2.0)   # past the teacher: above 1, not clipped
    assert gap_closed(0.5, 0.7, 0.5) is None                 # floor == teacher: no gap to close
    assert gap_closed(None, 0.7, 0.5) is None
    # lower-is-better KL with the teacher at 0 reads 1 - student / floor
    assert gap_closed(0.8, 0.2, 0.0) == pytest.approx(1 - 0.2 / 0.8)


def test_summarize_perfect_student_and_floor_like_student():
    teacher_answers = ["Act: finish", "Act: answer(3)"]
    per = {
        "teacher": {**metrics.agreement(teacher_answers, teacher_answers), "format_ok": [1.0, 1.0]},
        "student": {**metrics.agreement(teacher_answers, teacher_answers), "format_ok": [1.0, 1.0]},
        "floor": {**metrics.agreement(["no", "nope"], teacher_answers), "format_ok": [0.0, 0.0]},
    }
    kl = {"tokens": [2, 3], "student": {"kl_forward": [0.0, 0.0], "kl_reverse": [0.0, 0.0]},
          "floor": {"kl_forward": [1.0, 2.0], "kl_reverse": [0.5, 0.5]}}
    table = metrics.summarize(per, kl, has_format=True)
    assert table["teacher"]["kl_forward"] == 0.0 and table["teacher"]["exact_match"] == 1.0
    assert table["floor"]["kl_forward"] == pytest.approx((1 * 2 + 2 * 3) / 5)  # token-weighted
    assert all(v == pytest.approx(1.0) for v in table["gap_closed"].values())
    # a student no better than the floor closes nothing
    per["student"] = per["floor"]
    kl["student"] = kl["floor"]
    table = metrics.summarize(per, kl, has_format=True)
    assert all(v == pytest.approx(0.0) for v in table["gap_closed"].values())


# -- format checks, as evaluation uses them -------------------------------------------------------------
VALID = {
    "os": "Think: count the files.\n\nAct: bash\n\n```bash\nls /etc | wc -l\n```",
    "webshop": "Thought: look for it.\nAction: search[red cotton t-shirt]",
    "m2w": "Thought: the button.\nAnswer: B.\nAction: CLICK",
    "kg": "Thought: relations first.\nAction: get_relations(Barack Obama)",
}
INVALID = {
    "os": "Think: two actions.\nAct: finish\nAct: answer(3)",
    "webshop": "I would search for a shirt.",
    "m2w": "The answer is the second option.",
    "kg": "Action: unknown_tool(x)",
}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_format_rate_uses_each_tasks_check(name):
    task = build_task(**OmegaConf.to_container(OmegaConf.load(CONF / "task" / f"{name}.yaml"), resolve=True))
    flags = metrics.format_flags([VALID[name], INVALID[name], VALID[name]], task.check_format)
    assert flags == [1.0, 0.0, 1.0]
    per = {m: {**metrics.agreement([VALID[name]], [VALID[name]]), "format_ok": f}
           for m, f in (("teacher", [1.0]), ("student", [1.0]), ("floor", [0.0]))}
    table = metrics.summarize(per, None, has_format=True)
    assert table["student"]["format_rate"] == 1.0 and table["gap_closed"]["format_rate"] == 1.0
    assert "kl_forward" not in table["teacher"]


# -- KL per example ------------------------------------------------------------------------------------
def test_divergence_per_example_matches_the_loss_and_is_zero_for_identical_states():
    torch.manual_seed(0)
    weight = torch.randn(50, 8)
    student, teacher = torch.randn(7, 8), torch.randn(7, 8)
    per = metrics.divergence_per_example(student, teacher, [3, 4], weight, chunk_size=2)
    for name, kind in metrics.KL_KINDS.items():
        s_logits, t_logits = student @ weight.T, teacher @ weight.T
        ones = torch.ones(3, dtype=torch.bool)
        assert per[name][0] == pytest.approx(float(losses.distill_loss(s_logits[:3], t_logits[:3], ones, kind=kind)),
                                             rel=1e-5)
        # the token-weighted mean of the examples is the loss over all tokens
        whole = float(losses.distill_loss(s_logits, t_logits, torch.ones(7, dtype=torch.bool), kind=kind))
        assert metrics.token_weighted_mean(per[name], [3, 4]) == pytest.approx(whole, rel=1e-5)
    same = metrics.divergence_per_example(teacher, teacher, [3, 4], weight)
    assert all(abs(v) < 1e-6 for vals in same.values() for v in vals)


def test_kl_to_teacher_is_zero_when_student_and_floor_see_what_the_teacher_sees(tiny_path):
    """Identical models and inputs give KL 0: a fresh LoRA (B = 0) and teacher input = student input."""
    from genpi.data.datamodule import Collator
    from genpi.models.factory import apply_lora, load_model, load_tokenizer
    from genpi.module import GenPIModule

    tok = load_tokenizer({"name_or_path": "tiny"})
    model = apply_lora(load_model({"name_or_path": "tiny"}, for_training=False), {"r": 4, "alpha": 8, "dropout": 0.0})
    module = GenPIModule(model, {"kl": {"weight": 0.0}}, {}, teacher_prompt_ids=[]).eval()
    rows = []
    for text, answer in (("list the files", "Act: finish"), ("count users please", "Act: answer(3)")):
        ids = tok(text + answer, add_special_tokens=False)["input_ids"]
        n = len(tok(answer, add_special_tokens=False)["input_ids"])
        rows.append({"kl": {"student_input_ids": ids, "teacher_input_ids": ids, "response_len": n}})
    batch = Collator(tok.pad_token_id)(rows)
    kl = metrics.kl_to_teacher(module, [batch])
    assert len(kl["tokens"]) == 2 and all(n > 0 for n in kl["tokens"])
    for name in ("student", "floor"):
        for vals in kl[name].values():
            assert all(abs(v) < 1e-6 and math.isfinite(v) for v in vals)
