"""Tests of the online merging optimizer (alignment/merging.py): OnDARE and OnTIES.

Everything runs on CPU in float64 where exactness matters; the whole file takes a few seconds.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import weakref

import pytest
import torch
from torch import nn

from alignment import merging
from alignment.merging import (
    OnlineMergingOptimizer,
    adamw_direction,
    adamw_update,
    advance_moments,
    bernoulli_indices,
    bernoulli_mask,
    dare,
    disjoint_merge,
    elect_sign,
    keep_count,
    kth_largest,
    linear_merge,
    ties_trim,
)

DTYPE = torch.float64


def _tiny_model(seed: int = 0) -> nn.Module:
    """Four tensors: 0.weight (3, 4), 0.bias (3,), 2.weight (2, 3), 2.bias (2,)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)


def _reference_and_base(model: nn.Module, seed: int = 1) -> tuple[dict, dict]:
    """The policy starts at the reference; the base differs from it by a small random tau."""
    gen = torch.Generator().manual_seed(seed)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = {n: t - 0.1 * torch.randn(t.shape, generator=gen, dtype=DTYPE) for n, t in reference.items()}
    return reference, base


def _loss(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(8, 4, generator=gen, dtype=DTYPE)
    y = torch.randn(8, 2, generator=gen, dtype=DTYPE)
    return ((model(x) - y) ** 2).mean()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _warmup_then_decay(step: int) -> float:
    return min(1.0, (step + 1) / 3) * 0.8**step


# --------------------------------------------------------------------------------------------------------
# AdamW equivalence
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "alpha", "use_merge"),
    [("ondare", 0.0, True), ("ondare", 0.3, False), ("onties", 0.3, False)],
)
def test_keep_all_without_merge_is_adamw_step_for_step(mode, alpha, use_merge):
    """p = 1 and alpha = 0 (or use_merge=False): torch.optim.AdamW, with weight decay and an LR schedule."""
    model = _tiny_model()
    twin = copy.deepcopy(model)
    reference, base = _reference_and_base(model)
    hyper = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = OnlineMergingOptimizer(
        model.named_parameters(),
        reference=reference,
        base=base,
        mode=mode,
        reserve_p=1.0,
        alpha=alpha,
        use_merge=use_merge,
        **hyper,
    )
    adamw = torch.optim.AdamW(twin.parameters(), **hyper)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, _warmup_then_decay) for o in (opt, adamw)]
    for _ in range(12):
        for o, m, sched in zip((opt, adamw), (model, twin), schedulers):
            o.zero_grad()
            _loss(m).backward()
            o.step()
            sched.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=f"{name} drifted from AdamW")
    assert opt.param_groups[0]["lr"] == adamw.param_groups[0]["lr"] != 0.05


# --------------------------------------------------------------------------------------------------------
# The merge term
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ondare", "onties"])
@pytest.mark.parametrize("lr", [0.0, 0.1])
def test_zero_grads_move_theta_by_t_alpha_tau_tilde(mode, lr):
    """Zero gradients, no weight decay: after T steps theta moved by exactly T * alpha * tau_tilde.

    All values are dyadic (multiples of 1/32), so the sums are exact in float64 and equality is bitwise.
    lr = 0 checks that the merge term is not scaled by the learning rate.
    """
    theta = nn.Parameter(torch.tensor([0.5, -0.25, 1.0, 0.0, 0.75, -1.5, 0.125, 2.0], dtype=DTYPE))
    tau = torch.tensor([0.125, -0.25, 0.75, -0.625, 0.0625, 0.5, -0.875, 0.375], dtype=DTYPE)
    reserve_p, alpha, steps = 0.5, 0.25, 5
    opt = OnlineMergingOptimizer(
        [("theta", theta)],
        reference={"theta": tau.clone()},
        base={"theta": torch.zeros(8, dtype=DTYPE)},
        mode=mode,
        reserve_p=reserve_p,
        alpha=alpha,
        lr=lr,
        seed=3,
    )
    tau_tilde = opt.state[theta]["tau"].clone()
    # Each entry is dropped (0) or kept: scaled by 1/p for OnDARE, then clamped to [-1, 1].
    kept_value = (tau / reserve_p if mode == "ondare" else tau).clamp(-1, 1)
    assert torch.all((tau_tilde == 0) | (tau_tilde == kept_value))
    assert 0 < int((tau_tilde != 0).sum()) < 8
    start = theta.detach().clone()
    for _ in range(steps):
        theta.grad = torch.zeros_like(theta)
        opt.step()
    assert torch.equal(theta.detach(), start + steps * alpha * tau_tilde)


def test_ondare_clip_bounds_tau_tilde():
    """tau / p beyond clip is clamped: tau = 0.75, p = 0.5 gives 1.5, stored as 1.0 (clip) or 0 (dropped)."""
    theta = nn.Parameter(torch.zeros(1000, dtype=DTYPE))
    tau = torch.full((1000,), 0.75, dtype=DTYPE)
    opt = OnlineMergingOptimizer(
        [("theta", theta)],
        reference={"theta": tau},
        base={"theta": torch.zeros(1000, dtype=DTYPE)},
        reserve_p=0.5,
        alpha=0.1,
        lr=0.1,
        clip=1.0,
        seed=0,
    )
    assert set(opt.state[theta]["tau"].unique().tolist()) == {0.0, 1.0}


def test_ondare_keeps_fraction_p_of_the_update_within_4_sigma():
    """Over 10^6 entries the fraction of changed entries is p within 4 sigma, kept entries are Delta / p,
    and the next step draws a fresh mask (the two steps' masks overlap on about p^2 of the entries)."""
    n, reserve_p = 10**6, 0.3
    sigma = math.sqrt(n * reserve_p * (1 - reserve_p))
    theta = nn.Parameter(torch.zeros(n, dtype=DTYPE))
    twin = nn.Parameter(torch.zeros(n, dtype=DTYPE))
    opt = OnlineMergingOptimizer(
        [("theta", theta)],
        reference=None,
        base=None,
        reserve_p=reserve_p,
        alpha=0.0,
        lr=0.01,
        use_merge=False,
        seed=0,
    )
    adamw = torch.optim.AdamW([twin], lr=0.01, weight_decay=0.0)
    grads = torch.randn(2, n, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    changed = []
    for grad in grads:
        before, twin_before = theta.detach().clone(), twin.detach().clone()
        theta.grad, twin.grad = grad.clone(), grad.clone()
        opt.step()
        adamw.step()
        moved = theta.detach() != before
        assert abs(int(moved.sum()) - reserve_p * n) < 4 * sigma
        delta = twin.detach() - twin_before
        torch.testing.assert_close(
            (theta.detach() - before)[moved], delta[moved] / reserve_p, rtol=0, atol=1e-14
        )
        changed.append(moved)
    overlap_sigma = math.sqrt(n * reserve_p**2 * (1 - reserve_p**2))
    assert abs(int((changed[0] & changed[1]).sum()) - reserve_p**2 * n) < 4 * overlap_sigma


def test_bernoulli_mask_keep_fraction_within_4_sigma():
    n, keep_p = 10**6, 0.1
    mask = bernoulli_mask(
        torch.Size([1000, 1000]), keep_p, torch.Generator().manual_seed(1), torch.device("cpu")
    )
    assert mask.dtype == torch.bool
    assert abs(int(mask.sum()) - keep_p * n) < 4 * math.sqrt(n * keep_p * (1 - keep_p))


@pytest.mark.parametrize("keep_p", [0.1, 0.5])
def test_bernoulli_indices_have_the_law_of_a_bernoulli_mask(keep_p):
    """Geometric gaps give independent Bernoulli(p) entries: over 20,000 draws of 24 entries every position
    is kept with frequency p, two given positions together with p^2, and the count has variance n p (1 - p),
    each within 4 sigma (the variance within 5% of it)."""
    n, draws = 24, 20_000
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(draws, n, dtype=torch.bool)
    for row in masks:
        index = bernoulli_indices(n, keep_p, gen, torch.device("cpu"))
        assert index.dtype == torch.int64 and bool((index.diff() > 0).all())
        assert index.numel() == 0 or 0 <= int(index[0]) and int(index[-1]) < n
        row[index] = True
    sigma = math.sqrt(keep_p * (1 - keep_p) / draws)
    frequency = masks.double().mean(0)
    assert (frequency - keep_p).abs().max() < 4 * sigma, frequency
    for i, j in ((0, 1), (0, n - 1), (11, 12)):
        pair = float((masks[:, i] & masks[:, j]).double().mean())
        assert abs(pair - keep_p**2) < 4 * math.sqrt(keep_p**2 * (1 - keep_p**2) / draws)
    counts = masks.sum(1).double()
    assert abs(float(counts.mean()) - n * keep_p) < 4 * math.sqrt(n * keep_p * (1 - keep_p) / draws)
    assert abs(float(counts.var()) / (n * keep_p * (1 - keep_p)) - 1) < 0.05
    assert (
        bernoulli_indices(0, keep_p, gen, torch.device("cpu")).numel() == 0
    )  # an empty tensor keeps nothing
    # A large tensor: the count of kept entries is n p within 4 sigma.
    big = bernoulli_indices(10**6, keep_p, gen, torch.device("cpu"))
    assert abs(big.numel() - keep_p * 10**6) < 4 * math.sqrt(10**6 * keep_p * (1 - keep_p))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_ondare_step_is_kept_update_over_p_plus_alpha_tau_everywhere(weight_decay):
    """One OnDARE step with gradients and a merge, against AdamW from the same point: an entry the mask keeps
    moves by (1 - alpha) Delta / p + alpha tau_tilde, every other entry by alpha tau_tilde alone, where Delta
    is AdamW's update (its weight decay included in both). Also a non-contiguous parameter (a transpose)."""
    gen = torch.Generator().manual_seed(5)
    theta = nn.Parameter(torch.randn(40, 30, generator=gen, dtype=DTYPE).t())  # (30, 40), not contiguous
    assert not theta.is_contiguous()
    twin = nn.Parameter(theta.detach().clone())
    tau = 0.3 * torch.randn(30, 40, generator=gen, dtype=DTYPE)
    reserve_p, alpha, lr = 0.25, 0.2, 0.01
    opt = OnlineMergingOptimizer(
        [("theta", theta)],
        reference={"theta": tau},
        base={"theta": torch.zeros(30, 40, dtype=DTYPE)},
        reserve_p=reserve_p,
        alpha=alpha,
        lr=lr,
        weight_decay=weight_decay,
        seed=11,
    )
    adamw = torch.optim.AdamW([twin], lr=lr, weight_decay=weight_decay)
    tau_tilde = opt.state[theta]["tau"]
    for _ in range(3):
        grad = torch.randn(30, 40, generator=gen, dtype=DTYPE)
        before, twin_before = theta.detach().clone(), twin.detach().clone()
        theta.grad, twin.grad = grad.clone(), grad.clone()
        opt.step()
        adamw.step()
        decayed = before * (1 - lr * weight_decay)
        delta = twin.detach() - twin_before * (1 - lr * weight_decay)
        moved = theta.detach() - decayed - alpha * tau_tilde
        kept = moved.abs() > 1e-12
        assert 0.1 * 1200 < int(kept.sum()) < 0.4 * 1200
        torch.testing.assert_close(moved[kept], (1 - alpha) * delta[kept] / reserve_p, rtol=1e-10, atol=1e-14)
        twin.data.copy_(theta.detach())  # the next step's AdamW update starts from the same point


# --------------------------------------------------------------------------------------------------------
# OnTIES by hand
# --------------------------------------------------------------------------------------------------------


def test_keep_count():
    assert keep_count(6, 0.5) == 3
    assert keep_count(100, 0.29) == 29  # 0.29 * 100 is 28.999999999999996 in float64
    assert keep_count(10, 0.01) == 1  # at least one entry, unlike the authors' keep-everything
    assert keep_count(7, 1.0) == 7


def test_onties_by_hand():
    """Top-k, sign election and merged update on six entries, p = 0.5 (k = 3), alpha = 0.25.

    Trim Delta = [0.5, -0.25, 0.25, 0.125, -0.375, 0.0625]: magnitudes sorted 0.5, 0.375, 0.25, 0.25, ...;
    the 3rd largest is 0.25 and both 0.25 entries tie with it, so four are kept:
        Delta_hat = [0.5, -0.25, 0.25, 0, -0.375, 0]
    Trim tau = [-0.5, 0.125, 0.75, -0.25, 0.5, -1.0]: sorted 1.0, 0.75, 0.5, 0.5, ...; 3rd largest 0.5,
    a tie again, four kept:
        tau_tilde = [-0.5, 0, 0.75, 0, 0.5, -1.0]
    Sum = [0, -0.25, 1.0, 0, 0.125, -1.0], elected sign = [+, -, +, +, +, -]: entry 0 is the opposite-sign
    case with a zero sum (counts as +), entry 3 a zero sum of zeros, entry 4 opposite signs where tau wins.
    Zero what disagrees:
        Delta'' = [0.5, -0.25, 0.25, 0, 0, 0]       (entry 4's -0.375 disagrees with +)
        tau''   = [0, 0, 0.75, 0, 0.5, -1.0]         (entry 0's -0.5 disagrees with +)
    Update = 0.75 * Delta'' + 0.25 * tau''
           = [0.375, -0.1875, 0.1875 + 0.1875, 0, 0.125, -0.25] = [0.375, -0.1875, 0.375, 0, 0.125, -0.25]
    """
    t = lambda *v: torch.tensor(v, dtype=DTYPE)  # noqa: E731
    delta = t(0.5, -0.25, 0.25, 0.125, -0.375, 0.0625)
    tau = t(-0.5, 0.125, 0.75, -0.25, 0.5, -1.0)
    delta_hat, tau_tilde = ties_trim(delta, 0.5), ties_trim(tau, 0.5)
    assert torch.equal(delta_hat, t(0.5, -0.25, 0.25, 0, -0.375, 0))
    assert torch.equal(tau_tilde, t(-0.5, 0, 0.75, 0, 0.5, -1.0))
    assert torch.equal(elect_sign(delta_hat, tau_tilde), t(1, -1, 1, 1, 1, -1))
    assert torch.equal(disjoint_merge(delta_hat, tau_tilde, 0.25), t(0.375, -0.1875, 0.375, 0, 0.125, -0.25))


@pytest.mark.parametrize(
    "values",
    [
        torch.randn(300_000, generator=torch.Generator().manual_seed(0), dtype=DTYPE),
        torch.randint(0, 50, (300_000,), generator=torch.Generator().manual_seed(1)).to(DTYPE),  # many ties
        torch.arange(200_000, dtype=DTYPE) % 7,  # periodic: the strided sample sees one value
        torch.randn(1000, generator=torch.Generator().manual_seed(2), dtype=DTYPE),  # small: kthvalue itself
    ],
    ids=["normal", "ties", "periodic", "small"],
)
def test_kth_largest_equals_kthvalue(values):
    """The sampled selection returns exactly torch's kthvalue at every k tried, including k = 1 and numel."""
    n = values.numel()
    for k in (1, 2, n // 1000 + 1, n // 10, n // 3, n // 2, n - 1, n):
        assert kth_largest(values, k) == values.kthvalue(n - k + 1).values, k


@pytest.mark.parametrize("block", [None, 4096], ids=["one-block", "49-blocks"])
@pytest.mark.parametrize("use_merge", [True, False])
def test_onties_step_on_a_large_tensor_equals_trim_then_disjoint_merge(use_merge, block, monkeypatch):
    """A 400 x 500 tensor (past kth_largest's sampling size) with gradients rounded to 1/8, so that many
    |Delta| tie: each OnTIES step equals adamw_update's Delta (from the same moments) trimmed by ties_trim
    and merged by disjoint_merge, the dense path's functions. Worked through in one block and in 49 (the
    last one partial); the blocked search must find the top-k itself, without the dense fallback."""
    if block is not None:
        monkeypatch.setattr(merging, "_BLOCK", block)
    monkeypatch.setattr(merging, "top_k_indices", _no_dense_fallback)
    gen = torch.Generator().manual_seed(3)
    theta = nn.Parameter(torch.randn(400, 500, generator=gen, dtype=DTYPE))
    # tau_tilde keeps the top 10% of |tau|, from about 0.0066 (1.645 sigma) up, around |Delta| ~ lr = 0.01:
    # it wins some sign elections against Delta and loses others.
    tau = 0.004 * torch.randn(400, 500, generator=gen, dtype=DTYPE)
    reserve_p, alpha, lr = 0.1, 0.3, 0.01
    opt = OnlineMergingOptimizer(
        [("theta", theta)],
        reference={"theta": tau},
        base={"theta": torch.zeros(400, 500, dtype=DTYPE)},
        mode="onties",
        reserve_p=reserve_p,
        alpha=alpha,
        lr=lr,
        use_merge=use_merge,
    )
    exp_avg, exp_avg_sq = torch.zeros_like(theta), torch.zeros_like(theta)
    for step in (1, 2):
        grad = (8 * torch.randn(400, 500, generator=gen, dtype=DTYPE)).round() / 8
        before = theta.detach().clone()
        theta.grad = grad.clone()
        opt.step()
        delta = adamw_update(grad, exp_avg, exp_avg_sq, step, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8)
        delta_hat = ties_trim(delta, reserve_p)
        assert int((delta_hat != 0).sum()) >= 20_000  # ties keep at least k
        expected = delta_hat
        if use_merge:
            tau_tilde = opt.state[theta]["tau"]
            opposed = (delta_hat != 0) & (tau_tilde != 0) & ((delta_hat > 0) != (tau_tilde > 0))
            tau_wins = opposed & (tau_tilde.abs() > delta_hat.abs())
            assert int(tau_wins.sum()) > 50 and int((opposed & ~tau_wins).sum()) > 50
            expected = disjoint_merge(delta_hat, tau_tilde, alpha)
        torch.testing.assert_close(theta.detach(), before + expected, rtol=0, atol=1e-12)


def _no_dense_fallback(values, k):
    raise AssertionError("the blocked OnTIES step fell back to the dense top-k")


def test_onties_blocked_step_falls_back_when_the_sample_misleads(monkeypatch):
    """The gradient is 1 at the sample's 1,562 positions (``_sample_index``, one in each chunk of 128
    entries at 200,000), about 0.01 elsewhere: at step 1
    Adam's |Delta| = lr |g| / (|g| + eps) grows with |g|, so the sample sees only the largest entries, its
    lower bound admits fewer than k candidates, and the step must rank the dense Delta instead. It still
    equals the dense path's functions."""
    monkeypatch.setattr(merging, "_BLOCK", 4096)
    calls = []
    dense_top_k = merging.top_k_indices
    monkeypatch.setattr(merging, "top_k_indices", lambda values, k: calls.append(k) or dense_top_k(values, k))
    gen = torch.Generator().manual_seed(4)
    theta = nn.Parameter(torch.randn(200_000, generator=gen, dtype=DTYPE))
    opt = OnlineMergingOptimizer(
        [("theta", theta)],
        reference=None,
        base=None,
        mode="onties",
        reserve_p=0.1,
        alpha=0.0,
        lr=0.01,
        use_merge=False,
    )
    grad = 0.01 * torch.randn(200_000, generator=gen, dtype=DTYPE)
    grad[merging._sample_index(grad)] = 1.0
    before = theta.detach().clone()
    theta.grad = grad.clone()
    opt.step()
    assert calls == [20_000]
    delta = adamw_update(
        grad, torch.zeros_like(grad), torch.zeros_like(grad), 1, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8
    )
    torch.testing.assert_close(theta.detach(), before + ties_trim(delta, 0.1), rtol=0, atol=1e-12)
    once = torch.zeros_like(grad).lerp_(grad, 1 - 0.9)
    assert torch.equal(opt.state[theta]["exp_avg"], once)  # the moments advanced once, not twice


def test_onties_optimizer_step_by_hand():
    """Through the optimizer: step 1 of Adam with eps = 0 is Delta = -lr * sign(g), so every |Delta| ties
    and all are kept. With lr = 0.5, g = [1, -1, 1, -1]: Delta = [-0.5, 0.5, -0.5, 0.5].
    tau = [0.25, 0.75, -0.125, -1.0], p = 0.5 (k = 2): tau_tilde = [0, 0.75, 0, -1.0].
    Sum = [-0.5, 1.25, -0.5, -0.5], sign = [-, +, -, -]: Delta'' = [-0.5, 0.5, -0.5, 0] (entry 3 disagrees),
    tau'' = [0, 0.75, 0, -1.0]. alpha = 0.5: update = [-0.25, 0.625, -0.25, -0.5].
    """
    theta = nn.Parameter(torch.zeros(4, dtype=DTYPE))
    tau = torch.tensor([0.25, 0.75, -0.125, -1.0], dtype=DTYPE)
    opt = OnlineMergingOptimizer(
        [("w", theta)],
        reference={"w": tau},
        base={"w": torch.zeros(4, dtype=DTYPE)},
        mode="onties",
        reserve_p=0.5,
        alpha=0.5,
        lr=0.5,
        eps=0.0,
    )
    theta.grad = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=DTYPE)
    opt.step()
    assert torch.equal(theta.detach(), torch.tensor([-0.25, 0.625, -0.25, -0.5], dtype=DTYPE))


def test_linear_merge_by_hand():
    delta_hat = torch.tensor([0.5, -1.0, 0.0], dtype=DTYPE)
    tau_tilde = torch.tensor([1.0, 0.5, -0.25], dtype=torch.bfloat16)
    merged = linear_merge(delta_hat, tau_tilde, 0.25)
    assert merged.dtype == DTYPE
    assert torch.equal(merged, torch.tensor([0.625, -0.625, -0.0625], dtype=DTYPE))


# --------------------------------------------------------------------------------------------------------
# merge_every
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 3])
def test_merge_every_updates_all_tensors_and_merges_the_summed_adamw_steps(every):
    """merge_every=K with fixed gradients (so the AdamW updates do not depend on theta) and no weight decay.

    Let A_t be plain AdamW's weights after t steps and m the last merge step before t (0 at the start).
    Steps with t % K != 0 are plain AdamW steps: theta_t = theta_m + (A_t - A_m). At t % K == 0 the plain
    steps are replaced by one merge of the summed AdamW updates: theta_t = theta_m + merge(A_t - A_m), with
    merge(S) = disjoint_merge(ties_trim(S, p), tau_tilde, alpha). Every tensor changes on every step.
    """
    model = _tiny_model()
    twin = copy.deepcopy(model)
    reference, base = _reference_and_base(model)
    reserve_p, alpha = 0.5, 0.25
    opt = OnlineMergingOptimizer(
        model.named_parameters(),
        reference=reference,
        base=base,
        mode="onties",
        reserve_p=reserve_p,
        alpha=alpha,
        lr=0.01,
        merge_every=every,
    )
    adamw = torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.0)
    for name, p in model.named_parameters():
        expected_tau = ties_trim(reference[name] - base[name], reserve_p).clamp(-1, 1)
        assert torch.equal(opt.state[p]["tau"], expected_tau)
    gen = torch.Generator().manual_seed(7)
    grads = [{n: torch.randn(p.shape, generator=gen, dtype=DTYPE) for n, p in model.named_parameters()}]
    grads += [
        {n: torch.randn(g.shape, generator=gen, dtype=DTYPE) for n, g in grads[0].items()} for _ in range(5)
    ]
    theta_m, adamw_m = _params(model), _params(twin)
    for t, grad in enumerate(grads, start=1):
        before = _params(model)
        for m, o in ((model, opt), (twin, adamw)):
            for name, p in m.named_parameters():
                p.grad = grad[name].clone()
            o.step()
        now, adamw_now = _params(model), _params(twin)
        for name, p in model.named_parameters():
            assert not torch.equal(now[name], before[name]), f"{name} not updated at step {t}"
            summed = adamw_now[name] - adamw_m[name]
            if t % every == 0:
                summed = disjoint_merge(ties_trim(summed, reserve_p), opt.state[p]["tau"], alpha)
            torch.testing.assert_close(now[name], theta_m[name] + summed, rtol=0, atol=1e-12)
        if t % every == 0:
            theta_m, adamw_m = now, adamw_now


# --------------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------------


def _build(model, *, seed, base_shift=0.0, **options):
    reference, base = _reference_and_base(_tiny_model())
    base = {n: t + base_shift for n, t in base.items()}
    opt = OnlineMergingOptimizer(
        model.named_parameters(),
        reference=reference,
        base=base,
        reserve_p=0.5,
        alpha=0.05,
        lr=0.02,
        weight_decay=0.01,
        seed=seed,
        **options,
    )
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)


def _train(model, opt, sched, steps):
    for _ in range(steps):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    "options",
    [
        dict(mode="ondare", merge_every=3),
        dict(mode="ondare", rescale=True, tau_dtype=torch.bfloat16),
        dict(mode="onties", merge_every=2, tau_dtype=torch.bfloat16),
    ],
)
def test_interrupted_and_resumed_run_ends_with_identical_weights(options):
    """Run 7 steps straight; run 4, checkpoint, rebuild everything, load, run 3 more: identical weights.

    The resumed optimizer is built with another seed and another base, so identical weights show that tau,
    the masks' generator state, the moments, the step counters and the merge_every accumulators all come
    from the checkpoint. Rebuilding without loading it ends elsewhere, so the comparison can fail.
    """
    straight = _tiny_model()
    opt, sched = _build(straight, seed=5, **options)
    _train(straight, opt, sched, 7)

    first = _tiny_model()
    opt, sched = _build(first, seed=5, **options)
    _train(first, opt, sched, 4)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)

    resumed = _tiny_model(seed=99)
    resumed.load_state_dict(checkpoint["model"])
    not_loaded = copy.deepcopy(resumed)
    opt, sched = _build(resumed, seed=6, base_shift=0.5, **options)
    sched.load_state_dict(checkpoint["sched"])
    opt.load_state_dict(checkpoint["opt"])
    if options.get("tau_dtype") is not None:
        assert all(state["tau"].dtype == options["tau_dtype"] for state in opt.state.values())
    _train(resumed, opt, sched, 3)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name} differs after resuming"

    opt, sched = _build(not_loaded, seed=6, base_shift=0.5, **options)
    sched.load_state_dict(checkpoint["sched"])
    _train(not_loaded, opt, sched, 3)
    assert not all(torch.equal(p, q) for p, q in zip(straight.parameters(), not_loaded.parameters()))


def test_load_state_dict_rejects_a_plain_adamw_checkpoint():
    model = _tiny_model()
    opt, _ = _build(model, seed=0)
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="mask_rng"):
        opt.load_state_dict(adamw.state_dict())


# --------------------------------------------------------------------------------------------------------
# Names, errors, options
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["reference", "base"])
def test_parameter_missing_from_reference_or_base_is_named(role):
    model = _tiny_model()
    reference, base = _reference_and_base(model)
    tensors = {"reference": reference, "base": base}
    del tensors[role]["2.bias"]
    with pytest.raises(KeyError, match=rf"'2\.bias' has no tensor in {role}"):
        OnlineMergingOptimizer(model.named_parameters(), **tensors, reserve_p=0.5, alpha=0.1, lr=0.1)


def test_shape_mismatch_is_named():
    model = _tiny_model()
    reference, base = _reference_and_base(model)
    base["0.weight"] = torch.zeros(4, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"'0\.weight' has shape \(3, 4\) but base"):
        OnlineMergingOptimizer(
            model.named_parameters(), reference=reference, base=base, reserve_p=0.5, alpha=0.1, lr=0.1
        )


def test_yaml_string_numbers_are_refused_with_a_hint():
    """PyYAML reads 1e-5 (no dot) as a string: the error says so instead of failing on a comparison."""
    model = _tiny_model()
    reference, base = _reference_and_base(model)
    with pytest.raises(TypeError, match=r"alpha must be a number, got '1e-5'.*1\.0e-5"):
        OnlineMergingOptimizer(
            model.named_parameters(), reference=reference, base=base, reserve_p=0.5, alpha="1e-5", lr=0.1
        )


def test_no_reference_to_the_base_is_kept():
    """The base (and reference) model is only needed to compute tau: dropping our handle frees it."""
    model = _tiny_model()
    reference_model, base_model = copy.deepcopy(model), _tiny_model(seed=2)
    opt = OnlineMergingOptimizer(
        model.named_parameters(), reference=reference_model, base=base_model, reserve_p=0.5, alpha=0.1, lr=0.1
    )
    base_ref, reference_ref = weakref.ref(base_model), weakref.ref(reference_model)
    del base_model, reference_model
    gc.collect()
    assert base_ref() is None and reference_ref() is None
    _loss(model).backward()
    opt.step()


def test_unnamed_parameters_are_refused():
    model = _tiny_model()
    with pytest.raises(TypeError, match="named_parameters"):
        OnlineMergingOptimizer(model.parameters(), reference={}, base={}, reserve_p=0.5, alpha=0.1, lr=0.1)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("reserve_p", 0.0),
        ("reserve_p", 1.5),
        ("alpha", -0.1),
        ("mode", "ties"),
        ("merge_every", 0),
        ("clip", 0.0),
    ],
)
def test_bad_options_are_refused(option, value):
    model = _tiny_model()
    reference, base = _reference_and_base(model)
    kwargs = dict(reserve_p=0.5, alpha=0.1, lr=0.1) | {option: value}
    with pytest.raises(ValueError, match=option):
        OnlineMergingOptimizer(model.named_parameters(), reference=reference, base=base, **kwargs)


def test_models_and_wrapper_prefixes_are_matched():
    """reference / base as nn.Modules; the policy is wrapped DDP-style (names start with "module.")."""

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    reference_model, base_model = _tiny_model(seed=1), _tiny_model(seed=2)
    policy = Wrapper(copy.deepcopy(reference_model))
    opt = OnlineMergingOptimizer(
        policy.named_parameters(),
        reference=reference_model,
        base=base_model,
        reserve_p=1.0,
        alpha=0.1,
        lr=0.1,
        clip=None,
    )
    assert opt.param_groups[0]["param_names"][0] == "module.0.weight"
    for (name, p), ref, bas in zip(
        policy.named_parameters(), reference_model.parameters(), base_model.parameters()
    ):
        assert torch.equal(opt.state[p]["tau"], ref.detach() - bas.detach()), name


def test_frozen_and_gradless_parameters():
    """requires_grad=False: not optimised, no state, no reference entry needed. grad None: skipped whole."""
    model = _tiny_model()
    reference, base = _reference_and_base(model)
    model[0].bias.requires_grad_(False)
    del reference["0.bias"], base["0.bias"]
    opt = OnlineMergingOptimizer(
        model.named_parameters(), reference=reference, base=base, reserve_p=0.5, alpha=0.1, lr=0.1
    )
    assert "0.bias" not in opt.param_groups[0]["param_names"]
    assert model[0].bias not in opt.state
    before = _params(model)
    _loss(model).backward()
    model[2].bias.grad = None
    opt.step()
    after = _params(model)
    assert torch.equal(after["0.bias"], before["0.bias"])
    assert torch.equal(after["2.bias"], before["2.bias"])
    assert "step" not in opt.state[model[2].bias]
    assert not torch.equal(after["2.weight"], before["2.weight"])


def test_param_groups_keep_names_and_options():
    model = _tiny_model()
    reference, base = _reference_and_base(model)
    groups = [
        {"params": [(n, p) for n, p in model.named_parameters() if n.endswith("weight")], "alpha": 0.0},
        {"params": [(n, p) for n, p in model.named_parameters() if n.endswith("bias")], "use_merge": False},
    ]
    opt = OnlineMergingOptimizer(groups, reference=reference, base=base, reserve_p=0.5, alpha=0.1, lr=0.1)
    assert opt.param_groups[0]["param_names"] == ["0.weight", "2.weight"]
    assert opt.param_groups[1]["param_names"] == ["0.bias", "2.bias"]
    assert opt.param_groups[0]["alpha"] == 0.0 and opt.param_groups[1]["alpha"] == 0.1
    assert "tau" in opt.state[model[0].weight] and model[0].bias not in opt.state
    with pytest.raises(RuntimeError, match="after construction"):
        opt.add_param_group({"params": [("extra", nn.Parameter(torch.zeros(1)))]})


def test_rescale_renormalises_to_the_dense_l1_norm():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen, dtype=DTYPE)
    mask = bernoulli_mask(x.shape, 0.2, gen, x.device)
    assert torch.equal(dare(x, mask, 0.2), x * mask / 0.2)
    for kept in (dare(x, mask, 0.2, rescale=True), ties_trim(x, 0.2, rescale=True)):
        assert int((kept != 0).sum()) < 400
        torch.testing.assert_close(kept.abs().sum(), x.abs().sum(), rtol=1e-12, atol=0)
    assert ties_trim(x, 0.2).abs().sum() < 0.9 * x.abs().sum()
    # The signs and the ratios of the kept entries are those of x.
    kept = ties_trim(x, 0.2, rescale=True)
    ratio = kept[kept != 0] / x[kept != 0]
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-12, atol=0)


def test_tau_dtype_bfloat16():
    """tau_tilde is stored in bfloat16; the parameter stays float64 and moves by alpha * tau_tilde exactly."""
    model = _tiny_model()
    reference, base = _reference_and_base(model)
    opt = OnlineMergingOptimizer(
        model.named_parameters(),
        reference=reference,
        base=base,
        reserve_p=0.5,
        alpha=0.25,
        lr=0.1,
        tau_dtype=torch.bfloat16,
        seed=0,
    )
    before = _params(model)
    for p in model.parameters():
        assert opt.state[p]["tau"].dtype == torch.bfloat16
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        assert p.dtype == DTYPE
        tau_tilde = opt.state[p]["tau"].to(DTYPE)
        assert tau_tilde.abs().sum() > 0
        torch.testing.assert_close(p.detach(), before[name] + 0.25 * tau_tilde, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("op", ["ge", "gt", "le"])
def test_fast_comparisons_equal_torchs(op, dtype):
    """The step's comparisons (numpy on CPU for float32 / float64, torch otherwise) give torch's booleans,
    with ties at the bound, signed zeros, a bound held in another dtype and a written-into output."""
    gen = torch.Generator().manual_seed(5)
    values = (torch.randn(1000, generator=gen, dtype=torch.float64) * 4).round().to(dtype) / 4  # many ties
    values[:5] = torch.tensor([0.0, -0.0, 0.25, -0.25, 0.1], dtype=dtype)  # 0.1: rounded in float32 and bf16
    torch_op = {"ge": torch.ge, "gt": torch.gt, "le": torch.le}[op]
    for bound in (0.25, 0.0, -0.0, 0.1, torch.tensor(0.1, dtype=torch.float64), values[7]):
        expected = torch_op(values, bound)
        assert torch.equal(merging._compare(values, op, bound), expected), (op, bound)
        out = torch.empty(1000, dtype=torch.bool)
        assert merging._compare(values, op, bound, out=out) is out
        assert torch.equal(out, expected), (op, bound)
    strided = values[::3]
    assert torch.equal(merging._compare(strided, op, 0.5), torch_op(strided, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mask_in_place_equals_a_product_with_the_mask(dtype):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1000, generator=gen).to(dtype)
    mask = torch.rand(1000, generator=gen) > 0.5
    expected = x * mask
    y = x.clone()
    assert merging._mask_(y, mask) is y
    assert torch.equal(y, expected)
    assert torch.equal(torch.signbit(y), torch.signbit(expected))  # -0.0 where a negative entry is masked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adamw_update_equals_the_op_by_op_arithmetic(dtype):
    """On CPU adamw_update runs torch's fused AdamW kernel: the moments bitwise equal to AdamW's op-by-op
    arithmetic (advance_moments), Delta equal to adamw_direction's to rounding, over three steps."""
    gen = torch.Generator().manual_seed(7)
    m, v = torch.zeros(5000, dtype=dtype), torch.zeros(5000, dtype=dtype)
    m2, v2 = m.clone(), v.clone()
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    assert merging._fused_adamw_applies(m, v, m2)
    for step in (1, 2, 3):
        grad = torch.randn(5000, generator=gen, dtype=dtype)
        out = torch.full((5000,), 7.0, dtype=dtype)  # stale values in the buffer must not leak in
        delta = adamw_update(grad, m, v, step, **hyper, out=out)
        assert delta is out
        advance_moments(grad, m2, v2, 0.9, 0.999)
        expected = adamw_direction(m2, v2, step, **hyper)
        assert torch.equal(m, m2) and torch.equal(v, v2)
        rtol = 1e-6 if dtype == torch.float32 else 1e-14
        torch.testing.assert_close(delta, expected, rtol=rtol, atol=0)
    assert not merging._fused_adamw_applies(m.to(torch.bfloat16), v.to(torch.bfloat16))
    assert not merging._fused_adamw_applies(m[::2], v[::2])


def test_top_k_finds_its_bounds_on_column_structured_values(monkeypatch):
    """A 600 x 576 matrix whose every 64th column is large (weight gradients differ by column): a plain strided
    sample of stride 128 sees only those 9 columns and its bounds miss the k-th largest; the stratified sample
    (_sample_index) must bracket it, so the full-tensor selection never runs. The result is the exact top-k."""
    gen = torch.Generator().manual_seed(8)
    values = torch.rand(600, 576, generator=gen, dtype=torch.float32)
    values[:, ::64] += 10.0
    flat = values.flatten()
    k = keep_count(flat.numel(), 0.1)
    monkeypatch.setattr(merging, "kth_largest", lambda v, k: pytest.fail("fell back to the full selection"))
    index = merging.top_k_indices(flat, k)
    expected = torch.sort(torch.topk(flat, k).indices).values
    assert torch.equal(index, expected)


def test_onties_keeps_only_the_moving_entries_when_fewer_than_k_move(monkeypatch):
    """Only 5% of a 400 x 500 gradient is nonzero (as rows of unused tokens have none): the k-th largest |Delta|
    is 0 and TIES keeps every entry, but kept entries with Delta 0 change nothing, so the blocked pass returns
    the moving entries alone (not all 200,000) and the step still equals trim then disjoint merge."""
    monkeypatch.setattr(merging, "top_k_indices", _no_dense_fallback)
    gen = torch.Generator().manual_seed(9)
    theta = nn.Parameter(torch.randn(400, 500, generator=gen, dtype=DTYPE))
    tau = 0.004 * torch.randn(400, 500, generator=gen, dtype=DTYPE)
    alpha, lr = 0.3, 0.01
    opt = OnlineMergingOptimizer(
        [("theta", theta)],
        reference={"theta": tau},
        base={"theta": torch.zeros(400, 500, dtype=DTYPE)},
        mode="onties",
        reserve_p=0.1,
        alpha=alpha,
        lr=lr,
    )
    grad = torch.zeros(400, 500, dtype=DTYPE)
    grad[:20] = torch.randn(20, 500, generator=gen, dtype=DTYPE)  # 10,000 of 200,000 entries move
    found = []
    blocked = opt._onties_top_k_by_blocks
    monkeypatch.setattr(opt, "_onties_top_k_by_blocks", lambda *a: found.append(blocked(*a)) or found[-1])
    before = theta.detach().clone()
    theta.grad = grad.clone()
    opt.step()
    index, kept = found[0]
    assert index.numel() == 10_000 and bool((index < 10_000).all())
    exp_avg, exp_avg_sq = torch.zeros_like(grad), torch.zeros_like(grad)
    delta = adamw_update(grad, exp_avg, exp_avg_sq, 1, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8)
    expected = disjoint_merge(ties_trim(delta, 0.1), opt.state[theta]["tau"], alpha)
    torch.testing.assert_close(theta.detach(), before + expected, rtol=0, atol=1e-12)
