"""Shared parts of the training entry points: optimizer, LR schedule, the batch plan, checkpoints, saving.

The batch plan is decided before training from the data alone, the same on every process: a stream of
seeded per-epoch permutations is cut into global batches of ``per_device_batch_size x processes x
accumulation`` items, and each process takes its slice. One process with accumulation 2 and two processes
with accumulation 1 therefore see the same global batches, and losses are normalised by the global batch's
label count, so their gradients agree.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from alignment.config import OptimizerConfig, SchedulerConfig, TrainingConfig, to_dict
from alignment.fast_malloc import status_line


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU has bf16 matmul instructions (AVX512-BF16 or AMX-BF16). Without them torch falls back
    to a reference gemm that runs bf16 10-100x slower than fp32 (measured on an AVX2-only EPYC)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_mixed_precision(requested: str, cpuinfo: str | None = None, cuda: bool | None = None) -> str:
    """``training.mixed_precision`` as run: "auto" becomes "bf16" on a CUDA GPU that supports it or a CPU with
    fast bf16 (``cpu_has_fast_bf16``), else "no"; "no" and "bf16" are kept as asked."""
    if requested != "auto":
        return requested
    if cuda if cuda is not None else torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_fast_bf16(cpuinfo) else "no"


def deepspeed_launch() -> bool:
    """True when `accelerate launch` was given a DeepSpeed config (e.g. recipes/accelerate/zero3.yaml): the
    variable it sets, read as accelerate itself reads it."""
    from accelerate.utils.environment import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def make_accelerator(tc: TrainingConfig):
    """The Accelerator every entry point uses.

    On a machine without CUDA, processes started by torchrun (``accelerate launch --multi_gpu`` or a DDP
    config) only form a process group when Accelerator is told ``cpu=True``; otherwise each one silently trains
    alone with world size 1. We set it, and refuse to run if the launcher's world size was still lost.

    A DeepSpeed launch is the exception: ``cpu=True`` would turn it into plain data parallel without a word, so
    without CUDA DeepSpeed runs on its CPU accelerator over gloo instead (ZeRO-3 shards parameters, gradients and
    optimizer state there too). Its config gets the run's micro-batch and clipping; the training loops mark the
    last micro-batch of each optimizer step (``micro_batch``), where DeepSpeed steps its optimizer.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.utils.environment import parse_flag_from_env

    precision = resolve_mixed_precision(tc.mixed_precision)
    cuda = torch.cuda.is_available()
    deepspeed = deepspeed_launch()
    # MoE layers leave unrouted experts without gradients in a step.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if deepspeed and not cuda:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        cpu=not cuda and not deepspeed, mixed_precision=precision, kwargs_handlers=handlers
    )
    if tc.mixed_precision == "auto" and accelerator.is_main_process:
        print(f"[train] mixed_precision auto -> {precision}", flush=True)
    if not cuda:
        # `accelerate launch` pins each CPU process to one thread (OMP_NUM_THREADS=1): on a CPU machine that
        # leaves cores idle. Share them among this machine's processes instead: the cores this process may run
        # on (taskset, a container's cpuset), not every core of the host.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, usable_cpus() // local))
        print0(accelerator, f"[train] {status_line()}")
    if not cuda and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        # Accelerator(cpu=True) turns an FSDP launch config into MULTI_CPU: plain data parallel over gloo.
        print0(
            accelerator,
            f"[train] FSDP was asked for, but without CUDA accelerate runs it as plain data parallel "
            f"({accelerator.distributed_type.value}, gloo): every process holds the whole model and optimizer; "
            f"the losses are those of the same global batch, the memory is not sharded",
        )
    if deepspeed:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # One DeepSpeed micro-step per optimizer step: the loops accumulate micro-batches themselves (their
        # losses are already normalised by the global batch) and say which one is the last.
        ds["train_micro_batch_size_per_gpu"] = tc.per_device_batch_size
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = tc.per_device_batch_size * accelerator.num_processes
        ds["gradient_clipping"] = tc.max_grad_norm
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        print0(
            accelerator,
            f"[train] DeepSpeed ZeRO-{stage} on {'CUDA' if cuda else 'CPU (gloo)'}, "
            f"{accelerator.num_processes} processes",
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"launched {launched} processes but the process group has {accelerator.num_processes}; "
            "on CPU launch with `accelerate launch --multi_gpu --num_processes N` or a recipes/accelerate config"
        )
    return accelerator


@contextlib.contextmanager
def micro_batch(accelerator, model, last: bool):
    """The context of one micro-batch's forward and backward within an optimizer step.

    DDP: gradients are all-reduced only after the last micro-batch (``no_sync`` before it). DeepSpeed: its
    engine is told whether this is the step's last micro-batch; there it reduces the gradients, clips them and
    steps the optimizer inside ``accelerator.backward`` (the loop's ``optimizer.step()`` is then a no-op).
    """
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.gradient_state._set_sync_gradients(last)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    elif last:
        yield
    else:
        with accelerator.no_sync(model):
            yield


@contextlib.contextmanager
def whole_model(accelerator):
    """The context to load a model every process holds whole (a frozen reference that DeepSpeed never wraps):
    under ZeRO-3, transformers loads a model partitioned (zero.Init), and such a model cannot run a forward on
    its own. Inside, transformers does not see the DeepSpeed config; it sees it again after."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def print_sharding(accelerator, model) -> None:
    """Under DeepSpeed, one line per process: how many of the model's parameter entries it holds (ZeRO-3 keeps
    a parameter's full size in ``ds_numel`` and this process's part in ``ds_tensor``)."""
    if accelerator.state.deepspeed_plugin is None:
        return
    params = list(model.parameters())
    held = sum(getattr(p, "ds_tensor", p).numel() for p in params)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    print(
        f"[train] process {accelerator.process_index} holds {held} of {total} parameter entries", flush=True
    )


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one, else every CPU."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def print0(accelerator, *args) -> None:
    if accelerator.is_main_process:
        print(*args, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------------------------


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # Biases and norm weights (1-D) are not decayed, as in transformers' Trainer.
    return p.ndim < 2 or name.endswith(".bias")


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(
    cfg: OptimizerConfig, model: nn.Module, max_length: int = 2048, seed: int = 0
) -> torch.optim.Optimizer:
    named = trainable_named_parameters(model)
    if not named:
        raise ValueError("the model has no trainable parameters")
    if cfg.name == "adamw":
        groups = [
            {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if deepspeed_launch():
        raise ValueError(
            f"optimizer.name: {cfg.name} needs each parameter whole (its mask and base weights are per tensor), "
            "but DeepSpeed hands the optimizer flat shards of the parameters: use optimizer.name=adamw, or a "
            "DDP / FSDP2 launch config"
        )
    from alignment.merging_setup import build_merging_optimizer

    return build_merging_optimizer(cfg, model, named, max_length, seed)


def lr_factor(step: int, total: int, peak: float, cfg: SchedulerConfig) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based) of ``total``.

    Linear warmup over ``warmup`` steps, then cosine (or linear) decay that reaches ``min_lr`` exactly at the
    last step: lr = min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * progress)), progress = 0 .. 1.
    """
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)
    floor = cfg.min_lr / peak
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    if cfg.name == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: SchedulerConfig, peak: float, total: int):
    if cfg.min_lr > peak:
        raise ValueError(f"scheduler.min_lr ({cfg.min_lr}) is above the peak optimizer.lr ({peak})")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, peak, cfg))


# --------------------------------------------------------------------------------------------------------------
# Batch plan
# --------------------------------------------------------------------------------------------------------------


@dataclass
class BatchPlan:
    global_batches: list[list[int]]  # item indices of each optimizer step
    global_batch_size: int
    steps_per_epoch: float

    def __len__(self) -> int:
        return len(self.global_batches)

    def micro_batches(self, step: int, rank: int, world: int, accumulation: int) -> list[list[int]]:
        """This process's micro-batches of step ``step``: a contiguous slice, split into ``accumulation`` parts."""
        batch = self.global_batches[step]
        per_rank = len(batch) // world
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        per_micro = len(mine) // accumulation
        return [mine[i * per_micro : (i + 1) * per_micro] for i in range(accumulation)]


def plan_batches(n_items: int, cfg: TrainingConfig, world: int, seed: int) -> BatchPlan:
    g = cfg.per_device_batch_size * world * cfg.gradient_accumulation_steps
    if n_items < g:
        raise ValueError(
            f"only {n_items} training items but a global batch needs {g} "
            f"(per_device_batch_size x processes x gradient_accumulation_steps); lower them or add data"
        )
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, int(n_items * cfg.num_epochs) // g)
    stream: list[int] = []
    epoch = 0
    while len(stream) < total * g:
        order = list(range(n_items))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        stream += order
        epoch += 1
    return BatchPlan([stream[i * g : (i + 1) * g] for i in range(total)], g, n_items / g)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and the final model
# --------------------------------------------------------------------------------------------------------------

STATE_FILE = "trainer_state.json"


def save_checkpoint(accelerator, output_dir: str, step: int, limit: int, extra: dict[str, Any]) -> None:
    path = Path(output_dir) / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / STATE_FILE).write_text(json.dumps({"step": step, **extra}, indent=2))
        old = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for p in old[:-limit] if limit > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_checkpoint(output_dir: str, spec: str | None) -> Path | None:
    if spec is None:
        return None
    if spec == "latest":
        found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / STATE_FILE).is_file()]
        return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator, path: Path) -> int:
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())["step"]


def resume_step(accelerator, tc: TrainingConfig) -> int:
    """The optimizer step to start from: 0, or the step of the checkpoint ``resume_from_checkpoint`` names."""
    path = find_checkpoint(tc.output_dir, tc.resume_from_checkpoint)
    if path is None:
        return 0
    step = load_checkpoint(accelerator, path)
    print0(accelerator, f"[train] resumed from {path} at step {step}")
    return step


def progress_bar(accelerator, total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not (accelerator.is_main_process and enabled))


def checkpoint_if_due(accelerator, tc: TrainingConfig, step: int, total: int, extra: dict[str, Any]) -> None:
    """Save a resumable checkpoint after optimizer step ``step`` (1-based) every ``save_steps``, not at the end."""
    if tc.save_steps and step % tc.save_steps == 0 and step < total:
        save_checkpoint(accelerator, tc.output_dir, step, tc.save_total_limit, extra)


def finish(accelerator, wrapped: nn.Module, tokenizer, cfg: Any, tracker, summary: dict[str, Any]) -> None:
    """Save the final model, write the run summary, close the trackers."""
    save_final_model(accelerator, wrapped, tokenizer, cfg.training.output_dir, cfg)
    tracker.summary(summary)
    tracker.close()
    print0(accelerator, f"[train] saved {cfg.training.output_dir}")
    accelerator.end_training()


def save_final_model(accelerator, wrapped: nn.Module, tokenizer, output_dir: str, config: Any) -> None:
    """Standard HF folder (weights, config, tokenizer, chat template); LoRA: the adapter too, and merged weights."""
    out = Path(output_dir)
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(wrapped)  # gathers shards under FSDP / ZeRO-3
    model = accelerator.unwrap_model(wrapped).model
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        state = {k.removeprefix("model."): v for k, v in state.items()}
        if hasattr(model, "merge_and_unload"):  # peft
            model.save_pretrained(out / "adapter", state_dict=state)
            model = model.merge_and_unload()
            state = None
        model.config.use_cache = True
        if tokenizer.eos_token_id is not None and getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    accelerator.wait_for_everyone()
