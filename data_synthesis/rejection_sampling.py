"""Rejection sampling: the policy's own reasoning paths, checked, as SFT demonstrations and preference pairs.

    python -m data_synthesis.rejection_sampling recipes/rejection_sampling.yaml model=outputs/sft

The Qwen2 report's automated synthesis for tasks with a final answer (section 4.2): sample N reasoning paths
per problem from the policy, keep the paths whose final answer the verifier accepts as demonstrations, and pair
correct with incorrect paths as preferences for offline DPO. Here the verifier is the ``math`` reward
(``reward/math_reward.py``) against each row's gold ``answer``; sampling goes through the generation interface
that online DPO and evaluation use (vLLM in this process, transformers as the fallback).

Why the chain's offline DPO trains on these pairs rather than on the shipped synthetic ones: the shipped
rejected answers are written by templates (an answer off by ten, a skipped step) and the SFT model makes other
mistakes (a wrong product in the first step). DPO on the template pairs lowered greedy accuracy on the dev
split (0.325 -> 0.24 at lr 5e-6); the policy's own correct-vs-incorrect paths are the errors it actually makes.

Writes into ``out_dir``:
- ``preference.jsonl``: ``prompt``, ``chosen``, ``rejected`` (+ the row's other columns): per prompt up to
  ``pairs_per_prompt`` pairs, each a different correct and a different incorrect path (seeded choice);
- ``sft.jsonl``: ``messages`` (+ columns): up to ``demos_per_prompt`` distinct correct paths per prompt;
- ``stats.json``: prompts, samples, correct samples, prompts with no correct / no incorrect path, pairs, demos,
  unfinished samples, samples the verifier could not score, seconds and tokens per second.

Rules: an answer that did not finish (no end-of-turn token within ``sampling.max_new_tokens``) is never a
demonstration or a chosen answer (it may be a rejected one: it reached no correct answer); byte-identical
paths count once; a sample the verifier could not score (None) is left out and counted.

Deliberate simplifications: one model, one process; answers are compared by their final answer only (a
correct final answer reached by wrong steps passes, as in the report's rejection sampling).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignment.config import ConfigError, parse_cli, run_cli, to_dict
from alignment.data import DataError
from alignment.evaluation import load_prompts, sample
from alignment.generation import GenerationConfig, SamplingConfig, make_generator
from alignment.models import load_tokenizer, resolve_model


@dataclass
class RejectionSamplingConfig:
    # The policy that samples: a model folder or a built-in name.
    model: str = "outputs/sft"
    # Rows with a prompt and the gold answer (data/prompts, data/preference or any TRL prompt format).
    prompts: str = "data/prompts/train.jsonl"
    # The first N rows (0: all).
    max_prompts: int = 0
    # The column holding the gold final answer.
    answer_column: str = "answer"
    num_samples: int = 8
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.8, max_new_tokens=192)
    )
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    dtype: Literal["float32", "bfloat16"] = "float32"
    pairs_per_prompt: int = 2
    demos_per_prompt: int = 1
    seed: int = 0
    out_dir: str = "outputs/rejection_sampling"

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError(
                f"num_samples must be >= 2 to find a correct and an incorrect path, got {self.num_samples}"
            )
        for name in ("pairs_per_prompt", "demos_per_prompt", "max_prompts"):
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


def main(argv: list[str] | None = None) -> dict:
    from reward.math_reward import MathReward

    args = sys.argv[1:] if argv is None else argv
    cfg: RejectionSamplingConfig = parse_cli(RejectionSamplingConfig, args)
    where = args[0] if args and "=" not in args[0] else "command line"
    t0 = time.perf_counter()

    # Data first: a bad row or a missing answer column fails before any model loads.
    if not Path(cfg.prompts).is_file():
        raise ConfigError(f"{where}: prompts: {cfg.prompts} is not a file")
    examples = load_prompts(cfg.prompts, cfg.max_prompts)
    for i, ex in enumerate(examples, 1):
        if ex.columns.get(cfg.answer_column) in (None, ""):
            raise DataError(f"{cfg.prompts}: row {i}: field {cfg.answer_column!r}: missing (the gold answer)")
    try:
        path = resolve_model(cfg.model)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{where}: model: {e}") from None
    tokenizer = load_tokenizer(path)

    print(
        f"[rejection sampling] {len(examples)} prompts x {cfg.num_samples} samples from {cfg.model}",
        flush=True,
    )
    generator = make_generator(cfg.generation, path, tokenizer, cfg.dtype)
    t_gen = time.perf_counter()
    answers = sample(generator, tokenizer, examples, cfg.num_samples, cfg.sampling)
    t_gen = time.perf_counter() - t_gen
    generator.close()

    verifier = MathReward(answer_column=cfg.answer_column)
    flat = [c for a in answers for c in a]
    golds = [ex.columns[cfg.answer_column] for ex, a in zip(examples, answers) for _ in a]
    scored = verifier([ex.prompt for ex, a in zip(examples, answers) for _ in a], [c.text for c in flat],
                      **{cfg.answer_column: golds})  # fmt: skip
    verifier.close()

    rng = random.Random(cfg.seed)
    pref_rows, sft_rows = [], []
    stats = dict.fromkeys(("no_correct", "no_incorrect", "unfinished", "unscored", "correct"), 0)
    i = 0
    for ex, group in zip(examples, answers):
        scores = scored.scores[i : i + len(group)]
        i += len(group)
        stats["correct"] += sum(s is not None and s >= 1.0 for s in scores)
        stats["unscored"] += sum(s is None for s in scores)
        stats["unfinished"] += sum(not c.finished for c in group)
        sel = select([c.text for c in group], scores, [c.finished for c in group], rng,
                     cfg.pairs_per_prompt, cfg.demos_per_prompt)  # fmt: skip
        if not any(s is not None and s >= 1.0 and c.finished for s, c in zip(scores, group)):
            stats["no_correct"] += 1
        if not any(s is not None and s < 1.0 for s in scores):
            stats["no_incorrect"] += 1
        extra = {k: v for k, v in ex.columns.items() if k not in ("chosen", "rejected", "messages")}
        for chosen, rejected in sel.pairs:
            pref_rows.append({"prompt": ex.prompt, "chosen": [{"role": "assistant", "content": chosen}],
                              "rejected": [{"role": "assistant", "content": rejected}], **extra})  # fmt: skip
        for demo in sel.demos:
            sft_rows.append({"messages": [*ex.prompt, {"role": "assistant", "content": demo}], **extra})

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("preference.jsonl", pref_rows), ("sft.jsonl", sft_rows)):
        with open(out / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tokens = sum(len(c.token_ids) for c in flat)
    stats = {
        "prompts": len(examples),
        "samples": len(flat),
        **stats,
        "pairs": len(pref_rows),
        "demos": len(sft_rows),
        "sample_accuracy": stats["correct"] / max(1, len(flat)),
        "seconds": time.perf_counter() - t0,
        "generation_seconds": t_gen,
        "tokens_per_second": tokens / max(t_gen, 1e-9),
        "config": to_dict(cfg),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(
        f"[rejection sampling] {stats['correct']}/{len(flat)} samples correct; {len(pref_rows)} pairs, "
        f"{len(sft_rows)} demonstrations; {stats['no_correct']} prompts with no correct path, "
        f"{stats['no_incorrect']} with no incorrect one; {stats['seconds']:.0f} s -> {out}",
        flush=True,
    )
    return stats


if __name__ == "__main__":
    run_cli(main)
