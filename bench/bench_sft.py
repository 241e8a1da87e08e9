"""SFT: trained tokens/s, achieved FLOP/s and peak memory, ours against TRL's SFTTrainer, and the longest packed
sequence each trains under a memory cap, in one run.

    python bench/bench_sft.py                      # SmolLM2-135M-Instruct, bf16 autocast, 1k and 4k packs
    python bench/bench_sft.py --precision no --lengths 1024 --probe-lengths ""        # fp32 at 1k only
    python bench/bench_sft.py --child ours --length 1024 --batch 4 --steps 3 --profile   # where the time goes
    OMP_NUM_THREADS=1 python bench/bench_sft.py --model tiny-qwen2 --steps 2 --repeats 1 --probe-lengths 2048  # smoke

Same on both sides: the shipped demonstrations (data/sft/train.jsonl), loss on the answers only, packed into
sequences of --lengths tokens without padding (ours: recipes/sft.yaml's packing with packed_sdpa; TRL:
``packing=True``, its BFD padding-free packing with per-document position ids), --batch-tokens // length packs
per optimizer step, AdamW, float32 weights under the same --precision (default: what ``mixed_precision: auto``
picks here, bf16 autocast on a CPU with AVX512-BF16 or AMX; TRL: ``bf16=True``, its faster setting on such a CPU),
no gradient checkpointing in the throughput runs, torch on every core on both sides.

Throughput: each side runs in its own subprocess (its peak RSS is its own), alternating ours, TRL, ours, TRL over
--repeats; the first of --steps optimizer steps warms up and is not timed; a run's figure is the median of its
other steps, the reported figure the median over repeats. Tokens/s counts every token of the packs.

Achieved FLOP/s: model FLOPs per trained token = 6 x parameters (the tied output head's matmul included) plus
causal attention, 6 x layers x hidden x (the mean over tokens of their document's length: packed documents do
not attend to each other on either side), times tokens/s; against the machine's bf16 (or fp32) matmul peak,
measured here as the median of 2048^3 ``torch.matmul`` calls on every core. Recomputation is not counted.

Longest sequence (--probe-lengths): one optimizer step on one pack of each length, gradient checkpointing on
both sides, under --memory-cap-gib: the parent samples the child's RSS every 0.1 s and kills it past the cap
(the issue asks for 24 GiB; a 23 GiB machine cannot hold that, so the cap is a setting and named in the output).
A length counts as trained when its step finished under the cap; a step still running after --probe-timeout-s
(model load included) ends the probe of that side, reported as not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import (  # bench/machine.py: this folder is on sys.path
    cpu_name,
    print_result,
    run_child,
    step_timer,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data/sft/train.jsonl"


def run_ours(args) -> dict:
    """Our SFT loop; step times from its metrics.jsonl (each step's tokens / its time)."""
    from alignment.sft import main

    out = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    main(
        [
            str(REPO / "recipes/sft.yaml"),
            f"model.name_or_path={args.model}",
            "model.rope_scaling=null",
            f"model.gradient_checkpointing={str(args.checkpointing).lower()}",
            f"data.max_length={args.length}",
            f"training.per_device_batch_size={args.batch}",
            "training.gradient_accumulation_steps=1",
            f"training.max_steps={args.steps}",
            f"training.mixed_precision={args.precision}",
            "training.save_steps=0",
            "logging.report_to=[]",
            "logging.progress_bar=false",
            f"training.output_dir={out}",
        ]
    )
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    tokens_per_s = [r["tokens_per_second"] for r in rows]
    return {"tokens_per_s_steps": tokens_per_s, "steps": len(rows)}


def run_trl(args) -> dict:
    """TRL's SFTTrainer with packing (BFD, padding-free) and completion-only loss."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from alignment.models import load_tokenizer, resolve_model

    path = resolve_model(args.model)
    rows = [json.loads(x) for x in open(DATA)]
    # prompt/completion, so TRL computes the loss on the answer only (its assistant_only_loss needs a
    # template with generation tags, which SmolLM2's lacks). Multi-turn rows keep their first exchange.
    ds = datasets.Dataset.from_list(
        [
            {"prompt": r["messages"][: r["messages"].index(next(m for m in r["messages"] if m["role"] == "assistant"))],
             "completion": [next(m for m in r["messages"] if m["role"] == "assistant")]}
            for r in rows
        ]
    )  # fmt: skip
    step_times: list[float] = []
    step_tokens: list[int] = []

    cfg = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        max_length=args.length,
        packing=True,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-4,
        lr_scheduler_type="cosine",
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        gradient_checkpointing=args.checkpointing,
        dataloader_num_workers=0,
        seed=42,
        bf16=args.precision == "bf16",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=path,
        args=cfg,
        train_dataset=ds,
        processing_class=load_tokenizer(path),
        callbacks=[step_timer(step_times)],
    )
    collate = trainer.data_collator

    def counting(features):  # the tokens of each step's packs, as the trainer fetched them
        batch = collate(features)
        step_tokens.append(int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    # The collator runs just before each step (no prefetching with 0 workers): step k's tokens are step_tokens[k].
    return {"tokens_per_s_steps": [n / t for n, t in zip(step_tokens, step_times)], "steps": len(step_times)}


def child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    run = run_ours if args.child == "ours" else run_trl
    if args.profile:  # where the time goes: torch ops by self CPU time over the whole run
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = run(args)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    else:
        result = run(args)
    print_result(result)


def launch(
    which: str,
    args,
    length: int,
    batch: int,
    steps: int,
    checkpointing: bool,
    cap_mb: float | None,
    timeout_s: float | None = None,
):
    """One side in a subprocess; returns its RESULT, or {"killed_at_mb": ...} when it passed the memory cap."""
    cmd = [sys.executable, __file__, "--child", which, "--model", args.model, "--steps", str(steps),
           "--length", str(length), "--batch", str(batch), "--precision", args.precision]  # fmt: skip
    if checkpointing:
        cmd.append("--checkpointing")
    return run_child(cmd, f"{which} at {length} tokens", cap_mb, timeout_s)


def matmul_peak(precision: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n^3 torch.matmul on every core, median of repeats (after 2 warm-up calls)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        torch.matmul(a, b)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def model_flops_per_token(model: str) -> tuple[float, dict]:
    """6 N + causal attention over each token's own document (the packs' documents do not see each other)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignment.models import load_tokenizer, resolve_model

    path = resolve_model(model)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    tok = load_tokenizer(path)
    lengths = []
    for line in open(DATA):
        ids = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True)
        lengths.append(len(ids["input_ids"] if hasattr(ids, "keys") else ids))
    mean_context = sum(n * n for n in lengths) / sum(lengths)  # a token's document length, token-weighted
    attention = 6 * config.num_hidden_layers * config.hidden_size * mean_context
    return 6 * params + attention, {"parameters": params, "mean_document_tokens": mean_context}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default=None, help="bf16 or no; default: what mixed_precision auto picks")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run; the first is not timed")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lengths", default="1024,4096", help="tokens per packed sequence (throughput runs)")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="tokens per step: batch = this // length")
    ap.add_argument("--probe-lengths", default="8192,16384,32768", help="longest-sequence probe ('' to skip)")
    ap.add_argument("--memory-cap-gib", type=float, default=20.0)
    ap.add_argument("--probe-timeout-s", type=float, default=600.0, help="give up on a probe step after this")
    ap.add_argument("--out", default=str(REPO / "bench/results/sft.json"))
    ap.add_argument("--child", choices=["ours", "trl"])
    ap.add_argument("--length", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="with --child: print torch.profiler's op table")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))  # runnable from a checkout; children get it through PYTHONPATH too
    if args.precision is None:
        from alignment.training import resolve_mixed_precision

        args.precision = resolve_mixed_precision("auto", cuda=False)
    if args.child:
        return child(args)

    flops_per_token, model_info = model_flops_per_token(args.model)
    peak = matmul_peak(args.precision)
    report = {
        "machine": cpu_name(),
        "model": args.model,
        "precision": args.precision,
        "matmul_peak_gflops": peak / 1e9,
        "model_flops_per_token": flops_per_token,
        **model_info,
        "throughput": {},
        "probe": {},
    }
    print(
        f"SFT on {args.model}, {args.precision}, {report['machine']}; {args.precision} matmul peak {peak / 1e9:.0f} GFLOP/s"
    )

    for length in [int(x) for x in args.lengths.split(",") if x]:
        batch = max(1, args.batch_tokens // length)
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for _ in range(args.repeats):
            for which in runs:
                runs[which].append(launch(which, args, length, batch, args.steps, False, None))
        row = {"batch": batch}
        for which, rs in runs.items():
            tps = statistics.median(statistics.median(r["tokens_per_s_steps"][1:]) for r in rs)
            row[which] = {
                "tokens_per_s": tps,
                "achieved_gflops": tps * flops_per_token / 1e9,
                "share_of_peak": tps * flops_per_token / peak,
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                "runs": rs,
            }
        row["speedup"] = row["ours"]["tokens_per_s"] / row["trl"]["tokens_per_s"]
        row["memory_ratio"] = row["ours"]["peak_rss_mb"] / row["trl"]["peak_rss_mb"]
        report["throughput"][str(length)] = row
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(
            f"\n{batch} x {length}-token packs a step, median of {args.repeats} runs x {args.steps - 1} timed steps"
        )
        print(f"{'':6}{'tokens/s':>10}{'GFLOP/s':>10}{'of peak':>9}{'peak RSS MB':>13}")
        for which in ("ours", "trl"):
            r = row[which]
            print(
                f"{which:6}{r['tokens_per_s']:>10.1f}{r['achieved_gflops']:>10.1f}{r['share_of_peak']:>9.1%}{r['peak_rss_mb']:>13.0f}"
            )
        print(f"ours/TRL: throughput {row['speedup']:.2f}x, peak memory {row['memory_ratio']:.2f}x")

    cap_mb = args.memory_cap_gib * 1024
    probes = [int(x) for x in args.probe_lengths.split(",") if x]
    if probes:
        print(
            f"\nlongest pack trained in one step under {args.memory_cap_gib:g} GiB, gradient checkpointing on"
        )
    for which in ("ours", "trl"):
        report["probe"][which] = {}
        for length in probes:
            r = launch(which, args, length, 1, 1, True, cap_mb, args.probe_timeout_s)
            report["probe"][which][str(length)] = r
            Path(args.out).write_text(json.dumps(report, indent=2))
            if "killed_at_mb" in r:
                print(f"{which:6}{length:>7} tokens: over the cap (killed at {r['killed_at_mb']:.0f} MB)")
                break  # longer packs need more
            if "timed_out_s" in r:
                print(
                    f"{which:6}{length:>7} tokens: no step within {r['timed_out_s']:g} s (RSS {r['rss_mb']:.0f} MB)"
                )
                break
            print(
                f"{which:6}{length:>7} tokens: peak RSS {r['peak_rss_mb']:.0f} MB, about {length / r['tokens_per_s_steps'][0]:.0f} s a step"
            )
        fits = [int(k) for k, v in report["probe"][which].items() if "peak_rss_mb" in v]
        report["probe"][which]["longest"] = max(fits) if fits else None
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
