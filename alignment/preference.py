"""What offline and online DPO share: the preference configs, per-pair log-probs, the reference, and one step.

    reference = build_reference(cfg.reference, cfg.loss, cfg.model, cfg.data.max_length, tc, pairs, accelerator)
    sums = preference_step(policy, reference, micro_batch_pairs, idxs, cfg.loss, accelerator, scale)
    metrics = reduce_metrics(accelerator, sums, global_batch_size)       # {"loss": ..., "rewards/margins": ...}

Offline DPO (alignment/dpo.py) feeds it pairs from a file; online DPO (alignment/online_dpo.py) feeds it the
best and worst of N sampled answers. The losses themselves are pure functions in alignment/losses.py.

The reference is one object with ``.logps(pairs, idxs, policy)`` whatever it is made of: nothing (SimPO), a
frozen copy of the start model, the LoRA base of the policy (adapters switched off, no second copy), log-probs
computed once and cached on disk (offline pairs only: the table is indexed by pair), or the policy of the
previous step (online only: a frozen copy refreshed from the policy after each optimizer step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from alignment import losses as L
from alignment.config import DataConfig, ModelConfig, TrainingConfig
from alignment.data import IGNORE, PairSequences, collate_pairs
from alignment.logprobs import TokenLogProbs, unwrap
from alignment.models import cache_dir, load_causal_lm
from alignment.reference import cache_key, cached_reference_logps, fingerprint_model, fingerprint_pairs
from alignment.training import print0, resolve_mixed_precision, whole_model


@dataclass
class PreferenceDataConfig(DataConfig):
    # A pair longer than max_length: cut the prompt from the left, cut the answers' ends, or leave it out.
    overlong: Literal["truncate_prompt", "truncate_completion", "drop"] = "truncate_prompt"


@dataclass
class ReferenceConfig:
    # auto: the LoRA base with adapters disabled when training LoRA, else a frozen copy of the start model.
    # previous (online DPO only): the policy as it was before the last optimizer step, i.e. the sampler.
    mode: Literal["auto", "model", "lora_base", "precomputed", "previous"] = "auto"
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


# --------------------------------------------------------------------------------------------------------------
# Per-pair log-probs and losses
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PairLogps:
    """Summed answer log-probs and answer lengths of a micro-batch of pairs: four (B,) tensors."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor


def pair_logps(logprob_fn, pairs: list[PairSequences], device) -> PairLogps:
    """The 2B sequences ride in one padding-free row, ordered chosen_0, rejected_0, chosen_1, ...

    With packed_sdpa attention each rejected answer shares its chosen's prompt tokens (written once: the
    prompt's forward and backward are not done twice), with the same log-probs as two whole sequences.
    """
    batch = collate_pairs(pairs, getattr(unwrap(logprob_fn), "share_prompt", False))[0].to(device)
    token_logps = logprob_fn(batch.input_ids, batch.position_ids, batch.labels)  # (N,)
    owner = batch.seq_ids[batch.labels[0] != IGNORE]  # (N,) which sequence each labelled token belongs to
    sums = torch.zeros(2 * len(pairs), device=device, dtype=token_logps.dtype).index_add(
        0, owner, token_logps
    )
    lens = torch.bincount(owner, minlength=2 * len(pairs)).to(token_logps.dtype)
    return PairLogps(sums[0::2], sums[1::2], lens[0::2], lens[1::2])


def pair_losses(cfg: LossConfig, lp: PairLogps, ref_c, ref_r, nll_mask=None) -> tuple[torch.Tensor, ...]:
    """Per-pair losses and the implicit rewards reported as rewards/chosen and rewards/rejected.
    ``nll_mask`` ((B,), 1 or 0): which pairs the NLL term covers (None: all)."""
    c, r, len_c, len_r = lp.chosen, lp.rejected, lp.chosen_len, lp.rejected_len
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
        losses = losses + cfg.nll_weight * (nll if nll_mask is None else nll * nll_mask)
    return losses, rc, rr


# --------------------------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------------------------


class Reference:
    """Reference log-probs of a micro-batch's chosen and rejected answers, (B,) each, without gradient.

    mode: "none" (reference-free SimPO), "model" (a frozen copy), "lora_base" (the policy with its adapters
    switched off), "precomputed" (a (n_pairs, 2) table indexed by pair), "previous" (a frozen copy that
    ``refresh`` sets to the policy's current weights).
    """

    def __init__(self, mode: str, frozen: TokenLogProbs | None = None, table: torch.Tensor | None = None):
        self.mode, self.frozen, self.table = mode, frozen, table

    def logps(self, pairs: list[PairSequences], idxs: list[int] | None, policy, accelerator, like):
        if self.mode == "precomputed":
            ref = self.table[idxs]
            if ref.isnan().any():  # a row the precompute skipped: the run's plan and the table disagree
                missing = [i for i, r in zip(idxs, ref) if r.isnan().any()]
                raise RuntimeError(f"reference log-probs of pairs {missing[:5]} were not precomputed")
            ref = ref.to(accelerator.device, like.dtype)
            return ref[:, 0], ref[:, 1]
        if self.mode == "none":
            return torch.zeros_like(like), torch.zeros_like(like)
        with torch.no_grad():
            if self.mode in ("model", "previous"):
                lp = pair_logps(self.frozen, pairs, accelerator.device)
                return lp.chosen, lp.rejected
            logprobs = accelerator.unwrap_model(
                policy
            )  # the policy itself with its LoRA adapters switched off
            with logprobs.model.disable_adapter():
                lp = pair_logps(logprobs, pairs, accelerator.device)
            return lp.chosen, lp.rejected

    @torch.no_grad()
    def refresh(self, policy, accelerator) -> None:
        """mode "previous": copy the policy's current weights into the frozen copy (a no-op otherwise)."""
        if self.mode != "previous":
            return
        state = accelerator.unwrap_model(policy).model.state_dict()
        self.frozen.model.load_state_dict(state)


def resolve_reference_mode(ref_cfg: ReferenceConfig, loss_cfg: LossConfig, model_cfg: ModelConfig) -> str:
    if loss_cfg.name == "simpo":
        return "none"
    mode = ref_cfg.mode
    if mode == "auto":
        mode = "lora_base" if model_cfg.lora is not None else "model"
    if mode == "lora_base" and model_cfg.lora is None:
        raise ValueError("reference.mode: lora_base needs model.lora; use model or precomputed")
    return mode


def build_reference(
    ref_cfg: ReferenceConfig,
    loss_cfg: LossConfig,
    model_cfg: ModelConfig,
    max_length: int,
    tc: TrainingConfig,
    accelerator,
    pairs: list[PairSequences] | None = None,
    rows: list[int] | None = None,
) -> Reference:
    """The reference a recipe asks for. ``pairs`` (offline) are needed for ``precomputed`` only; ``rows``: the
    pairs the run trains on (None: all), the only ones ``precomputed`` scores."""
    mode = resolve_reference_mode(ref_cfg, loss_cfg, model_cfg)
    if mode in ("none", "lora_base"):
        return Reference(mode)
    if mode == "precomputed" and pairs is None:
        raise ValueError(
            "reference.mode: precomputed needs a fixed set of pairs; online DPO uses model or previous"
        )
    name = ref_cfg.name_or_path if mode != "previous" else None
    if mode == "previous" and model_cfg.lora is not None:
        raise ValueError(
            "reference.mode: previous copies full weights; with model.lora use lora_base or model"
        )
    with whole_model(accelerator):  # every process holds the frozen reference whole, also under ZeRO-3
        ref = load_causal_lm(model_cfg, max_length, name, trainable=False)
    frozen = TokenLogProbs(ref.to(accelerator.device), tc.logits_chunk_size)
    if mode in ("model", "previous"):
        return Reference(mode, frozen=frozen)
    return Reference(mode, table=_precompute(ref_cfg, model_cfg, tc, frozen, pairs, accelerator, rows))


def _precompute(ref_cfg, model_cfg, tc, frozen, pairs, accelerator, rows=None) -> torch.Tensor:
    """Every process computes its share, all gather, the main process writes the cache.

    Only the pairs in ``rows`` are scored (a run cut short by ``training.max_steps`` trains on a few of them);
    the other rows of the table are NaN, and a subset is part of the cache key."""
    rows = sorted(set(range(len(pairs)) if rows is None else rows))
    settings = {
        "dtype": model_cfg.dtype,
        "mixed_precision": resolve_mixed_precision(tc.mixed_precision),
        "share_prompt": frozen.share_prompt,  # the same log-probs to rounding, but not to the bit
    }
    if len(rows) < len(pairs):
        settings["rows"] = rows
    key = cache_key(fingerprint_model(frozen.model), fingerprint_pairs(pairs), settings)
    path = Path(ref_cfg.cache_dir or cache_dir() / "reference_logps") / f"{key}.pt"

    def compute() -> torch.Tensor:
        mine = rows[accelerator.process_index :: accelerator.num_processes]
        out = []
        bs = tc.per_device_batch_size
        for s in tqdm(
            range(0, len(mine), bs), desc="reference log-probs", disable=not accelerator.is_main_process
        ):
            idx = mine[s : s + bs]
            with torch.no_grad(), accelerator.autocast():
                lp = pair_logps(frozen, [pairs[i] for i in idx], accelerator.device)
            out += [(i, float(a), float(b)) for i, a, b in zip(idx, lp.chosen, lp.rejected)]
        table = torch.full((len(pairs), 2), math.nan, dtype=torch.float64)
        for i, a, b in gather_object(out):
            table[i] = torch.tensor([a, b], dtype=torch.float64)
        return table

    table, hit = cached_reference_logps(path, key, len(pairs), compute, accelerator)
    print0(accelerator, f"[reference] {'reused' if hit else 'computed and cached'} {path}")
    return table  # the frozen copy goes out of scope with the caller: only the table is kept


# --------------------------------------------------------------------------------------------------------------
# One micro-batch: loss, backward, metric sums
# --------------------------------------------------------------------------------------------------------------

# Sums over pairs; reduce_metrics divides by the global batch. TRL's names.
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def preference_step(
    policy,
    reference: Reference,
    pairs: list[PairSequences],
    idxs,
    loss_cfg: LossConfig,
    accelerator,
    global_batch: int,
) -> dict[str, torch.Tensor]:
    """Forward the micro-batch, add its share of the global mean loss to the gradients, return metric sums.

    Every loss is a mean over the ``global_batch`` pairs of the optimizer step; DDP averages gradients over
    processes, so each process scales its sum by processes / global_batch.
    """
    lp = pair_logps(policy, pairs, accelerator.device)
    ref_c, ref_r = reference.logps(pairs, idxs, policy, accelerator, lp.chosen)
    mask = None
    if not all(p.nll for p in pairs):
        mask = torch.tensor([float(p.nll) for p in pairs], device=lp.chosen.device, dtype=lp.chosen.dtype)
    losses, rc, rr = pair_losses(loss_cfg, lp, ref_c, ref_r, mask)
    accelerator.backward(losses.sum() / global_batch * accelerator.num_processes)
    d = lambda t: t.detach().double().sum()  # noqa: E731
    return {
        "loss": d(losses),
        "rewards/chosen": d(rc),
        "rewards/rejected": d(rr),
        "rewards/accuracies": d(rc > rr),
        "rewards/margins": d(rc - rr),
        "logps/chosen": d(lp.chosen),
        "logps/rejected": d(lp.rejected),
    }


def add_sums(total: dict[str, torch.Tensor] | None, part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(part) if total is None else {k: total[k] + part[k] for k in total}


def reduce_metrics(accelerator, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Sum each metric over processes and divide by ``count`` (the global batch): named, never positional."""
    names = list(sums)
    stacked = accelerator.reduce(torch.stack([sums[n] for n in names]), reduction="sum") / count
    return dict(zip(names, stacked.tolist()))
