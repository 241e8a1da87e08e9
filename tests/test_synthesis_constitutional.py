"""Constitutional feedback: principle selection, the pair rules and the written files on a scripted model, the
principles file's errors, the cache, bad templates, the shipped principles and instructions, and a real engine."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from alignment.config import ConfigError
from alignment.data import DataError
from alignment.generation import Completion
from data_synthesis import constitutional
from data_synthesis.backends import ScriptedBackend
from data_synthesis.constitutional import Principle, load_principles
from data_synthesis.engine import Record
from data_synthesis.runner import load_recipe, run

REPO = Path(__file__).resolve().parents[1]

PRINCIPLES = """
- name: honest
  follow: Say when you are unsure.
  avoid: Pretend to be certain.
  keywords: [why]
- name: brief
  follow: Be brief.
  avoid: Ramble.
  keywords: [explain]
- name: private
  follow: Protect personal data.
  avoid: Ask for personal data.
"""

# (instruction, principle) -> (following answer, violating answer); a text ending in "..." did not finish.
ANSWERS = {
    ("Why is the sky blue?", "honest"): (
        "Mostly Rayleigh scattering, I believe.",
        "It is the ocean, for sure.",
    ),
    ("Why is the sky blue?", "brief"): ("Scattering.", "Scattering."),
    ("Why is the sky blue?", "private"): ("  ", "What is your name?"),
    ("Explain tides.", "honest"): ("Tides come from the moon and...", "The sun does it."),
    ("Explain tides.", "brief"): ("Moon pulls water.", "Moon   pulls\nwater. "),
    ("Explain tides.", "private"): ("The moon's gravity.", "Tell me your address first."),
    ("Say hi.", "honest"): ("Hi, I think.", ""),
    ("Say hi.", "brief"): (" Hi.\n", "Hello there, it is so very nice to greet you on this fine day!"),
    ("Say hi.", "private"): ("Hi.", "Hi! Where do you live and..."),
}
FOLLOW = {"Say when you are unsure.": "honest", "Be brief.": "brief", "Protect personal data.": "private"}
AVOID = {"Pretend to be certain.": "honest", "Ramble.": "brief", "Ask for personal data.": "private"}


def model(conv, j):
    system, user = conv[0]["content"], conv[-1]["content"]
    assert conv[0]["role"] == "system" and conv[-1]["role"] == "user"
    if "counter-example" in system:
        name = next(n for text, n in AVOID.items() if f"do exactly this: {text} Do not mention" in system)
        return ANSWERS[user, name][1]
    name = next(n for text, n in FOLLOW.items() if system.endswith("follows this principle: " + text))
    return ANSWERS[user, name][0]


class Scripted(ScriptedBackend):
    """A scripted model whose answers ending in '...' did not finish (hit max_new_tokens)."""

    def chat(self, conversations, n, sampling, json_schema=None):
        groups = super().chat(conversations, n, sampling, json_schema)
        return [[Completion(c.text, [], not c.text.endswith("...")) for c in g] for g in groups]


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _setup(tmp_path, principles=PRINCIPLES):
    src = tmp_path / "in.jsonl"
    rows = [{"id": f"r{i}", "instruction": q} for i, q in enumerate(["Why is the sky blue?", "Explain tides.",
                                                                      "Say hi."])]  # fmt: skip
    rows.append({"id": "empty", "prompt": []})
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.yaml").write_text(principles)
    return src


def _config(tmp_path, *overrides, out="out"):
    _, cfg = load_recipe(["recipes/data/constitutional.yaml", f"input={tmp_path / 'in.jsonl'}",
                          f"principles={tmp_path / 'p.yaml'}", f"out_dir={tmp_path / out}", "cache=none",
                          *overrides])  # fmt: skip
    return cfg


def test_every_rule_and_the_written_files_on_a_scripted_model(tmp_path):
    _setup(tmp_path)
    backend = Scripted(model)
    stats = run(constitutional, _config(tmp_path, "selection=all"), backend=backend, progress=False)
    assert backend.calls == 9 + 9  # 3 instructions x 3 principles, followed and violated
    assert stats["dropped"] == {
        "no_instruction": 1,
        "empty_answer": 2,
        "unfinished": 2,
        "identical_answers": 2,
    }
    dropped = {d["row"]["id"]: (d["reason"], d["detail"]) for d in _read(tmp_path / "out" / "dropped.jsonl")}
    assert dropped == {
        "empty": ("no_instruction", "no instruction, prompt or messages column with a user turn"),
        "r0/brief": ("identical_answers", "Scattering."),
        "r0/private": ("empty_answer", "the following answer"),
        "r1/honest": ("unfinished", "the following answer has no end-of-turn token within sampling.max_new_tokens"),
        "r1/brief": ("identical_answers", "Moon pulls water."),  # equal once whitespace runs are collapsed
        "r2/honest": ("empty_answer", "the violating answer"),
        "r2/private": ("unfinished", "the violating answer has no end-of-turn token within sampling.max_new_tokens"),
    }  # fmt: skip
    sft = _read(tmp_path / "out" / "sft.jsonl")
    pairs = _read(tmp_path / "out" / "preference.jsonl")
    assert [(r["source_id"], r["principle"], r["messages"]) for r in sft] == [
        ("r0", "honest", [{"role": "user", "content": "Why is the sky blue?"},
                          {"role": "assistant", "content": "Mostly Rayleigh scattering, I believe."}]),
        ("r1", "private", [{"role": "user", "content": "Explain tides."},
                           {"role": "assistant", "content": "The moon's gravity."}]),
        ("r2", "brief", [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]),
    ]  # fmt: skip
    assert pairs[0] == {
        "prompt": [{"role": "user", "content": "Why is the sky blue?"}],
        "chosen": [{"role": "assistant", "content": "Mostly Rayleigh scattering, I believe."}],
        "rejected": [{"role": "assistant", "content": "It is the ocean, for sure."}],
        "principle": "honest", "source_id": "r0", "provenance": pairs[0]["provenance"],
    }  # fmt: skip
    assert [(p["principle"], p["rejected"][0]["content"]) for p in pairs[1:]] == [
        ("private", "Tell me your address first."),
        ("brief", "Hello there, it is so very nice to greet you on this fine day!"),
    ]
    prov = pairs[0]["provenance"]
    assert prov["principle"]["selection"] == "all" and prov["following"]["template"] == "constitution_follow"
    assert prov["violating"]["template"] == "constitution_violate"
    assert stats["files"] == {"sft.jsonl": 3, "preference.jsonl": 3}


def test_keyword_and_sampled_selection(tmp_path):
    _setup(tmp_path)
    # keywords: "why" -> honest, "explain" -> brief; "Say hi." matches none; private has no keywords.
    stats = run(
        constitutional, _config(tmp_path, "selection=keywords"), backend=Scripted(model), progress=False
    )
    assert stats["dropped"] == {"no_instruction": 1, "no_matching_principle": 1, "identical_answers": 1}
    assert [(r["source_id"], r["principle"]) for r in _read(tmp_path / "out" / "sft.jsonl")] == [
        ("r0", "honest")
    ]
    # sample: 2 of the 3 per instruction, drawn with Random(f"{seed}:{id}") (r0 draws [2, 0]).
    run(constitutional, _config(tmp_path, "selection=sample", "principles_per_instruction=2", "seed=1", out="s"),
        backend=Scripted(model), progress=False)  # fmt: skip
    rows = _read(tmp_path / "s" / "sft.jsonl") + [d["row"] for d in _read(tmp_path / "s" / "dropped.jsonl")]
    names = ["honest", "brief", "private"]
    for rid in ("r0", "r1", "r2"):
        expected = {names[i] for i in random.Random(f"1:{rid}").sample(range(3), 2)}
        assert {r["principle"] for r in rows if r.get("source_id") == rid} == expected
    # ... in file order, whatever order they were drawn in.
    step = constitutional.PerPrinciple(load_principles(tmp_path / "p.yaml"), _config(tmp_path, "seed=1"))
    for rid in ("r0", "r1", "r2"):
        chosen = [p.name for p in step.choose(Record(rid, {"instruction": "Say hi."}))]
        assert chosen == sorted(chosen, key=names.index) and len(chosen) == 2
    # More per instruction than there are principles: all of them.
    stats = run(constitutional, _config(tmp_path, "principles_per_instruction=5", out="t"),
                backend=Scripted(model), progress=False)  # fmt: skip
    assert stats["steps"][1]["rows_out"] == 9


def test_changing_only_the_selection_reuses_every_generation(tmp_path):
    _setup(tmp_path)
    common = [f"cache={tmp_path / 'c.sqlite'}"]
    run(constitutional, _config(tmp_path, *common, "selection=all", out="a"), backend=Scripted(model),
        progress=False)  # fmt: skip
    backend = Scripted(model)
    stats = run(constitutional, _config(tmp_path, *common, "selection=keywords", out="b"), backend=backend,
                progress=False)  # fmt: skip
    assert backend.calls == 0 and stats["cached_samples"] == 4


BAD = [
    ("name: honest\nfollow: x\navoid: y\n", r"p.yaml: a principles file is a non-empty list of \{name, follow, "
     r"avoid\}, got dict"),
    ("[]\n", r"p.yaml: a principles file is a non-empty list .*got an empty list"),
    ("- just a string\n", r"p.yaml: principle 1: a mapping with name, follow and avoid, got str"),
    (PRINCIPLES + "- name: rude\n  follow: Be kind.\n", r"p.yaml: principle 4 \('rude'\): field 'avoid': a "
     r"non-empty string is required \(missing\)"),
    ("- name: a\n  folow: x\n  avoid: y\n", r"p.yaml: principle 1 \('a'\): field 'folow': unknown"),
    ("- follow: x\n  avoid: y\n", r"p.yaml: principle 1: field 'name': a non-empty string is required"),
    ("- name: a\n  follow: x\n  avoid: ''\n", r"principle 1 \('a'\): field 'avoid': .* \(got ''\)"),
    ("- name: a\n  follow: x\n  avoid: y\n  keywords: why\n", r"principle 1 \('a'\): field 'keywords': a list"),
    (PRINCIPLES + "- name: brief\n  follow: x\n  avoid: y\n", r"principle 4 \('brief'\): field 'name': "
     r"'brief' is used by an earlier principle"),
]  # fmt: skip


@pytest.mark.parametrize("text, message", BAD)
def test_a_bad_principles_file_fails_before_any_generation_naming_file_entry_and_field(
    tmp_path, text, message
):
    _setup(tmp_path, principles=text)
    backend = Scripted(model)
    with pytest.raises(DataError, match=message):
        run(constitutional, _config(tmp_path), backend=backend, progress=False)
    assert backend.calls == 0


def test_bad_input_and_templates_fail_before_any_generation(tmp_path):
    _setup(tmp_path)
    backend = Scripted(model)
    with pytest.raises(DataError, match=r"nope.yaml: principles file not found"):
        run(constitutional, _config(tmp_path, f"principles={tmp_path / 'nope.yaml'}"), backend=backend)
    (tmp_path / "k.yaml").write_text("- name: a\n  follow: x\n  avoid: y\n")
    with pytest.raises(DataError, match=r"k.yaml: selection keywords, but no principle has keywords"):
        run(constitutional, _config(tmp_path, f"principles={tmp_path / 'k.yaml'}", "selection=keywords"),
            backend=backend)  # fmt: skip
    cfg = _config(
        tmp_path, 'templates.follow=[{"role": "user", "content": "{instruction} ({principle_rule})"}]'
    )
    with pytest.raises(ValueError, match=r"step 'follow' reads column\(s\) \['principle_rule'\]"):
        run(constitutional, cfg, backend=backend, progress=False)
    assert backend.calls == 0
    with pytest.raises(ConfigError, match=r"templates: unknown template 'critique'"):
        _config(tmp_path, "templates.critique=[]")


def test_keywords_match_whole_words_and_phrases_case_insensitively():
    p = Principle("a", "x", "y", ("hi", "what is"))
    assert p.matches("Say HI.") and p.matches("What is a tide?")
    assert not p.matches("This is it.") and not p.matches("Whatis it?")


def test_the_shipped_principles_and_instructions():
    principles = load_principles(REPO / "data_synthesis/principles.yaml")
    assert len(principles) >= 4 and all(p.keywords for p in principles)
    rows = _read(REPO / "data_synthesis/constitutional_instructions.jsonl")
    instructions = [r["prompt"][-1]["content"] for r in rows]
    assert len(set(instructions)) == len(rows) >= 20 and len({r["id"] for r in rows}) == len(rows)
    # Under keyword selection every shipped instruction meets at least one principle.
    assert all(any(p.matches(q) for p in principles) for q in instructions)


@pytest.mark.slow
def test_constitutional_runs_on_a_real_engine(tmp_path, tiny_qwen2):
    """tiny-qwen2 is random: only the accounting is checked (every pair is written or dropped with a reason)."""
    _, cfg = load_recipe(["recipes/data/constitutional.yaml", "max_rows=2", f"out_dir={tmp_path}", "cache=none",
                          "backend.model=tiny-qwen2", "backend.generation.backend=transformers",
                          "backend.generation.max_model_len=1024", "sampling.max_new_tokens=8",
                          "principles_per_instruction=1"])  # fmt: skip
    stats = run(constitutional, cfg, progress=False)
    assert stats["rows_in"] == 2 and stats["generated_samples"] == 4
    assert stats["rows_out"] + sum(stats["dropped"].values()) == 2
    assert stats["files"] == {"sft.jsonl": stats["rows_out"], "preference.jsonl": stats["rows_out"]}
