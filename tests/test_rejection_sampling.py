"""Rejection sampling: which samples become pairs and demonstrations, and the run on a tiny model."""

from __future__ import annotations

import json
import random

import pytest

from alignment.data import DataError
from alignment.generation import Completion
from data_synthesis.rejection_sampling import RejectionSamplingConfig, main, select


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
        RejectionSamplingConfig(num_samples=1)


def test_a_row_without_its_answer_fails_before_any_model_loads(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "What is 2+2?", "answer": "4"}\n{"prompt": "And 3+3?"}\n')
    with pytest.raises(DataError, match=r"p.jsonl: row 2: field 'answer'"):
        main([f"prompts={f}", "model=does-not-exist", f"out_dir={tmp_path / 'out'}"])


class ScriptedGenerator:
    """Answers from a script, in order: the pipeline's bookkeeping is checked against known answers."""

    def __init__(self, script):
        self.script = script

    def generate(self, prompt_ids, n, sampling):
        assert len(prompt_ids) == len(self.script) and all(len(a) == n for a in self.script)
        return [[Completion(t, [1, 2, 3], done) for t, done in group] for group in self.script]

    def close(self):
        pass


def test_pipeline_writes_exactly_the_pairs_demos_and_counts(tmp_path, monkeypatch, tiny_qwen2):
    import data_synthesis.rejection_sampling as rs

    f = tmp_path / "p.jsonl"
    rows = [
        {"prompt": f"What is {a} + {b}?", "answer": str(a + b), "task": "add"}
        for a, b in ((2, 2), (3, 4), (5, 5))
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = [
        [("2 + 2 = 4. The answer is 4.", True), ("The answer is 5.", True), ("The answer is 4.", False)],
        [("The answer is 1.", True), ("The answer is 2.", True), ("The answer is 1.", True)],  # none correct
        [("The answer is 10.", True), ("The answer is 10.", True), ("The answer is 10.", True)],  # none wrong
    ]
    monkeypatch.setattr(rs, "make_generator", lambda *a, **k: ScriptedGenerator(script))
    out = tmp_path / "out"
    stats = main([f"prompts={f}", f"model={tiny_qwen2}", f"out_dir={out}", "num_samples=3"])
    assert (stats["prompts"], stats["samples"], stats["correct"], stats["unfinished"]) == (3, 9, 5, 1)
    assert (stats["no_correct"], stats["no_incorrect"], stats["pairs"], stats["demos"]) == (1, 1, 1, 2)
    (pair,) = [json.loads(line) for line in (out / "preference.jsonl").open()]
    assert pair["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]
    assert pair["chosen"][0]["content"] == "2 + 2 = 4. The answer is 4."  # the unfinished "4" is never chosen
    assert pair["rejected"][0]["content"] in {"The answer is 5.", "The answer is 4."} - {"The answer is 4."}
    assert pair["answer"] == "4" and pair["task"] == "add"
    demos = [json.loads(line) for line in (out / "sft.jsonl").open()]
    assert [d["messages"][-1]["content"] for d in demos] == [
        "2 + 2 = 4. The answer is 4.",
        "The answer is 10.",
    ]
    assert json.loads((out / "stats.json").read_text())["config"]["num_samples"] == 3


@pytest.mark.slow
def test_run_on_tiny_model_with_transformers(tmp_path, tiny_qwen2):
    """The real generation interface end to end (the random tiny model's answers are noise: only counts)."""
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": "7"}) + "\n" for i in range(2)))
    stats = main([f"prompts={f}", f"model={tiny_qwen2}", f"out_dir={tmp_path / 'o'}", "num_samples=2",
                  "generation.backend=transformers", "sampling.max_new_tokens=8"])  # fmt: skip
    assert stats["samples"] == 4 and (tmp_path / "o" / "preference.jsonl").exists()
