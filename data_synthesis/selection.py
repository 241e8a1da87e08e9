"""Instruction selection (InsTag): a complexity-first, diversity-driven pick of tagged instructions under a budget.

    python -m data_synthesis recipes/data/selection.yaml [key=value ...]

Reads the ``tagged.jsonl`` that ``recipes/data/tagging.yaml`` writes (rows with ``instruction`` and ``tags``).
No model is needed: every score is computed from the row and the ontology of the input.

Scores of a row (all written to its ``selection`` column):
- ``complexity``: the number of its tags (InsTag measures complexity by tag count);
- ``rarity``: the mean over its tags of log(N / rows using the tag), N the input rows: rare intents score high;
- ``richness`` (semantic richness): the number of distinct content words of the instruction (lowercased words of
  2+ letters that are not stop words), a proxy for how much it asks;
- ``completeness`` (intent completeness) in [0, 1]: the mean of three checks: at least ``min_words`` words; it is
  a request (``is_request``: a question mark, a sentence opening with a request word such as "write",
  "explain", "how", or "please" / "can you"); no unfinished placeholder ("...", "[insert", "<your", "TODO", "lorem ipsum"). Rows below
  ``min_completeness`` are dropped as ``incomplete_intent`` before the selection.

The selection (InsTag section 4): rows are ordered by complexity, then rarity, richness and completeness
(descending; the input order breaks ties). In a pass, a row is taken when its tags add at least one tag not yet
covered by this pass's picks (diversity); a pass ends at the end of the list; the next pass starts with an empty
coverage over the rows not yet taken. Passes repeat until ``budget`` rows are taken or no row is left. Each
picked row says why: the pass, its rank, the new tags it added and its scores. Rows not picked are dropped as
``over_budget`` (in ``dropped.jsonl``, so nothing is lost).

Writes ``selected.jsonl`` (the picked rows, in pick order, with ``selection``) and, when the rows carry
``messages`` (SFT demonstrations, as ``data/sft`` does), ``sft.jsonl`` with just those demonstrations.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data_synthesis.engine import Record, Step, write_jsonl
from data_synthesis.runner import SynthesisConfig

STOP_WORDS = frozenset("""a an the and or but if then else of to in on at by for with from as is are was were be
been being it its this that these those there here what which who whom whose when where why how do does did
done can could should would will shall may might must i you he she we they me him her us them my your his our
their not no yes so than too very just also all any each every some such only own same other into out up down
over under again once more most few both about above below between through during before after until while""".split())  # fmt: skip

REQUEST_OPENERS = ("write", "explain", "describe", "list", "give", "create", "make", "find", "compute", "calculate",
                   "solve", "sort", "count", "reverse", "translate", "summarize", "summarise", "compare", "name",
                   "tell", "generate", "design", "implement", "how", "what", "why", "when", "where", "which",
                   "who", "please", "can", "could", "would", "suggest", "help", "convert", "classify", "rewrite",
                   "add", "subtract", "multiply", "divide", "identify", "determine", "show", "plan", "draft")  # fmt: skip
PLACEHOLDERS = ("...", "[insert", "<your", "todo", "lorem ipsum", "xxx")


@dataclass
class Config(SynthesisConfig):
    pipeline: str = "selection"
    input: str = "outputs/data/tagging/tagged.jsonl"
    out_dir: str = "outputs/data/selection"
    # How many rows to select.
    budget: int = 100
    min_words: int = 4
    # Rows whose intent completeness is below this are dropped (0: keep all).
    min_completeness: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        if not 0 <= self.min_completeness <= 1:
            raise ValueError(f"min_completeness must be in [0, 1], got {self.min_completeness}")


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z][a-z']+", text.lower()) if w not in STOP_WORDS}


def is_request(text: str) -> bool:
    """A question mark, a sentence that opens with a request word ("write", "explain", "how", ...), or
    "please" / "can you" anywhere."""
    lower = text.lower()
    if "?" in text or any(f"{w} " in lower for w in ("please", "can you")):
        return True
    for sentence in re.split(r"(?<=[.!:;\n])\s+", text.strip()):
        first = re.sub(r"[^a-z]", "", sentence.split()[0].lower()) if sentence.split() else ""
        if first in REQUEST_OPENERS:
            return True
    return False


def completeness(text: str, min_words: int) -> float:
    """Mean of: enough words; a request; no placeholder (see the module docstring)."""
    words = text.split()
    placeholder = any(p in text.lower() for p in PLACEHOLDERS)
    return (float(len(words) >= min_words) + float(is_request(text)) + float(not placeholder)) / 3


def scores(text: str, tags: list[str], usage: Counter, n_rows: int, min_words: int) -> dict[str, float]:
    rarity = sum(math.log(n_rows / usage[t]) for t in tags) / len(tags) if tags else 0.0
    return {"complexity": len(tags), "rarity": round(rarity, 4), "richness": len(content_words(text)),
            "completeness": round(completeness(text, min_words), 4)}  # fmt: skip


def select(rows: list[tuple[list[str], dict[str, float]]], budget: int) -> list[tuple[int, int, list[str]]]:
    """InsTag's greedy selection over (tags, scores) rows. -> (row index, pass, new tags) in pick order."""
    order = sorted(range(len(rows)), key=lambda i: (-rows[i][1]["complexity"], -rows[i][1]["rarity"],
                                                    -rows[i][1]["richness"], -rows[i][1]["completeness"], i))  # fmt: skip
    picked: list[tuple[int, int, list[str]]] = []
    taken: set[int] = set()
    passes = 0
    while len(picked) < budget and len(taken) < len(rows):
        passes += 1
        covered: set[str] = set()
        added = 0
        for i in order:
            if i in taken or len(picked) >= budget:
                continue
            new = [t for t in rows[i][0] if t not in covered]
            if new:
                covered.update(new)
                taken.add(i)
                picked.append((i, passes, new))
                added += 1
        if added == 0:  # rows with no tags can never add one: stop rather than loop
            break
    return picked


class Select(Step):
    name = "select"
    needs = ("instruction", "tags")
    makes = ("selection",)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def run(self, records, ctx):
        usage = Counter(t for r in records for t in set(r.data["tags"]))
        scored = []
        kept: list[Record] = []
        for r in records:
            s = scores(r.data["instruction"], r.data["tags"], usage, len(records), self.cfg.min_words)
            if s["completeness"] < self.cfg.min_completeness:
                ctx.drop(r, "incomplete_intent", f"completeness {s['completeness']}")
                continue
            kept.append(r)
            scored.append((list(r.data["tags"]), s))
        picks = select(scored, self.cfg.budget)
        out = []
        for rank, (i, pass_no, new) in enumerate(picks, 1):
            r = kept[i]
            why = {"rank": rank, "pass": pass_no, "new_tags": new, **scored[i][1]}
            r.set("selection", why, self.name, budget=self.cfg.budget)
            out.append(r)
        chosen = {i for i, _, _ in picks}
        for i, r in enumerate(kept):
            if i not in chosen:
                ctx.drop(r, "over_budget", f"complexity {scored[i][1]['complexity']}")
        return out


def steps(cfg: Config) -> list[Step]:
    return [Select(cfg)]


def write(result, cfg: Config, out: Path) -> dict[str, int]:
    files = {"selected.jsonl": write_jsonl(out / "selected.jsonl", (r.to_row() for r in result.records))}
    demos = [r for r in result.records if isinstance(r.data.get("messages"), list)]
    if demos:
        files["sft.jsonl"] = write_jsonl(
            out / "sft.jsonl",
            (
                {"messages": r.data["messages"], "source_id": r.id, "selection": r.data["selection"]}
                for r in demos
            ),
        )
    return files
