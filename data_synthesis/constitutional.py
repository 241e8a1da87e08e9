"""Constitutional feedback: answers that follow a principle and answers that break it, as demonstrations and
preference pairs.

    python -m data_synthesis recipes/data/constitutional.yaml [key=value ...]

The Qwen2 report's automated synthesis (section 4.2, "constitutional feedback", after Bai et al. 2022,
"Constitutional AI"): a constitution lists principles to follow and behaviour to avoid; the model is told to
answer in line with a principle, and told to answer against it, and the two answers serve as a demonstration and
as a preference pair. Steps:

1. ``instruction``: the row's instruction (``instruction`` column, or the last user turn of ``prompt`` /
   ``messages``); rows with none are dropped as ``no_instruction``.
2. ``principles``: each instruction becomes one row per principle of the ``principles`` file
   (``load_principles``: a YAML list of ``{name, follow, avoid, keywords?}``), chosen by ``selection``:
   ``all`` (every principle), ``keywords`` (those with a keyword that occurs in the instruction as a whole word
   or phrase, case-insensitive; a principle without keywords never matches) or ``sample``
   (``principles_per_instruction`` of them, drawn with ``random.Random(f"{seed}:{id}")``, kept in file order).
   An instruction with no principle is dropped as ``no_matching_principle``. Row ids are ``{id}/{principle}``.
3. ``follow``: the model answers under ``FOLLOW_TEMPLATE`` (a system message telling it to follow the
   principle's ``follow``).
4. ``violate``: the model answers under ``VIOLATE_TEMPLATE`` (a system message telling it to do what the
   principle's ``avoid`` describes). Both use the same ``sampling``, so the principle is the only difference.
5. ``check``: a row is kept or dropped whole (its demonstration is evidence of following the principle only
   when the violating answer shows the contrast), first rule first: ``empty_answer`` (either answer is empty
   after stripping), ``unfinished`` (either answer stopped at ``sampling.max_new_tokens``, not at the
   end-of-turn token), ``identical_answers`` (the two are equal once whitespace runs are collapsed).

Writes ``sft.jsonl`` (the following answer as ``messages``) and ``preference.jsonl`` (following = chosen,
violating = rejected); every row carries ``principle`` (its name), ``source_id`` (the input row) and
``provenance``. The prompt in both is the bare instruction as a user message: the model is to learn the
principle's behaviour without being told the principle.

Input: by default ``data_synthesis/constitutional_instructions.jsonl``, 24 everyday instructions written for
this project (cleaning, repairs, privacy, advice) on which the shipped principles have something to say; the
math prompts of ``data/prompts`` work too but give little to contrast.

Deliberate simplifications: one model writes both answers; nothing checks that the following answer really
follows the principle (no critique-and-revision loop, no judge), only that the two answers differ. Quality:
SmolLM2-135M mostly ignores the system message: in a 5-row dry run (10 pairs, 256 new tokens) 8 pairs had an
answer cut short, and the 2 kept ones differed in content but barely in the principle (the "concise" answer
was 60 words against 80). The rules remove only identical and broken pairs, not pairs that miss the principle. Point ``backend.model`` at a stronger model (or ``backend.kind: openai`` at
``vllm serve``) for pairs that show the principle.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignment.config import load_yaml
from alignment.data import DataError
from alignment.generation import SamplingConfig
from data_synthesis.engine import (
    Generate,
    Instruction,
    Map,
    Messages,
    Record,
    Step,
    chat_row,
    preference_row,
    write_jsonl,
)
from data_synthesis.runner import SynthesisConfig

# The Qwen2 report's constitution prompts, paraphrased: answer in line with a principle ...
FOLLOW_TEMPLATE: Messages = [
    {
        "role": "system",
        "content": "You are a helpful assistant. Answer the user's request, and make sure your answer follows "
        "this principle: {principle_follow}",
    },
    {"role": "user", "content": "{instruction}"},
]

# ... and against it, as the contrasting (rejected) answer.
VIOLATE_TEMPLATE: Messages = [
    {
        "role": "system",
        "content": "You are writing a counter-example for a training set: an answer to the user's request that "
        "deliberately breaks a principle. Answer the request, and in your answer do exactly this: "
        "{principle_avoid} Do not mention the principle or that the answer is a counter-example.",
    },
    {"role": "user", "content": "{instruction}"},
]

TEMPLATES: dict[str, Messages] = {"follow": FOLLOW_TEMPLATE, "violate": VIOLATE_TEMPLATE}
PRINCIPLE_FIELDS = ("name", "follow", "avoid", "keywords")


@dataclass
class Config(SynthesisConfig):
    pipeline: str = "constitutional"
    input: str = "data_synthesis/constitutional_instructions.jsonl"
    out_dir: str = "outputs/data/constitutional"
    # The constitution: a YAML list of {name, follow, avoid, keywords?}.
    principles: str = "data_synthesis/principles.yaml"
    # Which principles each instruction is answered under: all, keywords (those whose keywords occur), sample.
    selection: Literal["all", "keywords", "sample"] = "sample"
    # selection: sample: principles per instruction (all of them when the file has fewer).
    principles_per_instruction: int = 2
    # follow / violate -> a replacement chat template; fields: {instruction}, {principle}, {principle_follow},
    # {principle_avoid} and any input column. {}: the module's.
    templates: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    # Both answers. 512 tokens: at 256, SmolLM2-135M left 8 of 10 pairs with an answer cut short (dry run).
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.7, max_new_tokens=512)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.templates) - set(TEMPLATES))
        if unknown:
            raise ValueError(f"templates: unknown template {unknown[0]!r} (known: {', '.join(TEMPLATES)})")
        if self.principles_per_instruction < 1:
            raise ValueError(
                f"principles_per_instruction must be >= 1, got {self.principles_per_instruction}"
            )

    def template(self, name: str) -> Messages:
        return self.templates.get(name, TEMPLATES[name])


@dataclass(frozen=True)
class Principle:
    name: str
    follow: str
    avoid: str
    keywords: tuple[str, ...] = ()

    def matches(self, instruction: str) -> bool:
        return any(re.search(rf"\b{re.escape(k)}\b", instruction, re.I) for k in self.keywords)


def load_principles(path: str | Path) -> list[Principle]:
    """The principles of a YAML file; a DataError names the file, the entry and the field that is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: principles file not found")
    data: Any = load_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(data, list) or not data:
        got = "an empty list" if data == [] else type(data).__name__
        raise DataError(
            f"{path}: a principles file is a non-empty list of {{name, follow, avoid}}, got {got}"
        )
    out: list[Principle] = []
    for i, entry in enumerate(data, 1):
        where = f"{path}: principle {i}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: a mapping with name, follow and avoid, got {type(entry).__name__}")
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']!r})"
        for key in entry:
            if key not in PRINCIPLE_FIELDS:
                raise DataError(f"{where}: field {key!r}: unknown (allowed: {', '.join(PRINCIPLE_FIELDS)})")
        for key in ("name", "follow", "avoid"):
            value = entry.get(key)
            if not isinstance(value, str) or not value.strip():
                got = "missing" if value is None else f"got {value!r}"
                raise DataError(f"{where}: field {key!r}: a non-empty string is required ({got})")
        keywords = entry.get("keywords", [])
        if not isinstance(keywords, list) or not all(isinstance(k, str) and k.strip() for k in keywords):
            raise DataError(f"{where}: field 'keywords': a list of non-empty strings, got {keywords!r}")
        if entry["name"] in {p.name for p in out}:
            raise DataError(f"{where}: field 'name': {entry['name']!r} is used by an earlier principle")
        out.append(Principle(entry["name"].strip(), entry["follow"].strip(), entry["avoid"].strip(),
                             tuple(k.strip() for k in keywords)))  # fmt: skip
    return out


class PerPrinciple(Step):
    """One row per (instruction, principle) pair; instructions with no principle are dropped."""

    name = "principles"
    needs = ("instruction",)
    makes = ("principle", "principle_follow", "principle_avoid", "source_id")
    merges = True  # one row becomes several

    def __init__(self, principles: list[Principle], cfg: Config):
        self.principles, self.cfg = principles, cfg

    def choose(self, record: Record) -> list[Principle]:
        if self.cfg.selection == "all":
            return list(self.principles)
        if self.cfg.selection == "keywords":
            return [p for p in self.principles if p.matches(record.data["instruction"])]
        k = min(self.cfg.principles_per_instruction, len(self.principles))
        picked = set(random.Random(f"{self.cfg.seed}:{record.id}").sample(range(len(self.principles)), k))
        return [p for i, p in enumerate(self.principles) if i in picked]

    def run(self, records, ctx):
        out = []
        for r in records:
            chosen = self.choose(r)
            if not chosen:
                ctx.drop(r, "no_matching_principle", f"selection {self.cfg.selection}")
            for p in chosen:
                row = Record(f"{r.id}/{p.name}", dict(r.data), dict(r.provenance))
                made_by = {"principles": self.cfg.principles, "selection": self.cfg.selection}
                for column, value in (("principle", p.name), ("principle_follow", p.follow),
                                      ("principle_avoid", p.avoid), ("source_id", r.id)):  # fmt: skip
                    row.set(column, value, self.name, **made_by)
                out.append(row)
        return out


def _normal(text: str) -> str:
    return " ".join(text.split())


def check(record: Record) -> str | None:
    """The first rule a (following, violating) pair breaks, as 'reason: detail', or None (module docstring)."""
    answers = {"following": record.data["following"], "violating": record.data["violating"]}
    for name, text in answers.items():
        if not text.strip():
            return f"empty_answer: the {name} answer"
    for name in answers:
        if not record.data[name + "_finished"]:
            return f"unfinished: the {name} answer has no end-of-turn token within sampling.max_new_tokens"
    if _normal(answers["following"]) == _normal(answers["violating"]):
        return "identical_answers: " + answers["following"][:120]
    return None


def steps(cfg: Config) -> list[Step]:
    principles = load_principles(cfg.principles)  # a bad file fails here, before any model loads
    if cfg.selection == "keywords" and not any(p.keywords for p in principles):
        raise DataError(f"{cfg.principles}: selection keywords, but no principle has keywords")
    return [
        Instruction(),
        PerPrinciple(principles, cfg),
        Generate(
            "follow",
            cfg.template("follow"),
            "following",
            sampling=cfg.sampling,
            template_name="constitution_follow",
        ),
        Generate(
            "violate",
            cfg.template("violate"),
            "violating",
            sampling=cfg.sampling,
            template_name="constitution_violate",
        ),
        Map("check", check, needs=("following", "following_finished", "violating", "violating_finished")),
    ]


def write(result, cfg: Config, out: Path) -> dict[str, int]:
    sft, pairs = [], []
    for r in result.records:
        prompt = [{"role": "user", "content": r.data["instruction"]}]
        extra = {
            "principle": r.data["principle"],
            "source_id": r.data["source_id"],
            "provenance": r.provenance,
        }
        following, violating = r.data["following"].strip(), r.data["violating"].strip()
        sft.append(chat_row(prompt, following, **extra))
        pairs.append(preference_row(prompt, following, violating, **extra))
    return {"sft.jsonl": write_jsonl(out / "sft.jsonl", sft),
            "preference.jsonl": write_jsonl(out / "preference.jsonl", pairs)}  # fmt: skip
