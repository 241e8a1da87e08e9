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

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from alignment import losses as L
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
from alignment.data import (
    IGNORE,
    DataReport,
    PairSequences,
    collate,
    load_examples,
    normalize_preference_row,
    tokenize_pairs,
)
from alignment.logprobs import TokenLogProbs
from alignment.models import cache_dir, load_causal_lm, load_tokenizer
from alignment.reference import cache_key, cached_reference_logps, fingerprint_model, fingerprint_pairs
from alignment.tracking import make_tracker
from alignment.training import (
    build_optimizer,
    build_scheduler,
    checkpoint_if_due,
    finish,
    make_accelerator,
    plan_batches,
    print0,
    progress_bar,
    resume_step,
)


@dataclass
class PreferenceDataConfig(DataConfig):
    # A pair longer than max_length: cut the prompt from the left, cut the answers' ends, or leave it out.
    overlong: Literal["truncate_prompt", "truncate_completion", "drop"] = "truncate_prompt"


@dataclass
class ReferenceConfig:
    # auto: the LoRA base with adapters disabled when training LoRA, else a frozen copy of the start model.
    mode: Literal["auto", "model", "lora_base", "precomputed"] = "auto"
    # Reference weights; null: the model being trained, as loaded.
    name_or_path: str | None = None
    # Where precomputed log-probs are cached; null: $ALIGNMENT_CACHE/reference_logps.
    cache_dir: str | None = None


@dataclass
class LossConfig:
    name: Literal["sigmoid", "ipo", "robust", "simpo"] = "sigmoid"
    beta: float = 0.1
    # sigmoid: conservative DPO's eps; robust: the assumed label-noise rate (< 0.5).
    label_smoothing: float = 0.0
    # SimPO's target margin.
    simpo_gamma: float = 0.5
    # Weight of the per-token NLL of the chosen answer added to the loss (0: none).
    nll_weight: float = 0.0


@dataclass
class DPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def pair_logps(logprob_fn, pairs: list[PairSequences], device) -> tuple[torch.Tensor, ...]:
    """Sum of answer log-probs and answer lengths for a micro-batch of pairs: four (B,) tensors.

    The 2B sequences ride in one padding-free row, ordered chosen_0, rejected_0, chosen_1, ...
    """
    batch = collate([s for p in pairs for s in (p.chosen, p.rejected)]).to(device)
    token_logps = logprob_fn(batch.input_ids, batch.position_ids, batch.labels)  # (N,)
    owner = batch.seq_ids[batch.labels[0] != IGNORE]  # (N,) which sequence each labelled token belongs to
    sums = torch.zeros(2 * len(pairs), device=device, dtype=token_logps.dtype).index_add(
        0, owner, token_logps
    )
    lens = torch.bincount(owner, minlength=2 * len(pairs)).to(token_logps.dtype)
    return sums[0::2], sums[1::2], lens[0::2], lens[1::2]


def pair_losses(cfg: LossConfig, c, r, ref_c, ref_r, len_c, len_r) -> tuple[torch.Tensor, ...]:
    """Per-pair losses and the implicit rewards reported as rewards/chosen and rewards/rejected."""
    nll = L.nll_term(c, len_c)
    if cfg.name == "simpo":
        losses = L.simpo_loss(c, r, len_c, len_r, cfg.beta, cfg.simpo_gamma)
        rc, rr = (cfg.beta * c / len_c).detach(), (cfg.beta * r / len_r).detach()
    else:
        if cfg.name == "ipo":  # length-averaged, so the target margin does not depend on answer length
            c, r, ref_c, ref_r = c / len_c, r / len_r, ref_c / len_c, ref_r / len_r
            losses = L.ipo_loss(c, r, ref_c, ref_r, cfg.beta)
        elif cfg.name == "robust":
            losses = L.robust_dpo_loss(c, r, ref_c, ref_r, cfg.beta, cfg.label_smoothing)
        else:
            losses = L.dpo_sigmoid_loss(c, r, ref_c, ref_r, cfg.beta, cfg.label_smoothing)
        rc, rr = L.implicit_rewards(c, ref_c, cfg.beta), L.implicit_rewards(r, ref_r, cfg.beta)
    if cfg.nll_weight:
        losses = losses + cfg.nll_weight * nll
    return losses, rc, rr


def setup_reference(cfg: DPOConfig, pairs, accelerator):
    """-> (mode, frozen reference or None, precomputed (n, 2) table or None).

    mode is "none" (reference-free SimPO), "lora_base", "model" (a frozen copy) or "precomputed".
    """
    if cfg.loss.name == "simpo":
        return "none", None, None
    mode = cfg.reference.mode
    if mode == "auto":
        mode = "lora_base" if cfg.model.lora is not None else "model"
    if mode == "lora_base":
        if cfg.model.lora is None:
            raise ValueError("reference.mode: lora_base needs model.lora; use model or precomputed")
        return mode, None, None
    ref = load_causal_lm(cfg.model, cfg.data.max_length, cfg.reference.name_or_path, trainable=False)
    ref_logprobs = TokenLogProbs(ref.to(accelerator.device), cfg.training.logits_chunk_size)
    if mode == "model":
        return mode, ref_logprobs, None

    # precomputed: every process computes its share, all gather, the main process writes the cache.
    settings = {"dtype": cfg.model.dtype, "mixed_precision": cfg.training.mixed_precision}
    key = cache_key(fingerprint_model(ref), fingerprint_pairs(pairs), settings)
    path = Path(cfg.reference.cache_dir or cache_dir() / "reference_logps") / f"{key}.pt"

    def compute() -> torch.Tensor:
        mine = list(range(accelerator.process_index, len(pairs), accelerator.num_processes))
        out = []
        bs = cfg.training.per_device_batch_size
        for s in tqdm(
            range(0, len(mine), bs), desc="reference log-probs", disable=not accelerator.is_main_process
        ):
            idx = mine[s : s + bs]
            with torch.no_grad(), accelerator.autocast():
                c, r, _, _ = pair_logps(ref_logprobs, [pairs[i] for i in idx], accelerator.device)
            out += [(i, float(a), float(b)) for i, a, b in zip(idx, c, r)]
        table = torch.zeros(len(pairs), 2, dtype=torch.float64)
        for i, a, b in gather_object(out):
            table[i] = torch.tensor([a, b], dtype=torch.float64)
        return table

    table, hit = cached_reference_logps(path, key, len(pairs), compute, accelerator)
    print0(accelerator, f"[reference] {'reused' if hit else 'computed and cached'} {path}")
    return mode, None, table  # the frozen copy goes out of scope here: only the table is kept


def reference_logps(mode, frozen, table, policy, mb, idxs, accelerator, like: torch.Tensor):
    """Reference log-probs of a micro-batch's chosen and rejected answers, (B,) each, without gradient."""
    if mode == "precomputed":
        ref = table[idxs].to(accelerator.device, like.dtype)
        return ref[:, 0], ref[:, 1]
    if mode == "none":
        return torch.zeros_like(like), torch.zeros_like(like)
    with torch.no_grad():
        if mode == "model":
            c, r, _, _ = pair_logps(frozen, mb, accelerator.device)
            return c, r
        logprobs = accelerator.unwrap_model(policy)  # the policy itself with its LoRA adapters switched off
        with logprobs.model.disable_adapter():
            c, r, _, _ = pair_logps(logprobs, mb, accelerator.device)
        return c, r


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
    for line in report.lines():
        print0(accelerator, f"[data] {line}")
    plan = plan_batches(len(pairs), tc, world, cfg.data.seed)
    print0(accelerator, f"[data] {len(pairs)} pairs, {len(plan)} optimizer steps")

    model = load_causal_lm(cfg.model, cfg.data.max_length)
    ref_mode, ref_frozen, ref_table = setup_reference(cfg, pairs, accelerator)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.data.max_length, tc.seed)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.optimizer.lr, len(plan))
    policy, optimizer = accelerator.prepare(TokenLogProbs(model, tc.logits_chunk_size), optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start = resume_step(accelerator, tc)

    bar = progress_bar(accelerator, len(plan), start, cfg.logging.progress_bar)
    policy.train()
    for step in range(start, len(plan)):
        t0 = time.perf_counter()
        G = plan.global_batch_size  # pairs per optimizer step; every loss is a mean over them
        sums = torch.zeros(7, device=accelerator.device, dtype=torch.float64)
        micro = plan.micro_batches(step, rank, world, tc.gradient_accumulation_steps)
        for k, idxs in enumerate(micro):
            mb = [pairs[i] for i in idxs]
            sync = contextlib.nullcontext() if k == len(micro) - 1 else accelerator.no_sync(policy)
            with sync, accelerator.autocast():
                c, r, len_c, len_r = pair_logps(policy, mb, accelerator.device)
                ref_c, ref_r = reference_logps(
                    ref_mode, ref_frozen, ref_table, policy, mb, idxs, accelerator, c
                )
                losses, rc, rr = pair_losses(cfg.loss, c, r, ref_c, ref_r, len_c, len_r)
                accelerator.backward(losses.sum() / G * world)  # DDP averages over processes
            d = lambda t: t.detach().double().sum()  # noqa: E731
            sums += torch.stack([d(losses), d(rc), d(rr), d(rc > rr), d(c), d(r), d(rc - rr)])
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), tc.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        m = (accelerator.reduce(sums, reduction="sum") / G).tolist()
        metrics = {
            "loss": m[0],
            "rewards/chosen": m[1],
            "rewards/rejected": m[2],
            "rewards/accuracies": m[3],
            "rewards/margins": m[6],
            "logps/chosen": m[4],
            "logps/rejected": m[5],
            "learning_rate": lr,
            "grad_norm": float(grad_norm),
            "pairs_per_second": G / (time.perf_counter() - t0),
        }
        if (step + 1) % tc.logging_steps == 0 or step == len(plan) - 1:
            tracker.log(metrics, step + 1)
        bar.set_postfix(loss=f"{m[0]:.4f}", margin=f"{m[6]:.3f}", acc=f"{m[3]:.2f}")
        bar.update(1)
        checkpoint_if_due(accelerator, tc, step + 1, len(plan), {"loss": m[0]})
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
