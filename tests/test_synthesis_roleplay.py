"""The role-play pipeline (data_synthesis/roleplay.py): seeded profiles and questions, each consistency rule on
hand-written answers, the exact demonstrations and pairs written, the cache reuse, bad input, and one run on a
tiny random model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alignment.config import ConfigError
from alignment.data import DataError
from alignment.generation import Completion, SamplingConfig
from data_synthesis import roleplay
from data_synthesis.backends import ScriptedBackend
from data_synthesis.engine import Record
from data_synthesis.runner import load_recipe, run

ROOT = Path(__file__).resolve().parents[1]

ADA = {"id": "ada", "name": "Ada Lovelace", "age": 36, "job": "mathematician", "city": "London",
       "hobby": "chess", "favorite_color": "green", "secret": "you cannot swim", "speaking_style": "formally"}  # fmt: skip
BOB = {"id": "bob", "name": "Bob Stone", "age": 52, "job": "baker", "city": "Leeds",
       "hobby": "fishing", "favorite_color": "red", "secret": "you fear the dark", "speaking_style": "bluntly"}  # fmt: skip
PROBES = {"job": ["What do you do for a living?"], "city": ["Where do you live?"],
          "age": ["How old are you?"], "name": ["What is your name?"]}  # fmt: skip
CHAT = "How was your day?"

# (profile name, question) -> the two samples. A text ending in "..." is cut at max_new_tokens.
ANSWERS = {
    ("Ada", "What do you do for a living?"): ["I am a mathematician.", "I bake bread as a baker."],
    ("Ada", "Where do you live?"): ["I live in Leeds.", "As an AI, I live in London."],
    ("Ada", "How old are you?"): ["I'm thirty-six years old.", "I'm 36... no, wait, I'm 40."],
    ("Ada", "What is your name?"): ["My name is Ada.", "My name is Ada."],
    ("Ada", CHAT): ["Lovely, thank you!", "Quiet. I read."],
    ("Bob", "What do you do for a living?"): ["I knead dough all day.", "  "],
    ("Bob", "Where do you live?"): ["Leeds, born and raised.", "I live in Leeds."],
    ("Bob", "How old are you?"): ["I am fifty-two.", "Fifty two, I turned 52 in May."],
    ("Bob", "What is your name?"): ["I am an AI language model.", "Bob."],
    ("Bob", CHAT): ["It was a long day and I...", "Busy at the bakery."],
}


class Backend(ScriptedBackend):
    """Scripted answers; those ending in "..." did not finish."""

    def chat(self, conversations, n, sampling, json_schema=None):
        out = super().chat(conversations, n, sampling, json_schema)
        return [[Completion(c.text, [], not c.text.endswith("...")) for c in group] for group in out]


def respond(conv, j):
    who = re.search(r"You are (\w+)", conv[0]["content"]).group(1)
    return ANSWERS[(who, conv[-1]["content"])][j]


def setup_files(tmp_path: Path, profiles=(ADA, BOB)) -> tuple[Path, Path]:
    prof = tmp_path / "profiles.jsonl"
    prof.write_text("".join(json.dumps(p) + "\n" for p in profiles))
    chat = tmp_path / "chat.txt"
    chat.write_text(f"# one question\n\n{CHAT}\n")
    return prof, chat


def make_cfg(tmp_path: Path, profiles=(ADA, BOB), **kw) -> roleplay.Config:
    prof, chat = setup_files(tmp_path, profiles)
    base = dict(input=str(prof), chitchat_file=str(chat), chitchat_per_profile=1, probes=PROBES, num_samples=2,
                out_dir=str(tmp_path / "out"), cache=str(tmp_path / "cache.sqlite"))  # fmt: skip
    return roleplay.Config(**{**base, **kw})


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------------
# Profiles and questions
# --------------------------------------------------------------------------------------------------------------


def test_faker_profiles_are_seeded_and_every_profile_gets_its_questions():
    cfg = roleplay.Config(num_profiles=3, chitchat_per_profile=2, seed=0)
    rows = roleplay.read_input(cfg)
    again = roleplay.read_input(cfg)
    assert [(r.id, r.data) for r in rows] == [(r.id, r.data) for r in again]
    other = roleplay.read_input(roleplay.Config(num_profiles=3, chitchat_per_profile=2, seed=1))
    assert [r.data["name"] for r in rows] != [r.data["name"] for r in other]
    assert [r.id for r in rows[:6]] == ["p0/job", "p0/city", "p0/age", "p0/name", "p0/chat0", "p0/chat1"]
    assert len(rows) == 3 * 6
    chitchat = roleplay.load_chitchat("")
    for r in rows:
        d = r.data
        assert isinstance(d["age"], int) and 18 <= d["age"] <= 80
        assert d["job"] == d["job"].lower() and not re.search(r"[,/()]", d["job"])
        if d["field"] == "chitchat":
            assert d["question"] in chitchat and d["value"] == "" and d["rivals"] == []
        else:
            assert d["question"] in roleplay.PROBES[d["field"]]
            assert d["value"] == (d["name"].split()[0] if d["field"] == "name" else str(d[d["field"]]))
            assert d["value"] not in d["rivals"]
    many = roleplay.read_input(roleplay.Config(num_profiles=12, chitchat_per_profile=0))
    assert (
        len({r.data["question"] for r in many if r.data["field"] == "job"}) > 1
    )  # a seeded pick of variants
    # the rivals of a probe are the other profiles' values of its field
    cities = [r.data["city"] for r in rows if r.data["field"] == "city"]
    assert rows[1].data["rivals"] == [c for c in cities[1:] if c != cities[0]]


def test_rivals_leave_out_own_value_and_its_parts():
    profiles = [{"name": "Ann Lee", "job": "adult nurse", "city": "York"},
                {"name": "Lee Park", "job": "nurse", "city": "New York"},
                {"name": "Ann Cho", "job": "baker", "city": "York"},
                {"name": "Tom Ray", "job": "baker", "city": "Hull"}]  # fmt: skip
    own = profiles[0]
    assert roleplay.rivals(profiles, own, "job") == ["baker"]  # "nurse" is part of "adult nurse"
    assert roleplay.rivals(profiles, own, "city") == ["New York", "Hull"]
    assert roleplay.rivals(profiles, own, "name") == ["Tom"]  # "Lee" is her surname, "Ann" her own name
    assert roleplay.rivals(profiles, own, "age") == []


# --------------------------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------------------------


def test_number_words_and_age_claims():
    assert [roleplay.number_words(n) for n in (0, 13, 40, 42, 105)] == [
        "zero", "thirteen", "forty", "forty-two", "one hundred and five"]  # fmt: skip
    text = "I'm 42 years old. I\u2019m a forty-two-year-old nurse; I turned 41; I'm 5 minutes away; I'm 100% sure"
    assert roleplay.claimed_ages(text) == [42, 42, 41]
    assert roleplay.claimed_ages("My son is 12 and I have worked here for 20 years.") == []
    assert roleplay.states_value("I am forty two", "age", "42")
    assert roleplay.states_value("Forty.", "age", "40")
    assert not roleplay.states_value("I am forty-two", "age", "40")
    assert not roleplay.states_value("Room 420", "age", "42")
    assert roleplay.states_value("I'm an actuary at a firm", "job", "actuary")
    assert roleplay.states_value("I control air traffic, a controller", "job", "air traffic controller")
    assert not roleplay.states_value("I work in air traffic", "job", "air traffic controller")


def probe(field: str, value: str, answer: str, rivals=()) -> Record:
    return Record("q#0", {"field": field, "value": value, "rivals": list(rivals), "answer": answer,
                          "answer_finished": True})  # fmt: skip


@pytest.mark.parametrize(
    "field, value, answer, rivals, reason",
    [
        ("job", "baker", "I'm a baker in town.", ["nurse"], None),
        ("job", "baker", "I bake, and I am a nurse too.", ["nurse"], "inconsistent_fact"),
        ("job", "baker", "I make bread.", ["nurse"], "missing_fact"),
        ("job", "baker", "Nurses are lovely, I'm a baker.", ["nurse"], None),  # "nurses" is not "nurse"
        ("city", "West Donald", "I live in west   donald!", ["Leeds"], None),
        ("city", "West Donald", "West Donald, near Leeds.", ["Leeds"], "inconsistent_fact"),
        ("name", "Ada", "Ada Lovelace, at your service.", ["Bob"], None),
        ("name", "Ada", "Call me Bob.", ["Bob"], "inconsistent_fact"),
        ("age", "36", "I'm thirty-six.", [], None),
        ("age", "36", "Thirty-six! I turned 36 in May.", [], None),
        ("age", "36", "I am 35, going on 36.", [], "inconsistent_fact"),
        ("age", "36", "Old enough.", [], "missing_fact"),
        ("chitchat", "", "I live in Leeds and I'm 90.", [], None),  # chit-chat has no fact to check
    ],
)
def test_fact_rule(field, value, answer, rivals, reason):
    why = roleplay.check_facts(probe(field, value, answer, rivals))
    assert (why.split(":")[0] if why else None) == reason


def test_character_and_finish_rules():
    check = roleplay.in_character(roleplay.BREAK_PATTERNS)
    for text in ["As an AI, I cannot.", "I\u2019m just a language model.", "I am an assistant.",
                 "I don't have personal experiences.", "I'm SmolLM, made by Hugging Face."]:  # fmt: skip
        assert check(probe("chitchat", "", text)).startswith("broke_character"), text
    for text in ["I am a baker.", "My aim is to bake.", "I said it plainly."]:
        assert check(probe("chitchat", "", text)) is None, text
    assert roleplay.check_finished(probe("job", "x", " \n")) == "empty_answer"
    cut = probe("job", "x", "I am")
    cut.data["answer_finished"] = False
    assert roleplay.check_finished(cut).startswith("unfinished")


# --------------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------------


def test_pipeline_writes_exact_demos_pairs_and_drops(tmp_path):
    cfg = make_cfg(tmp_path)
    backend = Backend(respond)
    stats = run(roleplay, cfg, backend=backend, progress=False)
    assert backend.calls == 10 and stats["generated_samples"] == 20
    assert stats["rows_in"] == 10
    assert stats["dropped"] == {"inconsistent_fact": 3, "broke_character": 2, "missing_fact": 1,
                                "empty_answer": 1, "unfinished": 1}  # fmt: skip
    out = tmp_path / "out"
    sft = read(out / "sft.jsonl")
    demos = {r["source_id"]: r["messages"][-1]["content"] for r in sft}
    assert demos == {
        "ada/job": "I am a mathematician.", "ada/age": "I'm thirty-six years old.", "ada/name": "My name is Ada.",
        "ada/chat0": "Lovely, thank you!", "bob/city": "Leeds, born and raised.", "bob/age": "I am fifty-two.",
        "bob/name": "Bob.", "bob/chat0": "Busy at the bakery.",
    }  # fmt: skip
    first = sft[0]
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][0]["content"].startswith("You are Ada Lovelace, talking with someone")
    assert "- Job: mathematician\n- City where you live: London" in first["messages"][0]["content"]
    assert first["messages"][1]["content"] == "What do you do for a living?"
    assert first["profile_id"] == "ada" and first["field"] == "job"
    assert first["provenance"]["answer"]["step"] == "answer"
    assert first["provenance"]["demos"]["step"] == "select"
    pref = read(out / "preference.jsonl")
    assert [(r["source_id"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["rejected_reason"])
            for r in pref] == [
        ("ada/job", "I am a mathematician.", "I bake bread as a baker.", "inconsistent_fact"),
        ("ada/age", "I'm thirty-six years old.", "I'm 36... no, wait, I'm 40.", "inconsistent_fact"),
        ("bob/name", "Bob.", "I am an AI language model.", "broke_character"),
    ]  # fmt: skip
    assert pref[0]["prompt"] == first["messages"][:2]
    dropped = read(out / "dropped.jsonl")
    assert sorted((d["row"]["id"], d["reason"]) for d in dropped) == [
        ("ada/age#1", "inconsistent_fact"), ("ada/city#0", "inconsistent_fact"),
        ("ada/city#1", "broke_character"), ("ada/job#1", "inconsistent_fact"),
        ("bob/chat0#0", "unfinished"), ("bob/job#0", "missing_fact"), ("bob/job#1", "empty_answer"),
        ("bob/name#0", "broke_character"),
    ]  # fmt: skip
    assert json.loads((out / "stats.json").read_text())["files"] == {"sft.jsonl": 8, "preference.jsonl": 3}


def test_changing_a_filter_reuses_every_generation(tmp_path):
    cfg = make_cfg(tmp_path)
    run(roleplay, cfg, backend=Backend(respond), progress=False)
    backend = Backend(respond)
    cfg2 = make_cfg(tmp_path, rejected_reasons=["unfinished", "broke_character"], demos_per_question=2)
    stats = run(roleplay, cfg2, backend=backend, progress=False)
    assert backend.calls == 0 and stats["generated_samples"] == 0 and stats["cached_samples"] == 20
    pref = read(tmp_path / "out" / "preference.jsonl")
    assert [(r["source_id"], r["rejected_reason"]) for r in pref] == [
        ("bob/name", "broke_character"), ("bob/chat0", "unfinished")]  # fmt: skip
    sft = read(tmp_path / "out" / "sft.jsonl")
    # two distinct consistent answers where there are two; the duplicate "My name is Ada." counts once
    assert [r["source_id"] for r in sft].count("bob/city") == 2
    assert [r["source_id"] for r in sft].count("ada/name") == 1


def test_bad_input_fails_before_generation(tmp_path):
    bad = {k: v for k, v in BOB.items() if k != "job"}
    prof, _ = setup_files(tmp_path, (ADA, bad))
    with pytest.raises(DataError, match=r"profiles.jsonl: row 2: field 'job': missing"):
        roleplay.read_input(roleplay.Config(input=str(prof)))
    prof, _ = setup_files(tmp_path, (ADA, {**BOB, "age": "52"}))
    with pytest.raises(DataError, match=r"row 2: field 'age': expected an integer"):
        roleplay.read_input(roleplay.Config(input=str(prof)))
    # a template field no column provides: a clear error, and not one answer generated
    backend = Backend(respond)
    template = [
        {"role": "system", "content": "You are {name}, feeling {mood}."},
        {"role": "user", "content": "{question}"},
    ]
    with pytest.raises(ValueError, match=r"step 'answer' reads column\(s\) \['mood'\]"):
        run(roleplay, make_cfg(tmp_path, template=template), backend=backend, progress=False)
    # a profile without a column the template reads (hobby): the same check
    no_hobby = {k: v for k, v in ADA.items() if k != "hobby"}
    with pytest.raises(ValueError, match=r"step 'answer' reads column\(s\) \['hobby'\]"):
        run(roleplay, make_cfg(tmp_path, (no_hobby, BOB)), backend=backend, progress=False)
    assert backend.calls == 0


def test_recipe_loads_and_bad_settings_name_the_key():
    module, cfg = load_recipe([str(ROOT / "recipes/data/roleplay.yaml")])
    assert module is roleplay and cfg == roleplay.Config()
    with pytest.raises(ConfigError, match=r"probes.mood: no check for this field"):
        load_recipe([str(ROOT / "recipes/data/roleplay.yaml"), "probes.mood=[How are you]"])
    with pytest.raises(ConfigError, match=r"rejected_reasons: unknown \['too_short'\]"):
        load_recipe([str(ROOT / "recipes/data/roleplay.yaml"), "rejected_reasons=[too_short]"])
    with pytest.raises(ConfigError, match=r"break_patterns: '\(oops' is not a valid regular expression"):
        load_recipe([str(ROOT / "recipes/data/roleplay.yaml"), "break_patterns=['(oops']"])


@pytest.mark.slow
def test_real_engine_on_tiny_model(tmp_path):
    cfg = roleplay.Config(
        num_profiles=1, chitchat_per_profile=1, probes={"age": ["How old are you?"]}, num_samples=2,
        out_dir=str(tmp_path / "out"), cache="none", sampling=SamplingConfig(temperature=1.0, max_new_tokens=8),
    )  # fmt: skip
    cfg.backend.model = "tiny-qwen2"
    cfg.backend.generation.backend = "transformers"
    stats = run(roleplay, cfg, progress=False)
    assert stats["rows_in"] == 2 and stats["generated_samples"] == 4
    kept = sum(s["rows_out"] for s in stats["steps"] if s["step"] == "facts")
    assert kept + sum(stats["dropped"].values()) == 4  # every answer kept or dropped with a reason
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"sft.jsonl", "preference.jsonl", "dropped.jsonl", "stats.json"}
