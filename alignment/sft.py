"""Supervised fine-tuning: the first stage of Qwen2's post-training.

    accelerate launch alignment/sft.py recipes/sft.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/ddp.yaml alignment/sft.py recipes/sft.yaml

Tiny CPU smoke run (seconds):

    python alignment/sft.py recipes/sft.yaml model.name_or_path=tiny-qwen2 training.max_steps=2 \
        data.max_length=512 logging.report_to=[] training.output_dir=outputs/smoke

What it does: loss on assistant tokens only (the label of every other token is -100), examples packed into
sequences of ``data.max_length`` tokens with no attention across examples (position_ids restart per example),
cosine LR from ``optimizer.lr`` to ``scheduler.min_lr``, gradient clipping, optional gradient checkpointing,
YaRN RoPE scaling and LoRA; resumable checkpoints; a standard HF folder at the end. On a mixture-of-experts
model (e.g. tiny-qwen2-moe, or a model from ``python -m alignment.upcycle``) the router load-balancing loss
(Qwen2-MoE's form, alignment/moe.py) is added with weight ``model.router_aux_loss_coef`` and logged as
``aux_loss`` with the expert load (``moe/load_max``, ``moe/load_min``); ``loss`` stays the NLL alone.

Deliberate simplifications: the whole dataset is tokenized in memory in every process (fine up to a few
hundred thousand examples); no evaluation loop yet (the whole-chain recipe will add per-stage evaluation).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from alignment.config import (
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainingConfig,
    parse_cli,
    run_cli,
    to_dict,
)
from alignment.data import DataReport, Sequence, collate, fit_length, load_examples, normalize_sft_row, pack
from alignment.data import tokenize_conversation as tokenize
from alignment.models import load_causal_lm, load_tokenizer
from alignment.moe import RoutedTokenLogProbs, RouterBalance
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
class SFTDataConfig(DataConfig):
    # An example longer than max_length: keep its first max_length tokens (truncate) or leave it out (drop).
    overlong: Literal["truncate", "drop"] = "truncate"
    # Pack several examples into each sequence of max_length tokens (no attention across them).
    packing: bool = True


@dataclass
class SFTModelConfig(ModelConfig):
    # Mixture-of-experts models only: the weight of the router load-balancing loss added to the NLL.
    # null: the model's own (config.router_aux_loss_coef; 0.001 for Qwen2-MoE); 0: off (the load is still logged).
    router_aux_loss_coef: float | None = None


@dataclass
class SFTConfig:
    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def prepare_items(cfg: SFTConfig, tokenizer, report: DataReport, is_main: bool) -> list[list[Sequence]]:
    """Rows -> validated conversations -> tokens with assistant-only labels -> fitted -> packed.

    Each item is a list of sequences: one pack, or one example when packing is off.
    """
    conversations = load_examples(cfg.data, normalize_sft_row, report, rank0=is_main)
    sequences = []
    for i, messages in enumerate(tqdm(conversations, desc="tokenize", disable=not is_main, leave=False)):
        ids, labels = tokenize(tokenizer, messages, where=f"example {i}")
        seq = fit_length(Sequence(ids, labels), cfg.data.max_length, cfg.data.overlong, report)
        if seq is not None:
            sequences.append(seq)
    if not sequences:
        raise ValueError("no training examples left after length filtering; raise data.max_length")
    return pack(sequences, cfg.data.max_length) if cfg.data.packing else [[s] for s in sequences]


def main(argv: list[str] | None = None) -> None:
    cfg: SFTConfig = parse_cli(SFTConfig, sys.argv[1:] if argv is None else argv)
    tc = cfg.training

    # Set-up order matters: the accelerator first (it decides the device and process group), then the data,
    # so a bad row fails in seconds and before a model is loaded, then the model, then the optimizer over its
    # trainable parameters, and last `prepare`, which wraps the model for DDP / FSDP.
    accelerator = make_accelerator(tc)
    set_seed(tc.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    tracker = make_tracker(cfg.logging, tc.output_dir, to_dict(cfg), accelerator.is_main_process)

    tokenizer = load_tokenizer(cfg.model.name_or_path)
    report = DataReport()
    items = prepare_items(cfg, tokenizer, report, accelerator.is_main_process)
    for line in report.lines():
        print0(accelerator, f"[data] {line}")
    plan = plan_batches(len(items), tc, world, cfg.data.seed)
    n_tokens = sum(len(s.input_ids) for item in items for s in item)
    print0(accelerator, f"[data] {len(items)} sequences, {n_tokens} tokens, {len(plan)} optimizer steps")

    model = load_causal_lm(cfg.model, cfg.data.max_length)
    balance = RouterBalance(model.config, cfg.model.router_aux_loss_coef)  # adds nothing on a dense model
    optimizer = build_optimizer(cfg.optimizer, model, cfg.data.max_length, tc.seed)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.optimizer.lr, len(plan))
    policy, optimizer = accelerator.prepare(RoutedTokenLogProbs(model, tc.logits_chunk_size), optimizer)
    print_sharding(accelerator, policy)
    accelerator.register_for_checkpointing(scheduler)  # not `prepare`d: it would step once per process

    start = resume_step(accelerator, tc)

    bar = progress_bar(accelerator, len(plan), start, cfg.logging.progress_bar)
    policy.train()
    for step in range(start, len(plan)):
        t0 = time.perf_counter()
        global_items = [items[i] for i in plan.global_batches[step]]
        # Normalise by the global batch's label count: every process and micro-batch uses the same divisor,
        # so 2 processes x 1 micro-batch and 1 process x 2 micro-batches give the same gradient.
        n_labels = sum(s.num_labels for item in global_items for s in item)
        step_tokens = sum(len(s.input_ids) for item in global_items for s in item)
        micro = plan.micro_batches(step, rank, world, tc.gradient_accumulation_steps)
        nll_sum = torch.zeros((), device=accelerator.device)
        for k, idxs in enumerate(micro):
            batch = collate([s for i in idxs for s in items[i]]).to(accelerator.device)
            sync = micro_batch(accelerator, policy, last=k == len(micro) - 1)
            with sync, accelerator.autocast():
                # (N,) labelled tokens; router logits: one (T, E) per MoE layer, () for a dense model
                logps, router_logits = policy(batch.input_ids, batch.position_ids, batch.labels)
                share = batch.input_ids.numel() / step_tokens  # this micro-batch's part of the global batch
                loss = -logps.sum() / n_labels + balance.loss(router_logits, share)
                loss = loss * world  # DDP averages gradients over processes
                accelerator.backward(loss)
            nll_sum += -logps.detach().sum()
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), tc.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # Metrics of the whole global batch (all-reduces of a few scalars).
        loss_value = accelerator.reduce(nll_sum, reduction="sum").item() / n_labels
        moe_metrics = balance.metrics(accelerator)  # {} for a dense model
        tokens_per_s = step_tokens / (time.perf_counter() - t0)
        if (step + 1) % tc.logging_steps == 0 or step == len(plan) - 1:
            metrics = {"loss": loss_value, "learning_rate": lr, "grad_norm": float(grad_norm)}
            metrics |= {"tokens_per_second": tokens_per_s, "epoch": (step + 1) / plan.steps_per_epoch}
            metrics |= moe_metrics
            tracker.log(metrics, step + 1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        bar.update(1)
        checkpoint_if_due(accelerator, tc, step + 1, len(plan), {"loss": loss_value})
    bar.close()

    finish(
        accelerator,
        policy,
        tokenizer,
        cfg,
        tracker,
        {"steps": len(plan), "train_tokens": n_tokens, **report.__dict__},
    )


if __name__ == "__main__":
    run_cli(main)
