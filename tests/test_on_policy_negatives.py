"""On-policy negatives: which rows get the policy's wrong answer as their rejected answer, and the run on a tiny model."""

from __future__ import annotations

import json

import pytest

import data_synthesis.on_policy_negatives as opn
from data_synthesis.backends import ScriptedBackend
from data_synthesis.on_policy_negatives import first_wrong
from data_synthesis.runner import load_recipe, run

RECIPE = "recipes/data/on_policy_negatives.yaml"


def _pair(q, answer, chosen, rejected, **extra):
    return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "answer": answer, **extra}  # fmt: skip


def _rows(tmp_path, rows):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_first_wrong_takes_the_first_scored_wrong_answer_that_is_not_the_chosen_one():
    assert first_wrong(["a", "b", "c"], [1.0, 0.0, 0.0], "x") == "b"
    assert first_wrong(["a", "b"], [None, 0.0], "x") == "b"  # an unscored answer is never taken
    assert first_wrong(["x", "b"], [0.0, 0.0], "x") == "b"  # nor the chosen answer itself
    assert first_wrong(["a", "b"], [1.0, None], "x") is None
    # an empty answer is no rejected answer (the trainers refuse an empty assistant turn)
    assert first_wrong(["", " \n", "b"], [0.0, 0.0, 0.0], "x") == "b"
    assert first_wrong(["", " "], [0.0, 0.0], "x") is None


# The policy's greedy answers (what the scripted backend says to each question).
POLICY = {
    "What is 17 x 3?": "17 × 3 = 41. The answer is 41.",  # wrong: becomes the rejected answer
    "What is 2 + 2?": "2 + 2 = 4. The answer is 4.",  # right: the row keeps its own pair
    "What is 9 - 5?": "9 - 5 = 4. The answer is 4.",  # right
}


def test_wrong_answers_replace_the_rejected_ones_and_right_ones_keep_the_row(tmp_path):
    rows = [
        _pair("What is 17 x 3?", "51", "17 × 3 = 51. The answer is 51.", "The answer is 510.", task="mul"),
        _pair("What is 2 + 2?", "4", "2 + 2 = 4. The answer is 4.", "The answer is 5.", task="add"),
        _pair("What is 9 - 5?", "4", "9 - 5 = 4. The answer is 4.", "The answer is 14."),
        {"prompt": "What is 1 + 1?", "chosen": "2", "answer": "2"},  # no rejected answer: not a pair
        _pair("What is 3 + 3?", None, "The answer is 6.", "The answer is 7."),  # no gold answer
    ]
    f = _rows(tmp_path, rows)
    out = tmp_path / "out"
    _, cfg = load_recipe([RECIPE, f"input={f}", f"out_dir={out}", f"cache={tmp_path / 'c.sqlite'}"])
    backend = ScriptedBackend(lambda conv, j: POLICY[conv[-1]["content"]])
    stats = run(opn, cfg, backend=backend, progress=False)
    assert backend.calls == 3
    assert (stats["replaced"], stats["kept_own"], stats["sample_accuracy"]) == (1, 2, round(2 / 3, 4))
    assert stats["dropped"] == {"bad_pair": 1, "no_gold_answer": 1}
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").open()]
    assert "field 'rejected': missing" in dropped[0]["detail"]
    got = [json.loads(line) for line in (out / "preference.jsonl").open()]
    assert [r["rejected"][0]["content"] for r in got] == [
        "17 × 3 = 41. The answer is 41.",  # the policy's own mistake
        "The answer is 5.",  # the rows' own rejected answers
        "The answer is 14.",
    ]
    assert [r["chosen"][0]["content"] for r in got] == [r["chosen"][0]["content"] for r in rows[:3]]
    assert [r["rejected_source"] for r in got] == ["policy", "row", "row"]
    assert got[0]["task"] == "mul" and got[0]["provenance"]["rejected"]["step"] == "replace"
    # Dropping the rows the policy answers right reuses every answer from the cache.
    _, cfg = load_recipe([RECIPE, f"input={f}", f"out_dir={out}", f"cache={tmp_path / 'c.sqlite'}",
                          "keep_own_rejected=false"])  # fmt: skip
    again = ScriptedBackend(lambda conv, j: POLICY[conv[-1]["content"]])
    stats = run(opn, cfg, backend=again, progress=False)
    assert (
        again.calls == 0 and stats["dropped"]["policy_right"] == 2 and stats["files"]["preference.jsonl"] == 1
    )


def test_the_written_pairs_are_what_offline_dpo_reads(tmp_path):
    from alignment.data import normalize_preference_row

    f = _rows(
        tmp_path, [_pair("What is 17 x 3?", "51", "17 × 3 = 51. The answer is 51.", "The answer is 510.")]
    )
    _, cfg = load_recipe([RECIPE, f"input={f}", f"out_dir={tmp_path / 'o'}", "cache=none"])
    run(opn, cfg, backend=ScriptedBackend(lambda conv, j: POLICY[conv[-1]["content"]]), progress=False)
    (row,) = [json.loads(line) for line in (tmp_path / "o" / "preference.jsonl").open()]
    ex = normalize_preference_row(row, "row 0")
    assert ex.prompt == [{"role": "user", "content": "What is 17 x 3?"}]
    assert ex.rejected == [{"role": "assistant", "content": "17 × 3 = 41. The answer is 41."}]


def test_check_steps_makes_a_right_answer_on_a_wrong_equation_a_negative(tmp_path):
    lucky = "17 × 3 = 50, so 51. The answer is 51."
    f = _rows(
        tmp_path, [_pair("What is 17 x 3?", "51", "17 × 3 = 51. The answer is 51.", "The answer is 510.")]
    )
    sources = {}
    for check in (False, True):
        out = tmp_path / f"o{check}"
        _, cfg = load_recipe([RECIPE, f"input={f}", f"out_dir={out}", "cache=none", f"check_steps={check}"])
        run(opn, cfg, backend=ScriptedBackend(lambda conv, j: lucky), progress=False)
        (row,) = [json.loads(line) for line in (out / "preference.jsonl").open()]
        sources[check] = (row["rejected_source"], row["rejected"][0]["content"])
    assert sources == {False: ("row", "The answer is 510."), True: ("policy", lucky)}


@pytest.mark.slow
def test_run_on_tiny_model_with_transformers(tmp_path, tiny_qwen2):
    """The real generation interface end to end (the random tiny model's answers are noise, so all wrong)."""
    rows = [_pair(f"Say {i}.", "7", "The answer is 7.", "The answer is 8.") for i in range(2)]
    f = _rows(tmp_path, rows)
    _, cfg = load_recipe([RECIPE, f"input={f}", f"backend.model={tiny_qwen2}", f"out_dir={tmp_path / 'o'}",
                          "cache=none", "backend.generation.backend=transformers", "sampling.max_new_tokens=8"])  # fmt: skip
    stats = run(opn, cfg, progress=False)
    assert stats["rows_in"] == 2 and stats["replaced"] + stats["kept_own"] == 2
    got = [json.loads(line) for line in (tmp_path / "o" / "preference.jsonl").open()]
    assert len(got) == 2 and all(r["chosen"][0]["content"] == "The answer is 7." for r in got)
