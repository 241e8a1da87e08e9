"""On-policy negatives: each preference pair's rejected answer becomes the policy's own wrong answer.

    python -m data_synthesis recipes/data/on_policy_negatives.yaml backend.model=outputs/sft

For rows with a prompt, a chosen and a rejected answer and the gold final answer (``data/preference/train.jsonl``):
the policy answers each prompt (greedy by default), the ``math`` reward checks that answer against the gold one,
and where it is wrong it replaces the row's rejected answer. The row's chosen answer stays. A row the policy
answers right keeps its own pair (``keep_own_rejected: true``, the default) or is dropped as ``policy_right``.

Why: the shipped rejected answers are written by templates (a result off by ten, a skipped step), mistakes the
SFT model does not make, so offline DPO on them moves probability the model did not need moved. The policy's
own wrong answer is the mistake it makes (on this project's 135 M model: an arithmetic slip inside a right
plan), and DPO then pushes that down against a right worked answer (on-policy negatives, as in Iterative RPO's
pairs; here with the gold chosen answer, which needs no correct sample). On the chain's SFT model, 206 of the
300 shipped prompts get a new rejected answer; the README's "What moved the numbers" has what DPO on them reads.

It runs on the synthesis engine (``data_synthesis/runner.py``): steps ``pair`` (rows that are not a readable
preference pair are dropped as ``bad_pair``), ``gold`` (``no_gold_answer``), ``sample`` (the policy's
answers, cached), ``verify`` (the ``math`` reward; ``check_steps`` as in rejection sampling) and ``replace``.

Writes into ``out_dir``: ``preference.jsonl`` (``prompt``, ``chosen``, ``rejected``, the row's other columns,
``rejected_source``: ``policy`` or ``row``) and ``stats.json`` (the runner's counts, plus ``replaced``,
``kept_own``, ``unscored`` samples and ``sample_accuracy``). The first wrong answer in sampling order is taken;
an answer cut at ``max_new_tokens`` may be one (it reached no right answer); an unscored or empty one never is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignment.data import DataError, normalize_preference_row
from alignment.generation import SamplingConfig
from data_synthesis.backends import BackendConfig
from data_synthesis.engine import Generate, Map, Record, Step, as_list, write_jsonl
from data_synthesis.rejection_sampling import Verify, has_gold
from data_synthesis.runner import SynthesisConfig


@dataclass
class Config(SynthesisConfig):
    pipeline: str = "on_policy_negatives"
    # Preference rows with the gold final answer (data/preference/train.jsonl or any TRL preference format).
    input: str = "data/preference/train.jsonl"
    out_dir: str = "outputs/data/on_policy_negatives"
    # The policy whose mistakes become the rejected answers (backend.model): the SFT model by default.
    backend: BackendConfig = field(default_factory=lambda: BackendConfig(model="outputs/sft"))
    answer_column: str = "answer"
    # 1 greedy answer: the mistake the policy makes when asked (the evaluation's greedy setting).
    num_samples: int = 1
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=256)
    )
    # A right final answer on a wrong written equation counts as wrong (reward/arithmetic.py).
    check_steps: bool = False
    # A row the policy answers right: keep its own pair (true) or drop it as policy_right (false).
    keep_own_rejected: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")


def first_wrong(texts: list[str], scores: list[float | None], chosen: str) -> str | None:
    """The first answer, in sampling order, that the verifier scored wrong (score < 1), that says something and
    that is not the chosen answer itself; None when there is none (every answer right, unscored or empty: an
    empty assistant turn is no answer to train on, and the trainers refuse it)."""
    for text, score in zip(texts, scores, strict=True):
        if score is not None and score < 1.0 and text.strip() and text != chosen:
            return text
    return None


def _read_pair(r: Record) -> str | None:
    """The row as prompt + chosen + rejected turns (any TRL preference format), or the reason to drop it."""
    try:
        ex = normalize_preference_row(r.data, f"row {r.id}")
    except DataError as e:
        return f"bad_pair: {e}"
    if len(ex.chosen) != 1:
        return f"bad_pair: row {r.id}: field 'chosen': one assistant turn expected, got {len(ex.chosen)}"
    for column, value in (("prompt", ex.prompt), ("chosen", ex.chosen), ("rejected", ex.rejected)):
        if r.data.get(column) != value:
            r.set(column, value, "pair")
    return None


class Replace(Step):
    """The rejected answer becomes the policy's first wrong answer; a row with none keeps its own or is dropped."""

    name = "replace"
    needs = ("chosen", "rejected", "samples", "scores")
    makes = ("rejected", "rejected_source")

    def __init__(self, keep_own_rejected: bool):
        self.keep_own_rejected = keep_own_rejected

    def run(self, records, ctx):
        kept = []
        for r in records:
            texts = as_list(r.data["samples"])
            wrong = first_wrong(texts, r.data["scores"], r.data["chosen"][0]["content"])
            if wrong is not None:
                r.set("rejected", [{"role": "assistant", "content": wrong}], self.name)
                r.set("rejected_source", "policy", self.name)
            elif self.keep_own_rejected:
                r.set("rejected_source", "row", self.name)
            else:
                ctx.drop(r, "policy_right", f"{len(texts)} answer(s), none scored wrong")
                continue
            kept.append(r)
        return kept


def steps(cfg: Config) -> list[Step]:
    return [
        Map("pair", _read_pair, makes=("prompt", "chosen", "rejected")),
        Map("gold", has_gold(cfg.answer_column), makes=(cfg.answer_column,)),
        Generate(
            "sample",
            None,
            "samples",
            n=cfg.num_samples,
            sampling=cfg.sampling,
            conversation="prompt",
            template_name="the row's prompt",
        ),
        Verify(cfg.answer_column, cfg.check_steps),
        Replace(cfg.keep_own_rejected),
    ]


def write(result, cfg: Config, out: Path) -> dict[str, int]:
    own = {"samples", "samples_finished", "scores"}
    rows = []
    for r in result.records:
        row = {k: v for k, v in r.data.items() if k not in own}
        rows.append(row | {"source_id": r.id, "provenance": r.provenance})
    sampled = list(result.records) + [d.record for d in result.dropped if d.step == "replace"]
    scores = [s for r in sampled for s in r.data["scores"]]
    result.stats.update({
        "replaced": sum(r.data["rejected_source"] == "policy" for r in result.records),
        "kept_own": sum(r.data["rejected_source"] == "row" for r in result.records),
        "unscored": sum(s is None for s in scores),
        "sample_accuracy": round(sum(s is not None and s >= 1.0 for s in scores) / max(1, len(scores)), 4),
    })  # fmt: skip
    return {"preference.jsonl": write_jsonl(out / "preference.jsonl", rows)}
