"""Online DPO: Qwen2's online RLHF stage. Sample N answers per prompt from the current policy, let the rewards
pick the best and the worst, train on these pairs with DPO and the online merging optimizer, push the new
weights into the live sampler, repeat.

    accelerate launch alignment/online_dpo.py recipes/online_dpo.yaml [key=value ...]   (or: make online-dpo)

Tiny CPU smoke run:

    python alignment/online_dpo.py recipes/online_dpo.yaml model.name_or_path=tiny-qwen2 \
        optimizer.base=tiny-qwen2 'rewards=[{name: math}]' training.max_steps=2 eval.at_start=false \
        eval.at_end=false logging.report_to=[] training.output_dir=outputs/smoke-online

One step (the loop below, in this order):
1. a batch of ``prompts_per_step`` prompts from a seeded order over epochs (resuming continues it exactly);
2. ``num_samples`` answers per prompt from the sampler (alignment/generation.py: vLLM in this process by
   default), prompts sent as token ids;
3. scores from the composed reward of the recipe's ``rewards`` (reward/compose.py);
4. one pair per prompt (``pairs.per_prompt``: up to that many, a ladder of disjoint answers), best vs worst
   (alignment/pair_selection.py), the chosen answer a verified one where a
   verifier of ``pairs.chosen_must_pass`` judged the prompt, and the rejected answer one that passed the verifiers
   of ``pairs.rejected_must_pass`` where they judged it; ties, unscored and identical answers and prompts with no
   verified answer or no allowed rejected one are dropped and counted; with ``pairs.step_pairs``, up to that
   many more per prompt at the first wrong equation of a sampled answer: the right number against the sampled
   one, after the same prefix (alignment/step_pairs.py);
5. the DPO loss of the offline stage on these pairs (alignment/preference.py), against the start model,
   the LoRA base, or the previous step's policy;
6. an optimizer step (OnDARE by default: alignment/merging.py);
7. the new weights pushed into the sampler, so the next step samples from them.

Deliberate simplifications: generation and training take turns on the same devices (no
overlap); with several processes each samples its own share of prompts with its own engine.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import gather_object, set_seed

from alignment.config import (
    ConfigError,
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
from alignment.data import DataReport, PairSequences, encode_prompt, load_examples, normalize_prompt_row
from alignment.evaluation import (
    answer_sequence,
    answer_sequences,
    general_text_nll,
    kl_to_reference,
    load_prompts,
    math_accuracy,
    mean_reward,
    reward_components,
)
from alignment.generation import GenerationConfig, SamplingConfig, make_generator
from alignment.logprobs import TokenLogProbs
from alignment.models import load_causal_lm, load_tokenizer, resolve_model
from alignment.pair_selection import DROP_REASONS, PairSelectionConfig, select_pairs, verified
from alignment.preference import (
    METRICS,
    LossConfig,
    ReferenceConfig,
    add_sums,
    build_reference,
    preference_step,
    reduce_metrics,
)
from alignment.report import describe_change, logged_change
from alignment.step_pairs import step_pairs
from alignment.tracking import make_tracker
from alignment.training import (
    build_optimizer,
    build_scheduler,
    checkpoint_if_due,
    deepspeed_launch,
    finish,
    make_accelerator,
    micro_batch,
    plan_batches,
    print0,
    progress_bar,
    resume_step,
)
from reward.compose import RewardSpec, build_reward, make_reward

# Reward attributes that name a column the reward cannot judge without.
REQUIRED_COLUMN_ATTRS = ("answer_column", "constraints_column", "tests_column", "verifiers_column")


@dataclass
class OnlineEvalConfig:
    """Held-out evaluation before and after training (and every ``every`` steps): never trained on."""

    # Held-out prompts with gold answers (greedy math accuracy, mean reward of fresh samples). null: off.
    prompts: str | None = "data/eval/math.jsonl"
    max_prompts: int = 200
    at_start: bool = True
    at_end: bool = True
    every: int = 0
    max_new_tokens: int = 256
    # Fresh samples per prompt (at the training sampling settings) scored by the composed reward.
    reward_samples: int = 1
    # The seed of those samples (sampling.seed: a seeded call), the same at every evaluation: the start's and the
    # end's answers draw from the same random stream, and training's stream is left where it was. null: the
    # engine's running stream (needed with a vLLM server on vLLM's CPU build).
    seed: int | None = 0
    # KL to the start model over the fresh samples of the first N prompts (two full forwards per answer).
    kl_prompts: int = 48
    # Alignment tax: token NLL on held-out general text (pydoc topics), chunks x 256 tokens (0: off).
    general_text_chunks: int = 16


@dataclass
class OnlineDPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("math")])
    # A reward component that cannot judge an answer: none (the answer is unscored), zero, or renormalize
    # (the other components decide, scaled to the same total weight).
    reward_missing: Literal["none", "zero", "renormalize"] = "renormalize"
    pairs: PairSelectionConfig = field(default_factory=PairSelectionConfig)
    # Prompts per optimizer step (all processes together) and answers sampled per prompt.
    prompts_per_step: int = 8
    num_samples: int = 8
    # Compare the sampler's log-probs of a fixed answer with the policy's every N steps (0: never).
    sync_check_steps: int = 10
    eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 to form a pair, got {self.num_samples}")
        if self.prompts_per_step <= 0:
            raise ValueError(f"prompts_per_step must be positive, got {self.prompts_per_step}")
        if self.reference.mode == "precomputed":
            raise ValueError(
                "reference.mode: precomputed needs fixed pairs; online DPO uses auto, model, previous"
            )
        labels = [spec.label for spec in self.rewards]
        for key in ("chosen_must_pass", "rejected_must_pass"):
            for lab in getattr(self.pairs, key):
                if lab not in labels:
                    raise ValueError(f"pairs.{key}: {lab!r} is not the label of a reward (rewards: {labels})")


# --------------------------------------------------------------------------------------------------------------
# Checks that run before any model loads
# --------------------------------------------------------------------------------------------------------------


def check_rewards(specs: list[RewardSpec], columns: set[str], where: str) -> None:
    """Unknown reward names, bad params and columns a reward needs but the data lacks: errors, now."""
    for i, spec in enumerate(specs):
        key = f"rewards[{i}] ({spec.name})"
        if spec.name == "reward_model":
            if "name_or_path" not in spec.params:
                raise ConfigError(f"{where}: {key}.params.name_or_path: required (e.g. outputs/reward)")
            continue  # a model: built after the checks
        try:
            reward = make_reward(spec.name, **spec.params)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
        for attr in REQUIRED_COLUMN_ATTRS:
            col = getattr(reward, attr, None)
            if col is not None and col not in columns:
                raise ConfigError(
                    f"{where}: {key}: needs the column {col!r}, which the prompt data lacks "
                    f"(columns: {sorted(columns)}); add it or set params.{attr}"
                )


def check_lengths(cfg: OnlineDPOConfig, prompt_ids: list[list[int]], where: str) -> None:
    longest = max(len(p) for p in prompt_ids)
    need = longest + cfg.sampling.max_new_tokens
    for key, limit in (
        ("generation.max_model_len", cfg.generation.max_model_len),
        ("data.max_length", cfg.data.max_length),
    ):
        if need > limit:
            raise ConfigError(
                f"{where}: sampling.max_new_tokens: {cfg.sampling.max_new_tokens} new tokens after the longest "
                f"prompt ({longest} tokens) need {need} > {key} ({limit}); lower max_new_tokens or raise {key}"
            )


def push_state(policy, accelerator) -> dict[str, torch.Tensor]:
    """The policy's weights under the plain HF names the sampler knows; LoRA adapters merged into a copy."""
    model = accelerator.unwrap_model(policy).model
    if not hasattr(model, "merge_and_unload"):
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    state = {}
    deltas = {
        name.removeprefix("base_model.model.") + ".weight": m.get_delta_weight(m.active_adapters[0])
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and m.active_adapters
    }
    for name, t in model.state_dict().items():
        if "lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        state[name] = t + deltas[name].to(t.dtype) if name in deltas else t
    return state


# --------------------------------------------------------------------------------------------------------------
# Evaluation on held-out prompts
# --------------------------------------------------------------------------------------------------------------


def evaluate(
    cfg, generator, tokenizer, reward, policy, reference, accelerator
) -> tuple[dict[str, float], list]:
    """Greedy math accuracy, mean reward of fresh samples, KL to the start model, NLL on general text; and per
    held-out prompt, whether its greedy answer is right and its samples' mean reward (what ``held_out_change``
    compares between the evaluation at the start and at the end)."""
    ec = cfg.eval
    out: dict[str, float] = {}
    rows: list[dict] = []
    if ec.prompts:
        examples = load_prompts(ec.prompts, ec.max_prompts)
        rows = [{"prompt": ex.prompt, "greedy_right": None, "reward": None} for ex in examples]
        if all("answer" in ex.columns for ex in examples):
            out["eval/math_accuracy"], right = math_accuracy(
                generator, tokenizer, examples, ec.max_new_tokens
            )
            for row, ok in zip(rows, right):
                row["greedy_right"] = ok
        if ec.reward_samples:
            sampling = replace(cfg.sampling, max_new_tokens=ec.max_new_tokens, seed=ec.seed)
            out["eval/mean_reward"], answers, components, per_prompt = mean_reward(
                generator, tokenizer, examples, reward, sampling, ec.reward_samples
            )
            out |= {f"eval/reward/{k}": v for k, v in components.items()}  # each component's mean alone
            for key, values in per_prompt.items():  # the composed reward and each component
                for row, value in zip(rows, values):
                    row[key] = value
            if reference.mode == "model":  # the frozen start model
                n = ec.kl_prompts
                seqs = answer_sequences(tokenizer, examples[:n], answers[:n])
                out["eval/kl_to_start"] = kl_to_reference(
                    accelerator.unwrap_model(policy), reference.frozen, seqs
                )
    if ec.general_text_chunks:
        out["eval/general_text_nll"] = general_text_nll(
            accelerator.unwrap_model(policy), tokenizer, ec.general_text_chunks
        )
    return out, rows


def write_eval(accelerator, output_dir: str, name: str, figures: dict[str, float], rows: list[dict]) -> None:
    """One held-out evaluation, ``eval_<name>.json``: its figures and its per-prompt rows (the start's survives
    a resume, for the comparison at the end)."""
    if accelerator.is_main_process:
        with open(f"{output_dir}/eval_{name}.json", "w") as f:
            json.dump({"figures": figures, "rows": rows}, f)


def compare_to_start(output_dir: str, end_rows: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """The start's figures and ``held_out_change`` of the end's rows against them, from ``eval_start.json``
    (both empty when there is none, or when the held-out prompts changed since: then it says so)."""
    path = f"{output_dir}/eval_start.json"
    try:
        with open(path) as f:
            saved = json.load(f)
        return saved["figures"], logged_change(saved["rows"], end_rows)
    except FileNotFoundError:
        return {}, {}
    except ValueError as e:
        print(f"[eval] not compared with {path}: {e}", file=sys.stderr)
        return {}, {}


# --------------------------------------------------------------------------------------------------------------
# The parts of one step
# --------------------------------------------------------------------------------------------------------------


def logp_difference(generator, policy, probe, accelerator) -> float:
    """Largest |engine - policy| log-prob of the answer tokens of the probe (prompt ids, answer ids): zero up
    to kernel rounding when the engine holds the policy's weights, large when it samples from stale ones."""
    engine = torch.tensor(generator.sequence_logprobs(*probe), dtype=torch.float64)
    with torch.no_grad():
        mine = (
            accelerator.unwrap_model(policy)(*_one(answer_sequence(*probe), accelerator.device))
            .double()
            .cpu()
        )
    return float((engine - mine).abs().max())


def split(values: list, n: int) -> list[list]:
    """A flat per-answer list as one list per prompt of n answers."""
    return [values[k : k + n] for k in range(0, len(values), n)]


def verdicts(components, labels: list[str], n: int) -> list[list[bool | None]] | None:
    """Per prompt of n answers, per answer: ``verified`` by the named verifiers; None when no label is named."""
    return split(verified(components, labels), n) if labels else None


def pick_pairs(
    idxs, answers, scores, prompt_ids, cfg: PairSelectionConfig, rng, passed=None, rejected_ok=None
):
    """-> (pairs, drop counts by reason, margins of the kept pairs, one log row per prompt). ``passed`` and
    ``rejected_ok``: per prompt, per answer, whether it passed the verifiers of ``pairs.chosen_must_pass`` and
    of ``pairs.rejected_must_pass`` (None: not judged)."""
    pairs, drops, margins, rows = [], dict.fromkeys(DROP_REASONS, 0), [], []
    for k, (i, group, s) in enumerate(zip(idxs, answers, scores)):
        texts, lengths = [a.text for a in group], [len(a.token_ids) for a in group]
        ok = None if passed is None else passed[k]
        rej = None if rejected_ok is None else rejected_ok[k]
        sels = select_pairs(s, texts, lengths, [a.finished for a in group], cfg, rng, ok, rej)
        for sel in (x for x in sels if x.ok):  # every rung, or none: a failed prompt is one failed Selection
            pairs.append(PairSequences(
                answer_sequence(prompt_ids[i], group[sel.chosen].token_ids),
                answer_sequence(prompt_ids[i], group[sel.rejected].token_ids),
                nll=sel.verified,
            ))  # fmt: skip
            margins.append(sel.margin)
        sel = sels[0]
        if not sel.ok:
            drops[sel.reason] += 1
        rows.append({"prompt": i, "answers": texts, "scores": s, "chosen": sel.chosen,
                     "rejected": sel.rejected, "dropped": sel.reason, "verified": sel.verified})  # fmt: skip
        if cfg.per_prompt > 1:
            rows[-1]["more_pairs"] = [[x.chosen, x.rejected] for x in sels[1:]]
    return pairs, drops, margins, rows


def dpo_update(
    cfg, policy, reference, optimizer, scheduler, pairs, G, probe, accelerator
) -> dict[str, float]:
    """One optimizer step on this process's pairs; the loss is a mean over the G pairs of every process."""
    policy.train()
    sums = None
    bs = cfg.training.per_device_batch_size
    # Every process runs the same number of micro-batches (DDP syncs on the last); one short of pairs runs a
    # zero-weight micro-batch.
    mine = torch.tensor(-(-len(pairs) // bs), device=accelerator.device)
    n_micro = int(accelerator.reduce(mine, reduction="max"))
    for k in range(n_micro):
        mb = pairs[k * bs : (k + 1) * bs]
        sync = micro_batch(accelerator, policy, last=k == n_micro - 1)
        with sync, accelerator.autocast():
            if mb:
                sums = add_sums(sums, preference_step(policy, reference, mb, None, cfg.loss, accelerator, G))
            else:
                accelerator.backward(policy(*_one(answer_sequence(*probe), accelerator.device)).sum() * 0.0)
    grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.training.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    zeros = {k: torch.zeros((), dtype=torch.float64, device=accelerator.device) for k in METRICS}
    metrics = reduce_metrics(accelerator, sums or zeros, G) | {
        "learning_rate": lr,
        "grad_norm": float(grad_norm),
    }
    if cfg.loss.name != "simpo":  # implicit rewards are beta x log-ratio: the mean log-ratio of both answers
        metrics["objective/kl"] = (metrics["rewards/chosen"] + metrics["rewards/rejected"]) / (
            2 * cfg.loss.beta
        )
    return metrics


def step_metrics(
    idxs, flat, scored, scores, pairs, drops, margins, accelerator, n_steps=0
) -> dict[str, float]:
    """Scores, pairs (``n_steps``: the step pairs) and answer statistics of every process together."""
    valid = [x for x in scored.scores if x is not None]
    per_prompt = [[x for x in s if x is not None] for s in scores]
    components = reward_components(scored)
    local = {
        "score_sum": sum(valid), "score_n": len(valid),
        "max_sum": sum(max(p) for p in per_prompt if p), "min_sum": sum(min(p) for p in per_prompt if p),
        "prompts_scored": sum(1 for p in per_prompt if p), "margin_sum": sum(margins), "pairs": len(pairs),
        "unverified_pairs": sum(not p.nll for p in pairs), "step_pairs": n_steps,
        "paired_prompts": len(idxs) - sum(drops.values()),
        "prompts": len(idxs), "answers": len(flat), "tokens": sum(len(a.token_ids) for _, a in flat),
        "clipped": sum(not a.finished for _, a in flat), **{f"drop_{r}": n for r, n in drops.items()},
        **{f"component/{lab}": sum(v for v in vs if v is not None) for lab, vs in components.items()},
        **{f"component_n/{lab}": sum(v is not None for v in vs) for lab, vs in components.items()},
    }  # fmt: skip
    total = _sum_dicts(gather_object([local]))
    return {
        "objective/scores": total["score_sum"] / max(1, total["score_n"]),
        "objective/scores_max": total["max_sum"] / max(1, total["prompts_scored"]),
        "objective/scores_min": total["min_sum"] / max(1, total["prompts_scored"]),
        "objective/scores_margin": total["margin_sum"] / max(1, total["pairs"]),
        "online/pair_fraction": total["paired_prompts"] / total["prompts"],
        "online/pairs": total["pairs"],
        "online/dropped_ties": total["drop_tie"] + total["drop_small_margin"],
        "online/dropped_unscored": total["drop_unscored"],
        "online/dropped_identical": total["drop_identical"],
        "online/dropped_unverified": total["drop_unverified"],
        "online/dropped_no_rejected": total["drop_no_rejected"],
        "online/unverified_pairs": total["unverified_pairs"],
        "online/step_pairs": total["step_pairs"],
        "completions/mean_length": total["tokens"] / max(1, total["answers"]),
        "completions/clipped_ratio": total["clipped"] / max(1, total["answers"]),
        **{f"objective/scores/{k.split('/', 1)[1]}": v / max(1, total[f"component_n/{k.split('/', 1)[1]}"])
           for k, v in total.items() if k.startswith("component/")},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    cfg: OnlineDPOConfig = parse_cli(OnlineDPOConfig, sys.argv[1:] if argv is None else argv)
    args = sys.argv[1:] if argv is None else argv
    where = args[0] if args and "=" not in args[0] else "command line"
    tc = cfg.training
    if deepspeed_launch():  # before anything loads
        raise ConfigError(
            f"{where}: online DPO does not run under DeepSpeed: it pushes the policy's whole weights into its "
            "sampler after every step, and ZeRO-3's processes each hold a shard; launch it with a DDP or FSDP2 "
            "config of recipes/accelerate/"
        )
    accelerator = make_accelerator(tc)
    set_seed(tc.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.prompts_per_step % world:
        raise ConfigError(
            f"{where}: prompts_per_step ({cfg.prompts_per_step}) must divide among {world} processes"
        )

    # Data and rewards first: a bad row, an unknown reward or a missing column fails before any model loads.
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    report = DataReport()
    prompts = load_examples(cfg.data, normalize_prompt_row, report, rank0=accelerator.is_main_process)
    prompt_ids = [encode_prompt(tokenizer, ex.prompt) for ex in prompts]
    columns = set.intersection(*(set(ex.columns) for ex in prompts))
    check_rewards(cfg.rewards, columns, where)
    check_lengths(cfg, prompt_ids, where)
    for line in report.lines():
        print0(accelerator, f"[data] {line}")
    # The prompt order: seeded permutations per epoch, cut into steps of prompts_per_step, a slice per process.
    plan = plan_batches(
        len(prompts), replace(tc, per_device_batch_size=cfg.prompts_per_step // world, gradient_accumulation_steps=1),
        world, cfg.data.seed,
    )  # fmt: skip
    print0(accelerator, f"[data] {len(prompts)} prompts, {len(plan)} steps of {cfg.prompts_per_step} prompts")
    tracker = make_tracker(cfg.logging, tc.output_dir, to_dict(cfg), accelerator.is_main_process)

    model = load_causal_lm(cfg.model, cfg.data.max_length)
    reference = build_reference(cfg.reference, cfg.loss, cfg.model, cfg.data.max_length, tc, accelerator)
    reward = build_reward(cfg.rewards, missing=cfg.reward_missing)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.data.max_length, tc.seed)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.optimizer.lr, len(plan))
    policy, optimizer = accelerator.prepare(TokenLogProbs(model, tc.logits_chunk_size), optimizer)
    accelerator.register_for_checkpointing(scheduler)
    start = resume_step(accelerator, tc)

    # The sampler starts from the start model's files; a resumed run pushes the resumed weights into it.
    generator = make_generator(
        cfg.generation,
        resolve_model(cfg.model.name_or_path),
        tokenizer,
        cfg.model.dtype,
        engine_tokenizer=bool(cfg.sampling.stop),  # stop strings need the engine's own tokenizer
    )
    print0(accelerator, f"[generation] backend {generator.name}")
    if start:
        generator.load_weights(push_state(policy, accelerator).items())
        reference.refresh(policy, accelerator)
    # A fixed answer whose log-probs the engine and the policy must agree on (the sync check).
    probe = (prompt_ids[0], tokenizer("The answer is 42.", add_special_tokens=False).input_ids)

    summary: dict[str, float] = {}
    if start == 0 and accelerator.is_main_process:  # a fresh run never compares with an older run's start
        for name in ("start", "end"):
            Path(f"{tc.output_dir}/eval_{name}.json").unlink(missing_ok=True)
    if cfg.eval.at_start and start == 0:
        at_start, rows = evaluate(cfg, generator, tokenizer, reward, policy, reference, accelerator)
        write_eval(accelerator, tc.output_dir, "start", at_start, rows)
        summary |= {f"{k}/start": v for k, v in at_start.items()}
        tracker.log(at_start, 0)
        print0(accelerator, f"[eval] start: {at_start}")

    rng = random.Random(tc.seed * 7919 + rank)
    skipped = 0
    bar = progress_bar(accelerator, len(plan), start, cfg.logging.progress_bar)
    for step in range(start, len(plan)):
        t_step = time.perf_counter()
        metrics: dict[str, float] = {}
        rng.seed(tc.seed * 7919 + rank * 1_000_003 + step)  # the same choices when a step is redone on resume

        # 0. The sampler must hold the policy's weights: compare log-probs of a fixed answer now and then.
        if cfg.sync_check_steps and (step == start or (step + 1) % cfg.sync_check_steps == 0):
            metrics["sampling/logp_difference"] = logp_difference(generator, policy, probe, accelerator)

        # 1-2. This process's prompts, N answers each.
        idxs = plan.micro_batches(step, rank, world, 1)[0]
        t0 = time.perf_counter()
        batch = [prompt_ids[i] for i in idxs]
        if cfg.pairs.strategy == "greedy_anchor":  # answer 0 of each prompt: the policy's greedy answer
            greedy = generator.generate(batch, 1, replace(cfg.sampling, temperature=0.0))
            sampled = generator.generate(batch, cfg.num_samples - 1, cfg.sampling)
            answers = [g + s for g, s in zip(greedy, sampled)]
        else:
            answers = generator.generate(batch, cfg.num_samples, cfg.sampling)
        t_gen = time.perf_counter() - t0
        flat = [(i, a) for i, group in zip(idxs, answers) for a in group]
        new_tokens = sum(len(a.token_ids) for _, a in flat)

        # 3. Scores.
        t0 = time.perf_counter()
        cols = {k: [prompts[i].columns.get(k) for i, _ in flat] for k in columns}
        scored = reward([prompts[i].prompt for i, _ in flat], [a.text for _, a in flat], **cols)
        t_score = time.perf_counter() - t0
        scores = split(scored.scores, cfg.num_samples)
        # Per answer: did the verifiers named for the chosen (and for the rejected) answer give it full marks?
        components = reward_components(scored)
        passed = verdicts(components, cfg.pairs.chosen_must_pass, cfg.num_samples)
        rejected_ok = verdicts(components, cfg.pairs.rejected_must_pass, cfg.num_samples)

        # 4. One pair per prompt (or pairs.per_prompt), or a counted reason for none.
        pairs, drops, margins, log_rows = pick_pairs(
            idxs, answers, scores, prompt_ids, cfg.pairs, rng, passed, rejected_ok
        )
        parts = {lab: split(v, cfg.num_samples) for lab, v in components.items()}
        for k, (i, row) in enumerate(zip(idxs, log_rows)):  # samples.jsonl: which row, and each reward's part
            row.update(source=prompts[i].source, messages=prompts[i].prompt, columns=prompts[i].columns,
                       components={lab: v[k] for lab, v in parts.items()})  # fmt: skip

        # 4b. Step pairs: at each answer's first wrong equation, the right number against the sampled one.
        steps = []
        if cfg.pairs.step_pairs:
            for i, group, row in zip(idxs, answers, log_rows):
                got = step_pairs(prompt_ids[i], group, tokenizer, cfg.pairs.step_pairs)
                steps += [sp.pair for sp in got]
                row["step_pairs"] = [
                    {"answer": sp.answer, "wrong": sp.wrong, "right": sp.right} for sp in got
                ]

        # 5-6. DPO on the pairs of every process: the loss is a mean over all of them.
        t0 = time.perf_counter()
        train_pairs = pairs + steps
        G = int(
            accelerator.reduce(torch.tensor(len(train_pairs), device=accelerator.device), reduction="sum")
        )
        if G == 0:
            skipped += 1  # no prompt of any process gave a pair: nothing to learn from this step
        else:
            metrics |= dpo_update(
                cfg, policy, reference, optimizer, scheduler, train_pairs, G, probe, accelerator
            )
        t_train = time.perf_counter() - t0

        # 7. The next step samples from the new weights.
        t0 = time.perf_counter()
        if G:
            generator.load_weights(push_state(policy, accelerator).items())
            reference.refresh(policy, accelerator)
        t_push = time.perf_counter() - t0

        metrics |= step_metrics(idxs, flat, scored, scores, pairs, drops, margins, accelerator, len(steps))
        metrics |= {"online/skipped_steps": skipped, **{f"reward/{k}": v for k, v in reward.stats().items()}}
        metrics |= {"time/generation": t_gen, "time/scoring": t_score, "time/training": t_train,
                    "time/weight_push": t_push, "sampling/tokens_per_second": new_tokens / max(t_gen, 1e-9)}  # fmt: skip
        if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < len(plan):
            metrics |= evaluate(cfg, generator, tokenizer, reward, policy, reference, accelerator)[0]
        metrics["time/step"] = time.perf_counter() - t_step
        if (step + 1) % tc.logging_steps == 0 or step == len(plan) - 1:
            tracker.log(metrics, step + 1)
        _log_samples(accelerator, tc.output_dir, step + 1, gather_object(log_rows))
        bar.set_postfix(
            score=f"{metrics['objective/scores']:.3f}",
            pairs=f"{metrics['online/pair_fraction']:.2f}",
            loss=f"{metrics.get('loss', float('nan')):.4f}",
        )
        bar.update(1)
        checkpoint_if_due(
            accelerator, tc, step + 1, len(plan), {"objective/scores": metrics["objective/scores"]}
        )
    bar.close()

    if cfg.eval.at_end:
        end, rows = evaluate(cfg, generator, tokenizer, reward, policy, reference, accelerator)
        write_eval(accelerator, tc.output_dir, "end", end, rows)
        at_start, change = compare_to_start(tc.output_dir, rows)  # prompt by prompt, with a test of each move
        tracker.log(end | change, len(plan))
        summary |= {f"{k}/end": v for k, v in end.items()} | change
        print0(accelerator, f"[eval] end: {end}")
        if change:
            print0(accelerator, describe_change(at_start, end, change))
    generator.close()
    finish(
        accelerator, policy, tokenizer, cfg, tracker, {"steps": len(plan), "prompts": len(prompts), **summary}
    )


def _one(seq, device):
    """A single sequence as (input_ids, position_ids, labels) tensors of shape (1, T)."""
    n = len(seq.input_ids)
    return tuple(
        t.to(device)
        for t in (torch.tensor([seq.input_ids]), torch.arange(n)[None], torch.tensor([seq.labels]))
    )


def _sum_dicts(parts: list[dict]) -> dict:
    out: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def _log_samples(accelerator, output_dir: str, step: int, rows: list[dict]) -> None:
    """Every prompt's answers, scores and the chosen pair, one line per step: samples.jsonl."""
    if accelerator.is_main_process:
        with open(f"{output_dir}/samples.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "rows": rows}, default=str) + "\n")


if __name__ == "__main__":
    run_cli(main)
