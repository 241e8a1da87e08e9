"""Preference losses as small pure functions, one per loss, each with its paper and equation.

Inputs are per-pair tensors of shape (B,):
- ``chosen_logps`` / ``rejected_logps``: log pi_theta(y | x), summed over the answer's tokens;
- ``ref_chosen_logps`` / ``ref_rejected_logps``: the same under the frozen reference pi_ref;
- ``chosen_len`` / ``rejected_len``: answer lengths in tokens (SimPO and the NLL term normalise by them).

Each returns per-pair losses (B,); the trainer averages over the global batch. Implicit rewards for the
metrics (``rewards/chosen`` etc.) come from ``implicit_rewards``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_sigmoid_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), with conservative DPO's label smoothing (Mitchell 2023).

        h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
        L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    eps = 0 is plain DPO. eps > 0 (cDPO) assumes each label is flipped with probability eps: the loss is then
    minimised at a finite margin, beta * h = log((1 - eps) / eps), instead of growing without bound.
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def robust_dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float,
) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", eq. 10): an unbiased loss under label noise eps.

        L = ( -(1 - eps) * log sigmoid(beta * h) + eps * log sigmoid(-beta * h) ) / (1 - 2 * eps)

    with h as in DPO. Needs eps < 1/2. eps = 0 is plain DPO.
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17), regression to a fixed margin:

        L = (h - 1 / (2 * beta))^2,   h as in DPO (here beta plays the role of the paper's tau).

    The trainer passes length-averaged log-probs (``ipo`` in the recipe), as TRL does, so the target
    margin does not depend on answer length.
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a target margin gamma.

    L = -log sigmoid( beta / |y_w| * log pi(y_w|x) - beta / |y_l| * log pi(y_l|x) - gamma )
    """
    margin = beta * chosen_logps / chosen_len - beta * rejected_logps / rejected_len - gamma
    return -F.logsigmoid(margin)


def nll_term(chosen_logps: torch.Tensor, chosen_len: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the chosen answer, -log pi(y_w|x) / |y_w| (RPO, Pang et al. 2024)."""
    return -chosen_logps / chosen_len


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss under the Bradley-Terry model (Ouyang et al. 2022, eq. 1):

    P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l)),   L = -log sigmoid(r(x, y_w) - r(x, y_l))
    """
    return -F.logsigmoid(chosen_scores - rejected_scores)


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)), for the rewards/* metrics."""
    return beta * (logps - ref_logps).detach()
