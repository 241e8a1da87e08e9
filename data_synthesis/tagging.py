"""Ontology extraction (InsTag): fine-grained intent tags for every instruction, normalised into an ontology.

    python -m data_synthesis recipes/data/tagging.yaml [key=value ...]

The Qwen2 report's collaborative annotation starts from InsTag (Lu et al. 2023, "#InsTag: Instruction Tagging
for Analyzing Supervised Fine-tuning of Large Language Models"): a model tags each instruction with open-set,
fine-grained tags, each with a short reason, as JSON; the tags are then normalised into an ontology. Steps:

1. ``instruction``: the row's instruction (``instruction`` column, or the last user turn of ``prompt`` /
   ``messages``); rows with none are dropped as ``no_instruction``.
2. ``tag``: the model answers ``TAG_TEMPLATE`` greedily, constrained to ``TAG_SCHEMA`` (a JSON object with a
   list of ``{"tag", "explanation"}``) where the engine can (vLLM's structured outputs, an endpoint's
   ``response_format``; the transformers backend does not enforce it).
3. ``parse``: the JSON is read; rows whose answer does not parse (``invalid_json``) or holds no usable tag
   (``no_tags``) are dropped. A tag is usable when it has 1..``max_tag_words`` words after normalisation and
   one of them is a word of two or more letters (numbers such as "21" or "8/9" are not tags).
4. ``normalise``: InsTag's rule aggregation, then merging, then frequency filtering, over the whole dataset:
   - rule aggregation: lowercase; every character other than a letter or digit becomes a space; English
     plurals become singular (``lemma``: a rule-based lemmatiser of plural nouns, since WordNet is not available
     offline: "algorithms" -> "algorithm", "queries" -> "query", "boxes" -> "box");
   - merging near-duplicates: tags with the same set of words ("sort algorithm" / "algorithm sort") merge, and
     so do spelling variants: the same number of words, differing in one word whose two spellings are within
     ``merge_ratio`` by ``difflib``'s ratio ("math" / "maths"; a whole-string ratio merged "age calculation"
     into "change calculation" on a real run, so the ratio is taken on the differing word); each group is
     named by its most frequent member. InsTag's semantic aggregation (phrase
     embeddings + DBSCAN) and association aggregation (FP-Growth) are left out: a string rule is what runs
     offline without a second model, and a 135 M tagger's tags are too noisy for co-occurrence mining;
   - frequency filtering: tags used by fewer than ``min_count`` rows are removed from the ontology and from
     the rows; rows left with no tag are dropped as ``only_rare_tags``.

Writes ``tagged.jsonl`` (each row with ``tags``: the normalised tags, and ``tag_explanations``: the model's
reason for each) and ``ontology.json`` (tag -> rows using it, and the raw spellings merged into it; the rare
tags removed). ``recipes/data/selection.yaml`` selects from ``tagged.jsonl``.

Quality on the embedded model: SmolLM2-135M produces valid JSON under the schema but its tags are weak (often
generic: "text", "function"); the frequency filter removes the idiosyncratic ones. Point ``backend.model`` at a
stronger model (or ``backend.kind: openai`` at ``vllm serve``) for a useful ontology.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alignment.generation import SamplingConfig
from data_synthesis.engine import (
    Generate,
    Instruction,
    Map,
    Messages,
    Record,
    Step,
    parse_json_answer,
    write_jsonl,
)
from data_synthesis.runner import SynthesisConfig

# InsTag's tagging prompt (paraphrased from the paper's appendix): open-set tags of the user's intent.
TAG_TEMPLATE: Messages = [
    {"role": "system", "content": (
        "You tag user queries. Identify the intentions behind the query: give up to four short, fine-grained "
        "tags for the skills and topics it needs, each with a one-sentence explanation. Answer only with JSON "
        'of the form {{"tags": [{{"tag": str, "explanation": str}}]}}.')},
    # Two worked examples (one-shot each way), so a small model sees what a tag is; their tags are not in the
    # data, so the model copying them shows up as tags the frequency filter or the ontology makes visible.
    {"role": "user", "content": "User query: Write a haiku about autumn leaves."},
    {"role": "assistant", "content": (
        '{{"tags": [{{"tag": "poetry", "explanation": "asks for a poem"}}, {{"tag": "haiku form", "explanation": '
        '"the poem must follow the 5-7-5 haiku form"}}, {{"tag": "nature imagery", "explanation": "the topic is '
        'autumn leaves"}}]}}')},
    {"role": "user", "content": "User query: A bus travels 90 km in 1.5 hours. What is its average speed?"},
    {"role": "assistant", "content": (
        '{{"tags": [{{"tag": "speed calculation", "explanation": "speed is distance over time"}}, {{"tag": '
        '"division", "explanation": "90 is divided by 1.5"}}, {{"tag": "unit rate", "explanation": "the answer '
        'is in km per hour"}}]}}')},
    {"role": "user", "content": "User query: {instruction}"},
]  # fmt: skip

TAG_SCHEMA = {
    "type": "object",
    "properties": {
        "tags": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "tag": {"type": "string", "maxLength": 40},
                    "explanation": {"type": "string", "maxLength": 100},
                },
                "required": ["tag", "explanation"],
            },
            "minItems": 1,
            "maxItems": 4,
        }
    },
    "required": ["tags"],
}


@dataclass
class Config(SynthesisConfig):
    pipeline: str = "tagging"
    input: str = "data/sft/train.jsonl"
    out_dir: str = "outputs/data/tagging"
    # The tagging prompt: chat messages whose contents may read {instruction} and any input column.
    template: list[dict[str, str]] = field(default_factory=lambda: [dict(m) for m in TAG_TEMPLATE])
    # Enforce TAG_SCHEMA through the engine's structured outputs.
    structured: bool = True
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=256)
    )
    max_tag_words: int = 5
    # Spelling variants within this difflib ratio merge (1.0: only identical word sets merge).
    merge_ratio: float = 0.9
    # Tags used by fewer rows are removed.
    min_count: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.merge_ratio <= 1:
            raise ValueError(f"merge_ratio must be in (0, 1], got {self.merge_ratio}")
        if self.min_count < 1 or self.max_tag_words < 1:
            raise ValueError("min_count and max_tag_words must be >= 1")


_IRREGULAR = {"children": "child", "people": "person", "men": "man", "women": "woman", "data": "data",
              "analyses": "analysis", "indices": "index", "matrices": "matrix", "mice": "mouse"}  # fmt: skip
_KEEP = ("ss", "us", "is", "ics", "ous", "ness", "sis", "xis", "as")


def lemma(word: str) -> str:
    """The singular of an English plural noun by rule (``queries`` -> ``query``); other words unchanged."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or word.endswith(_KEEP) or not word.endswith("s"):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    return word[:-1]


def normalise_tag(tag: str) -> str:
    """Lowercase, non-alphanumerics to spaces, plurals to singular, single spaces."""
    words = re.sub(r"[^0-9a-z]+", " ", tag.lower()).split()
    return " ".join(lemma(w) for w in words)


def merge_tags(counts: Counter, ratio: float) -> dict[str, str]:
    """Map every normalised tag to its group's name. Groups: same word set, or difflib ratio >= ``ratio``
    (single linkage); a group is named by its most used member (ties: the alphabetically first)."""
    tags = sorted(counts, key=lambda t: (-counts[t], t))
    parent = {t: t for t in tags}

    def root(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    def union(a: str, b: str) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:  # the earlier (more used) root names the group
            first, second = sorted((ra, rb), key=tags.index)
            parent[second] = first

    by_words: dict[frozenset, str] = {}
    for t in tags:
        key = frozenset(t.split())
        if key in by_words:
            union(by_words[key], t)
        else:
            by_words[key] = t
    if ratio < 1.0:
        for i, a in enumerate(tags):
            for b in tags[i + 1 :]:
                if spelling_variants(a, b, ratio):
                    union(a, b)
    return {t: root(t) for t in tags}


def spelling_variants(a: str, b: str, ratio: float) -> bool:
    """Two tags with the same number of words that differ in exactly one word, where the two differing words
    are within ``ratio`` by difflib ("math problem" / "maths problem"); "age calculation" / "change
    calculation" differ in a whole word (age / change: 0.67) and stay apart."""
    wa, wb = a.split(), b.split()
    if len(wa) != len(wb):
        return False
    diff = [(x, y) for x, y in zip(wa, wb) if x != y]
    return len(diff) == 1 and difflib.SequenceMatcher(None, *diff[0]).ratio() >= ratio


def _parse(cfg: Config):
    def parse(r: Record) -> str | None:
        try:
            value = parse_json_answer(r.data["tag_answer"])
        except ValueError:
            return "invalid_json: " + r.data["tag_answer"][:120]
        items = value.get("tags") if isinstance(value, dict) else value
        raw: list[dict[str, str]] = []
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and isinstance(item.get("tag"), str):
                tag = item["tag"].strip()
                words = normalise_tag(tag).split()
                # A tag names a skill or topic: it has a word of two letters or more ("21" or "8/9" is not one).
                if 1 <= len(words) <= cfg.max_tag_words and any(re.fullmatch(r"[a-z]{2,}", w) for w in words):
                    raw.append({"tag": tag, "explanation": str(item.get("explanation", "")).strip()})
        if not raw:
            return "no_tags: " + r.data["tag_answer"][:120]
        r.set("raw_tags", raw, "parse")
        return None

    return parse


class Normalise(Step):
    """Rule aggregation, merging and frequency filtering over all rows (see the module docstring)."""

    name = "normalise"
    needs = ("raw_tags",)
    makes = ("tags", "tag_explanations")

    def __init__(self, merge_ratio: float, min_count: int):
        self.merge_ratio, self.min_count = merge_ratio, min_count
        self.ontology: dict[str, dict] = {}
        self.rare: dict[str, int] = {}

    def run(self, records, ctx):
        per_row = [{normalise_tag(t["tag"]): t for t in r.data["raw_tags"]} for r in records]
        counts = Counter(t for tags in per_row for t in tags)
        group = merge_tags(counts, self.merge_ratio)
        usage: Counter = Counter()
        aliases: dict[str, set[str]] = {}
        row_groups = []
        for tags in per_row:
            mine: dict[str, str] = {}
            for norm, item in tags.items():
                g = group[norm]
                mine.setdefault(g, item["explanation"])
                aliases.setdefault(g, set()).add(item["tag"])
            usage.update(mine.keys())
            row_groups.append(mine)
        keep = {g for g, c in usage.items() if c >= self.min_count}
        self.rare = {g: c for g, c in sorted(usage.items()) if g not in keep}
        self.ontology = {
            g: {"count": usage[g], "aliases": sorted(aliases[g])}
            for g in sorted(keep, key=lambda g: (-usage[g], g))
        }
        kept = []
        for r, mine in zip(records, row_groups):
            tags = {g: e for g, e in mine.items() if g in keep}
            if not tags:
                ctx.drop(r, "only_rare_tags", ", ".join(mine))
                continue
            order = sorted(tags, key=lambda g: (-usage[g], g))
            r.set("tags", order, self.name, min_count=self.min_count, merge_ratio=self.merge_ratio)
            r.set("tag_explanations", {g: tags[g] for g in order}, self.name)
            kept.append(r)
        return kept


def steps(cfg: Config) -> list[Step]:
    return [
        Instruction(),
        Generate(
            "tag",
            cfg.template,
            "tag_answer",
            n=1,
            sampling=cfg.sampling,
            json_schema=TAG_SCHEMA if cfg.structured else None,
            template_name="instag_tagging",
        ),  # fmt: skip
        Map("parse", _parse(cfg), needs=("tag_answer",), makes=("raw_tags",)),
        Normalise(cfg.merge_ratio, cfg.min_count),
    ]


def write(result, cfg: Config, out: Path) -> dict[str, int]:
    import json

    drop = {"tag_answer", "tag_answer_finished", "raw_tags"}
    rows = ({k: v for k, v in r.to_row().items() if k not in drop} for r in result.records)
    n = write_jsonl(out / "tagged.jsonl", rows)
    norm = next(s for s in result.steps if isinstance(s, Normalise))
    ontology, rare = norm.ontology, norm.rare
    (out / "ontology.json").write_text(
        json.dumps({"tags": ontology, "removed_rare": rare, "min_count": cfg.min_count}, indent=2) + "\n"
    )
    return {"tagged.jsonl": n, "ontology.json": len(ontology)}
