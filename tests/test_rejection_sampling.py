"""Rejection sampling: which samples become pairs and demonstrations, and the run on a tiny model."""

from __future__ import annotations

import json
import random

import pytest

import data_synthesis.rejection_sampling as rs
from alignment.generation import Completion
from data_synthesis.backends import ScriptedBackend
from data_synthesis.rejection_sampling import Config, select
from data_synthesis.runner import load_recipe, run


def test_select_pairs_correct_with_incorrect_and_keeps_only_finished_correct_paths():
    texts = ["A=4", "B=5", "A=4", "C=4 (cut", "D=6", "E=?", "F=4"]
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, None, 1.0]
    finished = [True, True, True, False, True, True, True]
    sel = select(texts, scores, finished, random.Random(0), pairs_per_prompt=5, demos_per_prompt=1)
    # Correct and finished, once each: A, F. Incorrect: B, D. The unfinished correct C and the unscored E: neither.
    assert len(sel.pairs) == 2
    assert {c for c, _ in sel.pairs} == {"A=4", "F=4"}
    assert {r for _, r in sel.pairs} == {"B=5", "D=6"}
    assert len(sel.demos) == 1 and sel.demos[0] in {"A=4", "F=4"}


def test_select_caps_pairs_and_gives_none_without_both_kinds():
    sel = select(["a", "b", "c", "d"], [1.0, 1.0, 0.0, 0.0], [True] * 4, random.Random(1), 1, 2)
    assert len(sel.pairs) == 1 and sorted(sel.demos) == ["a", "b"]
    assert select(["a", "b"], [1.0, 1.0], [True, True], random.Random(0), 2, 1).pairs == []
    assert select(["a", "b"], [0.0, 0.0], [True, True], random.Random(0), 2, 1) == select(
        ["x", "y"], [0.0, 0.0], [True, True], random.Random(0), 2, 0
    )
    # An unfinished wrong answer may be rejected (it reached no correct answer).
    sel = select(["ok", "cut"], [1.0, 0.0], [True, False], random.Random(0), 1, 0)
    assert sel.pairs == [("ok", "cut")] and sel.demos == []


def test_config_refuses_one_sample():
    with pytest.raises(ValueError, match="num_samples"):
        Config(num_samples=1)


def _rows(tmp_path, rows):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_rows_without_a_prompt_or_gold_answer_are_dropped_and_counted(tmp_path):
    f = _rows(tmp_path, [{"prompt": "What is 2+2?", "answer": "4"}, {"prompt": "And 3+3?"},
                         {"text": "no prompt", "answer": "1"}])  # fmt: skip
    _, cfg = load_recipe(["recipes/data/rejection_sampling.yaml", f"input={f}", f"out_dir={tmp_path / 'o'}",
                          "cache=none", "num_samples=2"])  # fmt: skip
    backend = ScriptedBackend(lambda conv, j: "The answer is 4.")
    stats = run(rs, cfg, backend=backend, progress=False)
    assert backend.calls == 1 and stats["dropped"] == {"no_gold_answer": 1, "bad_prompt": 1}
    dropped = [json.loads(line) for line in (tmp_path / "o" / "dropped.jsonl").open()]
    assert "field 'prompt': missing" in dropped[0]["detail"] and dropped[1]["row"]["prompt"] == [
        {"role": "user", "content": "And 3+3?"}
    ]


SCRIPT = {
    "What is 2 + 2?": [
        ("2 + 2 = 4. The answer is 4.", True),
        ("The answer is 5.", True),
        ("The answer is 4.", False),
    ],
    "What is 3 + 4?": [("The answer is 1.", True), ("The answer is 2.", True), ("The answer is 1.", True)],
    "What is 5 + 5?": [("The answer is 10.", True), ("The answer is 10.", True), ("The answer is 10.", True)],
}


class Scripted(ScriptedBackend):
    """Answers from SCRIPT, each with its own finished flag."""

    def __init__(self):
        super().__init__(lambda conv, j: SCRIPT[conv[-1]["content"]][j][0])

    def chat(self, conversations, n, sampling, json_schema=None):
        self.calls += len(conversations)
        return [[Completion(t, [], done) for t, done in SCRIPT[c[-1]["content"]][:n]] for c in conversations]


def test_pipeline_writes_exactly_the_pairs_demos_and_counts(tmp_path):
    rows = [
        {"prompt": f"What is {a} + {b}?", "answer": str(a + b), "task": "add"}
        for a, b in ((2, 2), (3, 4), (5, 5))
    ]
    f = _rows(tmp_path, rows)
    out = tmp_path / "out"
    _, cfg = load_recipe(["recipes/data/rejection_sampling.yaml", f"input={f}", f"out_dir={out}",
                          "num_samples=3", f"cache={tmp_path / 'c.sqlite'}"])  # fmt: skip
    stats = run(rs, cfg, backend=Scripted(), progress=False)
    assert (stats["rows_in"], stats["samples"], stats["correct"], stats["unfinished"]) == (3, 9, 5, 1)
    assert (stats["dropped"], stats["no_incorrect"], stats["files"]) == (
        {"no_correct_path": 1}, 1, {"preference.jsonl": 1, "sft.jsonl": 2})  # fmt: skip
    (pair,) = [json.loads(line) for line in (out / "preference.jsonl").open()]
    assert pair["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]
    assert pair["chosen"][0]["content"] == "2 + 2 = 4. The answer is 4."  # the unfinished "4" is never chosen
    assert pair["rejected"][0]["content"] == "The answer is 5."  # the unfinished correct "4" is neither
    assert (
        pair["answer"] == "4" and pair["task"] == "add" and pair["provenance"]["samples"]["step"] == "sample"
    )
    demos = [json.loads(line) for line in (out / "sft.jsonl").open()]
    assert [d["messages"][-1]["content"] for d in demos] == [
        "2 + 2 = 4. The answer is 4.",
        "The answer is 10.",
    ]
    assert json.loads((out / "stats.json").read_text())["config"]["num_samples"] == 3
    # Other pair settings reuse every sample.
    _, cfg = load_recipe(["recipes/data/rejection_sampling.yaml", f"input={f}", f"out_dir={out}",
                          "num_samples=3", f"cache={tmp_path / 'c.sqlite'}", "demos_per_prompt=0"])  # fmt: skip
    again = Scripted()
    stats = run(rs, cfg, backend=again, progress=False)
    assert again.calls == 0 and stats["files"]["sft.jsonl"] == 0


def test_the_old_entry_point_runs_the_same_pipeline(tmp_path, monkeypatch):
    import data_synthesis.runner as runner

    f = _rows(tmp_path, [{"prompt": "What is 2 + 2?", "answer": "4"}])
    seen = {}
    monkeypatch.setattr(runner, "run", lambda module, cfg: seen.update(module=module, cfg=cfg) or {})
    rs.main(["recipes/data/rejection_sampling.yaml", f"input={f}", "num_samples=3"])
    assert seen["module"] is rs and seen["cfg"].num_samples == 3 and seen["cfg"].input == str(f)


@pytest.mark.slow
def test_run_on_tiny_model_with_transformers(tmp_path, tiny_qwen2):
    """The real generation interface end to end (the random tiny model's answers are noise: only counts)."""
    f = _rows(tmp_path, [{"prompt": f"Say {i}.", "answer": "7"} for i in range(2)])
    _, cfg = load_recipe(["recipes/data/rejection_sampling.yaml", f"input={f}", f"backend.model={tiny_qwen2}",
                          f"out_dir={tmp_path / 'o'}", "num_samples=2", "cache=none",
                          "backend.generation.backend=transformers", "sampling.max_new_tokens=8"])  # fmt: skip
    stats = run(rs, cfg, progress=False)
    assert (
        stats["samples"] in (0, 4)
        and stats["rows_in"] == 2
        and (tmp_path / "o" / "preference.jsonl").exists()
    )


def test_check_steps_turns_a_right_answer_on_a_wrong_equation_into_an_incorrect_path(tmp_path):
    script = {"What is 6 x 7?": [("6 × 7 = 42. The answer is 42.", True), ("6 × 7 = 43, so 42. The answer is 42.", True),
                                 ("6 × 7 = 48. The answer is 48.", True)]}  # fmt: skip
    f = _rows(tmp_path, [{"prompt": "What is 6 x 7?", "answer": "42"}])
    backend = ScriptedBackend(lambda conv, j: script[conv[-1]["content"]][j][0])
    found = {}
    for check in (False, True):
        out = tmp_path / f"out{check}"
        _, cfg = load_recipe(["recipes/data/rejection_sampling.yaml", f"input={f}", f"out_dir={out}", "cache=none",
                              "num_samples=3", "pairs_per_prompt=3", "demos_per_prompt=3", f"check_steps={check}"])  # fmt: skip
        stats = run(rs, cfg, backend=backend, progress=False)
        demos = [json.loads(line)["messages"][-1]["content"] for line in (out / "sft.jsonl").open()]
        pairs = [json.loads(line) for line in (out / "preference.jsonl").open()]
        found[check] = (stats["correct"], stats["right_answer_wrong_steps"], sorted(demos), len(pairs))
    # by the final answer alone two paths are right; with the steps checked only the first one is
    assert found[False] == (
        2,
        0,
        ["6 × 7 = 42. The answer is 42.", "6 × 7 = 43, so 42. The answer is 42."],
        1,
    )
    assert found[True] == (1, 1, ["6 × 7 = 42. The answer is 42."], 1)
