"""Role-play: character profiles, in-role answers, and a consistency check wherever a fact can be checked.

    python -m data_synthesis recipes/data/roleplay.yaml [key=value ...]

The Qwen2 report's data repurposing (section 4.1, automated data synthesis) builds role-play data by taking
detailed character profiles from knowledge repositories, asking a model for instructions and in-role responses,
and keeping the profile's integrity "like a reading comprehension task". Here the profiles are made offline
with a seeded ``faker`` (or read from ``input``, a .jsonl of your own profiles), and integrity is checked by
rules on the facts a question asks for. Steps:

1. ``read_input``: ``num_profiles`` profiles (name, age, job, city from faker; hobby, speaking style, favourite
   colour and a secret from the lists below), each with one fact-probing question per ``probes`` field (a
   seeded pick among its variants: "What do you do for a living?") and ``chitchat_per_profile`` chit-chat
   questions (a seeded sample of ``data_synthesis/roleplay_chitchat.txt`` or ``chitchat_file``). A probe row
   also carries ``rivals``: the other profiles' values of its field (those that are not part of its own value).
2. ``answer``: ``num_samples`` answers per question, the profile as the system prompt (``template``).
3. ``samples``: one row per answer (id ``QUESTION#k``), so that every rejected answer is dropped and counted.
4. ``finished``: ``unfinished`` (cut at ``sampling.max_new_tokens``) or ``empty_answer``.
5. ``in_character``: ``broke_character``: the answer matches one of ``break_patterns`` (says it is an AI, an
   assistant or a language model, names a model vendor).
6. ``facts`` (fact-probing questions only; chit-chat has nothing to verify):
   - ``inconsistent_fact``: the answer claims another value: for job, city and name, another profile's value
     of that field appears as a phrase (whole words, any case); for age, a first-person claim ("I'm 42",
     "I am a forty-two-year-old", "my age is 42", "I turned 42") of any other number;
   - ``missing_fact``: the answer does not state its own value: every word of the job or the city, the given
     name (first word of ``name``), or the age as digits or in words ("42", "forty-two", "forty two").
7. ``select``: per question, up to ``demos_per_question`` distinct consistent answers (sample order) as
   demonstrations, and up to ``pairs_per_question`` (consistent, rejected) pairs, each answer used once, with
   rejected answers taken from the samples dropped for one of ``rejected_reasons``. A question whose answers
   all failed has no row here; its answers are in ``dropped.jsonl`` with their reasons.

Writes ``sft.jsonl`` (system + user + assistant ``messages``) and ``preference.jsonl`` (``prompt`` = system +
user, ``chosen``, ``rejected``, ``rejected_reason``), both with ``source_id`` (the question), ``profile_id``,
``field`` ("chitchat" or the probed field) and ``provenance``.

Deliberate simplifications: profiles are invented (faker's names, jobs and towns) instead of Wikipedia's
characters, and single-turn; only the four facts are verified (a hobby or a secret contradicted in chit-chat
passes); the matching is lexical, so an answer that paraphrases its job ("I crunch numbers for insurers" for
an actuary) counts as ``missing_fact`` and one that mentions another profile's town in passing counts as
``inconsistent_fact``: a lost demonstration, never a wrong one; and an answer that states its job and then
adds an invented one ("I'm an air traffic controller. I'm a flight director") passes. SmolLM2-135M rambles
and drifts from its profile (on a 5-question dry run, 8 of 20 answers ran past 160 tokens and 3 stated another
age or no job); the rules carry the quality, and a stronger model (``backend.model``, or ``backend.kind:
openai`` with ``backend.url``) keeps far more rows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alignment.data import DataError
from alignment.generation import SamplingConfig
from data_synthesis.engine import (
    Generate,
    Map,
    Messages,
    Record,
    Step,
    chat_row,
    preference_row,
    read_rows,
    render,
    write_jsonl,
)
from data_synthesis.runner import SynthesisConfig

CHITCHAT_FILE = Path(__file__).with_name("roleplay_chitchat.txt")

# The profile is the system prompt (the report conditions role-play answers on a character profile).
ROLEPLAY_TEMPLATE: Messages = [
    {
        "role": "system",
        "content": (
            "You are {name}, talking with someone you have just met. Stay in character: answer as {name}, in "
            "the first person, in a few sentences, and never say that you are an AI, an assistant or a language "
            "model.\n\nYour profile:\n- Name: {name}\n- Age: {age}\n- Job: {job}\n- City where you live: {city}\n"
            "- Hobby: {hobby}\n- Favourite colour: {favorite_color}\n- A secret you keep: {secret}\n"
            "- How you speak: {speaking_style}"
        ),
    },
    {"role": "user", "content": "{question}"},
]

# Fact-probing questions: profile field -> the ways a user may ask for it (one is drawn per profile).
PROBES: dict[str, list[str]] = {
    "job": [
        "What do you do for a living?",
        "What is your job?",
        "Where do you work, and what do you do there?",
    ],
    "city": ["Where do you live?", "Which city do you call home?", "What town are you from these days?"],
    "age": ["How old are you?", "May I ask your age?", "How old did you turn on your last birthday?"],
    "name": ["What is your name?", "Sorry, I didn't catch your name. Who are you?"],
}
FIELDS = ("name", "age", "job", "city")

# An answer that matches one of these (case-insensitive) has stepped out of its character.
BREAK_PATTERNS: list[str] = [
    r"\bas an? (?:ai|artificial intelligence|language model|assistant|chatbot)\b",
    r"\b(?:language model|llm)\b",
    r"\bi(?:'m| am) (?:just |only |merely )?(?:an? )?(?:ai|artificial intelligence|virtual assistant|ai assistant"
    r"|chatbot|bot|computer program|assistant)\b",
    r"\bai (?:assistant|model|system)\b",
    r"\bi (?:don't|do not) have (?:a )?(?:personal (?:experiences?|feelings|opinions|life)|a body|feelings)\b",
    r"\b(?:openai|chatgpt|smollm|hugging ?face|qwen)\b",
]

REASONS = ("unfinished", "empty_answer", "broke_character", "inconsistent_fact", "missing_fact")

HOBBIES = [
    "birdwatching", "rock climbing", "baking sourdough bread", "playing the cello", "restoring old bicycles",
    "chess", "growing tomatoes", "writing short stories", "long-distance running", "knitting scarves",
    "collecting vinyl records", "amateur astronomy", "fishing at dawn", "salsa dancing", "building model ships",
    "photographing old buildings", "hiking in the hills", "painting watercolours", "solving crossword puzzles",
    "brewing coffee at home",
]  # fmt: skip
SPEAKING_STYLES = [
    "warmly, with lots of questions back", "tersely, in short sentences", "with dry humour",
    "enthusiastically, with exclamation marks", "formally and politely", "in a slow, thoughtful way",
    "with many cooking metaphors", "cheerfully, with a bit of gossip", "like a patient teacher",
    "shyly, often hedging", "bluntly and honestly", "with old-fashioned expressions",
]  # fmt: skip
SECRETS = [
    "you are afraid of the dark", "you once won a local singing contest", "you cannot swim",
    "you failed your driving test three times", "you secretly write poetry", "you are saving to move abroad",
    "you still sleep with a childhood teddy bear", "you have never seen the sea",
    "you were once briefly famous for a viral video", "you are learning Japanese in secret",
]  # fmt: skip


@dataclass
class Config(SynthesisConfig):
    pipeline: str = "roleplay"
    # "" : invent num_profiles profiles with faker. A .jsonl file: one profile a row (name, age, job, city and
    # every other column the template reads; an optional id).
    input: str = ""
    out_dir: str = "outputs/data/roleplay"
    num_profiles: int = 50
    faker_locale: str = "en_US"
    min_age: int = 18
    max_age: int = 80
    # Chit-chat questions per profile, sampled from chitchat_file ("": data_synthesis/roleplay_chitchat.txt).
    chitchat_per_profile: int = 3
    chitchat_file: str = ""
    # Fact-probing questions: field (name, age, job, city) -> question variants; one question per field.
    probes: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in PROBES.items()})
    # The conversation the model answers: the profile as system prompt, then the question.
    template: list[dict[str, str]] = field(default_factory=lambda: [dict(m) for m in ROLEPLAY_TEMPLATE])
    num_samples: int = 4
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.8, max_new_tokens=160)
    )
    break_patterns: list[str] = field(default_factory=lambda: list(BREAK_PATTERNS))
    demos_per_question: int = 1
    pairs_per_question: int = 1
    # Answers dropped for these reasons are the rejected side of preference pairs.
    rejected_reasons: list[str] = field(
        default_factory=lambda: ["broke_character", "inconsistent_fact", "missing_fact"]
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_profiles < 1 or self.num_samples < 1:
            raise ValueError("num_profiles and num_samples must be >= 1")
        if not 0 <= self.min_age <= self.max_age:
            raise ValueError(f"ages: need 0 <= min_age <= max_age, got {self.min_age}..{self.max_age}")
        if min(self.chitchat_per_profile, self.demos_per_question, self.pairs_per_question) < 0:
            raise ValueError("chitchat_per_profile, demos_per_question and pairs_per_question must be >= 0")
        for name, questions in self.probes.items():
            if name not in FIELDS:
                raise ValueError(
                    f"probes.{name}: no check for this field (checked fields: {', '.join(FIELDS)})"
                )
            if not questions or not all(q.strip() for q in questions):
                raise ValueError(f"probes.{name}: give at least one non-empty question")
        unknown = sorted(set(self.rejected_reasons) - set(REASONS))
        if unknown:
            raise ValueError(f"rejected_reasons: unknown {unknown} (reasons: {', '.join(REASONS)})")
        for p in self.break_patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"break_patterns: {p!r} is not a valid regular expression ({e})") from None


# --------------------------------------------------------------------------------------------------------------
# Profiles and questions
# --------------------------------------------------------------------------------------------------------------


def _faker_jobs(fake) -> list[str]:
    """faker's job titles without a comma, a slash or brackets ("Engineer, civil (contracting)" is left out:
    no one says it that way, so no answer would contain it)."""
    job = next(p for p in fake.get_providers() if type(p).__module__.startswith("faker.providers.job"))
    return [j for j in job.jobs if not re.search(r"[,/()]", j)]


def make_profiles(cfg: Config) -> list[dict]:
    """``num_profiles`` profiles from a faker seeded with ``cfg.seed`` (the same seed: the same profiles)."""
    from faker import Faker

    fake = Faker(cfg.faker_locale)
    fake.seed_instance(cfg.seed)
    jobs = _faker_jobs(fake)
    width = len(str(cfg.num_profiles - 1))
    profiles = []
    for i in range(cfg.num_profiles):
        profiles.append({
            "profile_id": f"p{i:0{width}d}",
            "name": f"{fake.first_name()} {fake.last_name()}",
            "age": fake.random_int(cfg.min_age, cfg.max_age),
            "job": fake.random_element(jobs).lower(),
            "city": fake.city(),
            "hobby": fake.random_element(HOBBIES),
            "favorite_color": fake.safe_color_name(),
            "secret": fake.random_element(SECRETS),
            "speaking_style": fake.random_element(SPEAKING_STYLES),
        })  # fmt: skip
    return profiles


def read_profiles(path: str) -> list[dict]:
    """Profiles from a .jsonl/.json file: each needs a non-empty name, job and city and an integer age."""
    profiles = []
    for n, r in enumerate(read_rows(path), 1):
        for key in ("name", "job", "city"):
            if not isinstance(r.data.get(key), str) or not r.data[key].strip():
                raise DataError(f"{path}: row {n}: field {key!r}: missing or empty (a profile needs it)")
        if not isinstance(r.data.get("age"), int) or isinstance(r.data["age"], bool):
            raise DataError(f"{path}: row {n}: field 'age': expected an integer, got {r.data.get('age')!r}")
        profiles.append({"profile_id": r.id, **r.data})
    return profiles


def load_chitchat(path: str) -> list[str]:
    file = Path(path) if path else CHITCHAT_FILE
    if not file.is_file():
        raise DataError(f"chitchat_file: {file} not found")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    questions = [q for q in lines if q and not q.startswith("#")]
    if not questions:
        raise DataError(f"chitchat_file: {file} holds no question")
    return questions


def fact_value(profile: dict, name: str) -> str:
    """What an answer must state for a field: the given name for ``name``, the value otherwise."""
    value = str(profile[name]).strip()
    return value.split()[0] if name == "name" else value


def rivals(profiles: list[dict], own: dict, name: str) -> list[str]:
    """The other profiles' values of a field that an answer must not claim: distinct, not equal to the own
    value and not a phrase inside it (another profile's "nurse" beside one's own "adult nurse" says nothing)."""
    if name == "age":
        return []  # for age, any other first-person age is a contradiction (see check_facts)
    mine = fact_value(own, name)
    taken = {w.lower() for w in str(own[name]).split()} if name == "name" else set()
    out: list[str] = []
    for p in profiles:
        value = fact_value(p, name)
        if value.lower() in taken or has_phrase(mine, value) or value in out:
            continue
        out.append(value)
    return out


def read_input(cfg: Config) -> list[Record]:
    """One row per (profile, question): the probes first, then the chit-chat, profile after profile."""
    profiles = read_profiles(cfg.input) if cfg.input else make_profiles(cfg)
    chitchat = load_chitchat(cfg.chitchat_file) if cfg.chitchat_per_profile else []
    rng = random.Random(cfg.seed)
    records = []
    for p in profiles:
        pid = p["profile_id"]
        base = dict(p)
        for name, variants in cfg.probes.items():
            data = {**base, "question": rng.choice(variants), "field": name,
                    "value": fact_value(p, name), "rivals": rivals(profiles, p, name)}  # fmt: skip
            records.append(Record(f"{pid}/{name}", data))
        for k, q in enumerate(rng.sample(chitchat, min(cfg.chitchat_per_profile, len(chitchat)))):
            records.append(Record(f"{pid}/chat{k}", {**base, "question": q, "field": "chitchat", "value": "",
                                                     "rivals": []}))  # fmt: skip
    return records


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()  # fmt: skip
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0..999 in English words, hyphenated: 42 -> "forty-two", 105 -> "one hundred and five"."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words: {n} is out of 0..999")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10 - 2] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


_WORD_NUMBERS = {number_words(n).replace("-", " "): n for n in range(200)}
# Longest first, so "forty two" wins over "forty".
_NUM = (
    r"(\d{1,3}|"
    + "|".join(w.replace(" ", r"[\s-]+") for w in sorted(_WORD_NUMBERS, key=len, reverse=True))
    + ")"
)
_NOT_AN_AGE = r"(?!\s*(?:%|(?:percent|minutes?|hours?|days?|weeks?|months?|times|o'clock|am|pm|feet|foot|inches" \
              r"|pounds|kilos?|kg|km|miles|dollars|euros|cents|out of)\b))"  # fmt: skip
_AGE_CLAIMS = [
    re.compile(
        r"\bi(?:'m| am|m) (?:(?:just|only|now|currently) )?(?:an? )?" + _NUM + r"\b" + _NOT_AN_AGE, re.I
    ),
    re.compile(r"\b(?:my age is|i (?:just |have just |'ve just )?turned) " + _NUM + r"\b", re.I),
]


def _parse_number(text: str) -> int:
    if text.isdigit():
        return int(text)
    return _WORD_NUMBERS[" ".join(re.split(r"[\s-]+", text.lower()))]


def claimed_ages(text: str) -> list[int]:
    """The ages an answer claims in the first person ("I'm 42", "I am forty-two years old", "I turned 42")."""
    return [_parse_number(m.group(1)) for rx in _AGE_CLAIMS for m in rx.finditer(_plain(text))]


def _plain(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def has_phrase(text: str, phrase: str) -> bool:
    """``phrase``'s words in order, as whole words, in ``text`` (any case, any punctuation between them)."""
    words = _words(phrase)
    if not words:
        return False
    return re.search(r"(?<![a-z0-9])" + r"[^a-z0-9]+".join(map(re.escape, words)) + r"(?![a-z0-9])",
                     text.lower()) is not None  # fmt: skip


def states_value(text: str, name: str, value: str) -> bool:
    """Whether an answer states the profile's value of a field (see the module docstring)."""
    if name == "age":
        n = int(value)
        if re.search(rf"(?<!\d){n}(?!\d)", text):
            return True
        spoken = number_words(n).replace("-", " ")
        # "forty" must not be the start of "forty-two".
        tail = r"(?![\s-]+(?:one|two|three|four|five|six|seven|eight|nine)\b)" if n % 10 == 0 else ""
        return re.search(r"\b" + spoken.replace(" ", r"[\s-]+") + r"\b" + tail, text, re.I) is not None
    return set(_words(value)) <= set(_words(text))


def check_facts(r: Record) -> str | None:
    """``inconsistent_fact`` / ``missing_fact`` for a fact-probing answer (chit-chat passes)."""
    name, text = r.data["field"], _plain(r.data["answer"])
    if name == "chitchat":
        return None
    value = str(r.data["value"])
    if name == "age":
        other = [a for a in claimed_ages(text) if a != int(value)]
        if other:
            return f"inconsistent_fact: claims age {other[0]}, profile says {value}"
    else:
        claimed = [v for v in r.data["rivals"] if has_phrase(text, v)]
        if claimed:
            return f"inconsistent_fact: says {name} {claimed[0]!r}, profile says {value!r}"
    if not states_value(text, name, value):
        return f"missing_fact: {name} {value!r} not stated"
    return None


def check_finished(r: Record) -> str | None:
    if not r.data["answer"].strip():
        return "empty_answer"
    if not r.data["answer_finished"]:
        return "unfinished: cut at max_new_tokens"
    return None


def in_character(patterns: list[str]) -> Callable[[Record], str | None]:
    compiled = [re.compile(p, re.I) for p in patterns]

    def check(r: Record) -> str | None:
        text = _plain(r.data["answer"])
        for rx in compiled:
            m = rx.search(text)
            if m:
                return f"broke_character: {m.group(0)!r}"
        return None

    return check


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


class Samples(Step):
    """One row per sampled answer (id ``QUESTION#k``), so each answer is checked, kept or dropped on its own."""

    name = "samples"
    needs = ("answers", "answers_finished")
    makes = ("answer", "answer_finished", "sample", "question_id")
    merges = True  # one row in, num_samples rows out

    def run(self, records, ctx):
        out = []
        for r in records:
            texts, done = r.data["answers"], r.data["answers_finished"]
            if not isinstance(texts, list):
                texts, done = [texts], [done]
            base = {k: v for k, v in r.data.items() if k not in ("answers", "answers_finished")}
            made_by = r.provenance.get("answers", {})
            for k, (text, fin) in enumerate(zip(texts, done, strict=True)):
                s = Record(f"{r.id}#{k}", {**base, "question_id": r.id}, dict(r.provenance))
                s.provenance.pop("answers", None)
                s.provenance.pop("answers_finished", None)
                s.set("answer", text, made_by.get("step", "answer"), **_without_step(made_by))
                s.set("answer_finished", fin, self.name)
                s.set("sample", k, self.name)
                out.append(s)
        return out


def _without_step(made_by: dict) -> dict:
    return {k: v for k, v in made_by.items() if k != "step"}


class Select(Step):
    """Per question: demonstrations (distinct consistent answers) and (consistent, rejected) pairs, the rejected
    answers read from this run's dropped samples of the same question."""

    name = "select"
    needs = ("answer", "question_id")
    makes = ("demos", "pairs")
    merges = True  # samples -> one row per question

    def __init__(self, demos_per_question: int, pairs_per_question: int, rejected_reasons: list[str]):
        self.demos, self.pairs, self.rejected_reasons = (
            demos_per_question,
            pairs_per_question,
            rejected_reasons,
        )

    def run(self, records, ctx):
        rejected: dict[str, list[tuple[str, str]]] = {}
        for d in ctx.dropped:
            qid = d.record.data.get("question_id")
            if qid is not None and d.reason in self.rejected_reasons:
                rejected.setdefault(qid, []).append((d.record.data["answer"], d.reason))
        groups: dict[str, list[Record]] = {}
        for r in records:
            groups.setdefault(r.data["question_id"], []).append(r)
        out = []
        for qid, samples in groups.items():
            good = list(dict.fromkeys(s.data["answer"] for s in samples))
            worse: dict[str, str] = {}  # distinct rejected texts in sample order -> their reason
            for text, why in rejected.get(qid, []):
                worse.setdefault(text, why)
            bad = list(worse.items())
            k = min(self.pairs, len(good), len(bad))
            pairs = [{"chosen": c, "rejected": t, "reason": why} for c, (t, why) in zip(good[:k], bad[:k])]
            first = samples[0]
            data = {c: v for c, v in first.data.items() if c not in ("answer", "answer_finished", "sample")}
            rec = Record(qid, data, {c: p for c, p in first.provenance.items() if c in data or c == "answer"})
            rec.set("demos", good[: self.demos], self.name)
            rec.set("pairs", pairs, self.name, rejected_reasons=list(self.rejected_reasons))
            out.append(rec)
        return out


def steps(cfg: Config) -> list[Step]:
    return [
        Generate(
            "answer",
            cfg.template,
            "answers",
            n=cfg.num_samples,
            sampling=cfg.sampling,
            template_name="roleplay_profile",
        ),  # fmt: skip
        Samples(),
        Map("finished", check_finished, needs=("answer", "answer_finished")),
        Map("in_character", in_character(cfg.break_patterns), needs=("answer",)),
        Map("facts", check_facts, needs=("answer", "field", "value", "rivals")),
        Select(cfg.demos_per_question, cfg.pairs_per_question, cfg.rejected_reasons),
    ]


def write(result, cfg: Config, out: Path) -> dict[str, int]:
    sft, pref = [], []
    for r in result.records:
        prompt = render(cfg.template, r.data)
        extra = {"source_id": r.id, "profile_id": r.data["profile_id"], "field": r.data["field"],
                 "provenance": r.provenance}  # fmt: skip
        sft += [chat_row(prompt, demo, **extra) for demo in r.data["demos"]]
        pref += [
            preference_row(prompt, p["chosen"], p["rejected"], rejected_reason=p["reason"], **extra)
            for p in r.data["pairs"]
        ]
    return {"sft.jsonl": write_jsonl(out / "sft.jsonl", sft),
            "preference.jsonl": write_jsonl(out / "preference.jsonl", pref)}  # fmt: skip
