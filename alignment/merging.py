"""The Online Merging Optimizer: OnDARE and OnTIES as a drop-in ``torch.optim.Optimizer``.

Paper: Lu et al. 2024, "Online Merging Optimizers for Boosting Rewards and Mitigating Tax in Alignment",
arXiv:2405.17931 (used in Qwen2's RLHF stage). Instead of merging models once after training, every optimizer
step merges the AdamW update with the task vector of the SFT model, which keeps the policy close to what SFT
learnt (less alignment tax) while it follows the reward.

Notation: theta_b the pretrained base weights, theta_r the reference (SFT) weights, tau = theta_r - theta_b,
p the reserve (keep) rate ``reserve_p``, alpha the merge weight, Delta_t the AdamW update of step t.

Each step t, per parameter tensor:

1. Delta_t is computed exactly as ``torch.optim.AdamW`` computes it (same moments, bias correction and eps
   placement)::

       m = beta1 m + (1 - beta1) g          v = beta2 v + (1 - beta2) g^2
       Delta_t = -lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

   Weight decay is decoupled, as in AdamW: theta <- theta * (1 - lr * weight_decay) before the update. It is
   applied to theta directly and is never dropped, trimmed or sign-elected (it is a pull on the weights, not
   an update direction to merge).
2. OnDARE (``mode="ondare"``)::

       Delta_hat   = Bernoulli(p) mask, fresh each step, applied to Delta_t, scaled by 1/p
       tau_tilde   = clamp(Bernoulli(p) mask drawn once at construction, applied to tau, scaled by 1/p,
                           -clip, clip)
       theta      += (1 - alpha) * Delta_hat + alpha * tau_tilde

   OnTIES (``mode="onties"``): keep the k = max(1, floor(p * numel)) entries of largest magnitude per tensor
   (entries tied with the k-th magnitude are all kept, so a tie can keep a few more), for Delta_t every step
   and for tau once at construction (then clamped to [-clip, clip] like OnDARE's). Elect a sign per entry
   from Delta_hat + tau_tilde (a zero sum counts as positive), zero the entries of each that disagree with
   it, and ``theta += (1 - alpha) * Delta'' + alpha * tau''``.

Choices (see each option in ``OnlineMergingOptimizer``):

- The merge term alpha * tau_tilde is NOT scaled by the learning rate, as in the paper: it is added in full
  on every merge step, also during warm-up and after decay. After T merge steps with zero gradients theta has
  moved by exactly T * alpha * tau_tilde, so alpha must be small next to 1 / (number of steps).
- ``rescale=True`` replaces the 1/p factor (OnDARE) or the absent factor (OnTIES) by renormalising the kept
  entries to the L1 norm of the dense tensor.
- ``use_merge=False`` drops the merge entirely (alpha is ignored): theta += Delta_hat. OnDARE is then gradient
  dropout and OnTIES top-k update sparsification; with p = 1 both are AdamW.
- With ``use_merge=True`` and alpha = 0, OnTIES still elects signs from Delta_hat + tau_tilde, so tau can veto
  entries of the update: use ``use_merge=False`` to switch merging off.
- ``merge_every=K``: every parameter is updated on every step (unlike the authors' code). Steps whose
  per-parameter count t is not a multiple of K are plain AdamW steps that are also summed into an accumulator
  A; on steps t = K, 2K, ... the plain steps already applied are replaced by one merge of their sum::

      t % K != 0:  theta <- theta (1 - lr wd) + Delta_t;                   A <- A + Delta_t
      t % K == 0:  theta <- theta (1 - lr wd) - A + merge(A + Delta_t);    A <- 0

  so with no weight decay theta_K = theta_0 + merge(Delta_1 + ... + Delta_K). A costs one more
  parameter-sized buffer (only when K > 1).
- A parameter whose ``grad`` is None on a step is skipped entirely, as AdamW skips it: no moment update, no
  merge term, no step count and no mask drawn, so parameters the loss did not reach do not drift towards the
  reference on their own. Parameters with ``requires_grad=False`` are not optimised at all and need no entry
  in ``reference`` / ``base``.

Memory: one extra parameter-sized buffer (tau_tilde) beyond AdamW's two moments; ``tau_dtype=torch.bfloat16``
halves it for float32 parameters (tau_tilde is computed in at least float32, then stored rounded). The base
model is only needed to compute tau: the optimizer keeps no reference to ``reference`` or ``base``; drop your
own handles to free them.

Speed: with ``merge_every=1`` and ``rescale=False`` (the defaults) and p < 1, a step works on the kept entries
only. OnDARE draws the kept indices directly (``bernoulli_indices``: geometric gaps, p * numel uniforms),
forms Delta from the gathered moments at those indices and adds it with ``index_add_``, then alpha * tau_tilde
everywhere; OnTIES never forms the dense Delta either: bounds on the k-th largest |Delta| come from Delta on a
stratified random sample of the moments, then one pass of cache-sized blocks advances the moments, forms each block's
Delta and keeps the entries above the lower bound; the exact k-th largest is selected among those, and the
merge runs at their indices (those under it with Delta 0). Both equal the formulas above up to the rounding order
of the sums (tests compare them with the dense functions). The other settings take the dense path: transient
buffers of the tensor's size for the update, the mask, the masked and merged updates (and OnTIES'
magnitudes). ``bench/bench_merging.py`` measures both against AdamW.

Randomness: the masks come from a ``torch.Generator`` per device, seeded with ``seed`` (``None``: the value
of ``torch.initial_seed()``) and saved in ``state_dict()``, so a resumed run draws the same masks and ends
with bitwise-identical weights. Under DDP every rank must draw the same masks: pass the same seed on every
rank. Under FSDP each rank holds shards of each parameter: masks and the top-k are then per shard (k counts
the shard's entries), ``reference`` / ``base`` must hold this rank's shards under the policy's names (the
shape check names any parameter that does not match), and seeding each rank differently (``seed + rank``)
keeps the shards' masks independent. Only the single-process case is tested; FSDP2's DTensor parameters are
refused with an error (masks and top-k would need their local shards).

Usage::

    optimizer = OnlineMergingOptimizer(
        policy.named_parameters(), reference=sft_model, base=base_model,
        mode="ondare", reserve_p=0.1, alpha=1e-5, lr=5e-7, weight_decay=0.0,
    )
    del base_model  # tau is computed: the base is no longer needed
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: there are no DTensors to refuse
    DTensor = None

MODES = ("ondare", "onties")

# OnTIES' step works through large tensors in blocks of this many entries (1 MiB of float32): the moments,
# Delta and its magnitude of one block stay in the CPU's cache between the block's operations.
_BLOCK = 1 << 18

# Wrappers rename parameters: DDP and FSDP1 add "module.", torch.compile "_orig_mod.", peft
# "base_model.model." and ".base_layer." around the frozen base weights. Names are compared without them only
# when the exact name is missing, so an unwrapped reference can serve a wrapped policy.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "base_layer")


# --------------------------------------------------------------------------------------------------------
# Pure operations: each is one step of the method, testable by hand.
# --------------------------------------------------------------------------------------------------------


def keep_count(numel: int, keep_p: float) -> int:
    """How many entries OnTIES keeps in a tensor of ``numel`` entries: k = max(1, floor(p * numel)).

    The authors' code keeps everything when p * numel < 1; we keep at least the largest entry instead. The
    1e-6 tolerance keeps floor(0.29 * 100) at 29 (0.29 * 100 is 28.999999999999996 in float64).
    """
    return min(numel, max(1, math.floor(keep_p * numel + 1e-6)))


def bernoulli_mask(
    shape: torch.Size, keep_p: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """A boolean mask whose entries are True with probability ``keep_p``, drawn from ``generator``."""
    # Uniforms in float32 whatever the parameter dtype: bfloat16 uniforms have 8 bits, which would round p.
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32) < keep_p


def bernoulli_indices(
    numel: int, keep_p: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """The sorted flat indices that a Bernoulli(``keep_p``) mask over ``numel`` entries keeps, drawn as gaps.

    The gap from one kept entry to the next is Geometric(p): P(gap = k) = (1 - p)^(k - 1) p for k = 1, 2, ...,
    which is exactly the law of the positions of the True entries of ``numel`` independent Bernoulli(p) draws
    (the first kept index is gap_1 - 1, the next gap_1 + gap_2 - 1, ...). Each gap is drawn by inversion from
    a float64 uniform u: gap = floor(log(u) / log(1 - p)) + 1, since P(floor(log u / log(1 - p)) >= j) =
    P(u <= (1 - p)^j) = (1 - p)^j. That is about p * numel uniforms instead of numel, so at OnDARE's p = 0.1
    the mask costs a tenth of the random numbers; the draws differ from ``bernoulli_mask``'s, the law is the
    same. Returns int64 indices on ``device``.
    """
    if keep_p >= 1 or numel == 0:
        return torch.arange(numel, device=device)
    mean = numel * keep_p
    # Enough gaps to pass the end with overwhelming probability (6 sigma); loop in the rare case it does not.
    chunk = int(mean + 6 * math.sqrt(mean * (1 - keep_p)) + 64)
    scale = 1.0 / math.log1p(-keep_p)
    parts, end = [], 0
    while end < numel:
        uniform = torch.rand(chunk, dtype=torch.float64, generator=generator, device=device)
        gaps = uniform.log_().mul_(scale).floor_().add_(1)
        # Positions stay float64 (integers, exact below 2^53): u = 0 gives an infinite gap, clamped first.
        positions = gaps.clamp_(max=numel + 1).cumsum_(0).add_(end - 1)
        parts.append(positions)
        end = int(positions[-1]) + 1
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    return positions[: int(torch.searchsorted(positions, float(numel)))].to(torch.int64)


def l1_renormalise(kept: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Scale ``kept`` so that its L1 norm equals that of ``dense`` (unchanged when ``kept`` is all zero)."""
    # Norms in at least float32: a bfloat16 sum of millions of entries loses most of its digits.
    norm_dtype = torch.promote_types(dense.dtype, torch.float32)
    dense_norm = dense.abs().sum(dtype=norm_dtype)
    kept_norm = kept.abs().sum(dtype=norm_dtype)
    # torch.where rather than `if kept_norm == 0`: no host sync on GPU. The 1/0 it computes is never selected.
    scale = torch.where(kept_norm > 0, dense_norm / kept_norm, torch.ones_like(kept_norm))
    return kept.mul_(scale.to(kept.dtype))


def dare(x: torch.Tensor, mask: torch.Tensor, keep_p: float, rescale: bool = False) -> torch.Tensor:
    """DARE (Yu et al. 2024, arXiv:2311.03099): drop the entries where ``mask`` is False, rescale the rest.

    Returns a new tensor ``x * mask / keep_p``, or with ``rescale`` the kept entries scaled to the L1 norm
    of ``x``.
    """
    # torch.where rather than x * mask: multiplying by a bool tensor first casts the whole mask to x's dtype.
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if rescale:
        return l1_renormalise(kept, x)
    return kept.div_(keep_p)


def _sample_bounds(values: torch.Tensor, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Two entries of ``values`` that likely bracket its k-th largest: (upper, lower), None for no bound.

    From a sample of n / 128 entries (1,024 to 16,384; ``_sample_index``), the entries a few standard
    deviations of the sample quantile above and below the k-th largest's rank. Only a guess: the callers check
    it and fall back, so the result never depends on the sample, only the time does.
    """
    return _bounds_from_sample(values.index_select(0, _sample_index(values)), values.numel(), k)


def _sample_stride(n: int) -> int:
    """The chunk length of ``_sample_index``: n / 128 entries, at least 1,024 and at most 16,384."""
    return max(1, n // min(16384, max(1024, n // 128)))


def _sample_index(values: torch.Tensor) -> torch.Tensor:
    """Flat positions of a stratified random sample of the 1-D ``values``: one uniformly drawn entry in each
    chunk of ``_sample_stride`` consecutive entries (a partial last chunk is left out).

    Not a plain strided sample: a weight matrix's gradients differ by column, and a stride that shares factors
    with the row length sees only a few columns (stride 128 on 576 columns: 9 of them). On SmolLM2's real DPO
    gradients that misled the bounds of most tensors, and every OnTIES step fell back to the dense top-k
    (7.3x AdamW's step). The draw is seeded by the size, so the time is reproducible; the results never depend
    on it.
    """
    return _sample_positions(values.numel()).to(values.device)


@functools.lru_cache(maxsize=64)
def _sample_positions(n: int) -> torch.Tensor:
    """``_sample_index``'s positions for n entries, on CPU: the same every step (a model has a few sizes).
    Read-only: callers only gather with it."""
    stride = _sample_stride(n)
    size = n // stride
    gen = torch.Generator().manual_seed(n)
    return torch.randint(stride, (size,), generator=gen).add_(torch.arange(0, size * stride, stride))


def _bounds_from_sample(
    sample: torch.Tensor, n: int, k: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``_sample_bounds`` from a sample of a tensor of ``n`` entries, already taken."""
    size, q = sample.numel(), k / n
    margin = 4 * math.sqrt(size * q * (1 - q)) + 16
    hi, lo = int(q * size - margin), math.ceil(q * size + margin)
    # The (hi+1)-th and (lo+1)-th largest of the sample: two selections, cheaper than sorting it.
    upper = sample.kthvalue(size - hi).values if hi >= 0 else None
    lower = sample.kthvalue(size - lo).values if lo < size else None
    return upper, lower


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of the 1-D tensor ``values`` (1 <= k <= numel): ``values.kthvalue(numel - k +
    1).values`` exactly, without a selection over the whole tensor when it is large.

    With sample bounds U above and L below the answer (``_sample_bounds``): when fewer than k entries exceed
    U and at least k are >= L, the answer is the (k - #{> U})-th largest of the entries in [L, U], a selection
    over a small fraction of the tensor; otherwise (the sample misled, e.g. on a periodic tensor) the full
    kthvalue runs. Comparisons replace torch's CPU kthvalue, which copies the tensor and selects over all of it.
    """
    n = values.numel()
    if n <= 65536:
        return values.kthvalue(n - k + 1).values
    upper, lower = _sample_bounds(values, k)
    # count_nonzero: a bool tensor's sum() first copies it to int64.
    above = 0 if upper is None else int(torch.count_nonzero(_compare(values, "gt", upper)))
    at_least = n if lower is None else int(torch.count_nonzero(_compare(values, "ge", lower)))
    if not above < k <= at_least:
        return values.kthvalue(n - k + 1).values
    inside = torch.ones_like(values, dtype=torch.bool) if lower is None else _compare(values, "ge", lower)
    if upper is not None:
        inside &= _compare(values, "le", upper)
    candidates = values[inside]
    return candidates.kthvalue(candidates.numel() - (k - above) + 1).values


def top_k_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """The sorted indices of the entries of the 1-D tensor ``values`` that are >= its k-th largest: at least
    k of them, more when entries tie with the k-th largest (what ``ties_trim`` keeps).

    One pass finds the entries >= a sample lower bound L (``_sample_bounds``), a little over k of them; the
    k-th largest is then found among those alone (between L and the upper bound U), and the kept indices are
    a subset of them. When the sample misled, the full ``kth_largest`` and one comparison are used instead.
    """
    n = values.numel()
    if k >= n:
        return torch.arange(n, device=values.device)
    upper, lower = _sample_bounds(values, k) if n > 65536 else (None, None)
    if lower is not None:
        index = _flat_nonzero(_compare(values, "ge", lower))
        near = values.index_select(0, index)
        threshold = _kth_among(near, upper, k)
        if threshold is not None:
            return index.index_select(0, _flat_nonzero(_compare(near, "ge", threshold)))
    return _flat_nonzero(_compare(values, "ge", kth_largest(values, k)))


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """The int64 indices of the True entries of a 1-D boolean tensor, in order: ``mask.nonzero().squeeze(1)``.
    On CPU through numpy's ``flatnonzero`` (no copy either way), about 4x faster than torch's CPU nonzero,
    which dominated OnTIES' step."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().squeeze(1)


_COMPARE = {
    "ge": (np.greater_equal, torch.ge),
    "gt": (np.greater, torch.gt),
    "le": (np.less_equal, torch.le),
}


def _numpy_view(t: torch.Tensor) -> np.ndarray | None:
    """The numpy view of a CPU float32 / float64 tensor (no copy); None for any other."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return t.detach().numpy()
    return None


def _compare(values: torch.Tensor, op: str, bound: torch.Tensor | float, out: torch.Tensor | None = None):
    """``values >= bound`` (op "ge"), ``>`` ("gt") or ``<=`` ("le") as a bool tensor, into ``out`` when given.

    On CPU for float32 / float64 through numpy: torch's CPU comparisons run 7-10x slower here (262,144
    entries on one thread: 116 us against 16). The bound is compared in the values' dtype, as torch does.
    """
    numpy_op, torch_op = _COMPARE[op]
    x = _numpy_view(values)
    if x is None:
        return torch_op(values, bound, out=out) if out is not None else torch_op(values, bound)
    b = x.dtype.type(bound.item() if isinstance(bound, torch.Tensor) else bound)
    if out is None:
        return torch.from_numpy(numpy_op(x, b))
    numpy_op(x, b, out=out.numpy())
    return out


def _mask_(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x.mul_(mask)`` for a bool mask, in place: the entries where mask is False become zero (-0.0 for
    negative ones, as the product gives). Through numpy on CPU (3x faster than torch's mul by a bool here)."""
    view = _numpy_view(x)
    if view is None or not x.is_contiguous():
        return x.mul_(mask)
    np.multiply(view, mask.numpy(), out=view)
    return x


def _kth_among(near: torch.Tensor, upper: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """The k-th largest entry of a whole tensor, found among ``near``: its entries >= a lower bound L; None when
    the bounds do not bracket it (fewer than k candidates, or k or more above ``upper``), and the caller must
    look at the whole tensor."""
    if near.numel() < k:
        return None
    above = 0 if upper is None else int(torch.count_nonzero(_compare(near, "gt", upper)))
    if above >= k:
        return None
    candidates = near if upper is None else near.index_select(0, _flat_nonzero(_compare(near, "le", upper)))
    return candidates.kthvalue(candidates.numel() - (k - above) + 1).values


def ties_trim(x: torch.Tensor, keep_p: float, rescale: bool = False) -> torch.Tensor:
    """TIES' trim step (Yadav et al. 2023, arXiv:2306.01708): keep the top-k entries by magnitude.

    k = ``keep_count(x.numel(), keep_p)``. Entries whose magnitude equals the k-th largest are all kept, so
    ties can keep more than k (the original TIES code does the same). Returns a new tensor, the other
    entries zeroed; with ``rescale`` the kept entries are scaled to the L1 norm of ``x``.
    """
    numel = x.numel()
    k = keep_count(numel, keep_p)
    if k == numel:
        return x.clone()
    magnitude = x.abs()
    threshold = kth_largest(magnitude.flatten(), k)
    kept = torch.where(
        _compare(magnitude, "ge", threshold), x, torch.zeros((), dtype=x.dtype, device=x.device)
    )
    if rescale:
        return l1_renormalise(kept, x)
    return kept


def _elected_positive(delta_hat: torch.Tensor, tau_tilde: torch.Tensor) -> torch.Tensor:
    """True where the elected sign is +: delta_hat + tau_tilde >= 0 (a zero sum counts as positive)."""
    return _compare(delta_hat + tau_tilde, "ge", 0)


def elect_sign(delta_hat: torch.Tensor, tau_tilde: torch.Tensor) -> torch.Tensor:
    """TIES' sign election for two tensors: +1 where delta_hat + tau_tilde >= 0 (zero counts as +), else -1.

    The result has the promoted dtype of the two inputs.
    """
    dtype = torch.promote_types(delta_hat.dtype, tau_tilde.dtype)
    return torch.where(_elected_positive(delta_hat, tau_tilde), 1.0, -1.0).to(dtype)


def disjoint_merge(delta_hat: torch.Tensor, tau_tilde: torch.Tensor, alpha: float) -> torch.Tensor:
    """OnTIES' merged update: (1 - alpha) * Delta'' + alpha * tau'', in delta_hat's dtype.

    Delta'' and tau'' are ``delta_hat`` and ``tau_tilde`` with the entries whose sign disagrees with the
    elected sign (``elect_sign``) zeroed. Zero entries stay zero whatever the elected sign.
    """
    positive = _elected_positive(delta_hat, tau_tilde)
    # An entry agrees when its sign is the elected one. Zeros "agree" only with +, which changes nothing:
    # a kept zero adds zero. Boolean masks instead of products with the +-1 signs: 1 byte per entry, not 4.
    zero = torch.zeros((), dtype=delta_hat.dtype, device=delta_hat.device)
    delta_agreed = torch.where(_compare(delta_hat, "ge", 0) == positive, delta_hat, zero)
    tau_agreed = torch.where(_compare(tau_tilde, "ge", 0) == positive, tau_tilde, zero.to(tau_tilde.dtype))
    return delta_agreed.mul_(1 - alpha).add_(tau_agreed, alpha=alpha)


def linear_merge(delta_hat: torch.Tensor, tau_tilde: torch.Tensor, alpha: float) -> torch.Tensor:
    """OnDARE's merged update: (1 - alpha) * delta_hat + alpha * tau_tilde, in delta_hat's dtype."""
    # add_ promotes a bfloat16 tau_tilde elementwise: no parameter-sized float32 copy of it is made.
    return delta_hat.mul(1 - alpha).add_(tau_tilde, alpha=alpha)


def adamw_update(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advance AdamW's moments in place and return its update Delta (without weight decay), written into ``out``
    (the moments' shape) or a new tensor.

    On CPU, for contiguous float32 / float64 tensors, this is torch's fused AdamW kernel (what
    ``torch.optim.AdamW(fused=True)`` runs) applied to a zeroed buffer: one pass instead of eight elementwise
    ops, 2.6x faster here; the moments come out bitwise equal to the op-by-op path, Delta equal to rounding.
    Elsewhere it is ``torch.optim.AdamW``'s single-tensor arithmetic, except that the final ``addcdiv_`` into
    the parameter is split into this update and an add. Either way, with p = 1 and no merge the optimizer
    matches AdamW to rounding (about 1e-16 relative in float64).
    """
    if _fused_adamw_applies(grad, exp_avg, exp_avg_sq):
        delta = torch.zeros_like(exp_avg) if out is None else out.zero_()
        torch._fused_adamw_(
            [delta],
            [grad],
            [exp_avg],
            [exp_avg_sq],
            [],
            [_step_tensor(step)],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
        return delta
    advance_moments(grad, exp_avg, exp_avg_sq, beta1, beta2)
    return adamw_direction(exp_avg, exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, out=out)


@functools.lru_cache(maxsize=1)
def _step_tensor(step: int) -> torch.Tensor:
    """The step count as the fused kernel takes it (it reads it, never writes it): one tensor per step, not one per
    block."""
    return torch.tensor(float(step))


def _fused_adamw_applies(*tensors: torch.Tensor) -> bool:
    """Whether ``adamw_update`` may use torch's fused kernel: CPU, contiguous, one dtype, float32 or float64.
    bfloat16 stays op by op (the fused kernel computes in float32 and rounds once, which changes the numbers);
    on GPUs the op-by-op path stays as it was tested."""
    first = tensors[0]
    return (
        hasattr(torch, "_fused_adamw_")
        and first.device.type == "cpu"
        and first.dtype in (torch.float32, torch.float64)
        and all(t.dtype == first.dtype and t.device == first.device and t.is_contiguous() for t in tensors)
    )


def adamw_direction(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """AdamW's update Delta from moments already advanced (``adamw_update``'s second half), written into
    ``out`` (the moments' shape) or a new tensor.

    OnDARE's sparse step calls it on the moments gathered at the kept indices, OnTIES' blocked step per block.
    """
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / bias_correction1
    denom = torch.sqrt(exp_avg_sq, out=out).div_(bias_correction2_sqrt).add_(eps)
    # Written into denom (an elementwise op may alias its input) to save one parameter-sized buffer.
    return torch.div(exp_avg, denom, out=denom).mul_(-step_size)


def advance_moments(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float, beta2: float
) -> None:
    """AdamW's moment updates, in place: m = beta1 m + (1 - beta1) g, v = beta2 v + (1 - beta2) g^2."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def _add_at(param: torch.Tensor, index: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> None:
    """param.flatten()[index] += alpha * values, in place (through a flat copy when param is not contiguous)."""
    flat = param.view(-1) if param.is_contiguous() else param.reshape(-1)
    flat.index_add_(0, index, values, alpha=alpha)
    if not param.is_contiguous():
        param.copy_(flat.view_as(param))


# --------------------------------------------------------------------------------------------------------
# Matching the policy's parameters to the reference and base tensors.
# --------------------------------------------------------------------------------------------------------


def _canonical_name(name: str) -> str:
    """The parameter name with wrapper prefixes and segments removed (see _WRAPPER_PREFIXES)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


class _TensorLookup:
    """Finds the tensor of a policy parameter in a reference or base model, by exact or canonical name."""

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor], role: str) -> None:
        if isinstance(source, nn.Module):
            # state_dict rather than named_parameters: it lists tied weights under every name.
            tensors = dict(source.state_dict())
        elif isinstance(source, Mapping):
            tensors = dict(source)
        else:
            raise TypeError(
                f"OnlineMergingOptimizer: {role} must be an nn.Module or a dict of name -> tensor, "
                f"got {type(source).__name__}"
            )
        self.role = role
        self.tensors = tensors
        self.by_canonical: dict[str, str | None] = {}
        for key in tensors:
            canonical = _canonical_name(key)
            # Two keys with one canonical name are ambiguous: None makes a lookup by it fail loudly.
            self.by_canonical[canonical] = None if canonical in self.by_canonical else key

    def get(self, name: str, param: torch.Tensor) -> torch.Tensor:
        canonical = _canonical_name(name)
        key = name if name in self.tensors else self.by_canonical.get(canonical)
        if key is None and canonical in self.by_canonical:
            raise KeyError(
                f"OnlineMergingOptimizer: parameter '{name}' matches several {self.role} tensors once wrapper "
                f"prefixes are removed ('{canonical}'); pass a {self.role} whose names are the policy's exactly"
            )
        if key is None:
            raise KeyError(
                f"OnlineMergingOptimizer: parameter '{name}' has no tensor in {self.role} (looked up as "
                f"'{name}' and '{canonical}'). Pass a {self.role} with the policy's parameter "
                f"names (the same architecture), or set requires_grad=False on parameters not to optimise."
            )
        tensor = self.tensors[key]
        if tensor.shape != param.shape:
            raise ValueError(
                f"OnlineMergingOptimizer: parameter '{name}' has shape {tuple(param.shape)} but {self.role} "
                f"'{key}' has shape {tuple(tensor.shape)}. Under FSDP pass this rank's shards, wrapped like "
                f"the policy."
            )
        return tensor


def _named_groups(named_params: Iterable[Any]) -> list[dict[str, Any]]:
    """Param groups of trainable parameters, each with torch's ``param_names`` list beside ``params``.

    Accepts ``model.named_parameters()`` (one group) or a list of dicts whose ``params`` are (name, parameter)
    pairs, with per-group options.
    """
    items = list(named_params)
    if not items:
        raise ValueError("OnlineMergingOptimizer got no parameters: pass policy.named_parameters()")
    raw_groups = items if all(isinstance(item, dict) for item in items) else [{"params": items}]
    groups = []
    for raw in raw_groups:
        pairs = list(raw["params"])
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise TypeError(
                    "OnlineMergingOptimizer needs (name, parameter) pairs to match each parameter with its "
                    f"reference and base tensors, got {type(pair).__name__}: pass model.named_parameters()"
                )
        # Frozen parameters get no state and no tau: they cost no memory and need no reference entry.
        trainable = [(name, param) for name, param in pairs if param.requires_grad]
        for name, param in trainable:
            # FSDP2 parameters are DTensors whose shape is the global one: masks and top-k would need the
            # local shard (to_local()), which this optimizer does not do yet.
            if DTensor is not None and isinstance(param, DTensor):
                raise NotImplementedError(
                    f"OnlineMergingOptimizer: parameter '{name}' is a DTensor (FSDP2); DTensor parameters are "
                    f"not supported: use DDP, FSDP1 or a single process"
                )
        groups.append({**raw, "params": [p for _, p in trainable], "param_names": [n for n, _ in trainable]})
    if not any(group["params"] for group in groups):
        raise ValueError("OnlineMergingOptimizer: no parameter requires grad; unfreeze the ones to train")
    return groups


def _check_group(group: dict[str, Any]) -> None:
    """Guard clauses on one param group's options (defaults or per-group overrides)."""
    for key in (
        "reserve_p",
        "alpha",
        "lr",
        "eps",
        "weight_decay",
        *(() if group["clip"] is None else ("clip",)),
    ):
        value = group[key]
        # PyYAML reads 1e-5 (no dot) as a string: say so rather than fail on a comparison below.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(
                f"OnlineMergingOptimizer: {key} must be a number, got {value!r} ({type(value).__name__}); "
                f"in YAML write floats with a dot, e.g. 1.0e-5"
            )
    checks = [
        (group["mode"] in MODES, f"mode must be one of {MODES}, got {group['mode']!r}"),
        (0 < group["reserve_p"] <= 1, f"reserve_p must be in (0, 1], got {group['reserve_p']}; 1 keeps all"),
        (0 <= group["alpha"] <= 1, f"alpha must be in [0, 1], got {group['alpha']}"),
        (group["lr"] >= 0, f"lr must be >= 0, got {group['lr']}"),
        (all(0 <= b < 1 for b in group["betas"]), f"betas must be in [0, 1), got {group['betas']}"),
        (group["eps"] >= 0, f"eps must be >= 0, got {group['eps']}"),
        (group["weight_decay"] >= 0, f"weight_decay must be >= 0, got {group['weight_decay']}"),
        (
            isinstance(group["merge_every"], int) and group["merge_every"] >= 1,
            f"merge_every must be an integer >= 1 (1 merges every step), got {group['merge_every']!r}",
        ),
        (
            group["clip"] is None or group["clip"] > 0,
            f"clip must be > 0, or None for no clamp, got {group['clip']}",
        ),
        (isinstance(group["rescale"], bool), f"rescale must be True or False, got {group['rescale']!r}"),
        (
            isinstance(group["use_merge"], bool),
            f"use_merge must be True or False, got {group['use_merge']!r}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"OnlineMergingOptimizer: {message}")


def _tau(state: dict[str, Any]) -> torch.Tensor:
    """The parameter's tau_tilde; a group that merges but was built without the merge has none."""
    if "tau" not in state:
        raise RuntimeError(
            "OnlineMergingOptimizer: a group has use_merge=True but no tau was computed for it (it was "
            "built with use_merge=False); build the optimizer with the merge settings you train with"
        )
    return state["tau"]


class OnlineMergingOptimizer(torch.optim.Optimizer):
    """AdamW whose every update is merged with the SFT task vector: OnDARE or OnTIES (see the module doc).

    Args:
        named_params: the policy's ``named_parameters()``, or a list of param-group dicts whose ``params``
            are (name, parameter) pairs; any option below except ``seed`` and ``tau_dtype`` can be set per
            group. Only parameters with ``requires_grad`` are kept. Names are stored in each group's
            ``param_names`` (torch's own key for named parameters).
        reference, base: the SFT and pretrained weights, as models or dicts of name -> tensor with the
            policy's names (wrapper prefixes such as DDP's ``module.`` are tolerated). Used once to compute
            tau = reference - base; no reference to them is kept. May be None only when no group merges.
        mode: "ondare" (random drop, rescaled) or "onties" (top-k by magnitude, sign election).
        reserve_p: p, the fraction of entries kept, in (0, 1].
        alpha: the merge weight, in [0, 1]; alpha * tau_tilde is not scaled by lr.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay decoupled, never masked).
        rescale: renormalise the kept entries to the dense L1 norm instead of scaling by 1/p (or by 1).
        use_merge: False drops the merge (and alpha); the update is then the masked AdamW update.
        merge_every: K; plain AdamW steps in between, one merge of their sum every K steps.
        clip: tau_tilde is clamped to [-clip, clip] after masking and scaling; None for no clamp.
        seed: seeds the mask generators; None uses ``torch.initial_seed()``. Same seed on every DDP rank.
        tau_dtype: dtype to store tau_tilde in (e.g. torch.bfloat16 to halve it); None: the parameter's.
    """

    def __init__(
        self,
        named_params: Iterable[Any],
        *,
        reference: nn.Module | Mapping[str, torch.Tensor] | None,
        base: nn.Module | Mapping[str, torch.Tensor] | None,
        mode: str = "ondare",
        reserve_p: float,
        alpha: float,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rescale: bool = False,
        use_merge: bool = True,
        merge_every: int = 1,
        clip: float | None = 1.0,
        seed: int | None = None,
        tau_dtype: torch.dtype | None = None,
    ) -> None:
        if tau_dtype is not None and not tau_dtype.is_floating_point:
            raise ValueError(f"OnlineMergingOptimizer: tau_dtype must be a floating dtype, got {tau_dtype}")
        defaults = dict(
            mode=mode,
            reserve_p=reserve_p,
            alpha=alpha,
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            rescale=rescale,
            use_merge=use_merge,
            merge_every=merge_every,
            clip=clip,
        )
        self._constructed = False
        super().__init__(_named_groups(named_params), defaults)
        for group in self.param_groups:
            _check_group(group)
        self._seed = torch.initial_seed() if seed is None else int(seed)
        self._tau_dtype = tau_dtype
        self._generators: dict[str, torch.Generator] = {}
        self._scratch: dict[tuple[torch.dtype, str], tuple[torch.Tensor, ...]] = {}
        self._init_tau(reference, base)
        self._constructed = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # tau needs the base weights, which are gone once the optimizer is built.
        if self._constructed:
            raise RuntimeError(
                "OnlineMergingOptimizer cannot add param groups after construction (tau needs the base "
                "model): build it with every parameter to train, as groups if they need other options"
            )
        super().add_param_group(param_group)

    def _init_tau(self, reference: Any, base: Any) -> None:
        """Compute and store tau_tilde (masked once, scaled, clamped) for every parameter that merges."""
        if not any(group["use_merge"] for group in self.param_groups):
            return
        if reference is None or base is None:
            raise ValueError(
                "OnlineMergingOptimizer: merging needs both reference and base to compute tau; pass them, "
                "or use_merge=False"
            )
        reference_lookup = _TensorLookup(reference, "reference")
        base_lookup = _TensorLookup(base, "base")
        for group in self.param_groups:
            if not group["use_merge"]:
                continue
            for name, param in zip(group["param_names"], group["params"]):
                ref = reference_lookup.get(name, param)
                bas = base_lookup.get(name, param)
                # At least float32: a bfloat16 difference of two close weights keeps few correct digits.
                dtype = torch.promote_types(param.dtype, torch.float32)
                tau = ref.detach().to(param.device, dtype) - bas.detach().to(param.device, dtype)
                tau = self._sparsify(tau, group)
                if group["clip"] is not None:
                    tau.clamp_(-group["clip"], group["clip"])
                self.state[param]["tau"] = tau.to(self._tau_dtype or param.dtype)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The mask generator of ``device``, created and seeded on first use."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[key]

    def _sparsify(self, x: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """DARE or TIES-trim ``x`` according to the group's mode (x itself when everything is kept)."""
        keep_p = group["reserve_p"]
        if keep_p >= 1:
            return x
        if group["mode"] == "onties":
            return ties_trim(x, keep_p, group["rescale"])
        mask = bernoulli_mask(x.shape, keep_p, self._generator(x.device), x.device)
        return dare(x, mask, keep_p, group["rescale"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over every parameter that has a gradient (see the module doc)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._step_param(param, group)
        return loss

    def _step_param(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        if param.grad.is_sparse:
            raise RuntimeError("OnlineMergingOptimizer does not support sparse gradients; use sparse=False")
        state = self.state[param]
        if "step" not in state:
            # A float32 step tensor, as torch's AdamW keeps it (and skips casting it in load_state_dict).
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        every = group["merge_every"]
        if every == 1 and not group["rescale"] and group["reserve_p"] < 1:
            if group["mode"] == "ondare":
                self._ondare_sparse_step(param, state, group)
            else:
                self._onties_sparse_step(param, state, group)
            return
        if every > 1 and "accum" not in state:
            state["accum"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        delta = adamw_update(
            param.grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            step,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
        )
        if group["weight_decay"] != 0:
            param.mul_(1 - group["lr"] * group["weight_decay"])
        if step % every != 0:
            param.add_(delta)
            state["accum"].add_(delta)
            return
        if every > 1:
            # Undo the plain steps since the last merge, then merge their sum with this step's update.
            param.sub_(state["accum"])
            delta.add_(state["accum"])
            state["accum"].zero_()
        param.add_(self._merged_update(delta, state, group))

    def _ondare_sparse_step(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """One OnDARE step that computes the update only where the mask keeps it (p * numel entries).

        The same step as the dense path, theta <- theta (1 - lr wd) + (1 - alpha) mask * Delta / p + alpha *
        tau_tilde, rearranged: the moments advance everywhere, the kept indices come from
        ``bernoulli_indices``, Delta is computed at those indices only (``adamw_direction`` on the
        gathered moments) and added there with index_add_, then alpha * tau_tilde everywhere. At p = 0.1 it
        skips the dense update, the mask and the masked copy. The sums round in another order than the dense
        path's (theta + c Delta + alpha tau instead of theta + (c Delta + alpha tau)): equal to rounding.
        """
        state["step"] += 1
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        keep_p, lr = group["reserve_p"], group["lr"]
        advance_moments(param.grad, state["exp_avg"], state["exp_avg_sq"], beta1, beta2)
        if group["weight_decay"] != 0:
            param.mul_(1 - lr * group["weight_decay"])
        index = bernoulli_indices(param.numel(), keep_p, self._generator(param.device), param.device)
        update = adamw_direction(
            state["exp_avg"].reshape(-1).index_select(0, index),
            state["exp_avg_sq"].reshape(-1).index_select(0, index),
            step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
        )
        _add_at(param, index, update, alpha=(1 - group["alpha"] if group["use_merge"] else 1.0) / keep_p)
        if group["use_merge"]:
            param.add_(_tau(state), alpha=group["alpha"])

    def _onties_sparse_step(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """One OnTIES step that merges only where the trimmed update is kept.

        The same step as the dense path, rearranged: where ``ties_trim`` drops Delta, Delta_hat is 0, the
        elected sign is tau_tilde's own and the entry moves by alpha * tau_tilde. So theta moves by alpha *
        tau_tilde everywhere, and at the kept indices (about p * numel) by (1 - alpha) Delta'' - alpha * (the
        part of tau_tilde that disagrees with the elected sign), computed on gathered entries. Equal to the
        dense path up to the rounding order of the sums.
        """
        state["step"] += 1
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"])
        k = keep_count(param.numel(), group["reserve_p"])
        found = self._onties_top_k_by_blocks(param, state, step, k, hyper)
        if found is None:
            delta = adamw_update(param.grad, state["exp_avg"], state["exp_avg_sq"], step, **hyper).reshape(-1)
            index = top_k_indices(delta.abs(), k)
            kept = delta.index_select(0, index)
            del delta
        else:
            index, kept = found
        if group["weight_decay"] != 0:
            param.mul_(1 - group["lr"] * group["weight_decay"])
        if group["use_merge"]:
            alpha = group["alpha"]
            tau = _tau(state).reshape(-1).index_select(0, index)
            dtype = torch.promote_types(kept.dtype, tau.dtype)
            kept, tau = kept.to(dtype), tau.to(dtype)
            positive = _elected_positive(kept, tau)
            # In place on the gathered copies: Delta'' (the entries that agree with the elected sign), and the
            # part of tau_tilde that disagrees, which the alpha * tau_tilde added everywhere must take back.
            # Products with boolean masks: on CPU about 4x faster than torch.where or masked_fill_ here.
            _mask_(kept, _compare(kept, "ge", 0) == positive).mul_(1 - alpha)
            kept.sub_(_mask_(tau, _compare(tau, "ge", 0) != positive), alpha=alpha)
            param.add_(state["tau"], alpha=alpha)
        _add_at(param, index, kept.to(param.dtype))

    def _onties_top_k_by_blocks(
        self, param: torch.Tensor, state: dict[str, Any], step: int, k: int, hyper: dict[str, float]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Advance the moments and find OnTIES' kept indices and Delta there, in one pass of cache-sized blocks.

        Delta is never formed for the whole tensor. Bounds U >= L on the k-th largest |Delta| come first, from
        Delta computed on a sample of the moments (``_sample_index``, advanced out of place); then
        for each block of ``_BLOCK`` entries the moments advance in place, Delta is formed in a block-sized
        buffer, and the entries with |Delta| >= L are kept as candidates with their Delta. The exact k-th
        largest is then selected among the candidates (``_kth_among``). Each block's arithmetic is
        ``adamw_update``'s, op for op, so the moments, Delta and the kept set are the dense path's. Returns
        (sorted flat indices, Delta at them) with the moments advanced: the candidates, a few more than the
        kept entries, those under the k-th largest with Delta 0; None, with the moments NOT advanced,
        when this path does not apply (a small or non-contiguous tensor, no lower bound); and when the
        sample misled, the moments are advanced and Delta is recomputed densely from them (equal to rounding).
        """
        grad, exp_avg, exp_avg_sq = param.grad, state["exp_avg"], state["exp_avg_sq"]
        n = param.numel()
        tensors = (grad, exp_avg, exp_avg_sq)
        if n <= 65536 or k >= n or not all(t.is_contiguous() and t.dtype == param.dtype for t in tensors):
            return None
        beta1, beta2 = hyper["beta1"], hyper["beta2"]
        grad, exp_avg, exp_avg_sq = (t.view(-1) for t in tensors)
        at = _sample_index(grad)
        # Gathered copies, advanced out of place.
        sample_avg, sample_sq = exp_avg.index_select(0, at), exp_avg_sq.index_select(0, at)
        advance_moments(grad.index_select(0, at), sample_avg, sample_sq, beta1, beta2)
        upper, lower = _bounds_from_sample(adamw_direction(sample_avg, sample_sq, step, **hyper).abs_(), n, k)
        if lower is None:
            return None
        # When the k-th largest |Delta| may be 0 (fewer than k entries move, as in an embedding whose unused rows
        # have no gradient), the candidates are the moving entries only: TIES keeps the ties at 0 too, but an
        # entry with Delta 0 changes nothing when kept (its elected sign is tau_tilde's own), and keeping all
        # of them made the step gather and scatter the whole tensor.
        moving_only = not bool(lower > 0)
        op, bound = ("gt", 0.0) if moving_only else ("ge", lower)
        block = min(_BLOCK, n)
        delta, magnitude, is_candidate = self._block_buffers(block, param.dtype, param.device)
        indices, values = [], []
        for start in range(0, n, block):
            end = min(start + block, n)
            size = end - start
            g, m, v = grad[start:end], exp_avg[start:end], exp_avg_sq[start:end]
            d = adamw_update(g, m, v, step, **hyper, out=delta[:size])
            _compare(torch.abs(d, out=magnitude[:size]), op, bound, out=is_candidate[:size])
            found = _flat_nonzero(is_candidate[:size])
            values.append(d.index_select(0, found))
            indices.append(found.add_(start))
        index, near = torch.cat(indices), torch.cat(values)
        if moving_only and near.numel() < k:
            return index, near  # the k-th largest is 0: every moving entry is kept
        magnitude = near.abs()
        threshold = _kth_among(magnitude, upper, k)
        if threshold is None:  # the sample misled: rank the dense Delta of the moments just advanced
            dense = adamw_direction(exp_avg, exp_avg_sq, step, **hyper)
            index = top_k_indices(dense.abs(), k)
            return index, dense.index_select(0, index)
        # Candidates under the threshold stay in the index with Delta 0: a trimmed entry, which the merge moves
        # by alpha * tau_tilde alone (as everywhere else), and which costs no gather here.
        return index, _mask_(near, _compare(magnitude, "ge", threshold))

    def _block_buffers(
        self, size: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block-sized scratch buffers (Delta, its magnitude, the candidate mask), kept across tensors and
        steps: a fresh MiB-sized buffer per tensor costs an allocation and its page faults every time."""
        key = (dtype, str(device))
        buffers = self._scratch.get(key)
        if buffers is None or buffers[0].numel() < size:
            block = max(size, _BLOCK)
            buffers = (
                torch.empty(block, dtype=dtype, device=device),
                torch.empty(block, dtype=dtype, device=device),
                torch.empty(block, dtype=torch.bool, device=device),
            )
            self._scratch[key] = buffers
        return tuple(b[:size] for b in buffers)

    def _merged_update(
        self, delta: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> torch.Tensor:
        delta_hat = self._sparsify(delta, group)
        if not group["use_merge"]:
            return delta_hat
        if group["mode"] == "onties":
            return disjoint_merge(delta_hat, _tau(state), group["alpha"])
        return linear_merge(delta_hat, _tau(state), group["alpha"])

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (moments, step, tau_tilde, accumulators) plus the mask generators' states."""
        state_dict = super().state_dict()
        state_dict["mask_rng"] = {key: gen.get_state() for key, gen in self._generators.items()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rng_states = state_dict.pop("mask_rng", None)
        if rng_states is None:
            raise ValueError(
                "OnlineMergingOptimizer: this state dict has no 'mask_rng' entry, so it was not written by "
                "OnlineMergingOptimizer.state_dict(); resume from a checkpoint of this optimizer"
            )
        missing = set(self._generators) - set(rng_states)
        if missing:
            raise ValueError(
                f"OnlineMergingOptimizer: the checkpoint has no mask generator state for {sorted(missing)} "
                f"(it has {sorted(rng_states)}); resume with the parameters on the devices they were saved from"
            )
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to its parameter's dtype: store tau_tilde in tau_dtype again
        # (an exact round trip, bfloat16 -> float32 -> bfloat16).
        if self._tau_dtype is not None:
            for state in self.state.values():
                if "tau" in state:
                    state["tau"] = state["tau"].to(self._tau_dtype)
        for key, rng_state in rng_states.items():
            self._generator(torch.device(key)).set_state(rng_state)
