"""Reward model: training pairs per second and scoring sequences per second, with peak memory, ours against
TRL and plain transformers on the same model, pairs and texts, in one run.

    python bench/bench_reward.py                 # SmolLM2-135M-Instruct, 8 pairs a step, 9 steps, 2 repeats
    OMP_NUM_THREADS=1 python bench/bench_reward.py --model tiny-qwen2 --steps 3 --repeats 1 --score-pairs 8  # smoke

Training: ours (alignment/reward_model.py, recipes/reward.yaml) against TRL's ``RewardTrainer``. Both train a
one-output sequence classifier on the model with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected),
mean over the pairs of a step. Same on both sides: data/preference/train.jsonl in the same order, --batch pairs
per optimizer step (no accumulation), --max-length (no pair here is near it), AdamW at --lr without weight
decay, a constant schedule (the recipe's cosine is set to constant: TRL's has no min_lr), gradient clipping at
1.0, no gradient checkpointing (TRL's default is on), float32 weights with the same --precision (default: what
the recipe's ``mixed_precision: auto`` picks on this CPU, bf16 autocast where the CPU has AVX512-BF16 or AMX;
TRL: ``bf16=True, use_cpu=True``), and torch held to --threads threads. The recipe's held-out share
(``eval_fraction: 0.1``) is set to 0, so ours trains on every pair and runs no evaluation inside a step; TRL gets
the pairs in our first-epoch order (load_examples' shuffle, checked against it, our split shuffle, then
plan_batches) and reads them sequentially, so step k trains on the same pairs on both sides.

TRL's best CPU settings: padded chosen+rejected rows (2B, T) to the longest row of the step
(``pad_to_multiple_of`` None, its CPU default; it has no padding-free mode for reward models; the padding share
is reported), its default attention (sdpa), its default optimizer ``adamw_torch_fused`` (its fastest), its
default ``disable_dropout``. Ours packs the 2B sequences into one padding-free row (packed_sdpa) and runs
``torch.optim.AdamW`` as built. TRL also gathers min/mean/max reward, accuracy and margin for its logs each step;
ours computes loss, accuracy and margin. bf16 autocast is TRL's faster precision on a CPU with AVX512-BF16: on
an AMD EPYC (2 cores) it trained 1.57x faster than in float32 (``--precision no --tasks train``).

Scoring: ours (``reward.model.RewardModelScorer``: chat template, tokenize, padding-free rows of up to
``batch_tokens`` tokens) against a plain ``AutoModelForSequenceClassification`` forward on right-padded batches of
--score-batch sequences, on the same texts: the chosen and the rejected answer of the first --score-pairs pairs,
rendered with the model's chat template. Both in float32 (the scorer's default) under no_grad, tokenization
included in the time. Both load the model after the same seed, so the fresh score heads agree and the scores can
be compared (max_abs_diff).

Timing: each side runs in its own subprocess, so its peak RSS (ru_maxrss) is its own, and the sides alternate
(ours, theirs, ours, theirs) over --repeats. Training: the first optimizer step warms up allocators and kernels
and is not timed; a run's pairs/s is --batch over the median of its other steps, and the figure is the median
over repeats. Ours: the time between the tracker's per-step logs (the first from the start of the loop); it
collates inside its step. TRL: a TrainerCallback timing on_step_begin to on_step_end (its batch is fetched and
collated just before, outside that window). Peak RSS is the whole process's: ours saves its final model after
the loop, TRL saves none. Scoring: one untimed warm-up call on a few pairs, then one timed pass
over all the texts per run; the figure is the median over repeats.

Deliberate simplifications: a few steps per run, few repeats, CPU only, a fresh (untrained) score head for
scoring, and tiny-qwen2 only as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import (  # bench/machine.py: the script's folder is on sys.path
    cpu_name,
    default_threads,
    our_pair_order,
    print_result,
    run_child,
    step_timer,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data/preference/train.jsonl"
DATA_SEED = 0  # ours shuffles the pairs with data.seed; TRL gets them in that same order
SIDES = {"train": ("ours", "trl"), "score": ("ours", "plain")}


def train_ours(args) -> dict:
    import torch

    import alignment.reward_model as rm

    out = args.tmp / "run"
    marks: list[float] = []  # the loop's start, then the end of every step (its tracker.log)
    make_accelerator, make_tracker, resume_step = rm.make_accelerator, rm.make_tracker, rm.resume_step
    tokenize_pairs, lengths = rm.tokenize_pairs, []

    def same_threads(tc):  # ours sets torch to every core; hold it to the count TRL gets
        accelerator = make_accelerator(tc)
        torch.set_num_threads(args.threads)
        return accelerator

    def timed_tracker(*a, **k):
        tracker = make_tracker(*a, **k)
        log = tracker.log
        tracker.log = lambda *x, **y: (marks.append(time.perf_counter()), log(*x, **y))[1]
        return tracker

    def start_mark(*a, **k):
        step = resume_step(*a, **k)
        marks.append(time.perf_counter())
        return step

    def counted(*a, **k):
        pairs = tokenize_pairs(*a, **k)
        lengths.extend(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
        return pairs

    rm.make_accelerator, rm.make_tracker, rm.resume_step, rm.tokenize_pairs = (
        same_threads, timed_tracker, start_mark, counted,
    )  # fmt: skip
    rm.main([
        str(REPO / "recipes/reward.yaml"), f"model.name_or_path={args.model}", "model.gradient_checkpointing=false",
        f"data.max_length={args.max_length}", f"data.seed={DATA_SEED}", "eval_fraction=0.0", "eval_steps=0",
        "optimizer.name=adamw", f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.0",
        "scheduler.name=constant", "scheduler.warmup_ratio=0.0", "scheduler.warmup_steps=0",
        f"training.per_device_batch_size={args.batch}", "training.gradient_accumulation_steps=1",
        f"training.max_steps={args.steps}", "training.max_grad_norm=1.0", "training.save_steps=0",
        f"training.mixed_precision={args.precision}", f"training.output_dir={out}",
        "logging.report_to=[]", "logging.progress_bar=false",
    ])  # fmt: skip
    step_times = [b - a for a, b in zip(marks, marks[1:])]
    if len(step_times) != args.steps:
        raise RuntimeError(f"expected {args.steps} step times from ours, got {len(step_times)}")
    return _train_summary(args, step_times) | {
        "pairs": len(lengths),
        "tokens_per_pair": statistics.mean(lengths),
    }


def train_trl(args) -> dict:
    import datasets
    import torch
    from trl import RewardConfig, RewardTrainer

    from alignment.models import load_tokenizer, resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    rows = [json.loads(x) for x in open(DATA)]
    ds = datasets.Dataset.from_list(
        [
            {k: rows[i][k] for k in ("prompt", "chosen", "rejected")}
            for i in our_pair_order(rows, DATA, args.batch, DATA_SEED, split_shuffle=True)
        ]
    )
    step_times: list[float] = []

    cfg = RewardConfig(
        output_dir=str(args.tmp), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=1.0, max_length=args.max_length,
        bf16=args.precision == "bf16", use_cpu=True, seed=42,
        model_init_kwargs={"dtype": torch.float32},
        gradient_checkpointing=False,  # TRL's default is on; ours does not checkpoint
        pad_to_multiple_of=None,  # pad to the longest row of the step, no further
        train_sampling_strategy="sequential",  # the dataset is already in our order
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = RewardTrainer(model=path, args=cfg, train_dataset=ds, processing_class=load_tokenizer(path),
                            callbacks=[step_timer(step_times)])  # fmt: skip
    trainer.train()
    return _train_summary(args, step_times) | {"pairs": len(trainer.train_dataset), **_padding(trainer, args)}


def _train_summary(args, step_times: list[float]) -> dict:
    step = statistics.median(step_times[1:])  # the first step warms up allocators and kernels
    return {"s_per_step": step, "pairs_per_s": args.batch / step, "step_times_s": step_times}


def _padding(trainer, args) -> dict:
    """Tokens per pair (all pairs) and the share of TRL's padded (2B, T) batches that is padding (timed steps)."""
    ds = trainer.train_dataset
    lens = [len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ds]
    real = padded = 0
    for step in range(1, args.steps):
        rows = ds.select([(step * args.batch + j) % len(ds) for j in range(args.batch)])
        seq = [len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")]
        real, padded = real + sum(seq), padded + len(seq) * max(seq)
    return {"tokens_per_pair": statistics.mean(lens), "padding_share": 1 - real / padded}


def _score_texts(args) -> tuple[list, list[str]]:
    """The chosen and the rejected answer of the first --score-pairs pairs: (prompts, completions)."""
    rows = [json.loads(x) for x in open(DATA)][: args.score_pairs]
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    completions = [r[k][-1]["content"] for r in rows for k in ("chosen", "rejected")]
    return prompts, completions


def score_ours(args) -> dict:
    import torch

    from reward.model import RewardModelScorer

    prompts, completions = _score_texts(args)
    torch.manual_seed(0)  # the fresh score head: the same on both sides
    scorer = RewardModelScorer(args.model, max_length=args.max_length, dtype="float32")
    torch.set_num_threads(args.threads)
    scorer.score(prompts[:8], completions[:8])  # warm-up
    t0 = time.perf_counter()
    scores = scorer.score(prompts, completions)
    return _score_summary(time.perf_counter() - t0, scores, [len(scorer.encode(p, c)) for p, c in
                                                             zip(prompts, completions)])  # fmt: skip


def score_plain(args) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignment.models import load_tokenizer, resolve_model
    from reward.model import to_messages

    prompts, completions = _score_texts(args)
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "right"
    torch.manual_seed(0)  # the fresh score head: the same on both sides
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    torch.set_num_threads(args.threads)

    @torch.no_grad()
    def score(ps, cs) -> tuple[list[float], int]:
        texts = [tokenizer.apply_chat_template(to_messages(p, c), tokenize=False) for p, c in zip(ps, cs)]
        out, padded = [], 0
        for s in range(0, len(texts), args.score_batch):
            enc = tokenizer(texts[s : s + args.score_batch], add_special_tokens=False, padding=True,
                            truncation=True, max_length=args.max_length, return_tensors="pt")  # fmt: skip
            out += model(**enc, use_cache=False).logits[:, 0].float().tolist()  # (B, 1) -> B scores
            padded += enc.input_ids.numel()
        return out, padded

    score(prompts[:8], completions[:8])  # warm-up
    t0 = time.perf_counter()
    scores, padded = score(prompts, completions)
    seconds = time.perf_counter() - t0
    texts = [
        tokenizer.apply_chat_template(to_messages(p, c), tokenize=False) for p, c in zip(prompts, completions)
    ]
    lens = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    return _score_summary(seconds, scores, lens) | {"padding_share": 1 - sum(lens) / padded}


def _score_summary(seconds: float, scores: list[float], lens: list[int]) -> dict:
    return {
        "s": seconds,
        "seqs_per_s": len(scores) / seconds,
        "scores": scores,
        "tokens_per_seq": statistics.mean(lens),
    }


def child(args) -> None:
    args.tmp = Path(tempfile.mkdtemp(prefix=f"bench-reward-{args.task}-{args.which}-"))  # ours saves a model
    os.environ["HF_DATASETS_CACHE"] = str(args.tmp / "hf_datasets")  # before datasets is imported: read once
    run = {("train", "ours"): train_ours, ("train", "trl"): train_trl,
           ("score", "ours"): score_ours, ("score", "plain"): score_plain}[args.task, args.which]  # fmt: skip
    try:
        result = run(args)
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)
    print_result(result)


def child_run(task: str, which: str, args) -> dict:
    cmd = [sys.executable, __file__, "--task", task, "--which", which, "--model", args.model,
           "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
           "--threads", str(args.threads), "--lr", str(args.lr), "--precision", args.precision,
           "--score-pairs", str(args.score_pairs), "--score-batch", str(args.score_batch)]  # fmt: skip
    return run_child(cmd, f"{task} {which}")


def compare(task: str, runs: dict[str, list[dict]]) -> dict:
    """Median rate over the repeats and the largest peak RSS of each side, and ours/theirs ratios."""
    key = "pairs_per_s" if task == "train" else "seqs_per_s"
    ours, theirs = SIDES[task]
    row = {side: {"rate": statistics.median(r[key] for r in runs[side]),
                  "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[side]), "runs": runs[side]}
           for side in SIDES[task]}  # fmt: skip
    row["speed_ratio"] = row[ours]["rate"] / row[theirs]["rate"]
    row["memory_ratio"] = row[ours]["peak_rss_mb"] / row[theirs]["peak_rss_mb"]
    return row


def table(report: dict) -> str:
    lines = [
        "| task | unit | ours | TRL / plain | ours/theirs | ours peak MB | theirs peak MB | memory ours/theirs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task, unit in (("train", "pairs/s"), ("score", "sequences/s")):
        if task in report["tasks"]:
            r = report["tasks"][task]
            o, t = r["ours"], r[SIDES[task][1]]
            lines.append(
                f"| {task} | {unit} | {o['rate']:.2f} | {t['rate']:.2f} | {r['speed_ratio']:.2f}x "
                f"| {o['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | {r['memory_ratio']:.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument(
        "--steps", type=int, default=9, help="optimizer steps per training run; the first is untimed"
    )
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (recipes/reward.yaml: 8)")
    ap.add_argument("--max-length", type=int, default=1024, help="recipes/reward.yaml: 1024")
    ap.add_argument("--lr", type=float, default=1e-5, help="recipes/reward.yaml: 1e-5")
    ap.add_argument("--precision", choices=["auto", "no", "bf16"], default="auto",
                    help="training autocast; auto: as the recipe resolves it on this machine")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    ap.add_argument("--score-pairs", type=int, default=64, help="pairs scored: 2 sequences each")
    ap.add_argument("--score-batch", type=int, default=16, help="sequences per padded batch (plain side)")
    ap.add_argument("--tasks", nargs="+", choices=list(SIDES), default=list(SIDES))
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--out", default=str(REPO / "bench/results/reward.json"))
    ap.add_argument("--task", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--which", choices=["ours", "trl", "plain"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2: the first step is warm-up and not timed")
    if args.which:  # a subprocess: one side of one task
        return child(args)

    import torch
    import trl

    from alignment.training import resolve_mixed_precision

    args.precision = resolve_mixed_precision(args.precision)  # both sides get the same, resolved here once
    report = {
        "model": args.model, "batch_pairs": args.batch, "max_length": args.max_length, "steps": args.steps,
        "repeats": args.repeats, "precision_train": args.precision, "precision_score": "no (float32)",
        "score_sequences": 2 * args.score_pairs, "score_batch_plain": args.score_batch, "threads": args.threads,
        "cpu": cpu_name(), "torch": torch.__version__, "trl": trl.__version__, "tasks": {},
    }  # fmt: skip
    for task in args.tasks:
        runs: dict[str, list[dict]] = {side: [] for side in SIDES[task]}
        for rep in range(args.repeats):
            for side in SIDES[task]:
                runs[side].append(child_run(task, side, args))
                r = runs[side][-1]
                rate = (
                    f"{r['pairs_per_s']:.2f} pairs/s" if task == "train" else f"{r['seqs_per_s']:.2f} seqs/s"
                )
                print(f"{task} {side} run {rep + 1}: {rate}, peak {r['peak_rss_mb']:.0f} MB", flush=True)
        if task == "train" and runs["ours"][0]["pairs"] != runs["trl"][0]["pairs"]:
            sys.exit(f"ours trains on {runs['ours'][0]['pairs']} pairs, TRL on {runs['trl'][0]['pairs']}")
        report["tasks"][task] = row = compare(task, runs)
        if task == "score":
            diffs = [abs(a - b) for a, b in zip(runs["ours"][0]["scores"], runs["plain"][0]["scores"])]
            row["max_abs_score_diff"] = max(diffs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(
        f"\nReward model on {args.model}: training {args.batch} pairs/step, max length {args.max_length}, "
        f"{args.steps} steps (first untimed), precision {args.precision}; scoring {2 * args.score_pairs} sequences "
        f"in float32; {args.repeats} repeat(s), {args.threads} thread(s), {report['cpu']}, TRL {report['trl']}"
    )
    print(table(report))
    if "score" in report["tasks"]:
        print(f"scores ours vs plain: max abs diff {report['tasks']['score']['max_abs_score_diff']:.2e}")
    print("ours/theirs > 1: ours is faster; memory ours/theirs < 1: ours peaks lower.")


if __name__ == "__main__":
    main()
