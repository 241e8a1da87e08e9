"""Shared fixtures. Tests run on CPU, offline, with tiny models built from config (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _pin_this_worker() -> None:
    """Give each pytest-xdist worker its own share of this process's CPUs (2 workers on 2 cores: one core each).

    Unpinned, each worker's torch (and vLLM, and every process a test launches) takes every core, and two
    workers' thread pools fight over them: two SmolLM2 training loops side by side took 334 s each with 2
    threads apiece, 112 s each pinned to a core with 1 thread (57 s for one alone), on a 2-core AVX2 EPYC.
    The affinity is inherited by threads and child processes; torch, vLLM and alignment.training size their
    thread pools from it."""
    worker, count = (
        os.environ.get("PYTEST_XDIST_WORKER"),
        int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")),
    )
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // count
    if share < 1:
        return
    i = int(worker.removeprefix("gw"))
    os.sched_setaffinity(0, cpus[i * share : (i + 1) * share])
    os.environ["OMP_NUM_THREADS"] = str(share)


_pin_this_worker()

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# The heaviest modules first (`pytest --durations=0` on a 2-core AVX2-only EPYC, 2026-12-01: 300 s down to
# 65 s each). `make test` runs two pytest-xdist workers that take whole modules (`--dist loadscope`, so a
# module's fixtures are built once); a long module taken last would run alone at the end. The order only
# balances the workers: no test depends on it.
HEAVY_FIRST = (
    "test_online_dpo.py", "test_recipes_slow.py", "test_eval.py", "test_bf16.py", "test_claims_dpo.py",
    "test_dpo.py", "test_sft.py", "test_chain.py", "test_vllm_load.py", "test_label_studio.py", "test_upcycle.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(
        key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST))
    )  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen2() -> str:
    from alignment.models import resolve_model

    return resolve_model("tiny-qwen2")


@pytest.fixture(scope="session")
def perturbed_qwen2(tiny_qwen2, tmp_path_factory) -> str:
    """tiny-qwen2 with seeded noise on every weight: a reference (or a start model) that is not the policy."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("perturbed") / "model"
    shutil.copytree(tiny_qwen2, folder)
    weights = load_file(f"{folder}/model.safetensors")
    g = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.02 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in weights.items()}
    save_file(noisy, f"{folder}/model.safetensors", metadata={"format": "pt"})
    return str(folder)


@pytest.fixture(scope="session")
def qwen_tokenizer(tiny_qwen2):
    from alignment.models import load_tokenizer

    return load_tokenizer(tiny_qwen2)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]


def reset_accelerate() -> None:
    """Entry points run in-process one after another: forget the previous run's accelerate singletons."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now. Launches pass one each: the suite runs on two workers (pytest-xdist),
    and two launches on accelerate's default port 29500 at once would meet in one process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(
    script: str, recipe: str, overrides: list[str], output_dir, config_file: str | None = None
):
    """``accelerate launch --num_processes 2``, one thread each, and the finished process (it fails with its
    stderr): with ``--multi_gpu`` (gloo on CPU), or with ``config_file`` (a file of recipes/accelerate/)."""
    import subprocess
    import sys

    if config_file:
        how = ["--config_file", str(REPO / config_file)]
    else:
        how = ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2",
        "--main_process_port", str(free_port()), "--mixed_precision", "no",
        str(REPO / script), str(REPO / recipe), *overrides, f"training.output_dir={output_dir}",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
