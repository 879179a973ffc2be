"""DPO losses and metrics on summed completion log-probabilities (TRL's names and conventions).

With ``pi`` the policy's and ``ref`` the reference's summed log-probabilities of a completion,
``h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)`` is the preference log-ratio and

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``;
  ``eps = label_smoothing`` > 0 is conservative DPO (labels flipped with probability eps);
- ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2`` (on summed log-probabilities, as in the paper;
  TRL averages them per token for ipo);
- ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - beta h)``.

Implicit rewards are ``beta (pi - ref)``. Negative rewards are normal (the policy moved probability away
from both completions); what DPO optimises is the margin ``rewards/chosen - rewards/rejected``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def preference_losses(
    pi_chosen: torch.Tensor,  # (B,) summed log-probs of the chosen completions under the policy
    pi_rejected: torch.Tensor,  # (B,)
    ref_chosen: torch.Tensor,  # (B,) same under the frozen reference
    ref_rejected: torch.Tensor,  # (B,)
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair losses, (B,)."""
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the pairs and TRL's metrics (detached scalars):

    ``rewards/chosen``, ``rewards/rejected`` (mean implicit rewards), ``rewards/accuracies`` (fraction of
    pairs whose chosen reward is strictly higher), ``rewards/margins`` (mean reward difference),
    ``logps/chosen``, ``logps/rejected`` (mean summed policy log-probabilities).
    """
    losses = preference_losses(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta, loss_type,
                               label_smoothing)
    with torch.no_grad():
        r_chosen = beta * (pi_chosen - ref_chosen).detach()
        r_rejected = beta * (pi_rejected - ref_rejected).detach()
        metrics = {
            "rewards/chosen": r_chosen.mean(),
            "rewards/rejected": r_rejected.mean(),
            "rewards/accuracies": (r_chosen > r_rejected).float().mean(),
            "rewards/margins": (r_chosen - r_rejected).mean(),
            "logps/chosen": pi_chosen.detach().mean(),
            "logps/rejected": pi_rejected.detach().mean(),
        }
    return losses.mean(), metrics


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the labelled tokens of each row: (N, T, V), (N, T) -> (N,).

    ``labels`` are aligned with ``logits`` (``labels[:, t]`` is the token predicted at position t) and
    -100 where nothing is scored (prompt, padding). Computed in float32 whatever the logits' dtype.
    """
    mask = labels != -100
    targets = labels.clamp(min=0)
    logits = logits.float()
    token_logps = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1)
