"""Offline DPO: the second stage of Qwen2's post-training, on preference pairs, starting from the SFT model.

    accelerate launch alignment/dpo.py recipes/dpo.yaml [key=value ...]      (or: make dpo)

Tiny CPU smoke run:

    python alignment/dpo.py recipes/dpo.yaml model.name_or_path=tiny-qwen2 training.max_steps=2 \
        logging.report_to=[] training.output_dir=outputs/smoke-dpo

Losses (``loss.name``): sigmoid DPO (with ``label_smoothing``: conservative DPO), robust DPO, IPO and
reference-free SimPO, plus an optional NLL term on the chosen answer (``loss.nll_weight``); see
alignment/losses.py for the equations. The reference is a frozen copy of the starting model, the LoRA base
with adapters disabled (no second copy), or log-probs computed once and cached on disk
(``reference.mode: precomputed``). Chosen and rejected answers of each pair ride in one padding-free row.

Metrics carry TRL's names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
logps/chosen, logps/rejected.

Deliberate simplifications: the reference model is not sharded under FSDP / ZeRO-3 (use
``reference.mode: precomputed`` there); no evaluation loop yet.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Literal

from accelerate.utils import set_seed

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
    first_differing_step,
    load_examples,
    normalize_preference_row,
    tokenize_pairs,
)
from alignment.logprobs import TokenLogProbs
from alignment.models import load_causal_lm, load_tokenizer
from alignment.preference import (
    LossConfig,
    PreferenceDataConfig,
    ReferenceConfig,
    add_sums,
    build_reference,
    preference_step,
    reduce_metrics,
)
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


@dataclass
class DPODataConfig(PreferenceDataConfig):
    # Which tokens of each answer the loss scores. answer: all of them. first_differing_step: Step-DPO's pairs
    # (Lai et al. 2024): both answers up to the end of the first step (sentence or line) where they differ.
    span: Literal["answer", "first_differing_step"] = "answer"


@dataclass
class DPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def main(argv: list[str] | None = None) -> None:
    cfg: DPOConfig = parse_cli(DPOConfig, sys.argv[1:] if argv is None else argv)
    tc = cfg.training
    accelerator = make_accelerator(tc)
    set_seed(tc.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    tracker = make_tracker(cfg.logging, tc.output_dir, to_dict(cfg), accelerator.is_main_process)

    # Data first: a bad row fails before any model is loaded.
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    report = DataReport()
    examples = load_examples(cfg.data, normalize_preference_row, report, rank0=accelerator.is_main_process)
    pairs = tokenize_pairs(tokenizer, examples, cfg.data, cfg.data.overlong, report)
    if cfg.data.span == "first_differing_step":
        pairs = [first_differing_step(tokenizer, p) for p in pairs]
    for line in report.lines():
        print0(accelerator, f"[data] {line}")
    plan = plan_batches(len(pairs), tc, world, cfg.data.seed)
    print0(accelerator, f"[data] {len(pairs)} pairs, {len(plan)} optimizer steps")

    model = load_causal_lm(cfg.model, cfg.data.max_length)
    rows = [i for batch in plan.global_batches for i in batch]  # the pairs this run trains on
    reference = build_reference(
        cfg.reference, cfg.loss, cfg.model, cfg.data.max_length, tc, accelerator, pairs=pairs, rows=rows
    )
    optimizer = build_optimizer(cfg.optimizer, model, cfg.data.max_length, tc.seed)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.optimizer.lr, len(plan))
    policy, optimizer = accelerator.prepare(TokenLogProbs(model, tc.logits_chunk_size), optimizer)
    print_sharding(accelerator, policy)
    accelerator.register_for_checkpointing(scheduler)

    start = resume_step(accelerator, tc)

    bar = progress_bar(accelerator, len(plan), start, cfg.logging.progress_bar)
    policy.train()
    for step in range(start, len(plan)):
        t0 = time.perf_counter()
        G = plan.global_batch_size  # pairs per optimizer step; every loss is a mean over them
        sums = None
        micro = plan.micro_batches(step, rank, world, tc.gradient_accumulation_steps)
        for k, idxs in enumerate(micro):
            mb = [pairs[i] for i in idxs]
            sync = micro_batch(accelerator, policy, last=k == len(micro) - 1)
            with sync, accelerator.autocast():
                part = preference_step(policy, reference, mb, idxs, cfg.loss, accelerator, G)
            sums = add_sums(sums, part)
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), tc.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = reduce_metrics(accelerator, sums, G)
        metrics |= {
            "learning_rate": lr,
            "grad_norm": float(grad_norm),
            "pairs_per_second": G / (time.perf_counter() - t0),
        }
        if (step + 1) % tc.logging_steps == 0 or step == len(plan) - 1:
            tracker.log(metrics, step + 1)
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            margin=f"{metrics['rewards/margins']:.3f}",
            acc=f"{metrics['rewards/accuracies']:.2f}",
        )
        bar.update(1)
        checkpoint_if_due(accelerator, tc, step + 1, len(plan), {"loss": metrics["loss"]})
    bar.close()

    finish(
        accelerator,
        policy,
        tokenizer,
        cfg,
        tracker,
        {"steps": len(plan), "pairs": len(pairs), **report.__dict__},
    )


if __name__ == "__main__":
    run_cli(main)
