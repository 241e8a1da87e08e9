"""The sign test of alignment/stats.py against binomial tails counted by hand."""

from __future__ import annotations

import pytest

from alignment.stats import sign_test


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
