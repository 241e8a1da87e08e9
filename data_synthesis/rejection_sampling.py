"""Rejection sampling: the policy's own reasoning paths, checked, as SFT demonstrations and preference pairs.

    python -m data_synthesis recipes/data/rejection_sampling.yaml backend.model=outputs/sft

The Qwen2 report's automated synthesis for tasks with a final answer (section 4.2): sample N reasoning paths
per problem from the policy, keep the paths whose final answer the verifier accepts as demonstrations, and pair
correct with incorrect paths as preferences for offline DPO. Here the verifier is the ``math`` reward
(``reward/math_reward.py``) against each row's gold ``answer``; sampling goes through the generation interface
that online DPO and evaluation use (vLLM in this process, transformers as the fallback).

Why the chain's offline DPO trains on these pairs rather than on the shipped synthetic ones: the shipped
rejected answers are written by templates (an answer off by ten, a skipped step) and the SFT model makes other
mistakes (a wrong product in the first step). DPO on the template pairs lowered greedy accuracy on the dev
split (0.325 -> 0.24 at lr 5e-6); the policy's own correct-vs-incorrect paths are the errors it actually makes.

It runs on the synthesis engine (``data_synthesis/runner.py``): steps ``prompt`` (rows without a usable
prompt are dropped as ``bad_prompt``), ``gold`` (rows without the gold answer: ``no_gold_answer``),
``sample`` (N answers, cached: a rerun with other pair settings samples nothing), ``verify`` and ``select``
(rows with no correct finished path are dropped as ``no_correct_path``; a row with correct paths and no
incorrect one gives demonstrations and no pair).

Writes into ``out_dir``:
- ``preference.jsonl``: ``prompt``, ``chosen``, ``rejected`` (+ the row's other columns): per prompt up to
  ``pairs_per_prompt`` pairs, each a different correct and a different incorrect path (seeded choice);
- ``sft.jsonl``: ``messages`` (+ columns): up to ``demos_per_prompt`` distinct correct paths per prompt;
- ``stats.json``: the runner's per-step counts, plus samples, correct samples, prompts with no incorrect path,
  pairs, demos, unfinished samples and samples the verifier could not score.

Rules: an answer that did not finish (no end-of-turn token within ``sampling.max_new_tokens``) is never a
demonstration or a chosen answer (it may be a rejected one: it reached no correct answer); byte-identical
paths count once; a sample the verifier could not score (None) is left out and counted.

Deliberate simplifications: one model, one process. By default answers are compared by their final answer only
(a correct final answer reached by wrong steps passes, as in the report's rejection sampling); ``check_steps:
true`` also asks every equation between plain numbers to hold (``reward/arithmetic.py``).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from alignment.config import run_cli
from alignment.generation import SamplingConfig
from data_synthesis.backends import BackendConfig
from data_synthesis.engine import (
    Generate,
    Map,
    Prompt,
    Record,
    Step,
    as_list,
    chat_row,
    preference_row,
    write_jsonl,
)
from data_synthesis.runner import SynthesisConfig


@dataclass
class Config(SynthesisConfig):
    pipeline: str = "rejection_sampling"
    # Rows with a prompt and the gold answer (data/prompts, data/preference or any TRL prompt format).
    input: str = "data/prompts/train.jsonl"
    out_dir: str = "outputs/data/rejection_sampling"
    # The policy that samples (backend.model): the SFT model by default.
    backend: BackendConfig = field(default_factory=lambda: BackendConfig(model="outputs/sft"))
    # The column holding the gold final answer.
    answer_column: str = "answer"
    num_samples: int = 8
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.8, max_new_tokens=192)
    )
    pairs_per_prompt: int = 2
    demos_per_prompt: int = 1
    # A right final answer counts as a correct path only if every equation it writes holds (the ``arithmetic``
    # reward): "x = -32 / 7 = -6. The answer is -6." is then an incorrect path. Counted as right_answer_wrong_steps.
    check_steps: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 2:
            raise ValueError(
                f"num_samples must be >= 2 to find a correct and an incorrect path, got {self.num_samples}"
            )
        for name in ("pairs_per_prompt", "demos_per_prompt"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class Selection:
    """What one prompt's samples gave: (chosen, rejected) texts and demonstration texts."""

    pairs: list[tuple[str, str]]
    demos: list[str]


def select(
    texts: list[str],
    scores: list[float | None],
    finished: list[bool],
    rng: random.Random,
    pairs_per_prompt: int,
    demos_per_prompt: int,
) -> Selection:
    """Split one prompt's samples into correct (score 1, finished) and incorrect (score < 1) paths, each
    deduplicated in sampling order; pair up to ``pairs_per_prompt`` distinct correct paths with as many distinct
    incorrect ones (a seeded shuffle of each), and keep up to ``demos_per_prompt`` correct paths.
    Unscored (None) samples and unfinished correct ones are neither."""
    correct, wrong = [], []
    for text, score, done in zip(texts, scores, finished, strict=True):
        if score is None:
            continue
        if score >= 1.0:
            if done and text not in correct:
                correct.append(text)
        elif text not in wrong:
            wrong.append(text)
    chosen = rng.sample(correct, len(correct))
    rejected = rng.sample(wrong, len(wrong))
    k = min(pairs_per_prompt, len(chosen), len(rejected))
    return Selection(pairs=list(zip(chosen[:k], rejected[:k])), demos=chosen[:demos_per_prompt])


class Verify(Step):
    """The ``math`` reward of every sample against the row's gold answer (one verifier for the whole run)."""

    name = "verify"
    needs = ("prompt", "samples")
    makes = ("scores",)

    def __init__(self, answer_column: str, check_steps: bool = False):
        self.answer_column = answer_column
        self.check_steps = check_steps
        self.needs = ("prompt", "samples", answer_column)

    def run(self, records, ctx):
        from reward.arithmetic import ArithmeticReward
        from reward.math_reward import MathReward

        verifier = MathReward(answer_column=self.answer_column)
        arithmetic = ArithmeticReward() if self.check_steps else None
        try:
            for r in records:
                texts = as_list(r.data["samples"])  # a bare text when n == 1
                out = verifier([r.data["prompt"]] * len(texts), texts,
                               **{self.answer_column: [r.data[self.answer_column]] * len(texts)})  # fmt: skip
                scores, wrong_steps = list(out.scores), 0
                if arithmetic is not None:  # a right answer on a wrong equation is an incorrect path
                    for j, a in enumerate(arithmetic([r.data["prompt"]] * len(texts), texts).scores):
                        if scores[j] is not None and scores[j] >= 1.0 and a == 0.0:
                            scores[j], wrong_steps = 0.0, wrong_steps + 1
                r.set("scores", scores, self.name, reward="math", answer_column=self.answer_column,
                      check_steps=self.check_steps, right_answer_wrong_steps=wrong_steps)  # fmt: skip
        finally:
            verifier.close()
        return records


class Select(Step):
    name = "select"
    needs = ("samples", "samples_finished", "scores")
    makes = ("pairs", "demos")

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)

    def run(self, records, ctx):
        kept = []
        for r in records:
            scores, done = r.data["scores"], r.data["samples_finished"]
            sel = select(r.data["samples"], scores, done, self.rng, self.cfg.pairs_per_prompt,
                         self.cfg.demos_per_prompt)  # fmt: skip
            if not any(s is not None and s >= 1.0 and d for s, d in zip(scores, done)):
                ctx.drop(r, "no_correct_path", f"{sum(s is None for s in scores)} unscored")
                continue
            r.set("pairs", [list(p) for p in sel.pairs], self.name, seed=self.cfg.seed)
            r.set("demos", sel.demos, self.name)
            kept.append(r)
        return kept


def has_gold(column: str):
    def check(r: Record) -> str | None:
        return (
            None if r.data.get(column) not in (None, "") else f"no_gold_answer: field {column!r} is missing"
        )

    return check


def steps(cfg: Config) -> list[Step]:
    return [
        Prompt(),
        Map("gold", has_gold(cfg.answer_column), makes=(cfg.answer_column,)),  # rows that go on have it
        Generate(
            "sample",
            None,
            "samples",
            n=cfg.num_samples,
            sampling=cfg.sampling,
            conversation="prompt",
            template_name="the row's prompt",
        ),  # fmt: skip
        Verify(cfg.answer_column, cfg.check_steps),
        Select(cfg),
    ]


def write(result, cfg: Config, out: Path) -> dict[str, int]:
    own = {"prompt", "messages", "chosen", "rejected", "samples", "samples_finished", "scores", "pairs", "demos",
           "instruction"}  # fmt: skip
    pref_rows, sft_rows = [], []
    for r in result.records:
        extra = {k: v for k, v in r.data.items() if k not in own}
        extra |= {"source_id": r.id, "provenance": r.provenance}
        pref_rows += [preference_row(r.data["prompt"], c, rj, **extra) for c, rj in r.data["pairs"]]
        sft_rows += [chat_row(r.data["prompt"], d, **extra) for d in r.data["demos"]]
    # Counts over every sampled row (kept, or dropped at select for having no correct path).
    sampled = [r for r in result.records] + [d.record for d in result.dropped if d.step == "select"]
    samples = [s for r in sampled for s in r.data["scores"]]
    finished = [f for r in sampled for f in r.data["samples_finished"]]
    result.stats.update({
        "samples": len(samples),
        "correct": sum(s is not None and s >= 1.0 for s in samples),
        "unscored": sum(s is None for s in samples),
        "unfinished": sum(not f for f in finished),
        "no_incorrect": sum(not any(s is not None and s < 1.0 for s in r.data["scores"]) for r in result.records),
        "right_answer_wrong_steps": sum(r.provenance["scores"].get("right_answer_wrong_steps", 0) for r in sampled),
        "sample_accuracy": round(sum(s is not None and s >= 1.0 for s in samples) / max(1, len(samples)), 4),
    })  # fmt: skip
    return {"preference.jsonl": write_jsonl(out / "preference.jsonl", pref_rows),
            "sft.jsonl": write_jsonl(out / "sft.jsonl", sft_rows)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """``python -m data_synthesis.rejection_sampling RECIPE [key=value ...]``: the runner with this pipeline."""
    from data_synthesis import runner

    args = sys.argv[1:] if argv is None else argv
    if not (args and "=" not in args[0]):
        args = ["pipeline=rejection_sampling", *args]
    module, cfg = runner.load_recipe(args)
    return runner.run(module, cfg)


if __name__ == "__main__":
    run_cli(main)
