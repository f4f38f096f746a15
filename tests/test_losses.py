"""The loss functions at their edges, against textbook definitions written out here with plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from genpi import losses

torch.manual_seed(0)
V = 11


def _probs(logits: torch.Tensor) -> list[list[float]]:
    rows = []
    for row in logits.double().tolist():
        top = max(row)
        e = [math.exp(x - top) for x in row]
        rows.append([x / sum(e) for x in e])
    return rows


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def textbook(student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float = 0.5, temperature: float = 1.0):
    """Mean over rows of the divergence, from probabilities computed element by element in float64."""
    s_rows, t_rows = _probs(student / temperature), _probs(teacher / temperature)
    out = []
    for s, t in zip(s_rows, t_rows):
        if kind == "forward_kl":
            out.append(_kl(t, s))
        elif kind == "reverse_kl":
            out.append(_kl(s, t))
        else:
            m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t)]
            out.append(beta * _kl(t, m) + (1 - beta) * _kl(s, m))
    return sum(out) / len(out)


@pytest.fixture
def pair():
    return torch.randn(7, V) * 2, torch.randn(7, V) * 2


@pytest.mark.parametrize("kind", losses.KINDS)
def test_identical_logits_give_zero(pair, kind):
    s, _ = pair
    assert float(losses.distill_loss(s, s.clone(), torch.ones(7), kind=kind)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", losses.KINDS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_each_kind_equals_its_textbook_definition(pair, kind, beta):
    s, t = pair
    got = float(losses.distill_loss(s, t, torch.ones(7), kind=kind, beta=beta))
    assert got == pytest.approx(textbook(s, t, kind, beta), rel=1e-5)
    assert got > 0


def test_directions_are_what_their_names_say(pair):
    s, t = pair
    forward = float(losses.distill_loss(s, t, torch.ones(7), kind="forward_kl"))
    reverse = float(losses.distill_loss(s, t, torch.ones(7), kind="reverse_kl"))
    # swapping the arguments swaps the directions
    assert forward == pytest.approx(float(losses.distill_loss(t, s, torch.ones(7), kind="reverse_kl")), rel=1e-6)
    assert reverse == pytest.approx(float(losses.distill_loss(t, s, torch.ones(7), kind="forward_kl")), rel=1e-6)
    assert forward != pytest.approx(reverse, rel=1e-3)


def test_jsd_endpoints(pair):
    s, t = pair
    ones = torch.ones(7)
    for beta in (0.0, 1.0):  # the mixture equals one side: the divergence vanishes
        assert float(losses.distill_loss(s, t, ones, kind="jsd", beta=beta)) == 0.0
    # near the endpoints, JSD(beta) / beta -> KL(teacher || student) and JSD / (1 - beta) -> KL(student || teacher)
    eps = 1e-4
    fwd = float(losses.distill_loss(s, t, ones, kind="forward_kl"))
    rev = float(losses.distill_loss(s, t, ones, kind="reverse_kl"))
    assert float(losses.distill_loss(s, t, ones, kind="jsd", beta=eps)) / eps == pytest.approx(fwd, rel=1e-2)
    assert float(losses.distill_loss(s, t, ones, kind="jsd", beta=1 - eps)) / eps == pytest.approx(rev, rel=1e-2)
    # symmetric at 0.5
    assert float(losses.distill_loss(s, t, ones, kind="jsd")) == pytest.approx(
        float(losses.distill_loss(t, s, ones, kind="jsd")), rel=1e-6)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_temperature_divides_both_logits(pair, kind):
    s, t = pair
    got = float(losses.distill_loss(s, t, torch.ones(7), kind=kind, temperature=2.0))
    assert got == pytest.approx(textbook(s, t, kind, temperature=2.0), rel=1e-5)
    scaled = float(losses.distill_loss(s, t, torch.ones(7), kind=kind, temperature=2.0, scale_by_temperature_sq=True))
    assert scaled == pytest.approx(4 * got, rel=1e-6)


def test_masked_positions_contribute_nothing():
    s, t = torch.randn(2, 5, V), torch.randn(2, 5, V)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0]])
    before = float(losses.distill_loss(s, t, mask))
    s2, t2 = s.clone(), t.clone()
    s2[mask == 0] = torch.randn(int((mask == 0).sum()), V) * 10
    t2[mask == 0] = torch.randn(int((mask == 0).sum()), V) * 10
    assert float(losses.distill_loss(s2, t2, mask)) == pytest.approx(before, rel=1e-6)
    kept = mask.bool()
    assert before == pytest.approx(textbook(s[kept], t[kept], "forward_kl"), rel=1e-5)
    assert float(losses.distill_loss(s, t, torch.zeros(2, 5))) == 0.0


@pytest.mark.parametrize("kind", losses.KINDS)
def test_no_gradient_reaches_the_teacher(pair, kind):
    s, t = (x.clone().requires_grad_(True) for x in pair)
    losses.distill_loss(s, t, torch.ones(7), kind=kind).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_token_cross_entropy_ignores_labels_and_matches_the_definition():
    logits, labels = torch.randn(2, 4, V), torch.tensor([[1, 2, -100, 3], [-100, -100, 4, 5]])
    probs = _probs(logits.reshape(-1, V))
    want = [-math.log(probs[i][y]) for i, y in enumerate(labels.reshape(-1).tolist()) if y != -100]
    assert float(losses.token_cross_entropy(logits, labels)) == pytest.approx(sum(want) / len(want), rel=1e-5)
    assert float(losses.token_cross_entropy(logits, torch.full((2, 4), -100))) == 0.0


@pytest.mark.parametrize("kind", losses.KINDS)
def test_chunked_losses_equal_the_dense_ones_with_gradients(kind):
    n, h = 37, 16
    weight = torch.randn(V, h, requires_grad=True)
    bias = torch.randn(V)
    sh, th = torch.randn(n, h, requires_grad=True), torch.randn(n, h)
    dense = losses.distill_loss(sh @ weight.T + bias, th @ weight.T + bias, torch.ones(n), kind=kind)
    dense.backward()
    g_dense = (sh.grad.clone(), weight.grad.clone())
    sh.grad, weight.grad = None, None
    chunked = losses.chunked_distill_loss(sh, th, weight, kind=kind, chunk_size=5, lm_head_bias=bias)
    chunked.backward()
    assert float(chunked) == pytest.approx(float(dense), rel=1e-5)
    assert torch.allclose(sh.grad, g_dense[0], atol=1e-6) and torch.allclose(weight.grad, g_dense[1], atol=1e-6)
    targets = torch.randint(0, V, (n,))
    targets[::4] = -100
    ce_dense = losses.token_cross_entropy(sh @ weight.T, targets)
    assert float(losses.chunked_token_cross_entropy(sh, weight, targets, chunk_size=6)) == pytest.approx(
        float(ce_dense), rel=1e-5)


def test_topk_kl_is_exact_at_full_k_and_a_lower_bound_below():
    s, t = torch.randn(9, V), torch.randn(9, V)
    t_logp = torch.log_softmax(t, -1)
    full = float(losses.distill_loss(s, t, torch.ones(9)))
    lps, ids = t_logp.topk(V, dim=-1)
    assert float(losses.topk_forward_kl(s, ids, lps)) == pytest.approx(full, rel=1e-5)
    previous = 0.0
    for k in (1, 3, 6, V):
        lps, ids = t_logp.topk(k, dim=-1)
        value = float(losses.topk_forward_kl(s, ids, lps))
        assert value <= full + 1e-6 and value >= previous - 1e-6  # more of the teacher seen, closer to the truth
        previous = value
    assert float(losses.topk_forward_kl(t, *reversed(t_logp.topk(4, dim=-1)))) == pytest.approx(0.0, abs=1e-6)


def _topk_reference(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over k+1 buckets in float64, the rest masses as sums of probabilities."""
    s = torch.log_softmax(student_logits.double(), -1)
    rest = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
    s_rest = torch.logsumexp(s.masked_fill(~rest, float("-inf")), -1)
    t = teacher_logp.double()
    t_rest = torch.log1p(-t.exp().sum(-1))
    return ((t.exp() * (t - s.gather(-1, ids))).sum(-1) + t_rest.exp() * (t_rest - s_rest)).sum()


def test_topk_rest_mass_matches_float64_on_over_confident_students():
    torch.manual_seed(0)
    n, v, k = 6, 512, 4
    logits = torch.randn(n, v)
    ids = torch.stack([torch.randperm(v)[:k] for _ in range(n)])
    logits.scatter_(-1, ids[:, :1], 35.0)  # the student puts all but ~1e-13 of its mass on one stored token
    teacher = torch.log_softmax(torch.randn(n, v) * 2, -1)
    teacher_top = teacher.gather(-1, ids)  # the teacher leaves a real share of its mass outside the k ids
    student = logits.clone().requires_grad_(True)
    got = losses.topk_forward_kl(student, ids, teacher_top) * n
    got.backward()
    ref_student = logits.double().requires_grad_(True)
    want = _topk_reference(ref_student, ids, teacher_top)
    want.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert torch.allclose(student.grad.double(), ref_student.grad, atol=1e-6, rtol=1e-4)
    # the old 1 - sum(top) form cancels to 0 here: its rest-mass gradient vanished and the loss was off
    s_top = torch.log_softmax(logits, -1).gather(-1, ids)
    assert float((1 - s_top.exp().sum(-1)).clamp_min(0).max()) < 1e-7
