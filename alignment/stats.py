"""Small statistics for telling a stage's held-out move from noise, with no dependency beyond the standard library.

- ``sign_test``: the exact two-sided sign test of a paired comparison, from the prompts that moved each way.
- ``paired_difference``: the mean of paired differences (a prompt's score after minus before), its standard
  error and the two-sided sign-flip permutation test of it, for scores that are not right or wrong.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from math import comb, sqrt


def sign_test(up: int, down: int) -> float:
    """Two-sided exact sign test: how likely a split at least as uneven as ``up`` against ``down`` is when each
    changed prompt moves either way with probability 1/2 (prompts that did not change carry no information):

        n = up + down,   p = min(1, 2 * sum_{k=0}^{min(up, down)} C(n, k) / 2^n)

    p = 1 when nothing changed. A held-out set of 200 prompts where 7 answers turned right and 4 wrong gives
    p = 0.55: a net gain of 3 answers that a coin makes as often as not."""
    if up < 0 or down < 0:
        raise ValueError(f"sign_test: counts must be >= 0, got up={up}, down={down}")
    n = up + down
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(up, down) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class PairedDifference:
    mean: float  # mean of the differences d_i = after_i - before_i
    se: float  # its standard error, s / sqrt(n) (0 when n < 2)
    p: float  # two-sided sign-flip permutation test of mean = 0
    n: int  # pairs compared
    up: int  # pairs with d_i > 0
    down: int  # pairs with d_i < 0


def paired_difference(diffs: list[float], draws: int = 20_000, seed: int = 0) -> PairedDifference:
    """The mean of paired differences d_1..d_n, its standard error and the sign-flip permutation test:

        mean = (1/n) sum_i d_i,   se = s / sqrt(n),   s^2 = sum_i (d_i - mean)^2 / (n - 1)
        p = P(|sum_i e_i d_i| >= |sum_i d_i|),   e_i = +-1 with probability 1/2 each, independently

    Under "the stage changed nothing" each prompt's difference is as likely negative as positive, so every sign
    pattern is equally likely. Exact over all 2^n patterns when 2^n <= ``draws``; otherwise ``draws`` seeded
    random patterns with p = (1 + hits) / (1 + draws), which never reads 0. It needs no normality: a reward that
    is 5 x (right or wrong) + a judge's score is far from normal. A tolerance of 1e-9 x sum |d_i| counts ties of
    the permuted sum with the observed one despite float rounding."""
    n = len(diffs)
    if n == 0:
        return PairedDifference(float("nan"), float("nan"), 1.0, 0, 0, 0)
    mean = sum(diffs) / n
    se = sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else 0.0
    observed = abs(sum(diffs))
    tol = 1e-9 * sum(abs(d) for d in diffs)
    if 2**n <= draws:
        hits = sum(
            abs(sum(e * d for e, d in zip(signs, diffs))) >= observed - tol
            for signs in itertools.product((1, -1), repeat=n)
        )
        p = hits / 2**n
    else:
        rng = random.Random(seed)
        hits = sum(
            abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed - tol for _ in range(draws)
        )
        p = (1 + hits) / (1 + draws)
    return PairedDifference(mean, se, min(1.0, p), n, sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))
