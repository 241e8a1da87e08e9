"""What the benchmarks share (imported by the bench scripts beside it): the machine they ran on, each side run
in its own subprocess with its result and peak memory, TRL's step timer, and our trainers' first-epoch order."""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo and the core count, e.g. "AMD EPYC, 2 cores"."""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    return "unknown"


def default_threads() -> int:
    """``--threads``' default: OMP_NUM_THREADS where it is set, else the cores this process may use (its
    affinity mask, as training counts them), not every core of the host."""
    from alignment.training import usable_cpus

    return int(os.environ.get("OMP_NUM_THREADS") or usable_cpus())


def print_result(result: dict) -> None:
    """In a child: add its torch thread count and peak RSS (ru_maxrss, KiB on Linux) and print the RESULT line
    that ``run_child`` reads."""
    import torch

    result["torch_threads"] = torch.get_num_threads()  # as run: should be the same on every side
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def run_child(
    cmd: list[str],
    label: str,
    cap_mb: float | None = None,
    timeout_s: float | None = None,
    env_overrides: dict[str, str | None] | None = None,
) -> dict:
    """Run one side (``cmd``: a bench script with its child arguments) offline and return its RESULT line with
    ``wall_s``. With ``cap_mb``, the child's RSS is sampled every 0.1 s and the child is killed past the cap:
    then {"killed_at_mb": the RSS seen}; with ``timeout_s``, killed after that many seconds: then
    {"timed_out_s": timeout_s, "rss_mb": the peak RSS seen}. ``env_overrides`` sets (or, with None, removes)
    variables of the child's environment. A child that fails stops the benchmark."""
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1",
        "PYTHONPATH": str(REPO),
    }  # fmt: skip
    for key, value in (env_overrides or {}).items():  # None: removed from the child's environment
        env.pop(key, None) if value is None else env.__setitem__(key, value)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        peak = 0.0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss_kb = int(next(x for x in f if x.startswith("VmRSS")).split()[1])
            except (OSError, StopIteration):
                rss_kb = 0
            peak = max(peak, rss_kb / 1024)
            if cap_mb is not None and peak > cap_mb:
                proc.kill()
                proc.wait()
                return {"killed_at_mb": peak}
            if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                proc.kill()
                proc.wait()
                return {"timed_out_s": timeout_s, "rss_mb": peak}
            time.sleep(0.1)
        log.seek(0)
        text = log.read()
    line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(text[-6000:], file=sys.stderr)
        sys.exit(f"{label} failed (exit {proc.returncode}); its output is above")
    return json.loads(line[len("RESULT ") :]) | {"wall_s": time.perf_counter() - t0}


def step_timer(step_times: list[float]):
    """A transformers ``TrainerCallback`` appending each optimizer step's seconds (on_step_begin to
    on_step_end; the Trainer fetches and collates the batch just before that window) to ``step_times``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t0)

    return StepTimer()


def our_pair_order(rows: list[dict], data: Path, batch: int, seed: int, split_shuffle: bool) -> list[int]:
    """Row indices of the preference file ``data`` in the order our trainer visits them in its first epoch:
    load_examples shuffles the rows with data.seed (checked against load_examples itself); the reward trainer
    (``split_shuffle``) shuffles the pairs again with data.seed for its held-out split (none in the benches);
    then plan_batches shuffles them per epoch. A peer that reads its dataset sequentially in this order trains
    on the same pairs at every step."""
    from alignment.config import DataSource, TrainingConfig
    from alignment.data import DataReport, load_examples, normalize_preference_row
    from alignment.preference import PreferenceDataConfig
    from alignment.training import plan_batches

    n = len(rows)
    loaded = list(range(n))
    random.Random(seed).shuffle(loaded)  # one source at weight 1: the shuffle is its only draw
    cfg = PreferenceDataConfig(sources=[DataSource(path=str(data))], seed=seed)
    if load_examples(cfg, normalize_preference_row, DataReport()) != [
        normalize_preference_row(rows[j], f"row {j}") for j in loaded
    ]:
        raise RuntimeError("alignment.data.load_examples orders rows differently now; update our_pair_order")
    split = list(range(n))
    if split_shuffle:
        random.Random(seed).shuffle(split)
    tc = TrainingConfig(per_device_batch_size=batch, max_steps=-(-n // batch))
    plan = [i for b in plan_batches(n, tc, 1, seed).global_batches for i in b][:n]
    return [loaded[split[i]] for i in plan]
