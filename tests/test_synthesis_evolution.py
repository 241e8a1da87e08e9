"""Evol-Instruct: each elimination rule on a scripted model, the seeded choice of operation, rounds, the cache,
bad input and templates, and a real engine."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from alignment.config import ConfigError
from alignment.generation import Completion
from data_synthesis import evolution
from data_synthesis.backends import ScriptedBackend
from data_synthesis.evolution import IN_DEPTH_METHODS, check_answer, degenerate, eliminate, no_new_information
from data_synthesis.runner import load_recipe, run

PLANETS = "Explain how the planets of the solar system formed from a disc of gas and dust."
SONG_ANSWER = "Sorry for the long list: " + " ".join(f"song{i}" for i in range(75))  # 80 words

# instruction -> (its rewrite, the answer to the rewrite). A text ending in "..." comes back unfinished.
SCRIPT = {
    "Add 2 and 3.": ("Add 2 and 3, then multiply the sum by 4 and explain each step.", "20, since (2 + 3) x 4 = 20."),
    "Name a bird.": ('"Name a bird that cannot fly and explain why it lost flight."', "The kiwi: no predators."),
    "Name a colour.": ("  ", None),
    "Name a fruit.": ("The the of and, to a.", None),
    "Name a tree.": ("oak tree oak tree oak tree oak tree oak tree oak tree", None),
    "Name a river.": ("Name a long river.", "The Nile."),
    "Name a city.": ("#Rewritten Prompt#: Name a city in Europe with a port.", None),
    PLANETS: (PLANETS + " Be brief.", None),
    "Describe the water cycle.": ("Describe the cycle of the water.", None),
    "Name an ocean.": ("Name an ocean and list three animals that live in...", None),
    "Name a mountain.": ("Name a mountain higher than 8000 metres and its country.", "Sorry, I cannot answer that."),
    "Name a lake.": ("Name a lake deeper than one kilometre, with its country.", "The of and, to."),
    "Name a desert.": ("Name a desert in Asia and describe its climate.", "The Gobi is cold and dry in..."),
    "Name a song.": ("Name ten songs about rain and their singers.", SONG_ANSWER),
}  # fmt: skip
ANSWERS = {rewrite.strip('"'): answer for rewrite, answer in SCRIPT.values()}


def model(conv, j):
    text = conv[-1]["content"]
    if "#Given Prompt#:\n" in text:
        instruction = text.split("#Given Prompt#:\n")[1].split("\n\n#")[0]
        return SCRIPT[instruction][0]
    return ANSWERS[text]


class Scripted(ScriptedBackend):
    """A scripted model whose answers ending in '...' did not finish (hit max_new_tokens)."""

    def chat(self, conversations, n, sampling, json_schema=None):
        groups = super().chat(conversations, n, sampling, json_schema)
        return [[Completion(c.text, [], not c.text.endswith("...")) for c in g] for g in groups]


def _input(tmp_path, instructions, extra=()):
    src = tmp_path / "in.jsonl"
    rows = [{"id": f"r{i}", "prompt": [{"role": "user", "content": q}], "answer": "gold"}
            for i, q in enumerate(instructions)]  # fmt: skip
    src.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra]))
    return src


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _config(tmp_path, src, *overrides, out="out", operations=("add_constraints",)):
    _, cfg = load_recipe(["recipes/data/evolution.yaml", f"input={src}", f"out_dir={tmp_path / out}",
                          "cache=none", f"operations=[{', '.join(operations)}]", *overrides])  # fmt: skip
    return cfg


def test_rule_functions_by_hand():
    # difflib: the rewrite is the original (79 chars) + 10 chars, all matching: 2 * 79 / (79 + 89) = 0.9405.
    assert no_new_information(PLANETS, PLANETS + " Be brief.", 0.9) == "similarity 0.940 >= 0.9"
    assert no_new_information(PLANETS, PLANETS + " Be brief.", 0.95) is None  # "brief" is new
    assert no_new_information("Describe the water cycle.", "Describe the cycle of the water.", 0.9) == (
        "no content word the original lacks"
    )
    assert degenerate("", 0.5) == "empty"
    assert degenerate("Of the, and to!", 0.5) == "only punctuation and stop words"
    # 12 words, 10 trigrams, 2 distinct: 0.2 < 0.5; at 0.2 it is not under the threshold.
    assert degenerate("oak tree " * 6, 0.5) == "repeated text (2 distinct of 10 word trigrams)"
    assert degenerate("oak tree " * 6, 0.2) is None
    assert degenerate("14", 0.5) is None
    cfg = evolution.Config()
    assert eliminate("Name a river.", "Name the longest African river.", True, cfg) is None  # 5 words
    assert (
        eliminate("Name a river.", "Name the longest river.", True, cfg) == "too_short: 4 words < min_words 5"
    )
    statement = "The area of a rectangular tabletop is 7m * 15m = 105m2."
    assert eliminate("Find the area of a 7 m by 15 m tabletop.", statement, True, cfg).startswith(
        "not_a_request"
    )
    assert eliminate("Name a river.", "It is cold. Name the longest African river.", True, cfg) is None
    words = " ".join(f"w{i}" for i in range(78))
    assert check_answer("Sorry, " + words, True, cfg) == "refusal: 'sorry' in a 79-word answer"
    assert check_answer("Sorry, no. " + words, True, cfg) is None  # 80 words: not a short answer


def test_every_elimination_rule_on_a_scripted_model(tmp_path):
    src = _input(tmp_path, list(SCRIPT), extra=[{"id": "empty", "prompt": []}])
    backend = Scripted(model)
    stats = run(evolution, _config(tmp_path, src), backend=backend, progress=False)
    # 14 rewrites; answers to the 6 rewrites that pass (add, bird, mountain, lake, desert, song).
    assert backend.calls == 14 + 6
    assert stats["dropped"] == {
        "no_instruction": 1, "degenerate": 3, "too_short": 1, "copied_template_words": 1,
        "no_new_information": 2, "unfinished_rewrite": 1, "refusal": 1, "degenerate_answer": 1,
        "unfinished_answer": 1,
    }  # fmt: skip
    dropped = {d["row"]["id"]: (d["reason"], d["detail"]) for d in _read(tmp_path / "out" / "dropped.jsonl")}
    ids = {q: f"r{i}" for i, q in enumerate(SCRIPT)}
    assert dropped[ids["Name a colour."]] == ("degenerate", "empty")
    assert dropped[ids["Name a fruit."]] == ("degenerate", "only punctuation and stop words")
    assert dropped[ids["Name a tree."]][0] == "degenerate"
    assert dropped[ids["Name a river."]] == ("too_short", "4 words < min_words 5")
    assert dropped[ids["Name a city."]] == ("copied_template_words", "rewritten prompt")
    assert dropped[ids[PLANETS]] == ("no_new_information", "similarity 0.940 >= 0.9")
    assert dropped[ids["Describe the water cycle."]] == (
        "no_new_information",
        "no content word the original lacks",
    )
    assert dropped[ids["Name an ocean."]][0] == "unfinished_rewrite"
    assert dropped[ids["Name a mountain."]] == ("refusal", "'sorry' in a 5-word answer")
    assert dropped[ids["Name a lake."]] == ("degenerate_answer", "only punctuation and stop words")
    assert dropped[ids["Name a desert."]][0] == "unfinished_answer"

    rows = _read(tmp_path / "out" / "instructions.jsonl")
    assert [(r["source_id"], r["prompt"][0]["content"]) for r in rows] == [
        ("r0", "Add 2 and 3, then multiply the sum by 4 and explain each step."),
        ("r1", "Name a bird that cannot fly and explain why it lost flight."),  # the quotes stripped
        ("r13", "Name ten songs about rain and their singers."),  # 'sorry' in 80 words is no refusal
    ]
    first = rows[0]
    assert (first["original"], first["root"], first["operation"], first["round"]) == (
        "Add 2 and 3.", "Add 2 and 3.", "add_constraints", 1)  # fmt: skip
    assert "answer" not in first  # the gold answer belongs to the original instruction
    assert first["provenance"]["rewrite_1"]["template"] == "evol_instruct"
    assert first["provenance"]["operation_1"] == {"step": "choose_1", "seed": 0}
    sft = _read(tmp_path / "out" / "sft.jsonl")
    assert sft[0]["messages"] == [
        {"role": "user", "content": "Add 2 and 3, then multiply the sum by 4 and explain each step."},
        {"role": "assistant", "content": "20, since (2 + 3) x 4 = 20."},
    ]
    assert [r["source_id"] for r in sft] == ["r0", "r1", "r13"]
    assert stats["files"] == {"instructions.jsonl": 3, "sft.jsonl": 3}


def test_the_operation_is_drawn_per_row_with_the_seed_and_its_prompt_is_sent(tmp_path):
    src = _input(tmp_path, [f"Name {i} things." for i in range(40)])
    sent = {}

    def remember(conv, j):
        text = conv[-1]["content"]
        sent[text.split("#Given Prompt#:\n")[1].split("\n\n#")[0]] = text
        return "Done."

    cfg = _config(tmp_path, src, "answer=false", operations=evolution.OPERATIONS)
    run(evolution, cfg, backend=ScriptedBackend(remember), progress=False)
    dropped = _read(tmp_path / "out" / "dropped.jsonl")
    ops = {d["row"]["id"]: d["row"]["operation_1"] for d in dropped}
    assert ops == {f"r{i}": random.Random(f"0:r{i}:1").choice(cfg.operations) for i in range(40)}
    assert set(Counter(ops.values())) == set(cfg.operations)
    for i in range(40):
        text, op = sent[f"Name {i} things."], ops[f"r{i}"]
        if op == "breadth":
            assert "#Created Prompt#:" in text and "rarer topic" in text
        else:
            assert text.endswith("#Rewritten Prompt#:") and IN_DEPTH_METHODS[op] in text
    # Another seed, another draw (the same formula).
    cfg = _config(tmp_path, src, "seed=1", "answer=false", out="b", operations=cfg.operations)
    run(evolution, cfg, backend=ScriptedBackend(remember), progress=False)
    ops1 = {d["row"]["id"]: d["row"]["operation_1"] for d in _read(tmp_path / "b" / "dropped.jsonl")}
    assert ops1 == {f"r{i}": random.Random(f"1:r{i}:1").choice(cfg.operations) for i in range(40)} != ops


def test_two_rounds_keep_the_first_round_of_a_row_the_second_eliminates(tmp_path):
    src = _input(tmp_path, ["Add 2 and 3.", "Name a bird."])
    chain = {
        "Add 2 and 3.": "Add 2 and 3, then multiply the sum by 4.",
        "Add 2 and 3, then multiply the sum by 4.": "Add 2 and 3, multiply by 4, then subtract 7 and explain.",
        "Name a bird.": "Name a bird that cannot fly.",
        "Name a bird that cannot fly.": "Name a bird that cannot fly.",  # no new information in round 2
    }

    def two_rounds(conv, j):
        text = conv[-1]["content"]
        if "#Given Prompt#:\n" in text:
            return chain[text.split("#Given Prompt#:\n")[1].split("\n\n#")[0]]
        return "Answer to: " + text

    stats = run(evolution, _config(tmp_path, src, "rounds=2"), backend=Scripted(two_rounds), progress=False)
    assert stats["dropped"] == {"no_new_information": 1} and stats["rows_out"] == 1
    rows = _read(tmp_path / "out" / "instructions.jsonl")
    assert [(r["source_id"], r["round"], r["original"], r["root"], r["prompt"][0]["content"]) for r in rows] == [
        ("r0", 1, "Add 2 and 3.", "Add 2 and 3.", chain["Add 2 and 3."]),
        ("r0", 2, chain["Add 2 and 3."], "Add 2 and 3.", chain[chain["Add 2 and 3."]]),
        ("r1", 1, "Name a bird.", "Name a bird.", "Name a bird that cannot fly."),
    ]  # fmt: skip
    sft = _read(tmp_path / "out" / "sft.jsonl")
    assert sft[1]["messages"][1]["content"] == "Answer to: " + chain[chain["Add 2 and 3."]]


def test_changing_only_a_rule_reuses_every_generation(tmp_path):
    src = _input(tmp_path, list(SCRIPT))
    common = [f"cache={tmp_path / 'c.sqlite'}"]
    run(evolution, _config(tmp_path, src, *common, out="a"), backend=Scripted(model), progress=False)
    backend = Scripted(model)
    stats = run(evolution, _config(tmp_path, src, *common, "min_words=3", out="b"), backend=backend,
                progress=False)  # fmt: skip
    # "Name a long river." (4 words) now passes min_words and needs an answer the first run never asked for.
    assert backend.calls == 1 and stats["cached_samples"] == 14 + 6


def test_changing_only_a_threshold_makes_no_backend_call(tmp_path):
    src = _input(tmp_path, list(SCRIPT))
    common = [f"cache={tmp_path / 'c.sqlite'}"]
    run(evolution, _config(tmp_path, src, *common, out="a"), backend=Scripted(model), progress=False)
    backend = Scripted(model)
    stats = run(evolution, _config(tmp_path, src, *common, "refusal_max_words=5", out="b"), backend=backend,
                progress=False)  # fmt: skip
    assert backend.calls == 0 and stats["cached_samples"] == 14 + 6
    assert "refusal" not in stats["dropped"] and stats["files"]["instructions.jsonl"] == 4


def test_bad_templates_and_operations_fail_before_any_generation(tmp_path):
    src = _input(tmp_path, ["Add 2 and 3."])
    with pytest.raises(ConfigError, match=r"templates.deepening: an evolving prompt reads exactly one field, "
                       r"\{instruction\}; this one reads \['instructon'\]"):  # fmt: skip
        _config(tmp_path, src, "templates.deepening=Rewrite {instructon} harder.")
    with pytest.raises(ConfigError, match=r"unknown operation 'complicate_input'"):
        _config(tmp_path, src, "operations=[complicate_input]")
    with pytest.raises(ConfigError, match=r"rounds must be >= 1"):
        _config(tmp_path, src, "rounds=0")
    # A replacement template is what the model is sent.
    backend = Scripted(lambda conv, j: conv[-1]["content"])  # echoes the evolving prompt
    cfg = _config(tmp_path, src, "templates.add_constraints=Make harder {instruction}", "answer=false")
    run(evolution, cfg, backend=backend, progress=False)
    assert (
        _read(tmp_path / "out" / "instructions.jsonl")[0]["prompt"][0]["content"]
        == "Make harder Add 2 and 3."
    )


@pytest.mark.slow
def test_evolution_runs_on_a_real_engine(tmp_path, tiny_qwen2):
    """tiny-qwen2 is random: only the accounting is checked (every row is out or dropped with a reason)."""
    src = _input(tmp_path, ["Add 2 and 3.", "Name a bird."])
    _, cfg = load_recipe(["recipes/data/evolution.yaml", f"input={src}", f"out_dir={tmp_path / 'out'}",
                          "cache=none", "backend.model=tiny-qwen2", "backend.generation.backend=transformers",
                          "backend.generation.max_model_len=1024", "evolve_sampling.max_new_tokens=12",
                          "answer_sampling.max_new_tokens=12", "min_words=1", "max_similarity=1.0"])  # fmt: skip
    stats = run(evolution, cfg, progress=False)
    assert stats["rows_in"] == 2 and stats["generated_samples"] >= 2
    assert stats["rows_out"] + sum(stats["dropped"].values()) == 2
    assert stats["files"]["instructions.jsonl"] == stats["rows_out"]
