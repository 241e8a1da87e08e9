"""Math reward: answer extraction, equivalence through math-verify, our own time limit, None with reasons."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from reward.math_reward import BoxedFormatReward, MathReward, extract_final_answer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def math_reward():
    reward = MathReward(timeout_s=5.0)
    yield reward
    reward.close()


@pytest.mark.parametrize(
    ("text", "answer", "how"),
    [
        ("so we get \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", "boxed"),
        ("first \\boxed{3}, no wait: \\boxed{4}", "4", "boxed"),
        ("\\fbox{x^{2}}", "x^{2}", "boxed"),
        ("12 + 30 = 42. The answer is 42.", "42", "answer_is"),
        ("The answer is **7**.", "7", "answer_is"),
        ("Final answer: $x=3$", "x=3", "answer_is"),
        ("The answer is \\(\\frac{1}{2}\\).", "\\frac{1}{2}", "answer_is"),
        ("It costs 1,234.50 dollars in total", "1,234.50", "last_number"),
        ("between 3.5 and -2", "-2", "last_number"),
        ("three quarters, 3/4", "3/4", "last_number"),
    ],
)
def test_extract_final_answer(text, answer, how):
    assert extract_final_answer(text) == (answer, how)


def test_extract_nothing():
    assert extract_final_answer("I do not know.") == (None, None)
    assert extract_final_answer("\\boxed{}") == (None, None)


@pytest.mark.parametrize(
    ("completion", "gold", "score"),
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("The answer is 1/2.", "\\frac{1}{2}", 1.0),
        ("The answer is 1,000", "1000", 1.0),
        ("so 42.0", "42", 1.0),
        ("\\boxed{1+x}", "x+1", 1.0),
        ("\\boxed{\\sqrt{2}}", "2^{1/2}", 1.0),
        ("12 + 30 = 32", "42", 0.0),
        ("\\boxed{0.67}", "2/3", 0.0),
        ("No idea.", "42", 0.0),  # no answer given: the model's failure, judged 0
    ],
)
def test_equivalence(math_reward, completion, gold, score):
    out = math_reward(["q"], [completion], answer=[gold])
    assert out.scores == [score], out
    assert out.reasons == [None]


def test_gold_as_number_and_other_column():
    reward = MathReward(answer_column="gold")
    try:
        assert reward(["q", "q"], ["The answer is 7", "8"], gold=[7, 7]).scores == [1.0, 0.0]
    finally:
        reward.close()


def test_cannot_judge_gives_none_and_reason(math_reward):
    out = math_reward(["q"] * 3, ["\\boxed{5}"] * 3, answer=[None, "  ", "\\text{}"])
    assert out.scores == [None, None, None]
    assert "no gold answer" in out.reasons[0] and "no gold answer" in out.reasons[1]
    assert "cannot parse the gold answer" in out.reasons[2]
    assert out.num_failed == 3


def test_missing_column_gives_none_with_the_column_name(math_reward):
    out = math_reward(["q"], ["\\boxed{5}"], solution=["5"])
    assert out.scores == [None] and "'answer'" in out.reasons[0]


def test_length_mismatch_raises(math_reward):
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        math_reward(["q", "q"], ["1", "2"], answer=["1"])


def test_own_time_limit_then_recovers():
    # 9^(9^9) makes sympy compute a number with ~370 million digits: only killing the worker stops it.
    reward = MathReward(timeout_s=1.0)
    try:
        start = time.monotonic()
        out = reward(["q", "q"], ["\\boxed{9^{9^{9}}}", "\\boxed{\\frac{2}{4}}"], answer=["5", "0.5"])
        assert out.scores == [None, 1.0]
        assert "ran over 1 s" in out.reasons[0]
        assert time.monotonic() - start < 30  # 1 s limit + one worker restart
    finally:
        reward.close()


def test_works_off_the_main_thread(math_reward):
    # math-verify's own signal-based timeouts would raise here; ours do not depend on the thread.
    box = {}
    thread = threading.Thread(
        target=lambda: box.update(out=math_reward(["q"], ["\\boxed{1/3}"], answer=["\\frac{1}{3}"]))
    )
    thread.start()
    thread.join(60)
    assert box["out"].scores == [1.0]


def test_close_stops_the_worker():
    reward = MathReward()
    reward(["q"], ["\\boxed{2/4}"], answer=["1/2"])
    proc = reward._worker._proc
    assert proc is not None and proc.poll() is None
    reward.close()
    assert proc.poll() is not None


@pytest.mark.parametrize(("field", "value"), [("timeout_s", 0), ("answer_column", "")])
def test_bad_params(field, value):
    with pytest.raises(ValueError, match=field):
        MathReward(**{field: value})


def test_boxed_format_reward():
    out = BoxedFormatReward()(["q"] * 3, ["\\boxed{3}", "The answer is 3", "\\boxed{}"])
    assert out.scores == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------- the held-out eval sets


def test_eval_sets_are_reproducible(tmp_path):
    from data_synthesis.make_eval_sets import main

    main(["--out", str(tmp_path)])
    for name in ("math.jsonl", "ifeval.jsonl", "code.jsonl"):
        committed = REPO / "data" / "eval" / name
        assert committed.read_text() == (tmp_path / name).read_text(), (
            f"{name}: run python -m data_synthesis.make_eval_sets"
        )


def test_math_eval_set_is_apart_from_training():
    from data_synthesis.make_eval_sets import TRAINING_PATTERNS, training_prompts

    rows = [json.loads(line) for line in (REPO / "data" / "eval" / "math.jsonl").read_text().splitlines()]
    assert len(rows) >= 100 and len({r["id"] for r in rows}) == len(rows)
    prompts = [r["prompt"][0]["content"] for r in rows]
    assert len(set(prompts)) == len(prompts)
    train = training_prompts(REPO / "data")
    assert not set(prompts) & train
    assert not [p for p in prompts if any(pattern.search(p) for pattern in TRAINING_PATTERNS)]
    # The patterns do catch the training family, so the check above can fail.
    assert any(pattern.search("What is 12 plus 30?") for pattern in TRAINING_PATTERNS)


def test_math_eval_golds_are_what_math_verify_accepts(math_reward):
    rows = [json.loads(line) for line in (REPO / "data" / "eval" / "math.jsonl").read_text().splitlines()]
    sample = rows[:: len(rows) // 16]
    # A worked answer in another form than the gold string (fractions as \frac, integers as decimals).
    completions = []
    for r in sample:
        gold = r["answer"]
        form = f"\\frac{{{gold.split('/')[0]}}}{{{gold.split('/')[1]}}}" if "/" in gold else f"{gold}.0"
        completions.append(f"Working it out step by step. The answer is ${form}$.")
    out = math_reward(["p"] * len(sample), completions, answer=[r["answer"] for r in sample])
    assert out.scores == [1.0] * len(sample), [(r["prompt"], d) for r, d in zip(sample, out.details)]
