"""AutoIF: parsing cases by hand, cross-validation and judging on a scripted model with the real sandbox, the
shipped constraints and queries, and a run on a real engine."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from alignment.data import DataError
from data_synthesis import autoif
from data_synthesis.autoif import parse_cases, read_case
from data_synthesis.backends import ScriptedBackend
from data_synthesis.engine import Record, Result, read_rows
from data_synthesis.runner import load_recipe, run

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- parsing, by hand


def test_parse_and_read_cases():
    assert parse_cases('{"cases": [{"response": "a", "expected": true}]}') == [
        {"response": "a", "expected": True}
    ]
    assert parse_cases('Here:\n```json\n[{"input": "b", "output": "false"}]\n```') == [
        {"input": "b", "output": "false"}
    ]
    assert parse_cases("I do not know.") is None and parse_cases('{"other": 1}') is None
    assert read_case({"input": "b", "output": "false"}) == {"response": "b", "expected": False}
    assert read_case({"response": "c", "expected": " True "}) == {"response": "c", "expected": True}
    assert read_case({"response": "c", "expected": 1}) is None  # 1 is not a boolean
    assert read_case({"response": 3, "expected": True}) is None and read_case("a case") is None


# ---------------------------------------------------------------- the pipeline on a scripted model


def fn(body: str) -> str:
    return f"```python\ndef evaluate(response):\n    {body}\n```"


FEW_WORDS = fn("return len(response.split()) < 5")
FEW_SHORT = fn("return len(response.split()) < 5 and len(response) < 40")
NO_COMMA = fn("return response.count(',') == 0 if len(response) < 200 else response.missing")
FUNCTIONS = {
    # 1 repeats 0; 2 agrees with half the cases; 3 agrees like 0 (3 of 4 cases: the last case is wrong).
    "Answer in fewer than 5 words.": [FEW_WORDS, FEW_WORDS, fn("return True"), FEW_SHORT],
    # 1 raises without a comma, 2 defines nothing, 3 hangs (per-function time limit).
    "Use no commas.": [
        NO_COMMA,
        fn("return response.index(',') < 0"),
        "Check for commas.",
        fn("while True: pass"),
    ],
    "Be wise.": ["I cannot write code."] * 4,
    "Rhyme.": [FEW_WORDS] * 4,
}
SHORT_CASES = [
    {"response": "Yes indeed.", "expected": True},
    {"response": "one two three four five six", "expected": False},
    {"response": "Supercalifragilisticexpialidocious word", "expected": True},
    {"response": "Fine.", "expected": False},  # wrong: both kept functions disagree -> case_disputed
]
CASES = {
    "Answer in fewer than 5 words.": [
        json.dumps({"cases": [*SHORT_CASES[:2], {"response": "no expected value"}]}),
        json.dumps([SHORT_CASES[0], *SHORT_CASES[2:]]),  # the first repeats a case of the first answer
    ],
    "Use no commas.": [
        '{"cases": [{"response": "No commas here", "expected": true}, '
        '{"response": "a, b", "expected": "false"}]}',
        "not JSON",
    ],  # fmt: skip
    "Be wise.": ['{"cases": [{"response": "x", "expected": true}]}'] * 2,
    "Rhyme.": ["No idea.", "Sorry."],
}
RAIN = ["Rain falls.", "Rain falls.", "Rain is water that falls from clouds in small drops.",
        "Precipitation: condensed atmospheric waterdroplets"]  # fmt: skip
DRY = ["No commas at all", "Yes, commas", "No commas at all", "x" * 250]
WINDY = "Wind, wind and more wind blowing everywhere today"


def model(conversation, j):
    text = conversation[-1]["content"]
    if "Write a Python function `evaluate" in text:
        return FUNCTIONS[re.search(r"Instruction: (.*)\n", text).group(1)][j]
    if "Write test cases" in text:
        return CASES[re.search(r"Instruction: (.*)\n", text).group(1)][j]
    if text.startswith("Describe wind."):
        return WINDY
    return RAIN[j] if "fewer than 5 words" in text else DRY[j]


CONSTRAINTS = [
    # `constraints`: rule-based references (the ifeval reward's checkers), read only by the audit.
    {
        "id": "c/short",
        "instruction": "Answer in fewer than 5 words.",
        "constraints": [{"type": "word_count", "relation": "less than", "num_words": 5}],
    },
    {"id": "c/nocomma", "instruction": "Use no commas.", "constraints": [{"type": "no_commas"}]},
    {"id": "c/bad", "instruction": "Be wise.", "constraints": [{"type": "no_commas"}]},
    {"id": "c/nocases", "instruction": "Rhyme."},
    {"id": "c/empty", "instruction": ""},
]
QUERIES = [{"id": "q/rain", "query": "Describe rain."}, {"id": "q/snow", "query": "Describe snow."},
           {"id": "q/wind", "query": "Describe wind."}]  # fmt: skip


def _config(tmp_path, *overrides, out="out", queries=QUERIES):
    src, qs = tmp_path / "constraints.jsonl", tmp_path / "queries.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in CONSTRAINTS))
    qs.write_text("".join(json.dumps(q) + "\n" for q in queries))
    args = ["pipeline=autoif", f"input={src}", f"queries={qs}", f"out_dir={tmp_path / out}",
            f"cache={tmp_path / 'cache.sqlite'}", "num_functions=4", "num_case_sets=2", "num_answers=4",
            "queries_per_constraint=0", "min_case_accuracy=0.75", "min_functions=1", "pairs_per_prompt=1",
            "demos_per_prompt=1", "per_function_timeout_s=1.0", "cross_validation=all_cases",
            "min_parsed_functions=1", "min_parsed_cases=1", *overrides]  # fmt: skip
    return load_recipe(args)[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pipeline_cross_validates_judges_and_writes(tmp_path):
    backend = ScriptedBackend(model)
    stats = run(autoif, _config(tmp_path), backend=backend, progress=False)
    # 4 constraints x 2 templates, then 2 kept constraints x 3 queries.
    assert backend.calls == 4 * 2 + 2 * 3
    assert stats["dropped"] == {  # rows
        "no_instruction": 1,
        "no_functions": 1,
        "no_cases": 1,
        # Every answer about wind breaks both constraints; the 250-character answer makes NO_COMMA raise.
        "no_accepted_answer": 2,
    }
    assert stats["dropped_items"] == {  # functions, cases and answers of the rows
        "no_evaluate": 5,  # "Check for commas." and the four answers of "Be wise."
        "duplicate_function": 4,  # one for "fewer than 5 words", three for "Rhyme."
        "case_malformed": 1,
        "duplicate_case": 2,  # "Yes indeed." again, and the second case answer of "Be wise."
        "cases_unparsable": 3,
        # `return True` agrees with 2 of 4 cases, the raising one 1 of 2, the hanging one 0 of 2.
        "function_inaccurate": 3,
        "case_disputed": 1,
        "unjudged": 2,
    }
    assert stats["rows_out"] == 4
    out = tmp_path / "out"
    sft, pref = _rows(out / "sft.jsonl"), _rows(out / "preference.jsonl")
    got = {
        (r["source_id"], r["messages"][0]["content"], r["messages"][1]["content"], r["score"]) for r in sft
    }
    assert got == {
        ("c/short|q/rain", "Describe rain.\n\nAnswer in fewer than 5 words.", "Rain falls.", 1.0),
        ("c/short|q/snow", "Describe snow.\n\nAnswer in fewer than 5 words.", "Rain falls.", 1.0),
        ("c/nocomma|q/rain", "Describe rain.\n\nUse no commas.", "No commas at all", 1.0),
        ("c/nocomma|q/snow", "Describe snow.\n\nUse no commas.", "No commas at all", 1.0),
    }
    # Rejected: score 0 only (the 0.5 answer is neither accepted nor rejected).
    pairs = {(r["source_id"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in pref}
    assert pairs == {
        ("c/short|q/rain", "Rain falls.", RAIN[2]),
        ("c/short|q/snow", "Rain falls.", RAIN[2]),
        ("c/nocomma|q/rain", "No commas at all", "Yes, commas"),
        ("c/nocomma|q/snow", "No commas at all", "Yes, commas"),
    }
    assert all((r["chosen_score"], r["rejected_score"]) == (1.0, 0.0) for r in pref)
    assert pref[0]["provenance"]["function_answers"]["template"] == "autoif.function"
    verifiers = _rows(out / "verifiers.jsonl")
    assert verifiers == [
        {"constraint_id": "c/nocomma", "instruction": "Use no commas.",
         "verifiers": [NO_COMMA.split("\n", 1)[1].removesuffix("```")],
         "cases": [{"response": "No commas here", "expected": True}, {"response": "a, b", "expected": False}],
         "function_accuracy": [1.0]},
        {"constraint_id": "c/short", "instruction": "Answer in fewer than 5 words.",
         "verifiers": [f.split("\n", 1)[1].removesuffix("```") for f in (FEW_WORDS, FEW_SHORT)],
         "cases": SHORT_CASES[:3], "function_accuracy": [0.75, 0.75]},
    ]  # fmt: skip
    # The audit, by hand. c/short's cases by the reference (fewer than 5 words): "Fine." is 1 word, labelled
    # False: 3 of 4 right. Its functions FEW_WORDS and FEW_SHORT give the reference's verdict on all four case
    # responses, `return True` does not ("one two three four five six"). c/nocomma: both cases right; NO_COMMA
    # matches, the raising and the hanging function give no verdict. c/bad: dropped at parse (no function),
    # its one case ("x", True) labelled right. "Rhyme." has no reference: not audited.
    audit = {r["constraint_id"]: {k: r[k] for k in autoif.AUDIT_COUNTS} for r in _rows(out / "audit.jsonl")}
    # What was written: c/short's demonstrations "Rain falls." (2 words) the reference accepts, and its pairs
    # put them above RAIN[2] (10 words), which it refuses; c/nocomma's "No commas at all" above "Yes, commas".
    # Per constraint, in AUDIT_COUNTS' order: cases, labelled right, following the reference, functions,
    # run, matching the reference, kept, kept and matching; demonstrations, those the reference accepts,
    # pairs, those it orders the same way.
    assert {cid: tuple(counts.values()) for cid, counts in audit.items()} == {
        "c/bad": (1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        "c/nocomma": (2, 2, 1, 3, 3, 1, 1, 1, 2, 2, 2, 2),
        "c/short": (4, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2),
    }
    assert _rows(out / "audit.jsonl")[0]["reference"] == [{"type": "no_commas"}]
    assert stats["files"]["audit.jsonl"] == 3
    dropped = {(d["row"]["id"], d["reason"]) for d in _rows(out / "dropped.jsonl")}
    assert {("c/short#function1", "function_inaccurate"), ("c/short#case3", "case_disputed"),
            ("c/nocomma#function_answer2", "no_evaluate"), ("c/nocomma#case_answer1", "cases_unparsable"),
            ("c/nocomma|q/rain#answer3", "unjudged"), ("c/short|q/wind", "no_accepted_answer")} <= dropped  # fmt: skip


def test_autoif_cross_validation_drops_cases_no_function_confirms_first(tmp_path):
    """AutoIF's released rule (QwenLM/AutoIF, code/3_cross_validation.py), by hand on the scripted model.
    "fewer than 5 words" has 3 distinct functions (FEW_WORDS, `return True`, FEW_SHORT) and 4 cases. "Fine.",
    labelled False, is 1 word: all three return True, so no function agrees and the case goes first
    (case_unconfirmed). On the 3 cases left FEW_WORDS and FEW_SHORT agree with 3 of 3, `return True` with 2
    of 3 (0.67 < 0.8). Over all 4 cases (`all_cases`) the two would agree with 3 of 4 = 0.75 < 0.8, and the
    constraint would be dropped. "Use no commas." has 3 distinct functions but 2 cases, under
    min_parsed_cases 3."""
    base = ("min_parsed_functions=3", "min_parsed_cases=3", "min_case_accuracy=0.8")
    stats = run(
        autoif,
        _config(tmp_path, "cross_validation=autoif", *base),
        backend=ScriptedBackend(model),
        progress=False,
    )
    assert stats["dropped"] == {"no_instruction": 1, "no_functions": 1, "no_cases": 1,
                                "too_few_parsed_cases": 1, "no_accepted_answer": 1}  # fmt: skip
    assert stats["dropped_items"]["case_unconfirmed"] == 1 and "case_disputed" not in stats["dropped_items"]
    assert stats["dropped_items"]["function_inaccurate"] == 1  # `return True`
    [kept] = _rows(tmp_path / "out" / "verifiers.jsonl")
    assert kept["constraint_id"] == "c/short" and kept["function_accuracy"] == [1.0, 1.0]
    assert kept["verifiers"] == [f.split("\n", 1)[1].removesuffix("```") for f in (FEW_WORDS, FEW_SHORT)]
    assert kept["cases"] == SHORT_CASES[:3]
    dropped = {(d["row"]["id"], d["reason"]) for d in _rows(tmp_path / "out" / "dropped.jsonl")}
    assert ("c/short#case3", "case_unconfirmed") in dropped and (
        "c/nocomma",
        "too_few_parsed_cases",
    ) in dropped
    assert stats["rows_out"] == 2  # c/short with rain and snow
    # The same generations under the other rule: both functions fall under 0.8, the constraint goes.
    stats = run(autoif, _config(tmp_path, *base, out="b"), backend=ScriptedBackend(model), progress=False)
    assert stats["dropped"]["too_few_functions"] == 1 and stats["rows_out"] == 0
    with pytest.raises(ValueError, match="cross_validation must be 'autoif' or 'all_cases'"):
        autoif.Config(cross_validation="majority")
    with pytest.raises(ValueError, match=r"min_parsed_functions must be in \[1, num_functions\]"):
        autoif.Config(num_functions=2)  # the default min_parsed_functions is AutoIF's 3


def test_cases_and_functions_of_one_label_keep_nothing(tmp_path):
    """By hand, on "Shout." (`_config`'s min_case_accuracy 0.75). Functions: `return False` and
    `response.isupper()`. Cases: 4 labelled False ("hello", ...) and, in the second run, "HELLO THERE"
    labelled True.

    All False: both functions agree with all 4; the cases hold 0 True, so under min_cases_per_label 1 (the
    default) the constraint is dropped [one_sided_cases]. With 0 (AutoIF's code) both are kept, and the answer
    "HELLO!" scores 1 of 2: neither accepted nor rejected, no row.

    4 False + 1 True: `return False` agrees with 4 of 5 = 0.8 >= 0.75 but with no True case
    [function_one_sided]; isupper agrees with all 5 and alone judges "HELLO!" accepted and "quiet" rejected:
    one demonstration and one pair per query (3 queries). With 0 both are kept and again no row."""
    src = tmp_path / "shout.jsonl"
    reference = [{"type": "all_uppercase"}]  # read by the audit only
    src.write_text(json.dumps({"id": "c/shout", "instruction": "Shout.", "constraints": reference}) + "\n")
    quiet = [{"response": r, "expected": False} for r in ("hello", "quiet please", "a b c", "no")]
    loud = {"response": "HELLO THERE", "expected": True}

    def shout_model(cases):
        def model(conversation, j):
            text = conversation[-1]["content"]
            if "Write a Python function `evaluate" in text:
                return [fn("return False"), fn("return response.isupper()")][j]
            if "Write test cases" in text:
                return json.dumps({"cases": cases[j::2]})
            return ["HELLO!", "quiet"][j]

        return ScriptedBackend(model)

    def go(cases, out, *more):
        args = (f"input={src}", "num_functions=2", "num_answers=2", f"cache={tmp_path / out}.sqlite", *more)
        return run(autoif, _config(tmp_path, *args, out=out), backend=shout_model(cases), progress=False)

    stats = go(quiet, "a")
    assert stats["dropped"] == {"one_sided_cases": 1} and stats["rows_out"] == 0
    [d] = [d for d in _rows(tmp_path / "a" / "dropped.jsonl") if d["row"]["id"] == "c/shout"]
    assert d["reason"] == "one_sided_cases" and "0 True, 4 False" in d["detail"]
    stats = go(quiet, "b", "min_cases_per_label=0")
    assert _rows(tmp_path / "b" / "verifiers.jsonl")[0]["function_accuracy"] == [1.0, 1.0]
    assert stats["dropped"] == {"no_accepted_answer": 3} and stats["rows_out"] == 0

    stats = go([*quiet, loud], "c")
    assert stats["dropped_items"] == {"function_one_sided": 1} and stats["rows_out"] == 3
    [kept] = _rows(tmp_path / "c" / "verifiers.jsonl")
    assert kept["verifiers"] == ["def evaluate(response):\n    return response.isupper()\n"]
    assert {r["messages"][1]["content"] for r in _rows(tmp_path / "c" / "sft.jsonl")} == {"HELLO!"}
    pairs = {
        (r["chosen"][0]["content"], r["rejected"][0]["content"])
        for r in _rows(tmp_path / "c" / "preference.jsonl")
    }
    assert pairs == {("HELLO!", "quiet")}
    stats = go([*quiet, loud], "d", "min_cases_per_label=0")
    assert _rows(tmp_path / "d" / "verifiers.jsonl")[0]["function_accuracy"] == [0.8, 1.0]
    assert stats["dropped"] == {"no_accepted_answer": 3} and stats["rows_out"] == 0
    # The audit (AUDIT_COUNTS' order). The reference refuses every all-False case response, so no function
    # counts as matching it there, though both give its verdict on all four: `return False` would match any
    # reference on them. With "HELLO THERE" it accepts one: isupper matches, `return False` does not; the 3
    # demonstrations ("HELLO!") it accepts, the 3 pairs (above "quiet") it orders the same way.
    audit = {
        out: tuple(_rows(tmp_path / out / "audit.jsonl")[0][k] for k in autoif.AUDIT_COUNTS) for out in "abcd"
    }
    assert audit == {
        "a": (4, 4, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0),
        "b": (4, 4, 0, 2, 2, 0, 2, 0, 0, 0, 0, 0),
        "c": (5, 5, 1, 2, 2, 1, 1, 1, 3, 3, 3, 3),
        "d": (5, 5, 1, 2, 2, 1, 2, 1, 0, 0, 0, 0),
    }
    with pytest.raises(ValueError, match="min_cases_per_label must be >= 0"):
        autoif.Config(min_cases_per_label=-1)


def test_the_audit_reads_what_was_written():
    """By hand: the reference (no commas) accepts "a b", refuses "a, b"; a pair counts as ordered its way
    only when it accepts the chosen answer and refuses the rejected one."""
    audit = {"reference": [{"type": "no_commas"}], **dict.fromkeys(autoif.AUDIT_COUNTS[:8], 0)}
    data = {"instruction": "Use no commas.", "constraint_id": "c/x", "audit": audit}
    rows = [
        Record("c/x|q/1", {**data, "demos": [{"text": "a b"}], "pairs": [{"chosen": "a b", "rejected": "a, b"}]}),
        Record("c/x|q/2", {**data, "demos": [{"text": "a, b"}],
                           "pairs": [{"chosen": "a b", "rejected": "c d"}, {"chosen": "a, b", "rejected": "c, d"}]}),
    ]  # fmt: skip
    [row] = autoif.audit_rows(Result(rows, [], {}))
    written = {k: row[k] for k in autoif.WRITTEN_COUNTS}
    assert written == {
        "demos": 2,
        "demos_following_reference": 1,
        "pairs": 3,
        "pairs_ordered_by_reference": 1,
    }


def test_a_stricter_filter_reuses_every_generation(tmp_path):
    run(autoif, _config(tmp_path), backend=ScriptedBackend(model), progress=False)
    backend = ScriptedBackend(model)
    stats = run(autoif, _config(tmp_path, "min_functions=2", out="b"), backend=backend, progress=False)
    # Only "fewer than 5 words" keeps two functions; its answers are all in the cache.
    assert backend.calls == 0 and stats["generated_samples"] == 0
    assert stats["dropped"]["too_few_functions"] == 1 and stats["rows_out"] == 2


def test_an_accepted_answer_cut_at_the_token_limit_is_never_chosen(tmp_path):
    backend = ScriptedBackend(model, finished=False)
    stats = run(autoif, _config(tmp_path, "cache=none"), backend=backend, progress=False)
    assert stats["dropped_items"]["unfinished"] == 8  # two accepted answers in each of the four rows
    assert stats["dropped"]["no_accepted_answer"] == 6 and stats["rows_out"] == 0


def test_queries_are_drawn_per_constraint_with_a_seed(tmp_path):
    queries = [{"id": f"q/{i}", "query": f"Describe the number {i}."} for i in range(10)]
    step = autoif.PairQueries(_config(tmp_path, "queries_per_constraint=3", queries=queries))
    data = {
        "instruction": "i",
        "verifiers": ["v"],
        "kept_cases": [],
        "function_accuracy": [1.0],
        "audit": None,
    }
    rows = step.run([Record("c/x", dict(data)), Record("c/y", dict(data))], None)
    # A shuffle seeded by the seed and the constraint's id: the draw does not depend on the other rows.
    for cid in ("c/x", "c/y"):
        drawn = random.Random(f"0:{cid}").sample(step.queries, 3)
        assert [r.id for r in rows if r.data["constraint_id"] == cid] == [f"{cid}|{qid}" for qid, _ in drawn]
    assert rows[0].data["query"] == dict(step.queries)[rows[0].data["query_id"]]
    assert rows[0].provenance["query"]["step"] == "pair_queries"


def test_bad_input_fails_before_generation(tmp_path):
    backend = ScriptedBackend(model)
    cfg = _config(tmp_path, 'templates={"answer": [{"role": "user", "content": "{query} ({tone})"}]}')
    with pytest.raises(ValueError, match=r"step 'answer' reads column\(s\) \['tone'\]"):
        run(autoif, cfg, backend=backend, progress=False)
    with pytest.raises(DataError, match=r"queries.jsonl: row queries:2: field 'query'"):
        run(
            autoif,
            _config(tmp_path, queries=[QUERIES[0], {"text": "no query"}]),
            backend=backend,
            progress=False,
        )
    # A reference the ifeval checkers cannot use: an error naming the file, the row and the field.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"id": "c/rhyme", "instruction": "Rhyme.", "constraints": [{"type": "rhymes"}]})
    )
    with pytest.raises(
        DataError, match=r"bad.jsonl: row c/rhyme: field 'constraints': .*unknown type 'rhymes'"
    ):
        run(autoif, _config(tmp_path, f"input={bad}"), backend=backend, progress=False)
    assert backend.calls == 0
    with pytest.raises(ValueError, match="reject < accept"):
        autoif.Config(accept=0.5, reject=0.5)


# ---------------------------------------------------------------- the shipped constraints and queries


def test_shipped_constraints_and_queries():
    constraints = read_rows(REPO / "data_synthesis" / "autoif_constraints.jsonl")
    queries = autoif.load_queries(str(REPO / "data_synthesis" / "autoif_queries.jsonl"))
    assert len(constraints) >= 30 and len({c.id for c in constraints}) == len(constraints)
    assert all(c.data["instruction"].strip() for c in constraints)
    assert len(queries) >= 20 and len({q for _, q in queries}) == len(queries)
    # No query is a prompt of the held-out instruction-following set (data/eval/ifeval.jsonl).
    held = [json.loads(line)["prompt"][0]["content"].lower() for line in
            (REPO / "data" / "eval" / "ifeval.jsonl").read_text().splitlines()]  # fmt: skip
    assert not [q for _, q in queries if any(q.lower().rstrip(".") in h for h in held)]
    cfg = autoif.Config()  # the defaults read the shipped files
    # The audit's references are usable checkers (read_input checks them) and cover most constraints.
    assert sum(r.data.get("constraints") is not None for r in autoif.read_input(cfg)) >= 19
    assert (cfg.input, cfg.queries) == (
        "data_synthesis/autoif_constraints.jsonl",
        "data_synthesis/autoif_queries.jsonl",
    )


# ---------------------------------------------------------------- a real engine


@pytest.mark.slow
def test_autoif_runs_on_a_real_engine(tmp_path):
    """tiny-qwen2 is random: its functions define no evaluate, and the constraint is dropped and counted."""
    _, cfg = load_recipe(["recipes/data/autoif.yaml", "backend.model=tiny-qwen2", "max_rows=1", "cache=none",
                          f"out_dir={tmp_path}", "num_functions=1", "num_case_sets=1", "num_answers=1",
                          "min_parsed_functions=1", "min_parsed_cases=1",
                          "sampling.max_new_tokens=16", "backend.generation.backend=transformers"])  # fmt: skip
    stats = run(autoif, cfg, progress=False)
    assert stats["rows_in"] == 1 and stats["generated_samples"] == 2
    assert stats["dropped"]["no_functions"] == 1 and stats["rows_out"] == 0
    assert {"sft.jsonl", "preference.jsonl", "verifiers.jsonl", "audit.jsonl"} == set(stats["files"])
