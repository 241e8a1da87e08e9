"""Evol-Instruct: harder and rarer rewrites of every instruction, with the paper's elimination rules.

    python -m data_synthesis recipes/data/evolution.yaml [key=value ...]

The Qwen2 report's automated data synthesis grows its instruction set by evolution (Xu et al. 2023, "WizardLM:
Empowering Large Language Models to Follow Complex Instructions"): a model rewrites each instruction with an
evolving prompt, the failed rewrites are eliminated, and a model answers the rest. Steps, per round
``r = 1..rounds`` (each round evolves the previous round's survivors):

1. ``instruction`` (once): the row's instruction (``instruction`` column, or the last user turn of ``prompt`` /
   ``messages``); rows with none are dropped as ``no_instruction``.
2. ``choose_r``: one operation from ``operations``, drawn per row with ``random.Random(f"{seed}:{id}:{r}")``
   (the same row gets the same operation whatever else is in the run; list a name twice to double its chance).
   In-depth operations (``IN_DEPTH_TEMPLATE`` with one method each): ``add_constraints``, ``deepening``,
   ``concretizing``, ``increase_reasoning``; in-breadth: ``breadth`` (``BREADTH_TEMPLATE``: a new instruction
   of the same domain, about a rarer topic). The paper's fifth in-depth method, complicating the input, needs
   instructions with an input part and is left out.
3. ``evolve_r``: the model answers the operation's prompt (``#Given Prompt#`` / ``#Rewritten Prompt#``).
4. ``eliminate_r``: the rewrite (stripped of surrounding whitespace and quotes) is dropped, first rule first, as
   - ``unfinished_rewrite``: it stopped at ``evolve_sampling.max_new_tokens``, not at the end-of-turn token;
   - ``degenerate``: empty, only punctuation and stop words (``STOP_WORDS``), or repeated text (at least 6 word
     trigrams of which under ``min_distinct_trigrams`` are distinct);
   - ``too_short``: fewer than ``min_words`` words;
   - ``copied_template_words``: it contains one of ``template_words`` (case-insensitive: "given prompt",
     "rewritten prompt", ...), i.e. it copied the evolving prompt (the paper's rule 4);
   - ``no_new_information`` (the paper's rule 1, for which WizardLM asks ChatGPT whether the two are equal):
     here, the lowercased, whitespace-collapsed texts have a ``difflib.SequenceMatcher`` ratio >=
     ``max_similarity``, or the rewrite has no content word (a word outside ``STOP_WORDS``) the original lacks;
   - ``not_a_request``: it is not an instruction any more (``selection.is_request``: no question mark, no
     sentence opening with a request word, no "please" / "can you"), e.g. an answer instead of a rewrite.
5. ``answer_r`` and ``check_answer_r`` (with ``answer: true``): the model answers the evolved instruction; the
   paper's rules 2 and 3 (the evolved instruction makes it hard to respond) drop it as ``unfinished_answer``
   (no end-of-turn token within ``answer_sampling.max_new_tokens``), ``degenerate_answer`` (empty, only
   punctuation and stop words, repeated text) or ``refusal`` ("sorry" in an answer under ``refusal_max_words``
   words; the paper's threshold is 80).
6. ``accept_r``: the evolution is appended to the row's ``evolutions`` and becomes its ``instruction`` for the
   next round.

A row eliminated in round r stops evolving; the evolutions it passed in earlier rounds stay in the output (as
in WizardLM, whose final set merges every round's instructions), so ``write`` reads them off the dropped rows
too. Writes ``instructions.jsonl`` (one row per accepted evolution: ``prompt`` (the evolved instruction as a
user message), ``original`` (the instruction it rewrote), ``root`` (the input row's instruction),
``operation``, ``round``, ``source_id``, ``provenance``) and, with answers, ``sft.jsonl`` (the same, as
``messages`` with the answer). The input row's other columns (a gold ``answer``) are not carried: they belong to
the original instruction, not to its rewrite.

Deliberate simplifications: string rules stand in for the ChatGPT equality judge; one model evolves and
answers; no complicate-input operation. Quality: SmolLM2-135M often answers the instruction instead of
rewriting it. In a 5-row dry run on the math prompts, 2 rewrites rambled past 160 tokens, 2 copied "given
prompt" / "rewritten prompt", and the one kept was a statement ("The area of a rectangular tabletop is 7m * 15m
= 105m².") rather than an instruction; the ``not_a_request`` rule was added for that case. Point ``backend.model`` at a stronger model (or
``backend.kind: openai`` at ``vllm serve``) for a useful set.
"""

from __future__ import annotations

import difflib
import random
import re
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
    chat_row,
    template_fields,
    write_jsonl,
)
from data_synthesis.runner import SynthesisConfig
from data_synthesis.selection import is_request

# WizardLM's in-depth evolving prompt (its appendix), paraphrased; {method} is one of IN_DEPTH_METHODS.
IN_DEPTH_TEMPLATE = (
    "You are a prompt rewriter. Rewrite the given prompt into a harder version that a strong AI assistant "
    "would find more demanding. The rewritten prompt must stay reasonable: a person must be able to understand "
    "and answer it. Keep every part of the given prompt, including any table, code or input it contains.\n"
    "Make it harder with this method: {method}\n"
    "Do not make it wordy: add only 10 to 20 words. Write only the rewritten prompt; the words "
    "'#Given Prompt#', '#Rewritten Prompt#', 'given prompt' and 'rewritten prompt' must not appear in it.\n\n"
    "#Given Prompt#:\n{instruction}\n\n#Rewritten Prompt#:"
)

IN_DEPTH_METHODS = {
    "add_constraints": "add one more constraint or requirement to the prompt.",
    "deepening": "if the prompt asks about a particular issue, ask about it in more depth and breadth.",
    "concretizing": "replace general concepts in the prompt with more specific ones.",
    "increase_reasoning": "if the prompt can be solved with a few simple thinking steps, rewrite it so that "
    "it explicitly asks for reasoning in several steps.",
}

# WizardLM's in-breadth evolving prompt, paraphrased.
BREADTH_TEMPLATE = (
    "You are a prompt creator. Take inspiration from the given prompt and write a brand-new prompt. It must "
    "belong to the same domain as the given prompt but be about a rarer topic, with similar length and "
    "difficulty. The new prompt must be reasonable: a person must be able to understand and answer it. Write "
    "only the new prompt; the words '#Given Prompt#', '#Created Prompt#', 'given prompt' and 'created prompt' "
    "must not appear in it.\n\n#Given Prompt#:\n{instruction}\n\n#Created Prompt#:"
)

# operation -> the evolving prompt (a user message reading {instruction}).
TEMPLATES: dict[str, str] = {
    **{op: IN_DEPTH_TEMPLATE.replace("{method}", method) for op, method in IN_DEPTH_METHODS.items()},
    "breadth": BREADTH_TEMPLATE,
}
OPERATIONS = tuple(TEMPLATES)

# English function words: a text made only of these (and punctuation) says nothing.
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having he
    her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor
    not now of off on once only or other our ours ourselves out over own same she should so some such than that
    the their theirs them themselves then there these they this those through to too under until up very was we
    were what when where which while who whom why will with would you your yours yourself yourselves ok okay
    yes please thanks thank sure here's it's i'm let let's""".split()
)


@dataclass
class Config(SynthesisConfig):
    pipeline: str = "evolution"
    input: str = "data/prompts/train.jsonl"
    out_dir: str = "outputs/data/evolution"
    # Operations drawn from, uniformly per row and round (a name listed twice is drawn twice as often).
    operations: list[str] = field(default_factory=lambda: list(OPERATIONS))
    # Rounds of evolution; round r evolves round r-1's accepted instructions.
    rounds: int = 1
    # Answer each evolved instruction (sft.jsonl) and apply the answer rules.
    answer: bool = True
    # operation -> a replacement evolving prompt (a user message reading {instruction}); {}: the module's.
    templates: dict[str, str] = field(default_factory=dict)
    evolve_sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.7, max_new_tokens=160)
    )
    answer_sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.7, max_new_tokens=384)
    )
    # Elimination rules (module docstring).
    min_words: int = 5
    max_similarity: float = 0.9
    min_distinct_trigrams: float = 0.5
    template_words: list[str] = field(
        default_factory=lambda: [
            "given prompt",
            "rewritten prompt",
            "created prompt",
            "prompt rewriter",
            "prompt creator",
        ]  # fmt: skip
    )
    refusal_max_words: int = 80

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not self.operations:
            raise ValueError(f"operations is empty: name at least one of {', '.join(OPERATIONS)}")
        for name in [*self.operations, *self.templates]:
            if name not in OPERATIONS:
                raise ValueError(f"unknown operation {name!r} (known: {', '.join(OPERATIONS)})")
        for op, text in self.templates.items():
            fields = template_fields(text)
            if fields != {"instruction"}:
                raise ValueError(
                    f"templates.{op}: an evolving prompt reads exactly one field, {{instruction}}; "
                    f"this one reads {sorted(fields) or 'none'}"
                )
        if not 0 < self.max_similarity <= 1 or not 0 <= self.min_distinct_trigrams <= 1:
            raise ValueError("max_similarity must be in (0, 1] and min_distinct_trigrams in [0, 1]")
        if self.min_words < 1 or self.refusal_max_words < 0:
            raise ValueError("min_words must be >= 1 and refusal_max_words >= 0")

    def template(self, op: str) -> str:
        return self.templates.get(op, TEMPLATES[op])


# --------------------------------------------------------------------------------------------------------------
# The rules, as pure functions of text
# --------------------------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if w not in STOP_WORDS}


def degenerate(text: str, min_distinct_trigrams: float) -> str | None:
    """Why a text says nothing (empty, only punctuation and stop words, repeated text), or None."""
    if not text.strip():
        return "empty"
    ws = words(text)
    if not content_words(text):
        return "only punctuation and stop words"
    trigrams = list(zip(ws, ws[1:], ws[2:]))
    if len(trigrams) >= 6 and len(set(trigrams)) / len(trigrams) < min_distinct_trigrams:
        return f"repeated text ({len(set(trigrams))} distinct of {len(trigrams)} word trigrams)"
    return None


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def no_new_information(original: str, evolved: str, max_similarity: float) -> str | None:
    """Why the evolved instruction adds nothing over the original, or None (module docstring, rule 1)."""
    ratio = difflib.SequenceMatcher(None, _normal(original), _normal(evolved), autojunk=False).ratio()
    if ratio >= max_similarity:
        return f"similarity {ratio:.3f} >= {max_similarity}"
    if not content_words(evolved) - content_words(original):
        return "no content word the original lacks"
    return None


def clean_rewrite(text: str) -> str:
    """The rewrite without surrounding whitespace and one pair of surrounding quotes."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def eliminate(original: str, rewrite: str, finished: bool, cfg: Config) -> str | None:
    """The first elimination rule a rewrite breaks, as 'reason: detail', or None (module docstring, step 4)."""
    if not finished:
        return "unfinished_rewrite: no end-of-turn token within evolve_sampling.max_new_tokens"
    why = degenerate(rewrite, cfg.min_distinct_trigrams)
    if why:
        return "degenerate: " + why
    if len(words(rewrite)) < cfg.min_words:
        return f"too_short: {len(words(rewrite))} words < min_words {cfg.min_words}"
    low = rewrite.lower()
    copied = [w for w in cfg.template_words if w.lower() in low]
    if copied:
        return "copied_template_words: " + ", ".join(copied)
    why = no_new_information(original, rewrite, cfg.max_similarity)
    if why:
        return "no_new_information: " + why
    if not is_request(rewrite):
        return "not_a_request: no question mark, request opening, 'please' or 'can you'"
    return None


def check_answer(answer: str, finished: bool, cfg: Config) -> str | None:
    """The paper's 'hard to respond' rules on the answer to an evolved instruction (module docstring, step 5)."""
    if not finished:
        return "unfinished_answer: no end-of-turn token within answer_sampling.max_new_tokens"
    why = degenerate(answer, cfg.min_distinct_trigrams)
    if why:
        return "degenerate_answer: " + why
    n = len(words(answer))
    if "sorry" in answer.lower() and n < cfg.refusal_max_words:
        return f"refusal: 'sorry' in a {n}-word answer"
    return None


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


def _ask(column: str) -> Messages:
    """A one-turn conversation whose user message is a column's text."""
    return [{"role": "user", "content": "{" + column + "}"}]


def round_steps(cfg: Config, r: int) -> list[Step]:
    """The steps of round ``r``: choose an operation, evolve, eliminate, answer, check the answer, accept."""
    op_col, prompt_col, rewrite_col = f"operation_{r}", f"evolve_prompt_{r}", f"rewrite_{r}"
    evolved_col, response_col = f"evolved_{r}", f"response_{r}"

    def choose(rec: Record) -> None:
        op = random.Random(f"{cfg.seed}:{rec.id}:{r}").choice(cfg.operations)
        rec.set(op_col, op, f"choose_{r}", seed=cfg.seed)
        prompt = cfg.template(op).format(instruction=rec.data["instruction"])
        rec.set(prompt_col, prompt, f"choose_{r}", template=op)

    def check(rec: Record) -> str | None:
        rewrite = clean_rewrite(rec.data[rewrite_col])
        why = eliminate(rec.data["instruction"], rewrite, rec.data[rewrite_col + "_finished"], cfg)
        if not why:
            rec.set(evolved_col, rewrite, f"eliminate_{r}")
        return why

    def accept(rec: Record) -> None:
        before = rec.data.get("evolutions", [])
        evolution = {
            "round": r,
            "operation": rec.data[op_col],
            "instruction": rec.data[evolved_col],
            "original": rec.data["instruction"],
            "root": before[0]["root"] if before else rec.data["instruction"],
            "provenance": dict(rec.provenance),
        }
        if cfg.answer:
            evolution["answer"] = rec.data[response_col].strip()
        rec.set("evolutions", [*before, evolution], f"accept_{r}")
        rec.set("instruction", rec.data[evolved_col], f"accept_{r}", round=r)

    def answer_rules(rec: Record) -> str | None:
        return check_answer(rec.data[response_col], rec.data[response_col + "_finished"], cfg)

    steps: list[Step] = [
        Map(f"choose_{r}", choose, needs=("instruction",), makes=(op_col, prompt_col)),
        Generate(
            f"evolve_{r}",
            _ask(prompt_col),
            rewrite_col,
            sampling=cfg.evolve_sampling,
            template_name="evol_instruct",
        ),
        Map(
            f"eliminate_{r}",
            check,
            needs=("instruction", rewrite_col, rewrite_col + "_finished"),
            makes=(evolved_col,),
        ),
    ]
    if cfg.answer:
        steps += [
            Generate(
                f"answer_{r}",
                _ask(evolved_col),
                response_col,
                sampling=cfg.answer_sampling,
                template_name="answer",
            ),
            Map(f"check_answer_{r}", answer_rules, needs=(response_col, response_col + "_finished")),
        ]
    steps.append(Map(f"accept_{r}", accept, needs=(op_col, evolved_col), makes=("instruction", "evolutions")))
    return steps


def steps(cfg: Config) -> list[Step]:
    out: list[Step] = [Instruction()]
    for r in range(1, cfg.rounds + 1):
        out += round_steps(cfg, r)
    return out


def write(result, cfg: Config, out: Path) -> dict[str, int]:
    """One row per accepted evolution, from the rows that passed every round and from those eliminated in a
    later round (their earlier evolutions stand)."""
    records = [*result.records, *(d.record for d in result.dropped)]
    evolutions = [(rec.id, e) for rec in records for e in rec.data.get("evolutions", [])]

    def extra(rid: str, e: dict) -> dict:
        return {"original": e["original"], "root": e["root"], "operation": e["operation"], "round": e["round"],
                "source_id": rid, "provenance": e["provenance"]}  # fmt: skip

    def prompt(e: dict) -> Messages:
        return [{"role": "user", "content": e["instruction"]}]

    rows = [{"prompt": prompt(e), **extra(rid, e)} for rid, e in evolutions]
    files = {"instructions.jsonl": write_jsonl(out / "instructions.jsonl", rows)}
    if cfg.answer:
        sft = [chat_row(prompt(e), e["answer"], **extra(rid, e)) for rid, e in evolutions]
        files["sft.jsonl"] = write_jsonl(out / "sft.jsonl", sft)
    return files
