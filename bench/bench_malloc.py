"""tcmalloc against glibc's malloc under our own stages, in one run: SFT steps and greedy generation on the
embedded SmolLM2-135M-Instruct, each side in its own process, alternating glibc, tcmalloc, glibc, tcmalloc.

    python bench/bench_malloc.py                   # 2 repeats: about 8 minutes on 2 cores
    python bench/bench_malloc.py --repeats 1 --prompts 32 --steps 3     # quicker

Training: ``bench_sft.py``'s own child (our SFT loop, 1,024-token packs of the shipped demonstrations, 2 a step,
the precision ``mixed_precision: auto`` picks here); its figure is the median tokens/s of the steps after the
first, which warms up. Generation: greedy answers to the first ``--prompts`` prompts of
``data/prompts/train.jsonl`` through the generation interface the evaluation uses (vLLM in process, the engine in
bf16 where the CPU runs it fast, as ``recipes/eval.yaml`` asks), up to 256 new tokens; its figure is generated
tokens/s of one ``generate`` call, the engine already started. Each side's process also reports its CPU time
split into user and system time: what tcmalloc saves is mostly system time (page faults of freshly mapped
memory). The library is what ``python -m alignment.fast_malloc`` finds (``make install`` fetches it).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from machine import cpu_name, print_result, run_child  # bench/machine.py: this folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alignment.fast_malloc import find_tcmalloc  # noqa: E402


def cpu_times() -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": usage.ru_utime, "sys_s": usage.ru_stime}


def child_generation(args) -> None:
    from alignment.data import encode_prompt
    from alignment.generation import GenerationConfig, SamplingConfig, make_generator
    from alignment.models import load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    rows = [json.loads(line) for line in (REPO / "data/prompts/train.jsonl").read_text().splitlines()]
    prompts = [encode_prompt(tokenizer, row["prompt"]) for row in rows[: args.prompts]]
    generator = make_generator(GenerationConfig(backend="vllm", dtype="bf16_if_fast"), path, tokenizer)
    t0 = time.perf_counter()
    answers = generator.generate(prompts, 1, SamplingConfig(temperature=0.0, max_new_tokens=256))
    seconds = time.perf_counter() - t0
    generator.close()
    tokens = sum(len(a[0].token_ids) for a in answers)
    print_result({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, **cpu_times()})


def child_sft(args) -> None:
    """bench_sft.py's child, with this process's CPU times added to its RESULT line."""
    import bench_sft

    from alignment.training import resolve_mixed_precision

    precision = resolve_mixed_precision("auto", cuda=False)
    run = argparse.Namespace(
        model="smollm2-135m-instruct",
        precision=precision,
        steps=args.steps,
        length=1024,
        batch=2,
        checkpointing=False,
    )
    result = bench_sft.run_ours(run)
    steps = result["tokens_per_s_steps"][1:]  # the first step warms up
    print_result({"tokens_per_s": statistics.median(steps), "steps": len(steps), **cpu_times()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--steps", type=int, default=5, help="SFT optimizer steps per run; the first is not timed"
    )
    ap.add_argument("--prompts", type=int, default=64, help="greedy answers per generation run")
    ap.add_argument("--out", default=str(REPO / "bench/results/malloc.json"))
    ap.add_argument("--child", choices=["sft", "generation"])
    args = ap.parse_args()
    if args.child == "sft":
        return child_sft(args)
    if args.child == "generation":
        return child_generation(args)

    library = find_tcmalloc({})
    if library is None:
        sys.exit(
            "no tcmalloc here: `python -m alignment.fast_malloc --install` (part of make install) fetches it"
        )
    sides = {"glibc": {"LD_PRELOAD": None, "ALIGNMENT_TCMALLOC": "0"}, "tcmalloc": {"LD_PRELOAD": library}}
    runs: dict = {work: {side: [] for side in sides} for work in ("sft", "generation")}
    for work in runs:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            work,
            "--steps",
            str(args.steps),
            "--prompts",
            str(args.prompts),
        ]
        for repeat in range(args.repeats):
            for side, env in sides.items():
                result = run_child(cmd, f"{work} on {side}", env_overrides=env)
                print(f"{work} {side} repeat {repeat}: {json.dumps(result)}", flush=True)
                runs[work][side].append(result)

    def med(work: str, side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[work][side])

    summary = {
        work: {
            side: {k: round(med(work, side, k), 2) for k in ("tokens_per_s", "user_s", "sys_s", "wall_s")}
            for side in sides
        }
        | {"speedup": round(med(work, "tcmalloc", "tokens_per_s") / med(work, "glibc", "tokens_per_s"), 3)}
        for work in runs
    }
    result = {
        "cpu": cpu_name(),
        "library": library,
        "repeats": args.repeats,
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for work, row in summary.items():
        g, t = row["glibc"], row["tcmalloc"]
        print(
            f"{work}: glibc {g['tokens_per_s']:.0f} tokens/s ({g['sys_s']:.0f} s system of {g['user_s'] + g['sys_s']:.0f} s "
            f"CPU), tcmalloc {t['tokens_per_s']:.0f} tokens/s ({t['sys_s']:.0f} s of {t['user_s'] + t['sys_s']:.0f} s): "
            f"{row['speedup']:.2f}x"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
