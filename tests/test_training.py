"""training.mixed_precision: auto follows the hardware (bf16 only where it is fast); CPU threads follow the usable cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from alignment.training import cpu_has_fast_bf16, resolve_mixed_precision

EPYC_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
EPYC_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
SAPPHIRE = "flags\t\t: avx512f amx_bf16 amx_tile\n"


def test_cpu_flags():
    assert cpu_has_fast_bf16(EPYC_BF16)
    assert cpu_has_fast_bf16(SAPPHIRE)
    assert not cpu_has_fast_bf16(EPYC_AVX2)
    # A flag name that only contains the word is not the flag.
    assert not cpu_has_fast_bf16("flags\t\t: avx512_bf16x\n")


def test_auto_follows_the_cpu_and_explicit_choices_stay():
    assert resolve_mixed_precision("auto", EPYC_BF16, cuda=False) == "bf16"
    assert resolve_mixed_precision("auto", EPYC_AVX2, cuda=False) == "no"
    assert resolve_mixed_precision("bf16", EPYC_AVX2, cuda=False) == "bf16"
    assert resolve_mixed_precision("no", EPYC_BF16, cuda=False) == "no"


def test_cpu_threads_follow_the_cores_this_process_may_use():
    """A process pinned to one core (taskset, a container's cpuset, a pytest-xdist worker) trains with one
    thread: counting every core of the host put two thread pools on each core, 3x slower."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        pytest.skip("needs a machine with two CPUs or more to pin a process to one of them")
    one = min(os.sched_getaffinity(0))
    code = (
        "import torch; torch.set_num_threads(7)\n"
        "from alignment.config import TrainingConfig\n"
        "from alignment.training import make_accelerator\n"
        "make_accelerator(TrainingConfig()); print(torch.get_num_threads())"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "WORLD_SIZE")
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: os.sched_setaffinity(0, {one}),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1", out.stdout


def test_the_merging_optimizer_refuses_deepspeed_shards(monkeypatch, tiny_qwen2):
    """Under a DeepSpeed launch the optimizer gets flat shards; OnDARE's masks and base weights are per tensor."""
    from alignment.config import ModelConfig, OptimizerConfig
    from alignment.models import load_causal_lm
    from alignment.training import build_optimizer

    model = load_causal_lm(ModelConfig(name_or_path=tiny_qwen2), 64)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="optimizer.name: ondare needs each parameter whole"):
        build_optimizer(OptimizerConfig(name="ondare", base=tiny_qwen2), model)
    assert build_optimizer(OptimizerConfig(name="adamw"), model) is not None  # AdamW is DeepSpeed's to shard


def test_saving_a_model_on_a_cpu_machine_does_not_claim_an_undetected_gpu(tmp_path):
    """accelerate imports DeepSpeed on every save_pretrained; without CUDA, DeepSpeed warned "If you have GPU or
    other accelerator, we were unable to detect it" in every stage of a CPU run."""
    pytest.importorskip("deepspeed")
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine DeepSpeed picks CUDA and says nothing")
    code = (
        "import alignment.models\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,\n"
        "                     num_key_value_heads=1, vocab_size=64)\n"
        f"Qwen2ForCausalLM(config).save_pretrained({str(tmp_path)!r})\n"
        "import deepspeed; print('saved')"
    )
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "saved"
    assert "unable to detect" not in out.stdout + out.stderr, out.stdout[-2000:]  # DeepSpeed logs to stdout
    assert (tmp_path / "model.safetensors").exists()
