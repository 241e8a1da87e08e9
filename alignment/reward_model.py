"""Reward-model training: a Bradley-Terry model on preference pairs, the judge online DPO uses.

    accelerate launch alignment/reward_model.py recipes/reward.yaml [key=value ...]     (or: make reward)

Tiny CPU smoke run:

    python alignment/reward_model.py recipes/reward.yaml model.name_or_path=tiny-qwen2 training.max_steps=2 \
        logging.report_to=[] training.output_dir=outputs/smoke-rm

A sequence-classification head (one output) on a causal LM scores the last token of a conversation; the loss
is -log sigmoid(r(x, y_w) - r(x, y_l)) (alignment/losses.py). A held-out share of the pairs
(``eval_fraction``) is never trained on; its accuracy (the fraction of pairs where the chosen answer scores
higher) is reported as ``eval/accuracy`` every ``eval_steps`` and at the end. The result is a standard HF
``...ForSequenceClassification`` folder that ``reward.model.RewardModelScorer`` loads.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object, set_seed

from alignment.config import (
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainingConfig,
    parse_cli,
    run_cli,
    to_dict,
)
from alignment.data import (
    DataReport,
    PairSequences,
    collate_pairs,
    load_examples,
    normalize_preference_row,
    tokenize_pairs,
)
from alignment.logprobs import unwrap
from alignment.losses import bradley_terry_loss
from alignment.models import load_tokenizer
from alignment.preference import PreferenceDataConfig
from alignment.tracking import make_tracker
from alignment.training import (
    build_optimizer,
    build_scheduler,
    checkpoint_if_due,
    finish,
    make_accelerator,
    micro_batch,
    plan_batches,
    print0,
    print_sharding,
    progress_bar,
    resume_step,
)
from reward.model import SequenceScores, load_reward_model


@dataclass
class RewardModelConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Share of the pairs held out (chosen with data.seed) for eval/accuracy; never trained on.
    eval_fraction: float = 0.1
    # Evaluate every N optimizer steps (0: only at the end).
    eval_steps: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        # The reward model is loaded as a full sequence classifier: refuse what would silently be ignored.
        if self.model.lora is not None:
            raise ValueError("model.lora: the reward model trains all weights; set model.lora: null")
        if self.model.rope_scaling is not None:
            raise ValueError("model.rope_scaling: not supported for the reward model; set it to null")


def pair_scores(scorer, pairs: list[PairSequences], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and rejected answers of a micro-batch: two (B,) tensors."""
    batch, last = collate_pairs(pairs, getattr(unwrap(scorer), "share_prompt", False))
    batch = batch.to(device)
    scores = scorer(batch.input_ids, batch.position_ids, last.to(device))  # (2B,)
    return scores[0::2], scores[1::2]


@torch.no_grad()
def evaluate(scorer, pairs: list[PairSequences], accelerator, batch_size: int) -> float:
    """Held-out accuracy: the share of pairs whose chosen answer scores higher. Each process takes a stride."""
    mine = list(range(accelerator.process_index, len(pairs), accelerator.num_processes))
    wins = []
    for s in range(0, len(mine), batch_size):
        with accelerator.autocast():
            c, r = pair_scores(scorer, [pairs[i] for i in mine[s : s + batch_size]], accelerator.device)
        wins += (c > r).tolist()
    wins = gather_object(wins)
    return sum(wins) / max(1, len(wins))


def main(argv: list[str] | None = None) -> None:
    cfg: RewardModelConfig = parse_cli(RewardModelConfig, sys.argv[1:] if argv is None else argv)
    tc = cfg.training
    accelerator = make_accelerator(tc)
    set_seed(tc.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    tracker = make_tracker(cfg.logging, tc.output_dir, to_dict(cfg), accelerator.is_main_process)

    tokenizer = load_tokenizer(cfg.model.name_or_path)
    report = DataReport()
    examples = load_examples(cfg.data, normalize_preference_row, report, rank0=accelerator.is_main_process)
    pairs = tokenize_pairs(tokenizer, examples, cfg.data, cfg.data.overlong, report)
    order = list(range(len(pairs)))
    random.Random(cfg.data.seed).shuffle(order)
    n_eval = int(len(pairs) * cfg.eval_fraction)
    eval_pairs, pairs = [pairs[i] for i in order[:n_eval]], [pairs[i] for i in order[n_eval:]]
    for line in report.lines():
        print0(accelerator, f"[data] {line}")
    plan = plan_batches(len(pairs), tc, world, cfg.data.seed)
    print0(accelerator, f"[data] {len(pairs)} training pairs, {len(eval_pairs)} held out, {len(plan)} steps")

    model, _ = load_reward_model(
        cfg.model.name_or_path, cfg.model.dtype, trainable=True, attn=cfg.model.attn_implementation
    )
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = build_optimizer(cfg.optimizer, model, cfg.data.max_length, tc.seed)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.optimizer.lr, len(plan))
    scorer, optimizer = accelerator.prepare(SequenceScores(model), optimizer)
    print_sharding(accelerator, scorer)
    accelerator.register_for_checkpointing(scheduler)

    start = resume_step(accelerator, tc)

    bar = progress_bar(accelerator, len(plan), start, cfg.logging.progress_bar)
    for step in range(start, len(plan)):
        scorer.train()
        G = plan.global_batch_size
        sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
        micro = plan.micro_batches(step, rank, world, tc.gradient_accumulation_steps)
        for k, idxs in enumerate(micro):
            sync = micro_batch(accelerator, scorer, last=k == len(micro) - 1)
            with sync, accelerator.autocast():
                c, r = pair_scores(scorer, [pairs[i] for i in idxs], accelerator.device)
                losses = bradley_terry_loss(c, r)
                accelerator.backward(losses.sum() / G * world)
            sums += torch.stack([losses.detach().sum(), (c > r).sum(), (c - r).detach().sum()]).double()
        grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), tc.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        loss, acc, margin = (accelerator.reduce(sums, reduction="sum") / G).tolist()
        metrics = {
            "loss": loss,
            "accuracy": acc,
            "margin": margin,
            "learning_rate": lr,
            "grad_norm": float(grad_norm),
        }
        last = step == len(plan) - 1
        if eval_pairs and (last or (cfg.eval_steps and (step + 1) % cfg.eval_steps == 0)):
            scorer.eval()
            metrics["eval/accuracy"] = evaluate(scorer, eval_pairs, accelerator, tc.per_device_batch_size)
        if (step + 1) % tc.logging_steps == 0 or last or "eval/accuracy" in metrics:
            tracker.log(metrics, step + 1)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2f}")
        bar.update(1)
        checkpoint_if_due(accelerator, tc, step + 1, len(plan), {"loss": loss})
    bar.close()

    final = {"steps": len(plan), "train_pairs": len(pairs), "eval_pairs": len(eval_pairs)}
    if eval_pairs:
        final["eval/accuracy"] = metrics["eval/accuracy"]
        print0(
            accelerator, f"[eval] held-out accuracy {final['eval/accuracy']:.3f} on {len(eval_pairs)} pairs"
        )
    finish(accelerator, scorer, tokenizer, cfg, tracker, final)


if __name__ == "__main__":
    run_cli(main)
