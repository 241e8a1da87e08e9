"""InsTag selection: scores and the complexity-first, diversity-driven greedy pick, derived by hand."""

from __future__ import annotations

import json
import math
from collections import Counter

from data_synthesis import selection
from data_synthesis.runner import load_recipe, run
from data_synthesis.selection import completeness, content_words, scores, select


def test_completeness_checks():
    assert completeness("Write a poem about the sea.", 4) == 1.0
    assert completeness("How far is the moon from here?", 4) == 1.0
    assert completeness("the sea and the sky today", 4) == 2 / 3  # not a request
    assert completeness("Write about [insert topic] now", 4) == 2 / 3  # a placeholder
    assert completeness("sea ...", 4) == 0.0


def test_scores_by_hand():
    usage = Counter({"a": 1, "b": 4})
    s = scores("Write the cat a song", ["a", "b"], usage, 4, 4)
    assert s == {"complexity": 2, "rarity": round((math.log(4) + math.log(1)) / 2, 4), "richness": 3,
                 "completeness": 1.0}  # fmt: skip
    assert content_words("Write the cat a song") == {"write", "cat", "song"}


def test_select_passes_by_hand():
    # Order by complexity then rarity: A, E, B, C, D. Pass 1 takes A (x y z) and E (adds w); B, C and D add
    # nothing new. Pass 2 restarts the coverage: B (x y), then C (w); the budget of 4 is reached before D.
    rows = {"A": ["x", "y", "z"], "B": ["x", "y"], "C": ["w"], "D": ["x"], "E": ["y", "w"]}
    usage = Counter(t for tags in rows.values() for t in tags)
    scored = [(tags, scores("Write it now please", tags, usage, 5, 4)) for tags in rows.values()]
    names = list(rows)
    picks = [(names[i], p, new) for i, p, new in select(scored, 4)]
    assert picks == [("A", 1, ["x", "y", "z"]), ("E", 1, ["w"]), ("B", 2, ["x", "y"]), ("C", 2, ["w"])]
    assert [names[i] for i, _, _ in select(scored, 10)] == ["A", "E", "B", "C", "D"]


def test_selection_pipeline_writes_why_and_drops_the_rest(tmp_path):
    rows = [
        ("A", "Write a story about x, y and z.", ["x", "y", "z"]),
        ("B", "Explain x and y to a child.", ["x", "y"]),
        ("C", "Describe w in three lines.", ["w"]),
        ("D", "Give an example of x today.", ["x"]),
        ("E", "Compare y with w in detail.", ["y", "w"]),
        ("F", "sea ...", ["q"]),
    ]
    src = tmp_path / "tagged.jsonl"
    src.write_text("".join(json.dumps({"id": i, "instruction": t, "tags": g,
                                       "messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]})
                           + "\n" for i, t, g in rows))  # fmt: skip
    _, cfg = load_recipe(
        ["recipes/data/selection.yaml", f"input={src}", f"out_dir={tmp_path / 'o'}", "budget=4"]
    )
    stats = run(selection, cfg, progress=False)
    assert stats["dropped"] == {"incomplete_intent": 1, "over_budget": 1}
    picked = [json.loads(line) for line in (tmp_path / "o" / "selected.jsonl").read_text().splitlines()]
    assert [(p["id"], p["selection"]["pass"], p["selection"]["new_tags"]) for p in picked] == [
        ("A", 1, ["x", "y", "z"]), ("E", 1, ["w"]), ("B", 2, ["x", "y"]), ("C", 2, ["w"])]  # fmt: skip
    sft = [json.loads(line) for line in (tmp_path / "o" / "sft.jsonl").read_text().splitlines()]
    assert [s["source_id"] for s in sft] == ["A", "E", "B", "C"] and sft[0]["messages"][1]["content"] == "ok"
    dropped = [json.loads(line) for line in (tmp_path / "o" / "dropped.jsonl").read_text().splitlines()]
    assert [(d["row"]["id"], d["reason"]) for d in dropped] == [
        ("F", "incomplete_intent"),
        ("D", "over_budget"),
    ]
