"""The sign test of alignment/stats.py against binomial tails counted by hand."""

from __future__ import annotations

import pytest

from alignment.stats import paired_difference, sign_test


def test_sign_test_is_twice_the_binomial_tail_of_the_smaller_count():
    # n = 11, the smaller count 4: C(11,0..4) = 1 + 11 + 55 + 165 + 330 = 562 of 2^11 = 2048, doubled.
    assert sign_test(7, 4) == pytest.approx(2 * 562 / 2048)
    assert sign_test(4, 7) == sign_test(7, 4)
    # Ten changes all one way: 2 x (1/2)^10.
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    # n = 28, the smaller count 9: C(28,0..9) = 1 + 28 + 378 + 3,276 + 20,475 + 98,280 + 376,740 + 1,184,040
    # + 3,108,105 + 6,906,900 = 11,698,223 of 2^28, doubled: 0.087.
    assert sign_test(19, 9) == pytest.approx(2 * 11_698_223 / 2**28)


def test_an_even_split_or_nothing_changed_is_p_1_and_negative_counts_are_refused():
    assert sign_test(0, 0) == 1.0
    assert sign_test(3, 3) == 1.0  # the doubled tail passes 1: capped
    assert sign_test(5, 6) == 1.0
    with pytest.raises(ValueError, match="up=-1"):
        sign_test(-1, 2)


def test_paired_difference_enumerates_every_sign_pattern_when_few():
    # d = (1, 2, 3): sum 6; of the 8 sign patterns only +++ and --- reach |sum| >= 6, so p = 2/8.
    r = paired_difference([1.0, 2.0, 3.0])
    assert (r.mean, r.p, r.n, r.up, r.down) == (2.0, 0.25, 3, 3, 0)
    # s^2 = ((1-2)^2 + 0 + (3-2)^2) / 2 = 1, se = 1 / sqrt(3).
    assert r.se == pytest.approx(1 / 3**0.5)
    # d = (1, -1, 2): sum 2; patterns' sums: +++ 2, ++- -2, +-+ 4, +-- 0, -++ 0, -+- -4, --+ 2, --- -2:
    # |sum| >= 2 in 6 of 8.
    assert paired_difference([1.0, -1.0, 2.0]).p == pytest.approx(6 / 8)
    # Ties of the permuted sum with the observed one count despite rounding: 0.1 + 0.2 against 0.3.
    assert paired_difference([0.1, 0.2, -0.3]).p == 1.0


def test_paired_difference_samples_patterns_when_many_and_nothing_is_p_1():
    # 40 equal positive differences: only 2 of 2^40 patterns reach the observed sum, so almost no draw does.
    r = paired_difference([0.5] * 40, draws=2000, seed=1)
    assert r.p == pytest.approx(1 / 2001)
    # Symmetric differences: the observed sum is 0 and every pattern reaches it.
    assert paired_difference([1.0, -1.0] * 20, draws=500).p == 1.0
    # A modest shift among noise: the Monte Carlo p is close to the normal approximation's.
    rng = __import__("random").Random(3)
    d = [rng.gauss(0.3, 1.0) for _ in range(100)]
    r = paired_difference(d, draws=20_000)
    z = r.mean / r.se
    from math import erfc

    assert r.p == pytest.approx(erfc(abs(z) / 2**0.5), abs=0.02)
    assert paired_difference([]).p == 1.0
