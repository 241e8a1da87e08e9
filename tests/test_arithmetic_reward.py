"""The arithmetic reward: every equation between plain numbers that a completion writes must hold."""

import json
from fractions import Fraction
from pathlib import Path

import pytest

from reward import make_reward
from reward.arithmetic import ArithmeticReward, check_equations, first_wrong_step, write_like

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize(
    "text, checked, wrong",
    [
        # 15 + 15 = 30 and 30 + 18 = 48: two equations, both hold
        ("Kira is 15 + 15 = 30 now, and 30 + 18 = 48. The answer is 48.", 2, None),
        # a chain: 2 x (14 + 20) = 2 x 34 (both 68), then 2 x 34 = 68
        ("The border is 2 × (14 + 20) = 2 × 34 = 68.", 2, None),
        # precedence: 240 x 10 / 100 = 24, then 240 - 24 = 216
        ("10% of 240 is 240 × 10 / 100 = 24, and 240 - 24 = 216.", 2, None),
        # fractions compare by value: 9/4 = 2.25 = 27/12, 5/3 = 20/12
        ("Over 12: 9/4 = 27/12 and 5/3 = 20/12, so the sum is 47/12.", 2, None),
        # a right final answer on a wrong step: -32 / 7 is -4 4/7, not -6
        ("7x = -46 + 4 = -42, so x = -42 / 7 = -6. The answer is -6.", 2, None),
        ("7x = -46 + 4 = -32, so x = -32 / 7 = -6. The answer is -6.", 1, "-46 + 4 = -32"),
        ("18 × 18 = 272 and 9 × 9 = 81.", 1, "18 × 18 = 272"),
        ("Over 11: 7/11 = 3/11.", 1, "7/11 = 3/11"),
        # a spaced x multiplies; thousands commas and dollars are read as numbers
        ("5 x 6 = 30 and $1,200 + $34 = $1,234.", 2, None),
        # a rounded decimal holds at its written decimals (10/3 = 3.333...), not at others
        ("10 / 3 = 3.33", 1, None),
        ("10 / 3 = 3.34", 1, "10 / 3 = 3.34"),
        ("6 / 0 = 0", 1, "6 / 0 = 0"),
        # sides that touch a variable or a word are not checked: 5x - 3 = 47 is not "3 = 47"
        ("5x - 3 = 47, so 5x = 50.", 0, None),
        ("5x + 2 × 3 = 11", 0, None),  # not "2 x 3 = 11"
        ("3 + 4 = 7x - 2", 0, None),  # not "3 + 4 = 7"
        ("x = 9 and the 3rd = 5", 0, None),
        ("In descending order: 84, 70, 52. The answer is 84, 70, 52.", 0, None),
    ],
)
def test_check_equations(text, checked, wrong):
    assert check_equations(text) == (checked, wrong)


def test_reward_scores_none_without_equations():
    reward = make_reward("arithmetic")
    assert isinstance(reward, ArithmeticReward)
    out = reward(
        ["p"] * 3,
        ["5 × 7 = 35. The answer is 35.", "5 × 7 = 36. The answer is 36.", "The answer is olleh."],
    )
    assert out.scores == [1.0, 0.0, None]
    assert out.details[1] == {"equations": 1, "wrong": "5 × 7 = 36"}
    assert out.reasons[2] == "no equation between plain numbers to check"


def test_shipped_right_answers_pass_and_most_rejected_fail():
    """Every worked answer the project ships as right passes; the plausible wrong ones are mostly caught."""
    verdicts = {"sft": [], "chosen": [], "rejected": []}
    for line in (DATA / "sft" / "train.jsonl").read_text().splitlines():
        verdicts["sft"].append(check_equations(json.loads(line)["messages"][-1]["content"]))
    for line in (DATA / "preference" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        for side in ("chosen", "rejected"):
            verdicts[side].append(check_equations(row[side][-1]["content"]))
    for side in ("sft", "chosen"):
        assert [v for v in verdicts[side] if v[1] is not None] == []
        assert sum(v[0] > 0 for v in verdicts[side]) > len(verdicts[side]) / 2  # most write equations
    caught = sum(v[1] is not None for v in verdicts["rejected"])
    assert caught > len(verdicts["rejected"]) / 3


@pytest.mark.parametrize(
    "text, left, right, value",
    [
        # the first wrong equation, its right side's span and the left side's exact value
        ("44 × 5 = 216 km and 38 × 2 = 76 km, so 216 + 76 = 292.", "44 × 5", "216", 220),
        ("Kira is 15 + 15 = 30 now, and 30 + 18 = 49. The answer is 49.", "30 + 18", "49", 48),
        ("The border is 2 × (14 + 20) = 2 × 34 = 70.", "2 × 34", "70", 68),  # the chain's second link
        ("It costs $1,200 + $34 = $1,244 in all.", "$1,200 + $34", "$1,244", 1234),
        ("10 / 4 = 2.4, so", "10 / 4", "2.4", Fraction(5, 2)),
        ("3 × 4 = 13 and 13 + 1 = 15.", "3 × 4", "13", 12),  # the first of two wrong ones
    ],
)
def test_first_wrong_step_finds_the_number_to_replace(text, left, right, value):
    step = first_wrong_step(text)
    assert (step.left, step.right, step.value) == (left, right, value)
    assert text[step.start : step.end] == right


@pytest.mark.parametrize(
    "text",
    [
        "Kira is 15 + 15 = 30 now, and 30 + 18 = 48.",  # every equation holds
        "The answer is 42.",  # none to check
        "So 3 + 4 = 2 + 6 and 8 = 8.",  # the wrong right side is an expression, not one number
        "6 / 0 = 0",  # a division by zero has no value to write
        "Over 11: 7/11 = 3/11.",  # a fraction is an expression here
    ],
)
def test_first_wrong_step_is_none_without_a_number_to_replace(text):
    assert first_wrong_step(text) is None


@pytest.mark.parametrize(
    "value, written, out",
    [
        (220, "216", "220"),
        (Fraction(5, 2), "2", "2.50"),  # an integer written for a non-integer: two decimals
        (Fraction(10, 3), "3.3", "3.3"),  # as many decimals as written, rounded as the check rounds
        (Fraction(2, 3), "0.666", "0.667"),
        (Fraction(5, 2), "2.4", "2.5"),
        (12, "12.50", "12.00"),
        (1234, "$1,244", "$1234"),
        (-42, "-32", "-42"),
    ],
)
def test_write_like_writes_the_value_as_the_wrong_number_was_written(value, written, out):
    v = Fraction(value)
    assert write_like(v, written) == out
    assert check_equations(f"{v.numerator} / {v.denominator} = {out}") == (
        1,
        None,
    )  # and the check accepts it
