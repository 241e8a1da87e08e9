"""IFEval-style checkers: each one with a response that passes and one that fails, and the reward built on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reward.ifeval import (
    CHECKERS,
    DESCRIPTIONS,
    IFEVAL_IDS,
    IFEvalReward,
    check_constraint,
    describe_constraint,
)

REPO = Path(__file__).resolve().parents[1]

# (constraint, a response that satisfies it, a response that does not)
CASES = [
    (
        {"type": "word_count", "relation": "at least", "num_words": 5},
        "one two three four five",
        "one two three",
    ),
    ({"type": "word_count", "relation": "less than", "num_words": 4}, "it's well-known here", "a b c d"),
    (
        {"type": "sentence_count", "relation": "at most", "num_sentences": 2},
        "Hi there. Bye!",
        "One. Two? Three!",
    ),
    (
        {"type": "paragraph_count", "num_paragraphs": 2},
        "First part.\n***\nSecond part.",
        "First.\n***\n***\nSecond.",
    ),
    (
        {"type": "nth_paragraph_first_word", "num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        "Start here.\n\nThen, the end.",
        "Start here.\n\nAnd then the end.",
    ),
    (
        {"type": "keywords_include", "keywords": ["river", "stone"]},
        "A Stone by the river.",
        "A stone by the sea.",
    ),
    ({"type": "keywords_exclude", "forbidden_words": ["very"]}, "Every day is good.", "It is very good."),
    (
        {"type": "keyword_frequency", "keyword": "cat", "frequency": 2, "relation": "at least"},
        "cat and CAT",
        "cat, concatenate",
    ),
    (
        {"type": "letter_frequency", "letter": "z", "let_frequency": 3, "let_relation": "at least"},
        "Zoo zebra zz",
        "zebra",
    ),
    ({"type": "json_format"}, '```json\n{"a": [1, 2]}\n```', 'Here is JSON: {"a": 1}'),
    ({"type": "bullet_count", "num_bullets": 2}, "* one\n- two\n**bold** line", "* one\n* two\n* three"),
    ({"type": "title"}, "<<Ode to Rain>>\nDrops fall.", "Ode to Rain\nDrops fall."),
    (
        {"type": "section_count", "num_sections": 2, "section_spliter": "SECTION"},
        "SECTION 1 intro\nSECTION 2 body",
        "SECTION 1 only one",
    ),
    (
        {"type": "placeholder_count", "num_placeholders": 2},
        "Send to [name] at [address].",
        "Send to [name] now.",
    ),
    ({"type": "postscript", "postscript_marker": "P.S."}, "Hello.\nP.S. see you", "Hello. PS see you"),
    ({"type": "postscript", "postscript_marker": "P.P.S"}, "Hi.\np.p.s. more", "Hi.\nP.S. more"),
    ({"type": "highlighted_sections", "num_highlights": 2}, "*one* and **two**", "*one* and * *"),
    ({"type": "start_phrase", "phrase": "Dear team"}, "  dear team, hello", "Hello dear team"),
    (
        {"type": "end_phrase", "end_phrase": "Any other questions?"},
        "Done. Any other questions?  ",
        "Any other questions? Bye.",
    ),
    ({"type": "quotation"}, '"All of it quoted."', 'Not "quoted" fully'),
    ({"type": "all_lowercase"}, "all lower, 123", "Not all lower"),
    ({"type": "all_uppercase"}, "ALL UPPER, 123", "ALL UPPER but one"),
    (
        {"type": "capital_word_frequency", "capital_frequency": 2, "capital_relation": "less than"},
        "Only ONE shout",
        "TWO LOUD words",
    ),
    ({"type": "no_commas"}, "No commas here.", "One, two"),
    (
        {"type": "repeat_prompt", "prompt_to_repeat": "Write a haiku about tea."},
        "Write a haiku about tea. Green leaves...",
        "Here is a haiku about tea.",
    ),
    ({"type": "two_responses"}, "Answer A.\n******\nAnswer B.", "Answer A.\n******\nAnswer A."),
    ({"type": "constrained_response"}, "I think so. My answer is maybe.", "My answer is perhaps."),
    ({"type": "choose_from", "options": ["red", "green"]}, "Green.", "Red or green"),
]


def test_at_least_twenty_checkers_and_every_one_is_tested():
    assert len(CHECKERS) >= 20
    assert {c["type"] for c, _, _ in CASES} == set(CHECKERS)
    assert set(DESCRIPTIONS) == set(CHECKERS)


@pytest.mark.parametrize(
    ("constraint", "good", "bad"), CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in enumerate(CASES)]
)
def test_checker_passes_and_fails(constraint, good, bad):
    assert check_constraint(good, constraint) is True
    assert check_constraint(bad, constraint) is False


@pytest.mark.parametrize(
    ("constraint", "good", "bad"), CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in enumerate(CASES)]
)
def test_description_mentions_parameters(constraint, good, bad):
    text = describe_constraint(constraint)
    assert text and "{" not in text.replace('{"', "")
    for key, value in constraint.items():
        # The request to repeat is the prompt itself, which the instruction does not quote again.
        if (
            key not in ("type", "prompt_to_repeat")
            and isinstance(value, str | int)
            and not isinstance(value, bool)
        ):
            assert str(value) in text, (key, text)


def test_edge_cases_of_counting():
    assert not check_constraint("", {"type": "all_lowercase"})  # no letters: not "all lowercase"
    assert not check_constraint("", {"type": "json_format"})
    assert check_constraint("[1, 2]", {"type": "json_format"})
    assert not check_constraint("******\nonly one\n******", {"type": "two_responses"})
    assert not check_constraint(
        "A\n\nB\n\nC",
        {"type": "nth_paragraph_first_word", "num_paragraphs": 2, "nth_paragraph": 1, "first_word": "a"},
    )


def test_ifeval_ids_and_none_params_are_accepted():
    assert set(IFEVAL_IDS.values()) <= set(CHECKERS)
    # As datasets loads a list column: every mapping gets every key, missing ones None.
    constraint = {
        "type": "length_constraints:number_words",
        "relation": "at least",
        "num_words": 2,
        "keywords": None,
    }
    assert check_constraint("two words", constraint)


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        ({"type": "nope"}, "unknown type 'nope'"),
        ({"kind": "title"}, "'type'"),
        ({"type": "word_count"}, "num_words"),
        ({"type": "word_count", "num_words": 3, "colour": "red"}, "colour"),
        ({"type": "word_count", "num_words": "many"}, "int"),
        ({"type": "word_count", "num_words": 3, "relation": "about"}, "relation"),
        ({"type": "letter_frequency", "letter": "ab", "let_frequency": 1}, "single letter"),
        ({"type": "keywords_include", "keywords": "river"}, "list of str"),
        (
            {"type": "nth_paragraph_first_word", "num_paragraphs": 2, "nth_paragraph": 3, "first_word": "x"},
            "nth_paragraph",
        ),
    ],
)
def test_bad_constraints_say_what_is_wrong(constraint, message):
    with pytest.raises(ValueError, match=message):
        check_constraint("some response", constraint)


ROW = [
    {"type": "no_commas"},
    {"type": "all_lowercase"},
    {"type": "word_count", "relation": "at least", "num_words": 3},
]


def test_reward_fraction_and_all():
    completions = ["no commas and lower", "No commas but Capital", "Bad, Bad"]
    fraction = IFEvalReward()(["p"] * 3, completions, constraints=[ROW] * 3)
    assert fraction.scores == [1.0, pytest.approx(2 / 3), 0.0]
    assert fraction.details[1]["satisfied"] == {"no_commas": True, "all_lowercase": False, "word_count": True}
    strict = IFEvalReward(mode="all")(["p"] * 3, completions, constraints=[ROW] * 3)
    assert strict.scores == [1.0, 0.0, 0.0]


def test_reward_reads_json_strings_and_another_column():
    out = IFEvalReward(constraints_column="instructions")(
        ["p"], ["hello there friend"], instructions=[json.dumps(ROW)]
    )
    assert out.scores == [1.0]


def test_reward_bad_rows_give_none_with_reason():
    rows = [[], [{"type": "nope"}], "not json", [{"type": "title"}]]
    out = IFEvalReward()(["p"] * 4, ["x", "x", "x", "<<T>>"], constraints=rows)
    assert out.scores[:3] == [None, None, None] and out.scores[3] == 1.0
    assert "empty" in out.reasons[0] and "unknown type" in out.reasons[1] and "JSON" in out.reasons[2]
    missing = IFEvalReward()(["p"], ["x"], other=[ROW])
    assert missing.scores == [None] and "'constraints'" in missing.reasons[0]


def test_reward_bad_params():
    with pytest.raises(ValueError, match="mode"):
        IFEvalReward(mode="most")


def test_ifeval_eval_set_rows_are_usable():
    rows = [json.loads(line) for line in (REPO / "data" / "eval" / "ifeval.jsonl").read_text().splitlines()]
    assert len(rows) >= 100
    used = set()
    for row in rows:
        text = row["prompt"][0]["content"]
        for i, constraint in enumerate(row["constraints"]):
            check_constraint("any response", constraint, i)  # raises on unusable parameters
            assert describe_constraint(constraint) in text
            used.add(constraint["type"])
    assert len(used) >= 20
    # Every row can be scored, and an empty answer does not satisfy everything.
    out = IFEvalReward()(["p"] * len(rows), [""] * len(rows), constraints=[r["constraints"] for r in rows])
    assert None not in out.scores and sum(out.scores) < len(rows)
