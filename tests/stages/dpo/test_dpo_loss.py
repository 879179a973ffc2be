"""DPO losses and metrics against an independent float64 computation of the papers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.dpo.loss import dpo_loss, sequence_logps


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def paper_loss(pc: float, pr: float, rc: float, rr: float, beta: float, kind: str, eps: float) -> float:
    """One pair's loss, written out from the papers: DPO (Rafailov et al.; conservative DPO mixes the
    flipped label with weight eps), IPO (Azar et al.), hinge / SLiC (Zhao et al.)."""
    # h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x), from the probabilities themselves
    h = math.log(math.exp(pc) / math.exp(rc)) - math.log(math.exp(pr) / math.exp(rr))
    if kind == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return max(0.0, 1 - beta * h)


def paper_metrics(pc, pr, rc, rr, beta):
    rew_c = [beta * (a - b) for a, b in zip(pc, rc, strict=True)]
    rew_r = [beta * (a - b) for a, b in zip(pr, rr, strict=True)]
    return {
        "rewards/chosen": np.mean(rew_c), "rewards/rejected": np.mean(rew_r),
        "rewards/accuracies": np.mean([c > r for c, r in zip(rew_c, rew_r, strict=True)]),
        "rewards/margins": np.mean([c - r for c, r in zip(rew_c, rew_r, strict=True)]),
        "logps/chosen": np.mean(pc), "logps/rejected": np.mean(pr),
    }


@pytest.mark.parametrize(("kind", "beta", "eps"), [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                                  ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0),
                                                  ("hinge", 0.1, 0.0), ("hinge", 2.0, 0.0)])
def test_loss_and_metrics_match_the_papers_formulas(kind, beta, eps):
    g = torch.Generator().manual_seed(3)
    # Realistic summed log-probs (tens of nats), the reference near the policy, some ties in reward.
    pc = -torch.rand(64, generator=g) * 40 - 5
    pr = -torch.rand(64, generator=g) * 40 - 5
    rc = pc + torch.randn(64, generator=g) * 3
    rr = pr + torch.randn(64, generator=g) * 3
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta, kind, eps)
    assert loss.dtype == torch.float32
    c, r, a, b = (t.double().tolist() for t in (pc, pr, rc, rr))
    expected = np.mean([paper_loss(*x, beta, kind, eps) for x in zip(c, r, a, b, strict=True)])
    assert abs(loss.item() - expected) <= 1e-6 * max(1.0, abs(expected))
    want = paper_metrics(c, r, a, b, beta)
    assert set(metrics) == set(want)
    for name, value in want.items():
        assert abs(metrics[name].item() - value) <= 1e-6 * max(1.0, abs(value)), name


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_policy_equal_to_reference_gives_zero_rewards(kind):
    logps = -torch.rand(8) * 30
    loss, m = dpo_loss(logps[:4], logps[4:], logps[:4].clone(), logps[4:].clone(), 0.1, kind)
    expected = {"sigmoid": math.log(2), "ipo": (1 / 0.2) ** 2, "hinge": 1.0}[kind]
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    if kind == "sigmoid":  # exactly log 2 in float32
        assert loss.item() == torch.tensor(math.log(2), dtype=torch.float32).item()
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[name].item() == 0.0


def test_gradient_direction_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-10.0], requires_grad=True), torch.tensor([-12.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-10.0]), torch.tensor([-12.0]), 0.1)
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending the loss raises chosen, lowers rejected
    assert pc.grad.item() == pytest.approx(-0.05, abs=1e-7)  # -beta * sigmoid(0)


def test_sequence_logps_sums_only_labelled_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding
    got = sequence_logps(logits, labels)
    for b in range(3):
        want = 0.0
        for t in range(7):
            if labels[b, t] != -100:
                row = logits[b, t].double()
                want += (row[labels[b, t]] - torch.log(torch.exp(row).sum())).item()
        assert abs(got[b].item() - want) <= 1e-6 * max(1.0, abs(want))
    assert sequence_logps(logits.bfloat16(), labels).dtype == torch.float32
