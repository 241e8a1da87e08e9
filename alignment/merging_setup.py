"""Build the online merging optimizer from a recipe's ``optimizer:`` block (name: ondare | onties).

theta_b (``optimizer.base``) is loaded only to compute tau and is freed when this returns. theta_r
(``optimizer.reference``) defaults to the model being trained, as it is at the start of training (the SFT
weights, when a stage starts from the SFT output).
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from alignment.config import ModelConfig, OptimizerConfig
from alignment.merging import OnlineMergingOptimizer


def build_merging_optimizer(
    cfg: OptimizerConfig, model: nn.Module, named: list[tuple[str, nn.Parameter]], max_length: int, seed: int
) -> OnlineMergingOptimizer:
    from alignment.models import load_causal_lm
    from alignment.training import _no_decay

    if any("lora_" in n for n, _ in named):
        raise ValueError(
            f"optimizer.name: {cfg.name} merges full weights with tau = reference - base; it cannot drive LoRA "
            "adapters. Set model.lora: null, or use optimizer.name: adamw"
        )
    base = load_causal_lm(ModelConfig(name_or_path=cfg.base), max_length, trainable=False)
    reference = (
        load_causal_lm(ModelConfig(name_or_path=cfg.reference), max_length, trainable=False)
        if cfg.reference
        else model
    )
    groups = [
        {"params": [(n, p) for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [(n, p) for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
    ]
    optimizer = OnlineMergingOptimizer(
        [g for g in groups if g["params"]],
        reference=reference,
        base=base,
        mode=cfg.name,
        reserve_p=cfg.reserve_p,
        alpha=cfg.alpha,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        rescale=cfg.rescale,
        use_merge=cfg.use_merge,
        merge_every=cfg.merge_every,
        clip=cfg.clip,
        seed=seed,  # the same on every process, so data-parallel ranks draw the same masks
        tau_dtype=getattr(torch, cfg.tau_dtype) if cfg.tau_dtype else None,
    )
    del base, reference
    gc.collect()
    return optimizer
