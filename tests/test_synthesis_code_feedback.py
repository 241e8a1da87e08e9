"""Execution feedback for code: parsing by hand, the pass matrix and every drop rule on a scripted model with
the real sandbox, the shipped problems (none from the held-out HumanEval set), and a run on a real engine."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from data_synthesis import code_feedback
from data_synthesis.backends import ScriptedBackend
from data_synthesis.code_feedback import bad_test, parse_tests, solution_code
from data_synthesis.engine import pick, read_rows
from data_synthesis.runner import load_recipe, run

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- parsing, by hand


def test_parse_tests_reads_fences_json_and_split_asserts():
    fenced = "Tests:\n```python\nassert f(1) == 2\nx = 3\n  assert f(2) == (\n    4)\nprint('hi')\n```"
    assert parse_tests(fenced) == ["assert f(1) == 2", "assert f(2) == (\n    4)"]
    assert parse_tests('{"tests": ["assert f(1) == 2", "assert f(0) == 0"]}') == [
        "assert f(1) == 2",
        "assert f(0) == 0",
    ]
    assert parse_tests('["assert f(3) == 4"]') == ["assert f(3) == 4"]
    assert parse_tests("no fence\nassert f(5) == 6\n") == ["assert f(5) == 6"]
    assert parse_tests("I cannot write tests.") == []


def test_bad_test_rules():
    assert bad_test("assert f(1) == 2", "f") is None
    assert bad_test("assert f(1) == (", "f")[0] == "test_unparsable"
    assert bad_test("assert f(1) == 2; import os", "f") == ("test_unparsable", "not one assert statement")
    assert bad_test("assert True", "f") == ("test_no_call", "never calls f")
    assert bad_test("assert g(1) == f", "f") == ("test_no_call", "never calls f")


def test_solution_code_needs_a_top_level_def():
    assert solution_code("```python\ndef f(x):\n    return x\n```", "f") == (
        "def f(x):\n    return x\n",
        None,
    )
    assert "does not parse" in solution_code("def f(x) return x", "f")[1]
    assert solution_code("```python\ndef g(x):\n    return x\n```", "f")[1] == "defines no top-level def f"
    assert solution_code("```python\nclass A:\n    def f(self):\n        pass\n```", "f")[1] is not None


def test_pick_pairs_distinct_texts_and_never_pairs_a_text_with_itself():
    pairs, demos = pick(["a", "b", "a", "x"], ["c", "x", "d", "c"], random.Random(0), pairs=5, demos=1)
    # "x" is on both sides: left out. Chosen {a, b}, rejected {c, d}: two pairs, no text twice.
    assert sorted(c for c, _ in pairs) == ["a", "b"] and sorted(r for _, r in pairs) == ["c", "d"]
    assert len(demos) == 1 and demos[0] in ("a", "b")
    assert pick(["a"], [], random.Random(0), 2, 3) == ([], ["a"])
    assert pick(["a", "b"], ["c"], random.Random(0), 0, 0) == ([], [])


# ---------------------------------------------------------------- the pipeline on a scripted model

GOOD_ADD = "Here it is:\n```python\ndef add_two(a, b):\n    return a + b\n```\nIt adds a and b."
SOLUTIONS = {
    # 0 and 3 are byte-identical; 1 is wrong; 2 defines nothing.
    "add_two": [GOOD_ADD, "```python\ndef add_two(a, b):\n    return a - b\n```", "Just add them.", GOOD_ADD],
    "noop": ["```python\ndef noop(x):\n    return None\n```"] * 4,
    # 0 and 1 each pass one test of two; 2 hangs (per-test time limit); 3 does not parse.
    "double": [
        "```python\ndef double(x):\n    return x * 3\n```",
        "```python\ndef double(x):\n    return 4\n```",
        "```python\ndef double(x):\n    while True:\n        pass\n```",
        "```python\ndef double(x) return 2 * x\n```",
    ],
}
TESTS = {
    "add_two": [
        "```python\nassert add_two(1, 2) == 3\nassert add_two(5, 0) == 5\n"
        "assert add_two(2, 2) == 5\nassert True\n```",
        '{"tests": ["assert add_two(1, 2) == 3", "assert add_two(0, 0) == 0"]}',
    ],
    "noop": ["```python\nassert noop(1) == 1\nassert noop(2) == 2\n```", "assert noop(3) == 3"],
    "double": [
        "```python\nassert double(0) == 0\nassert double(2) == 4\n```",
        "Tests:\nassert double(0) == 0",
    ],
}
PROBLEMS = [
    {
        "id": "p/add",
        "prompt": "Add two numbers.",
        "entry_point": "add_two",
        "signature": "def add_two(a, b):",
    },
    {"id": "p/noop", "prompt": "Return x.", "entry_point": "noop"},
    {
        "id": "p/double",
        "prompt": "Double x.",
        "entry_point": "double",
        "signature": "def double(x: int) -> int:",
    },
    {"id": "p/no-entry", "prompt": "Do something.", "entry_point": "not a name"},
    {"id": "p/no-prompt", "prompt": "", "entry_point": "f"},
]


def model(conversation, j):
    text = conversation[-1]["content"]
    entry = re.search(r"def (\w+)\(", text).group(1)
    return TESTS[entry][j] if "Write unit tests" in text else SOLUTIONS[entry][j]


def _config(tmp_path, *overrides, out="out"):
    src = tmp_path / "problems.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    args = ["pipeline=code_feedback", f"input={src}", f"out_dir={tmp_path / out}", "num_solutions=4",
            "num_test_sets=2", "per_test_timeout_s=1.0", f"cache={tmp_path / 'cache.sqlite'}", *overrides]  # fmt: skip
    return load_recipe(args)[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


ADD_CODE = "```python\ndef add_two(a, b):\n    return a + b\n```"
SUB_CODE = "```python\ndef add_two(a, b):\n    return a - b\n```"


def test_pipeline_pass_matrix_drops_pairs_and_files(tmp_path):
    backend = ScriptedBackend(model)
    stats = run(code_feedback, _config(tmp_path), backend=backend, progress=False)
    assert backend.calls == 3 * 2  # three problems reach generation, two templates each
    # add_two: tests (1,2)->3, (5,0)->5, (2,2)->5 [wrong], "assert True" [no call], (1,2)->3 [duplicate],
    # (0,0)->0. a+b passes 1, 2, 4; a-b passes 2, 4; the wrong test is passed by none. The answer in prose
    # defines no function. noop: every test fails -> no kept test. double: x*3 passes (0)->0 only, 4 passes
    # (2)->4 only, so both tests are kept and nothing passes all; the hanging one passes none.
    assert stats["dropped"] == {  # rows
        "no_instruction": 1,
        "no_entry_point": 1,
        "no_kept_test": 1,
        "no_passing_solution": 1,
    }
    assert stats["dropped_items"] == {  # solutions and tests of the rows
        "no_function": 2,
        "test_no_call": 1,
        "duplicate_test": 2,
        "test_passed_by_none": 4,
        "solution_passes_none": 1,
    }
    assert stats["rows_out"] == 1
    out = tmp_path / "out"
    sft, pref, problems = (_rows(out / f) for f in ("sft.jsonl", "preference.jsonl", "problems.jsonl"))
    prompt = code_feedback.render(code_feedback.SOLUTION_TEMPLATE, {"instruction": "Add two numbers.",
                                                                    "signature": "def add_two(a, b):"})  # fmt: skip
    # The byte-identical a+b answers count once: one demonstration, one pair against a-b (2 of 3 kept tests).
    assert [r["messages"] for r in sft] == [[*prompt, {"role": "assistant", "content": ADD_CODE}]]
    assert (
        sft[0]["pass_rate"] == 1.0 and sft[0]["source_id"] == "p/add" and "solutions" in sft[0]["provenance"]
    )
    assert len(pref) == 1 and pref[0]["prompt"] == prompt
    assert pref[0]["chosen"] == [{"role": "assistant", "content": ADD_CODE}]
    assert pref[0]["rejected"] == [{"role": "assistant", "content": SUB_CODE}]
    assert (pref[0]["chosen_pass_rate"], pref[0]["rejected_pass_rate"]) == (1.0, pytest.approx(2 / 3))
    assert problems == [{"prompt": prompt, "tests": ["assert add_two(1, 2) == 3", "assert add_two(5, 0) == 5",
                                                     "assert add_two(0, 0) == 0"],
                         "source_id": "p/add", "entry_point": "add_two"}]  # fmt: skip
    dropped = {(d["row"]["id"], d["reason"]) for d in _rows(out / "dropped.jsonl")}
    assert {("p/add#solution2", "no_function"), ("p/add#test2", "test_passed_by_none"),
            ("p/add#raw_test3", "test_no_call"), ("p/add#raw_test4", "duplicate_test"),
            ("p/double#solution2", "solution_passes_none"), ("p/double#solution3", "no_function"),
            ("p/noop", "no_kept_test"), ("p/double", "no_passing_solution")} <= dropped  # fmt: skip


def test_a_lower_pass_fraction_reuses_every_generation(tmp_path):
    run(code_feedback, _config(tmp_path), backend=ScriptedBackend(model), progress=False)
    backend = ScriptedBackend(model)
    stats = run(code_feedback, _config(tmp_path, "min_pass_fraction=0.5", out="b"), backend=backend,
                progress=False)  # fmt: skip
    assert backend.calls == 0 and stats["generated_samples"] == 0 and stats["cached_samples"] == 3 * 6
    # Now a-b (2/3) passes too, so add_two has no failing solution; x*3 and 4 (1/2 each) pass for double.
    assert stats["dropped"].get("no_passing_solution", 0) == 0
    assert stats["files"] == {"sft.jsonl": 2, "preference.jsonl": 0, "problems.jsonl": 2}


def test_a_passing_solution_cut_at_the_token_limit_is_never_chosen(tmp_path):
    backend = ScriptedBackend(model, finished=False)
    stats = run(code_feedback, _config(tmp_path, "cache=none"), backend=backend, progress=False)
    # a+b (twice) is the only passing solution of add_two: both unfinished -> no passing solution left.
    assert stats["dropped_items"]["unfinished"] == 2
    assert stats["dropped"]["no_passing_solution"] == 2 and stats["rows_out"] == 0


def test_answer_output_keeps_the_whole_answer(tmp_path):
    run(code_feedback, _config(tmp_path, "output=answer", "cache=none"), backend=ScriptedBackend(model),
        progress=False)  # fmt: skip
    pref = _rows(tmp_path / "out" / "preference.jsonl")
    assert (
        pref[0]["chosen"][0]["content"] == GOOD_ADD
        and pref[0]["rejected"][0]["content"] == SOLUTIONS["add_two"][1]
    )


def test_a_template_field_no_column_provides_fails_before_generation(tmp_path):
    cfg = _config(
        tmp_path, 'templates={"tests": [{"role": "user", "content": "{instruction} in {language}"}]}'
    )
    backend = ScriptedBackend(model)
    with pytest.raises(ValueError, match=r"step 'write_tests' reads column\(s\) \['language'\]"):
        run(code_feedback, cfg, backend=backend, progress=False)
    assert backend.calls == 0


def test_config_checks():
    with pytest.raises(ValueError, match="templates.test: unknown template"):
        code_feedback.Config(templates={"test": [{"role": "user", "content": "x"}]})
    with pytest.raises(ValueError, match="min_pass_fraction"):
        code_feedback.Config(min_pass_fraction=0.0)


# ---------------------------------------------------------------- the shipped problems


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _trigrams(text: str) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i : i + 3]) for i in range(len(w) - 2)}


def test_shipped_problems_are_not_from_the_held_out_humaneval_set():
    problems = read_rows(REPO / "data_synthesis" / "code_problems.jsonl")
    assert len(problems) >= 40 and len({p.id for p in problems}) == len(problems)
    assert all(p.data["entry_point"].isidentifier()
               and p.data["signature"].startswith(f"def {p.data['entry_point']}(")
               for p in problems)  # fmt: skip
    held_out = [json.loads(line) for line in (REPO / "data" / "eval" / "code.jsonl").read_text().splitlines()]
    names = {h["entry_point"].lower().replace("_", "") for h in held_out}
    assert not [p.id for p in problems if p.data["entry_point"].lower().replace("_", "") in names]
    # Prompt similarity: the share of a problem's word trigrams found in a held-out prompt (1.0 for a copy;
    # the shipped problems reach 0.19 at most).
    held = [_trigrams(h["prompt"][0]["content"]) for h in held_out]
    for p in problems:
        mine = _trigrams(p.data["prompt"])
        worst = max(len(mine & h) / len(mine) for h in held)
        assert worst < 0.4, (p.id, worst)


# ---------------------------------------------------------------- a real engine


@pytest.mark.slow
def test_code_feedback_runs_on_a_real_engine(tmp_path):
    """tiny-qwen2 is random: its answers define no function, and every problem is dropped and counted."""
    _, cfg = load_recipe(["recipes/data/code_feedback.yaml", "backend.model=tiny-qwen2", "max_rows=1",
                          "cache=none", f"out_dir={tmp_path}", "num_solutions=2", "num_test_sets=1",
                          "sampling.max_new_tokens=24", "backend.generation.backend=transformers"])  # fmt: skip
    stats = run(code_feedback, cfg, progress=False)
    assert stats["rows_in"] == 1 and stats["generated_samples"] == 3
    row_reasons = ("no_valid_solution", "no_tests", "no_kept_test", "no_passing_solution", "sandbox_error")
    assert stats["rows_out"] + sum(stats["dropped"].get(r, 0) for r in row_reasons) == 1
    assert {"sft.jsonl", "preference.jsonl", "problems.jsonl"} == set(stats["files"])
