"""Step time and peak memory of OnDARE and OnTIES against torch.optim.AdamW, on SmolLM2-135M's shapes.

Run (about a minute and a half on 2 CPU cores with the defaults):

    python bench/bench_merging.py
    python bench/bench_merging.py --steps 2 --dtype bfloat16 --tau-dtype bfloat16

The 272 tensors of SmolLM2-135M (llama: vocab 49152, hidden 576, intermediate 1536, 30 layers, 9 heads and 3
KV heads of dim 64, tied embeddings, RMSNorm weights; 134.5 M parameters) are built directly with random
values: nothing is downloaded and no forward pass runs, so the time is the optimizer step alone. Gradients
are random and drawn anew before each timed pair of steps (AdamW's, then the optimizer's), outside the timing.

Each optimizer runs in a fresh subprocess so that its peak memory is its own. Memory is the resident set
size (RSS) from /proc/self/status: "state" is the bytes of the optimizer's state tensors, "peak extra" the
peak RSS during the steps above the RSS of parameters and gradients alone (state plus the transient buffers
of a step). The high-water mark is reset with /proc/self/clear_refs after setup, so building tau from the
base weights is not counted. Simplifications: one process, CPU only, no forward or backward pass.

Where the time goes on CPU (torch profiler, one thread). OnDARE computes its update only where the mask keeps
it: the moments advance everywhere, the kept indices are drawn as geometric gaps (p * numel uniforms, not
numel), the update is formed on the gathered moments and added with index_add_, then alpha * tau everywhere:
4 full passes against AdamW's 7, plus the draws and gathers. OnTIES ranks the update without forming it
for the whole tensor: bounds on the k-th largest from a stratified random sample (one entry drawn in each
chunk; a plain strided sample saw only a few columns of a real gradient), then one pass of 1 MiB blocks that
advances the moments and forms the block's update in one call of torch's fused AdamW kernel (2.6x faster
than the eight elementwise ops it replaced), and keeps the entries over the lower bound (numpy's flatnonzero:
torch's CPU nonzero was a quarter of the step), then an exact selection among those, about 11% of the
entries. Comparisons and products with boolean masks go through numpy (torch's CPU comparisons ran 7-10x
slower here); the two changes took OnTIES from 2.35x to 1.70x AdamW's step in one session. What remains
(cProfile, per step): torch's kthvalue (the sample bounds and the band between them) 0.09 s, flatnonzero
0.07 s, the fused kernel 0.07 s, gathers 0.05 s, and per-tensor overhead over the 272 tensors. For
scale, SFT of SmolLM2-135M trains about 100 tokens/s on such a CPU (shared/NOTES.md): a step of 2,048 tokens
takes about 20 s, next to well under a second of optimizer. Figures are noisy on a shared machine: compare the
ratios, which are taken against AdamW steps interleaved in the same process.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.merging import OnlineMergingOptimizer  # noqa: E402

OPTIMIZERS = ("adamw", "ondare", "onties")
MiB = 2**20


def smollm2_135m_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of SmolLM2-135M (lm_head is tied to the embedding: one tensor)."""
    vocab, hidden, intermediate, layers, heads, kv_heads, head_dim = 49152, 576, 1536, 30, 9, 3, 64
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            layer + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            layer + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            layer + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            layer + "mlp.gate_proj.weight": (intermediate, hidden),
            layer + "mlp.up_proj.weight": (intermediate, hidden),
            layer + "mlp.down_proj.weight": (hidden, intermediate),
            layer + "input_layernorm.weight": (hidden,),
            layer + "post_attention_layernorm.weight": (hidden,),
        }
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def _rss_mib(field: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MiB
    raise RuntimeError(f"{field} not found in /proc/self/status: this benchmark needs Linux")


def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS, so that RSS counts live tensors only."""
    gc.collect()
    # glibc keeps freed blocks below its mmap threshold (tensors up to 32 MiB) in the heap, resident: without
    # this the freed base weights would count as memory the merging optimizers hold.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS then also counts freed blocks


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _build_optimizer(name: str, params: dict[str, torch.nn.Parameter], tau_dtype: torch.dtype | None):
    """The optimizer and the seconds its constructor took (for merging: computing tau, masks included)."""
    if name == "adamw":
        return torch.optim.AdamW(params.values(), lr=1e-5, weight_decay=0.01), 0.0
    # The policy starts at the reference, as after SFT; the base differs from it by a small random tau.
    reference = {n: p.detach() for n, p in params.items()}
    base = {n: t - torch.empty_like(t).uniform_(-0.01, 0.01) for n, t in reference.items()}
    start = time.perf_counter()
    optimizer = OnlineMergingOptimizer(
        params.items(),
        reference=reference,
        base=base,
        mode=name,
        reserve_p=0.1,
        alpha=1e-5,
        lr=1e-5,
        weight_decay=0.01,
        seed=0,
        tau_dtype=tau_dtype,
    )
    return optimizer, time.perf_counter() - start


def _fresh_gradients(params: dict[str, torch.nn.Parameter]) -> None:
    """New random gradients, as every training step has (not timed). With one fixed gradient Adam's update is
    lr * g / (|g| + eps) at every step, the same magnitude for every entry to 1e-5: no real run ranks such
    updates, and OnTIES' top-k then keeps whole bands of exact ties."""
    for p in params.values():
        p.grad.uniform_(-1e-3, 1e-3)


def _timed_step(optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def run_worker(name: str, steps: int, dtype: torch.dtype, tau_dtype: torch.dtype | None) -> dict:
    """Measure one optimizer in this (fresh) process: memory first, then time against AdamW.

    Memory: the peak RSS over one step (which allocates the moments), above parameters and gradients. Time:
    `steps` steps of the optimizer interleaved with `steps` of a torch AdamW on the same parameters, so that
    both see the same load from other processes on the machine (the AdamW states are built after the
    memory reading and do not count in it).
    """
    # Uniform rather than normal values: several times faster to draw, and the optimizers do not care.
    shapes = smollm2_135m_shapes()
    params = {
        n: torch.nn.Parameter(torch.empty(s, dtype=dtype).uniform_(-0.04, 0.04)) for n, s in shapes.items()
    }
    for p in params.values():
        p.grad = torch.empty_like(p).uniform_(-1e-3, 1e-3)
    _release_freed_memory()
    rss_params_grads = _rss_mib("VmRSS")

    optimizer, build_s = _build_optimizer(name, params, tau_dtype)
    _release_freed_memory()  # the base weights are garbage now: only tau remains
    peak_reset = _reset_peak_rss()
    optimizer.step()  # allocates the moments
    peak_extra_mib = _rss_mib("VmHWM") - rss_params_grads
    state_bytes = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )

    adamw = optimizer if name == "adamw" else _build_optimizer("adamw", params, None)[0]
    adamw.step()  # warm-up
    adamw_times, times = [], []
    for _ in range(steps):
        _fresh_gradients(params)
        adamw_times.append(_timed_step(adamw))
        if adamw is not optimizer:
            times.append(_timed_step(optimizer))
    times = times or adamw_times
    return {
        "name": name,
        "numel": sum(p.numel() for p in params.values()),
        "tensors": len(params),
        "build_s": build_s,
        "step_s": sum(times) / len(times),
        "adamw_step_s": sum(adamw_times) / len(adamw_times),
        "state_mib": state_bytes / MiB,
        "peak_extra_mib": peak_extra_mib,
        "peak_reset": peak_reset,
    }


def _print_table(rows: list[dict], args: argparse.Namespace) -> None:
    adamw = next(row for row in rows if row["name"] == "adamw")
    first = rows[0]
    print(
        f"SmolLM2-135M shapes: {first['tensors']} tensors, {first['numel'] / 1e6:.1f} M parameters, "
        f"{args.dtype}, tau_dtype {args.tau_dtype or 'as parameters'}, {torch.get_num_threads()} threads; "
        f"mean of {args.steps} steps interleaved with AdamW's in the same process"
    )
    columns = [
        "optimizer",
        "step s",
        "AdamW s",
        "x AdamW",
        "state MiB",
        "x AdamW",
        "peak extra MiB",
        "x AdamW",
    ]
    widths = [10, 9, 9, 9, 11, 9, 16, 9, 9]
    print(
        "".join(
            f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(columns + ["build s"], widths))
        )
    )
    for row in rows:
        values = [
            f"{row['step_s']:.3f}",
            f"{row['adamw_step_s']:.3f}",
            f"{row['step_s'] / row['adamw_step_s']:.2f}",
            f"{row['state_mib']:.0f}",
            f"{row['state_mib'] / adamw['state_mib']:.2f}",
            f"{row['peak_extra_mib']:.0f}",
            f"{row['peak_extra_mib'] / adamw['peak_extra_mib']:.2f}",
            f"{row['build_s']:.2f}",
        ]
        print(f"{row['name']:<{widths[0]}}" + "".join(f"{v:>{w}}" for v, w in zip(values, widths[1:])))
    print("state: optimizer state tensors; peak extra: peak RSS over one step above parameters and gradients")
    if not all(row["peak_reset"] for row in rows):
        print("note: the kernel refused to reset the peak RSS; peak extra includes building tau")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per optimizer (after 1 warm-up)")
    # The step is memory-bound elementwise work: a second thread gains little, and on a shared machine a
    # descheduled thread stalls every op, so one thread gives steadier figures.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tau-dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--worker", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if "adamw" not in args.optimizers:
        parser.error("--optimizers must include adamw: ratios are against it")
    dtype = getattr(torch, args.dtype)
    tau_dtype = getattr(torch, args.tau_dtype) if args.tau_dtype else None

    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.steps, dtype, tau_dtype)))
        return
    rows = []
    for name in args.optimizers:
        command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps)]
        command += ["--dtype", args.dtype, "--threads", str(args.threads)]
        if args.tau_dtype:
            command += ["--tau-dtype", args.tau_dtype]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"the {name} worker failed:\n{result.stderr}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    _print_table(rows, args)


if __name__ == "__main__":
    main()
