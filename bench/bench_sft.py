"""SFT throughput and peak memory: our loop against TRL's SFTTrainer, same model, data and settings, one run.

    python bench/bench_sft.py                       # SmolLM2-135M-Instruct, 6 steps each, fp32
    python bench/bench_sft.py --model tiny-qwen2 --steps 3

Both train on the shipped demonstrations (data/sft/train.jsonl) with loss on the answers only, packed into
sequences of --max-length tokens, --batch sequences per step, AdamW, no gradient checkpointing. Each trainer
runs in its own subprocess, so peak RSS (ru_maxrss) is its own; the first step is warm-up and not timed.
Tokens/s counts every token in the packed sequences (both trainers see the same tokens). Report ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_ours(args) -> dict:
    """Our SFT loop, timed per step from its metrics.jsonl."""
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    from alignment.sft import main

    t0 = time.perf_counter()
    main(
        [
            str(REPO / "recipes/sft.yaml"),
            f"model.name_or_path={args.model}",
            "model.rope_scaling=null",
            "model.gradient_checkpointing=false",
            f"data.max_length={args.max_length}",
            f"training.per_device_batch_size={args.batch}",
            f"training.max_steps={args.steps}",
            f"training.logits_chunk_size={args.max_length}",
            "logging.report_to=[]",
            "logging.progress_bar=false",
            f"training.output_dir={out}",
        ]
    )
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    timed = rows[1:]  # the first step warms up allocators and kernels
    tps = sum(r["tokens_per_second"] for r in timed) / len(timed)
    return {"tokens_per_s": tps, "wall_s": wall, "steps": len(rows)}


def run_trl(args) -> dict:
    """TRL's SFTTrainer with packing (BFD, padding-free) and completion-only loss."""
    import tempfile

    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from alignment.models import load_tokenizer, resolve_model

    path = resolve_model(args.model)
    rows = [json.loads(x) for x in open(REPO / "data/sft/train.jsonl")]
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

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)

    out = tempfile.mkdtemp(prefix="bench-trl-")
    cfg = SFTConfig(
        output_dir=out,
        max_length=args.max_length,
        packing=True,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=7e-6,
        lr_scheduler_type="cosine",
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=42,
        bf16=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=path, args=cfg, train_dataset=ds, processing_class=load_tokenizer(path), callbacks=[Timer()]
    )
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    tokens_per_step = sum(lengths) / len(lengths) * args.batch  # packed sequences are nearly full
    timed = step_times[1:]  # the first step warms up allocators and kernels
    return {
        "tokens_per_s": tokens_per_step * len(timed) / sum(timed),
        "wall_s": wall,
        "steps": len(step_times),
    }


def child(which: str, args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    result = run_ours(args) if which == "ours" else run_trl(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--child", choices=["ours", "trl"])
    args = ap.parse_args()
    if args.child:
        return child(args.child, args)

    results = {}
    for which in ("ours", "trl"):
        cmd = [sys.executable, __file__, "--child", which, "--model", args.model, "--steps", str(args.steps),
               "--max-length", str(args.max_length), "--batch", str(args.batch)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{which} failed")
        results[which] = json.loads(line[len("RESULT ") :])
    o, t = results["ours"], results["trl"]
    print(
        f"SFT on {args.model}, {args.batch} x {args.max_length}-token packed sequences, {args.steps} steps, fp32, CPU"
    )
    print(f"{'':10}{'tokens/s':>12}{'peak RSS MB':>14}")
    for name, r in results.items():
        print(f"{name:10}{r['tokens_per_s']:>12.1f}{r['peak_rss_mb']:>14.0f}")
    print(
        f"ratio ours/TRL: throughput {o['tokens_per_s'] / t['tokens_per_s']:.2f}x, peak memory {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
