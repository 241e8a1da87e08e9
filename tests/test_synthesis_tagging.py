"""InsTag ontology extraction: tag normalisation by hand, the whole pipeline on a scripted tagger, a real engine."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from data_synthesis import tagging
from data_synthesis.backends import ScriptedBackend
from data_synthesis.runner import load_recipe, run
from data_synthesis.tagging import lemma, merge_tags, normalise_tag


def test_lemma_singularises_plural_nouns_only():
    cases = {"algorithms": "algorithm", "queries": "query", "boxes": "box", "matches": "match",
             "analysis": "analysis", "class": "class", "physics": "physics", "data": "data",
             "children": "child", "writing": "writing", "bus": "bus", "is": "is"}  # fmt: skip
    assert {w: lemma(w) for w in cases} == cases


def test_normalise_tag():
    assert normalise_tag("  Sorting-Algorithms!! ") == "sorting algorithm"
    assert normalise_tag("Python_Programming") == "python programming"
    assert normalise_tag("C++ Queries") == "c query"


def test_merge_tags_by_word_set_and_ratio():
    counts = Counter({"sort algorithm": 3, "algorithm sort": 1, "math": 2, "maths": 5, "poetry": 1})
    # "math"/"maths": ratio 2*4/9 = 0.889 -> merged at 0.85, not at 0.9.
    assert merge_tags(counts, 0.85) == {"sort algorithm": "sort algorithm", "algorithm sort": "sort algorithm",
                                        "maths": "maths", "math": "maths", "poetry": "poetry"}  # fmt: skip
    assert merge_tags(counts, 0.9)["math"] == "math"
    assert merge_tags(counts, 1.0)["algorithm sort"] == "sort algorithm"
    # A whole different word is not a spelling variant, however much of the string is shared.
    counts = Counter({"change calculation": 3, "age calculation": 1, "math problem": 1, "maths problem": 2})
    assert merge_tags(counts, 0.85) == {"change calculation": "change calculation",
                                        "age calculation": "age calculation", "maths problem": "maths problem",
                                        "math problem": "maths problem"}  # fmt: skip


TAGS = {
    "Add 2 and 3.": [("Arithmetic", "adds numbers"), ("Math Problems", "a math task"), ("8/9", "a number")],
    "Sort the list 3 1 2.": [("sorting", "orders items"), ("Lists", "works on a list")],
    "Add 7 and 9.": [("arithmetics", "adds"), ("math problem", "math")],
    "Sort the words b a.": [("Sorting", "orders words"), ("a very long tag with far too many words", "x")],
    "Write a haiku.": [("poetry", "a poem")],
}


def tagger(conv, j):
    text = conv[-1]["content"]
    instruction = text.split("User query: ")[1]
    if instruction == "Reverse abc.":
        return "I think the tags are reversing"  # not JSON
    if instruction == "Count the a's.":
        return '{"tags": []}'
    return json.dumps({"tags": [{"tag": t, "explanation": e} for t, e in TAGS[instruction]]})


def test_tagging_pipeline_on_a_scripted_tagger(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": q}]} for q in [*TAGS, "Reverse abc.", "Count the a's."]]
    rows.append({"prompt": []})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, cfg = load_recipe(["pipeline=tagging", f"input={src}", f"out_dir={tmp_path / 'out'}", "cache=none",
                          "merge_ratio=0.9", "min_count=2"])  # fmt: skip
    backend = ScriptedBackend(tagger)
    stats = run(tagging, cfg, backend=backend, progress=False)
    assert backend.calls == 7
    assert stats["dropped"] == {"no_instruction": 1, "invalid_json": 1, "no_tags": 1, "only_rare_tags": 1}
    out = [json.loads(line) for line in (tmp_path / "out" / "tagged.jsonl").read_text().splitlines()]
    # "arithmetics" -> "arithmetic"; "math problems" / "math problem" -> "math problem"; "list" is used once.
    assert [(r["instruction"], r["tags"]) for r in out] == [
        ("Add 2 and 3.", ["arithmetic", "math problem"]),
        ("Sort the list 3 1 2.", ["sorting"]),
        ("Add 7 and 9.", ["arithmetic", "math problem"]),
        ("Sort the words b a.", ["sorting"]),
    ]
    assert out[0]["tag_explanations"] == {"arithmetic": "adds numbers", "math problem": "a math task"}
    assert out[0]["provenance"]["tag_answer"]["settings"]["json_schema"] == tagging.TAG_SCHEMA
    onto = json.loads((tmp_path / "out" / "ontology.json").read_text())
    assert onto["tags"] == {
        "arithmetic": {"count": 2, "aliases": ["Arithmetic", "arithmetics"]},
        "math problem": {"count": 2, "aliases": ["Math Problems", "math problem"]},
        "sorting": {"count": 2, "aliases": ["Sorting", "sorting"]},
    }
    assert onto["removed_rare"] == {"list": 1, "poetry": 1}
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert {d["reason"]: d["row"]["instruction"] for d in dropped if d["reason"] != "no_instruction"} == {
        "invalid_json": "Reverse abc.", "no_tags": "Count the a's.", "only_rare_tags": "Write a haiku."}  # fmt: skip


def test_changing_only_the_filter_reuses_every_generation(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"instruction": q}) + "\n" for q in TAGS))
    common = ["pipeline=tagging", f"input={src}", f"cache={tmp_path / 'c.sqlite'}"]
    _, cfg = load_recipe([*common, f"out_dir={tmp_path / 'a'}", "min_count=2"])
    run(tagging, cfg, backend=ScriptedBackend(tagger), progress=False)
    _, cfg = load_recipe([*common, f"out_dir={tmp_path / 'b'}", "min_count=1"])
    backend = ScriptedBackend(tagger)
    stats = run(tagging, cfg, backend=backend, progress=False)
    assert backend.calls == 0 and stats["cached_samples"] == 5 and stats["rows_out"] == 5


def test_a_template_field_no_column_provides_fails_before_generation(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "x"}) + "\n")
    _, cfg = load_recipe(["pipeline=tagging", f"input={src}", "cache=none", f"out_dir={tmp_path}",
                          'template=[{"role": "user", "content": "{instruction} in {domain}"}]'])  # fmt: skip
    backend = ScriptedBackend(tagger)
    with pytest.raises(ValueError, match=r"step 'tag' reads column\(s\) \['domain'\]"):
        run(tagging, cfg, backend=backend, progress=False)
    assert backend.calls == 0


@pytest.mark.slow
def test_tagging_runs_on_a_real_engine_with_the_schema(tmp_path):
    """tiny-qwen2 is random: under vLLM's structured outputs its answers still parse as the schema."""
    pytest.importorskip("vllm")
    _, cfg = load_recipe(["recipes/data/tagging.yaml", "backend.model=tiny-qwen2", "max_rows=4", "cache=none",
                          f"out_dir={tmp_path}", "min_count=1", "sampling.max_new_tokens=96",
                          "backend.generation.max_model_len=1024"])  # fmt: skip
    stats = run(tagging, cfg, progress=False)
    assert stats["rows_in"] == 4 and stats["generated_samples"] == 4
    assert (
        stats["dropped"].get("invalid_json", 0) + stats["dropped"].get("no_tags", 0) + stats["rows_out"] <= 4
    )
