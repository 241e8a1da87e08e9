"""The arithmetic reward: every equation between plain numbers that a completion writes must hold."""

import json
from pathlib import Path

import pytest

from reward import make_reward
from reward.arithmetic import ArithmeticReward, check_equations

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
