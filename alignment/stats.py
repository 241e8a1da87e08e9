"""Small statistics for telling a stage's held-out move from noise, with no dependency beyond the standard library.

- ``sign_test``: the exact two-sided sign test of a paired comparison, from the prompts that moved each way.
"""

from __future__ import annotations

from math import comb


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
