"""How far the cached-teacher KL was off on over-confident students, before and after the log-sum-exp rest mass.

    python experiments/numerics/rest_mass.py     # writes experiments/numerics/results/rest_mass.json

For students whose top logit exceeds the rest by ``margin``, the top-k forward KL (k=4 stored teacher tokens,
V=4096) is computed three ways: in float64 (the reference), with genpi's float32 log-sum-exp rest mass, and with the
earlier float32 ``1 - sum(top)`` rest mass clamped at 1e-8. Reported: the relative error of each against the
reference, for the loss and for the gradient with respect to the student's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from genpi.losses import topk_forward_kl


def clamped_rest_kl(student_logits: torch.Tensor, ids: torch.Tensor, teacher_top: torch.Tensor) -> torch.Tensor:
    """The earlier form: rest masses as ``1 - sum(top)``, the student's clamped at 1e-8."""
    s_top = F.log_softmax(student_logits.float(), -1).gather(-1, ids)
    t_rest = (1 - teacher_top.exp().sum(-1)).clamp_min(0.0)
    s_rest = (1 - s_top.exp().sum(-1)).clamp_min(1e-8)
    kl_top = (teacher_top.exp() * (teacher_top - s_top)).sum(-1)
    return (kl_top + t_rest * (torch.log(t_rest.clamp_min(1e-8)) - torch.log(s_rest))).mean()


def reference_kl(student_logits: torch.Tensor, ids: torch.Tensor, teacher_top: torch.Tensor) -> torch.Tensor:
    s = torch.log_softmax(student_logits.double(), -1)
    outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
    s_rest = torch.logsumexp(s.masked_fill(~outside, float("-inf")), -1)
    t = teacher_top.double()
    t_rest = torch.log1p(-t.exp().sum(-1))
    return ((t.exp() * (t - s.gather(-1, ids))).sum(-1) + t_rest.exp() * (t_rest - s_rest)).mean()


def loss_and_grad(fn, logits: torch.Tensor, ids: torch.Tensor, teacher_top: torch.Tensor):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, ids, teacher_top)
    loss.backward()
    return float(loss.detach()), x.grad.double()


def main() -> None:
    torch.manual_seed(0)
    n, vocab, k = 64, 4096, 4
    teacher = torch.log_softmax(torch.randn(n, vocab) * 2, -1)
    ids = teacher.topk(k, -1).indices
    teacher_top = teacher.gather(-1, ids)
    rows = []
    for margin in (5.0, 10.0, 20.0, 30.0, 40.0):
        logits = torch.randn(n, vocab)
        logits.scatter_(-1, ids[:, :1], margin)
        ref_loss, ref_grad = loss_and_grad(reference_kl, logits.double(), ids, teacher_top)
        row = {"margin": margin, "student_rest_mass": float(torch.softmax(logits.double(), -1).scatter(
            -1, ids, 0.0).sum(-1).mean()), "reference_loss": ref_loss}
        for name, fn in (("log_sum_exp", topk_forward_kl), ("clamped_1_minus_sum", clamped_rest_kl)):
            loss, grad = loss_and_grad(fn, logits, ids, teacher_top)
            row[f"{name}/loss_rel_error"] = abs(loss - ref_loss) / abs(ref_loss)
            row[f"{name}/grad_rel_error"] = float((grad - ref_grad).norm() / ref_grad.norm())
        rows.append(row)
    out = Path(__file__).parent / "results" / "rest_mass.json"
    out.write_text(json.dumps({"n_rows": n, "vocab": vocab, "k": k, "rows": rows}, indent=2) + "\n")
    for r in rows:
        print(f"margin {r['margin']:>4}: rest mass {r['student_rest_mass']:.1e}  loss error lse "
              f"{r['log_sum_exp/loss_rel_error']:.1e} vs clamped {r['clamped_1_minus_sum/loss_rel_error']:.1e}  "
              f"grad error lse {r['log_sum_exp/grad_rel_error']:.1e} vs clamped "
              f"{r['clamped_1_minus_sum/grad_rel_error']:.1e}")


if __name__ == "__main__":
    main()
