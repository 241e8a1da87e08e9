"""Each preference loss against a value derived by hand (the derivation is in each test's docstring)."""

from __future__ import annotations

import math

import pytest
import torch

from alignment import losses as L
from alignment.preference import LossConfig, PairLogps, pair_losses

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def test_sigmoid_dpo_by_hand():
    """c=-10, r=-12, ref_c=ref_r=-11: h = (-10+11) - (-12+11) = 2; beta=0.5 -> beta*h = 1.
    L = -log sigmoid(1) = log(1 + e^-1) = 0.31326168751822286."""
    loss = L.dpo_sigmoid_loss(T(-10.0), T(-12.0), T(-11.0), T(-11.0), beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-12)
    assert loss.item() == pytest.approx(0.31326168751822286, rel=1e-12)


def test_conservative_dpo_by_hand():
    """eps=0.1, beta*h=1: 0.9 * log(1+e^-1) + 0.1 * log(1+e^1) = 0.31326168751822286 + 0.1 = 0.41326168751822286,
    since log(1+e^1) - log(1+e^-1) = 1."""
    loss = L.dpo_sigmoid_loss(T(-10.0), T(-12.0), T(-11.0), T(-11.0), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.41326168751822286, rel=1e-12)


def test_conservative_dpo_has_a_finite_optimum_and_plain_dpo_does_not():
    """cDPO's loss is minimised where beta*h = log((1-eps)/eps) (log 9 for eps=0.1); plain DPO keeps pushing."""
    beta, eps = 0.5, 0.1
    h = torch.tensor([math.log(9) / beta], dtype=torch.float64, requires_grad=True)
    L.dpo_sigmoid_loss(h, T(0.0), T(0.0), T(0.0), beta, eps).sum().backward()
    assert abs(h.grad.item()) < 1e-12
    h2 = torch.tensor([100.0], dtype=torch.float64, requires_grad=True)
    L.dpo_sigmoid_loss(h2, T(0.0), T(0.0), T(0.0), beta).sum().backward()
    assert h2.grad.item() < 0  # still rewards a larger margin


def test_dpo_beta_to_zero_tends_to_log2():
    """As beta -> 0, -log sigmoid(beta*h) -> log 2 for any margin h, and its gradient in h -> -beta/2."""
    for h in (-50.0, 0.0, 3.0, 80.0):
        hh = torch.tensor([h], dtype=torch.float64, requires_grad=True)
        loss = L.dpo_sigmoid_loss(hh, T(0.0), T(0.0), T(0.0), beta=1e-6)
        loss.sum().backward()
        assert loss.item() == pytest.approx(math.log(2), abs=1e-4)
        assert hh.grad.item() == pytest.approx(-0.5e-6, rel=1e-3)


def test_robust_dpo_by_hand_and_unbiased():
    """eps=0.1, beta*h=1: (-(0.9) log sigmoid(1) + 0.1 log sigmoid(-1)) / 0.8
    = (0.9*0.31326168751822286 - 0.1*1.31326168751822286) / 0.8 = 0.18826168751822283.
    Unbiased under label noise: (1-eps) L(h) + eps L(-h) = -log sigmoid(beta h), the clean DPO loss."""
    loss = L.robust_dpo_loss(T(-10.0), T(-12.0), T(-11.0), T(-11.0), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.18826168751822283, rel=1e-12)
    flipped = L.robust_dpo_loss(T(-12.0), T(-10.0), T(-11.0), T(-11.0), beta=0.5, label_smoothing=0.1)
    assert (0.9 * loss + 0.1 * flipped).item() == pytest.approx(0.31326168751822286, rel=1e-12)
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        L.robust_dpo_loss(T(0.0), T(0.0), T(0.0), T(0.0), 0.1, 0.5)


def test_ipo_by_hand():
    """h = 2; beta=0.5: (2 - 1/(2*0.5))^2 = (2 - 1)^2 = 1; beta=0.25: (2 - 2)^2 = 0."""
    args = (T(-10.0), T(-12.0), T(-11.0), T(-11.0))
    assert L.ipo_loss(*args, beta=0.5).item() == pytest.approx(1.0, rel=1e-12)
    assert L.ipo_loss(*args, beta=0.25).item() == pytest.approx(0.0, abs=1e-12)


def test_simpo_by_hand():
    """chosen -10 over 5 tokens (avg -2), rejected -12 over 4 (avg -3), beta=2, gamma=0.5:
    margin = 2*(-2) - 2*(-3) - 0.5 = 1.5; L = log(1 + e^-1.5) = 0.20141327798275246."""
    loss = L.simpo_loss(T(-10.0), T(-12.0), T(5.0), T(4.0), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(0.20141327798275246, rel=1e-12)


def test_nll_term_and_bradley_terry_by_hand():
    """NLL: -(-10)/5 = 2. Bradley-Terry: scores 1.0 vs 0.5: log(1 + e^-0.5) = 0.47407698418010663."""
    assert L.nll_term(T(-10.0), T(5.0)).item() == pytest.approx(2.0)
    assert L.bradley_terry_loss(T(1.0), T(0.5)).item() == pytest.approx(0.47407698418010663, rel=1e-12)
    assert L.implicit_rewards(T(-10.0), T(-11.0), 0.5).item() == pytest.approx(0.5)


def test_pair_losses_nll_mask_leaves_the_nll_term_out_of_unverified_pairs():
    """Two identical pairs, chosen -10 over 5 tokens, rejected -12 over 4, reference equal to the policy
    (so the DPO term is log 2); nll_weight 1: the first pair adds the NLL term 10 / 5 = 2, the masked one not."""
    lp = PairLogps(T(-10.0, -10.0), T(-12.0, -12.0), T(5.0, 5.0), T(4.0, 4.0))
    cfg = LossConfig(name="sigmoid", beta=0.1, nll_weight=1.0)
    losses, _, _ = pair_losses(cfg, lp, lp.chosen, lp.rejected, nll_mask=T(1.0, 0.0))
    assert losses.tolist() == pytest.approx([math.log(2) + 2.0, math.log(2)], rel=1e-12)
    unmasked, _, _ = pair_losses(cfg, lp, lp.chosen, lp.rejected)
    assert unmasked.tolist() == pytest.approx([math.log(2) + 2.0] * 2, rel=1e-12)
