"""Offline DPO: pairs per second and peak memory, ours (alignment/dpo.py, recipes/dpo.yaml) against TRL's
``DPOTrainer``, same model, pairs, batch, max length and loss, in four configurations, one run.

    python bench/bench_dpo.py                    # SmolLM2-135M-Instruct, 8 pairs a step, 6 steps, all four
    python bench/bench_dpo.py --configs live-fp32 precomputed-fp32
    OMP_NUM_THREADS=1 python bench/bench_dpo.py --model tiny-qwen2 --steps 3 --batch 2 --max-length 256  # smoke

Configurations, each run by both trainers: ``live-*`` scores the reference on every step with a frozen copy of
the start model (ours: ``reference.mode=model``; TRL's default); ``precomputed-*`` scores every pair once before
training and reads the table during it (ours: ``reference.mode=precomputed``; TRL: ``precompute_ref_log_probs``).
``*-fp32`` trains in float32; ``*-bf16`` uses bf16 autocast over float32 weights (ours:
``training.mixed_precision=bf16``; TRL: ``bf16=True, use_cpu=True``).

Same on both sides: data/preference/train.jsonl, --batch pairs per optimizer step (no accumulation), --max-length,
sigmoid DPO at --beta with no NLL term (the recipe's ``nll_weight: 1`` is set to 0: TRL's sigmoid loss has
none), AdamW at --lr without weight decay, a constant schedule, gradient clipping at 1.0, no gradient
checkpointing (TRL's default is on), torch held to --threads threads (ours otherwise takes every core whatever
OMP_NUM_THREADS says), and the pairs in the same order: TRL gets the dataset in our first-epoch order (our
load_examples shuffle, checked against it, then plan_batches) and reads it sequentially, so step k trains on the
same pairs on both sides.

Timing: each trainer runs in its own subprocess, so peak RSS (ru_maxrss) is its own. The first optimizer step
warms up allocators and kernels and is not timed; pairs/s is --batch over the median of the other steps. Ours:
each step's time from its metrics.jsonl (``pairs_per_second`` = pairs / step seconds). TRL: a TrainerCallback
timing on_step_begin to on_step_end (its batch is fetched and collated just before on_step_begin, outside that
window; ours collates inside its step).

Precompute is done before the first step on both sides, so it is never in the step times; its seconds are
reported apart. Ours: ``alignment.preference._precompute`` (hashing the weights and pairs for the cache key,
the reference forwards, writing the cache); loading its frozen reference copy is outside it. TRL: ``hash_module``
(its cache key) plus ``_precompute_ref_logps`` (the forwards, writing its datasets cache); it reuses the policy
and loads no copy. Neither may reuse an earlier run: ours writes to a fresh ``reference.cache_dir`` per run
(the bench checks it computed one file); TRL's dataset is in memory, so ``datasets`` writes its table under a
random name in a per-process temporary folder, and HF_DATASETS_CACHE is a fresh folder as well. Peak RSS
includes precompute: ours loads a second copy of the model for it (freed after), TRL scores with the policy.

TRL's best CPU setting: ``padding_free`` is unavailable in this TRL (it warns and falls back to padding), so
TRL pads chosen and rejected rows to the longest row of the step (``pad_to_multiple_of`` None, its CPU default;
the padding share is reported); ours packs them into one padding-free row. TRL keeps its default optimizer,
fused AdamW (``adamw_torch_fused``), its faster one; ours runs ``torch.optim.AdamW`` as built. TRL's policy
forward also computes entropy, mean logits and top-1 hits for its logged metrics; it has no switch for that.

Deliberate simplifications: one run of each, no repeats; medians of a few steps; CPU only; past one epoch
(300 pairs) TRL replays the first epoch's order while ours reshuffles. tiny-qwen2 keeps Qwen2's 151k-token
vocabulary, so its numbers mostly time the LM head: use it as a smoke test, not a result.
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
CONFIGS = ("live-fp32", "precomputed-fp32", "live-bf16", "precomputed-bf16")


def run_ours(args) -> dict:
    import torch

    import alignment.dpo as dpo
    import alignment.preference as preference

    precomputed, bf16 = args.configs[0].startswith("precomputed"), args.configs[0].endswith("bf16")
    out, cache = args.tmp / "run", args.tmp / "reflogps"  # the cache folder is new: ours pays its precompute
    precompute_s: list[float] = []
    preference._precompute = _timed(preference._precompute, precompute_s)
    make_accelerator = dpo.make_accelerator

    def same_threads(tc):  # ours sets torch to every core; hold it to the count TRL gets
        accelerator = make_accelerator(tc)
        torch.set_num_threads(args.threads)
        return accelerator

    dpo.make_accelerator = same_threads
    dpo.main([
        str(REPO / "recipes/dpo.yaml"), f"model.name_or_path={args.model}", "model.gradient_checkpointing=false",
        f"data.max_length={args.max_length}", f"data.seed={DATA_SEED}",
        f"reference.mode={'precomputed' if precomputed else 'model'}", f"reference.cache_dir={cache}",
        "loss.name=sigmoid", f"loss.beta={args.beta}", "loss.nll_weight=0.0",
        "optimizer.name=adamw", f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.0",
        "scheduler.name=constant", "scheduler.warmup_ratio=0.0", "scheduler.warmup_steps=0",
        f"training.per_device_batch_size={args.batch}", "training.gradient_accumulation_steps=1",
        f"training.max_steps={args.steps}", "training.max_grad_norm=1.0", "training.save_steps=0",
        f"training.mixed_precision={'bf16' if bf16 else 'no'}", f"training.output_dir={out}",
        "logging.report_to=[]", "logging.progress_bar=false",
    ])  # fmt: skip
    if precomputed and len(list(cache.glob("*.pt"))) != 1:
        raise RuntimeError(f"expected ours to compute one reference table in {cache}")
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    step_times = [args.batch / r["pairs_per_second"] for r in rows]  # pairs_per_second = pairs / step seconds
    pairs = json.loads((out / "summary.json").read_text())["pairs"]
    return _summary(args, step_times, sum(precompute_s) if precomputed else None) | {"pairs": pairs}


def run_trl(args) -> dict:
    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer
    from trl.trainer import dpo_trainer

    from alignment.models import load_tokenizer, resolve_model

    precomputed, bf16 = args.configs[0].startswith("precomputed"), args.configs[0].endswith("bf16")
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    rows = [json.loads(x) for x in open(DATA)]
    order = our_pair_order(rows, DATA, args.batch, DATA_SEED, split_shuffle=False)
    ds = datasets.Dataset.from_list(
        [{k: rows[i][k] for k in ("prompt", "chosen", "rejected")} for i in order]
    )
    precompute_s: list[float] = []  # its cache key (a hash of the weights) and the reference forwards
    dpo_trainer.hash_module = _timed(dpo_trainer.hash_module, precompute_s)
    DPOTrainer._precompute_ref_logps = _timed(DPOTrainer._precompute_ref_logps, precompute_s)
    step_times: list[float] = []

    cfg = DPOConfig(
        output_dir=str(args.tmp), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=1.0, beta=args.beta, loss_type=["sigmoid"], max_length=args.max_length,
        precompute_ref_log_probs=precomputed, bf16=bf16, use_cpu=True, seed=42,
        gradient_checkpointing=False,  # TRL's default is on; ours does not checkpoint
        padding_free=False,  # unavailable in this TRL: True only warns and pads anyway
        pad_to_multiple_of=None,  # pad to the longest row of the step, no further
        train_sampling_strategy="sequential",  # the dataset is already in our order
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=path,
        args=cfg,
        train_dataset=ds,
        processing_class=load_tokenizer(path),
        callbacks=[step_timer(step_times)],
    )
    trainer.train()
    result = _summary(args, step_times, sum(precompute_s) if precomputed else None)
    return result | {"pairs": len(trainer.train_dataset), **_padding(trainer.train_dataset, args)}


def _timed(fn, into: list[float]):
    """``fn``, adding the seconds of every call to ``into``."""

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            into.append(time.perf_counter() - t0)

    return wrapper


def _summary(args, step_times: list[float], precompute_s: float | None) -> dict:
    step = statistics.median(step_times[1:])  # the first step warms up allocators and kernels
    return {
        "s_per_step": step,
        "pairs_per_s": args.batch / step,
        "step_times_s": step_times,
        "precompute_s": precompute_s,
    }


def _padding(ds, args) -> dict:
    """Tokens per pair and the share of TRL's padded (2B, T) batch that is padding, over the timed steps."""
    real = padded = 0
    for step in range(1, args.steps):
        lens = [
            min(len(r["prompt_ids"]) + len(r[k]), args.max_length)
            for r in ds.select([(step * args.batch + j) % len(ds) for j in range(args.batch)])
            for k in ("chosen_ids", "rejected_ids")
        ]
        real, padded = real + sum(lens), padded + len(lens) * max(lens)
    return {"tokens_per_pair": real / (args.batch * (args.steps - 1)), "padding_share": 1 - real / padded}


def child(args) -> None:
    args.tmp = Path(tempfile.mkdtemp(prefix=f"bench-dpo-{args.which}-"))  # removed after: ours saves a model
    os.environ["HF_DATASETS_CACHE"] = str(args.tmp / "hf_datasets")  # before datasets is imported: read once
    try:
        result = run_ours(args) if args.which == "ours" else run_trl(args)
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)
    print_result(result)


def child_run(which: str, config: str, args) -> dict:
    cmd = [sys.executable, __file__, "--which", which, "--configs", config, "--model", args.model,
           "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
           "--threads", str(args.threads), "--lr", str(args.lr), "--beta", str(args.beta)]  # fmt: skip
    return run_child(cmd, f"{config} {which}")


def table(report: dict) -> str:
    def secs(r):
        return "-" if r["precompute_s"] is None else f"{r['precompute_s']:.1f}"

    lines = [
        "| config | ours pairs/s | TRL pairs/s | ours/TRL | ours peak MB | TRL peak MB | memory ours/TRL "
        "| ours precompute s | TRL precompute s | TRL padding |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in report["configs"].items():
        o, t = c["ours"], c["trl"]
        lines.append(
            f"| {name} | {o['pairs_per_s']:.2f} | {t['pairs_per_s']:.2f} | {c['speed_ratio']:.2f}x "
            f"| {o['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | {c['memory_ratio']:.2f}x "
            f"| {secs(o)} | {secs(t)} | {t['padding_share']:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run; the first is not timed")
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (recipes/dpo.yaml: 8)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--out", default=str(REPO / "bench/results/dpo.json"))
    ap.add_argument("--which", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2: the first step is warm-up and not timed")
    if args.which:  # a subprocess: one trainer, one configuration
        return child(args)

    import torch
    import trl

    report = {
        "model": args.model, "batch_pairs": args.batch, "max_length": args.max_length, "steps": args.steps,
        "threads": args.threads, "cpu": cpu_name(), "torch": torch.__version__, "trl": trl.__version__, "configs": {},
    }  # fmt: skip
    for name in args.configs:
        r = {which: child_run(which, name, args) for which in ("ours", "trl")}
        if r["ours"]["pairs"] != r["trl"]["pairs"]:
            sys.exit(f"{name}: ours trains on {r['ours']['pairs']} pairs, TRL on {r['trl']['pairs']}")
        r["speed_ratio"] = r["ours"]["pairs_per_s"] / r["trl"]["pairs_per_s"]
        r["memory_ratio"] = r["ours"]["peak_rss_mb"] / r["trl"]["peak_rss_mb"]
        report["configs"][name] = r
        print(
            f"{name}: ours {r['ours']['pairs_per_s']:.2f} pairs/s, TRL {r['trl']['pairs_per_s']:.2f}",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(
        f"\nOffline DPO on {args.model}, {args.batch} pairs/step, max length {args.max_length}, {args.steps} steps "
        f"(first untimed), {args.threads} thread(s), {report['cpu']}, TRL {report['trl']}"
    )
    print(table(report))
    print("ours/TRL > 1: ours trains more pairs per second; memory ours/TRL < 1: ours peaks lower.")


if __name__ == "__main__":
    main()
