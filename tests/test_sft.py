"""The SFT stage end to end on tiny-qwen2: it learns, resumes exactly, schedules LR, and scales to 2 processes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from alignment.config import SchedulerConfig
from alignment.sft import main as sft_main
from alignment.training import lr_factor
from tests.conftest import REPO, free_port, launch_two_processes, read_metrics, reset_accelerate, write_jsonl

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is {a + b}."},
        ]
    }
    for a, b in [(12, 30), (7, 5), (100, 23), (41, 9), (3, 3), (56, 44), (18, 2), (90, 9)]
]


def run_sft(tmp_path, name: str, *overrides: str, data=None) -> str:
    data = data or write_jsonl(tmp_path / "sft.jsonl", ROWS)
    out = tmp_path / name
    reset_accelerate()
    sft_main(
        [
            str(REPO / "recipes/sft.yaml"),
            "model.name_or_path=tiny-qwen2",
            "training.mixed_precision=no",  # the recipe's auto is bf16 on some CPUs
            "model.rope_scaling=null",
            "model.gradient_checkpointing=false",
            f"data.sources=[{{path: {data}}}]",
            "data.max_length=128",
            "data.packing=false",
            "training.per_device_batch_size=2",
            "training.num_epochs=4",
            "optimizer.lr=1e-3",
            "scheduler.min_lr=1e-4",
            "logging.report_to=[]",
            "logging.progress_bar=false",
            f"training.output_dir={out}",
            *overrides,
        ]
    )
    return str(out)


def test_sft_lowers_loss_and_changes_every_parameter(tmp_path, tiny_qwen2):
    out = run_sft(tmp_path, "run")
    losses = [m["loss"] for m in read_metrics(out)]
    assert len(losses) == 16  # 8 examples x 4 epochs / batch 2
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0  # nats
    before, after = load_file(f"{tiny_qwen2}/model.safetensors"), load_file(f"{out}/model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not train: {unchanged}"


def test_saved_model_loads_in_transformers_with_chat_template(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_sft(tmp_path, "run", "training.max_steps=1")
    model = AutoModelForCausalLM.from_pretrained(out)  # no custom attention registered for loading
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    full = run_sft(tmp_path, "full", "training.max_steps=6", "training.save_steps=3")
    part = run_sft(tmp_path, "part", "training.max_steps=6", "training.save_steps=3")
    # Interrupt: drop what came after the checkpoint at step 3, then resume from it.
    from pathlib import Path

    lines = Path(part, "metrics.jsonl").read_text().splitlines()[:3]
    Path(part, "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (Path(part) / "model.safetensors").unlink()
    assert sorted(p.name for p in Path(part).glob("checkpoint-*")) == ["checkpoint-3"]
    run_sft(
        tmp_path,
        "part",
        "training.max_steps=6",
        "training.save_steps=3",
        "training.resume_from_checkpoint=latest",
    )
    a, b = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7)
        assert x["learning_rate"] == pytest.approx(y["learning_rate"], rel=1e-9)
    wa, wb = load_file(f"{full}/model.safetensors"), load_file(f"{part}/model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_lr_schedule_peaks_at_7e6_and_ends_at_7e7():
    cfg = SchedulerConfig(name="cosine", min_lr=7e-7)
    lrs = [7e-6 * lr_factor(s, 10, 7e-6, cfg) for s in range(10)]
    assert lrs[0] == pytest.approx(7e-6) and max(lrs) == pytest.approx(7e-6)
    assert lrs[-1] == pytest.approx(7e-7)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # The midpoint of a cosine is the mean of the two ends.
    assert 7e-6 * lr_factor(5, 11, 7e-6, cfg) == pytest.approx((7e-6 + 7e-7) / 2)
    warm = SchedulerConfig(name="cosine", min_lr=7e-7, warmup_steps=4)
    wl = [lr_factor(s, 20, 7e-6, warm) for s in range(20)]
    assert wl[:4] == sorted(wl[:4]) and wl[4] == pytest.approx(1.0)


def test_lr_schedule_in_a_real_run(tmp_path):
    out = run_sft(
        tmp_path,
        "run",
        "optimizer.lr=7e-6",
        "scheduler.min_lr=7e-7",
        "scheduler.warmup_steps=0",
        "training.max_steps=5",
    )
    lrs = [m["learning_rate"] for m in read_metrics(out)]
    assert lrs[0] == pytest.approx(7e-6) and lrs[-1] == pytest.approx(7e-7)


def test_chunked_logprobs_equal_full_logits(tiny_qwen2):
    from alignment.config import ModelConfig
    from alignment.logprobs import TokenLogProbs
    from alignment.models import load_causal_lm

    model = load_causal_lm(ModelConfig(name_or_path=tiny_qwen2), 256)
    ids = torch.randint(0, 151_000, (1, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    labels[0, :10] = -100
    pos = torch.cat([torch.arange(25), torch.arange(15)])[None]
    chunked = TokenLogProbs(model, chunk_size=7)(ids, pos, labels)
    logits = model(input_ids=ids, position_ids=pos).logits.float()  # the plain way: full logits
    mask = labels != -100
    full = torch.log_softmax(logits[mask], -1).gather(-1, labels[mask][:, None]).squeeze(-1)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    # The gradients through the checkpointed chunks equal those of the full logits.
    weights = [model.model.embed_tokens.weight, model.model.layers[0].mlp.up_proj.weight]
    from_full = torch.autograd.grad(full.sum(), weights)
    from_chunks = torch.autograd.grad(chunked.sum(), weights)
    for a, b in zip(from_chunks, from_full):
        # Whole-tensor relative error: single entries differ by summation order (1e-5 in 19 M entries).
        assert a.abs().sum() > 0 and (a - b).norm() <= 1e-4 * b.norm()


def _data_parallel_overrides(data) -> list[str]:
    """The SFT run the multi-process tests repeat: tiny-qwen2, fp32, 3 steps of 1 unpacked row per process."""
    return [
        "model.name_or_path=tiny-qwen2", "training.mixed_precision=no", "model.rope_scaling=null",
        f"data.sources=[{{path: {data}}}]", "data.max_length=128", "data.packing=false",
        "training.per_device_batch_size=1", "training.max_steps=3", "optimizer.lr=1e-3", "scheduler.min_lr=1e-4",
        "model.gradient_checkpointing=false", "logging.report_to=[]", "logging.progress_bar=false",
    ]  # fmt: skip


def _assert_same_run(one, two, atol: float = 1e-5) -> None:
    """The same 3 losses (rel 1e-5) and the same final weights (atol 1e-5 unless told) in two run folders."""
    a, b = read_metrics(one), read_metrics(two)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    wa, wb = load_file(f"{one}/model.safetensors"), load_file(f"{two}/model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """accelerate launch --num_processes 2 (gloo on CPU) == 1 process with 2x accumulation."""
    data = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    common = _data_parallel_overrides(data)
    one = run_sft(tmp_path, "one", *common, "training.gradient_accumulation_steps=4", data=data)
    two = tmp_path / "two"
    launch_two_processes(
        "alignment/sft.py", "recipes/sft.yaml", [*common, "training.gradient_accumulation_steps=2"], two
    )
    _assert_same_run(one, tmp_path / "two")


def test_the_fsdp2_config_on_cpu_runs_data_parallel_and_says_so(tmp_path):
    """recipes/accelerate/fsdp2.yaml with 2 processes on a CPU machine: accelerate (Accelerator(cpu=True)) runs
    it as plain data parallel over gloo, not sharded; the run says so, and its losses and weights are those of
    1 process with the same global batch."""

    if torch.cuda.is_available():
        pytest.skip("on CUDA the FSDP2 config shards: this checks the CPU fallback")
    data = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    common = _data_parallel_overrides(data)
    one = run_sft(tmp_path, "one", *common, "training.gradient_accumulation_steps=4", data=data)
    two = tmp_path / "two"
    proc = launch_two_processes(
        "alignment/sft.py",
        "recipes/sft.yaml",
        [*common, "training.gradient_accumulation_steps=2"],
        two,
        config_file="recipes/accelerate/fsdp2.yaml",
    )
    assert proc.stdout.count("[train] FSDP was asked for, but without CUDA") == 1  # the main process only
    _assert_same_run(one, two)


def test_zero3_shards_the_model_over_two_processes_and_matches_one_process(tmp_path):
    """recipes/accelerate/zero3.yaml with 2 processes: DeepSpeed ZeRO-3 (on CPU its CPU accelerator over gloo)
    holds half of the parameters in each process, steps its optimizer at the last of 2 micro-batches, and gives
    the losses and final weights of 1 process with the same global batch (4 micro-batches). Resumed from its
    step-2 checkpoint (DeepSpeed's sharded optimizer state), it ends with the same weights."""
    import re
    import shutil

    pytest.importorskip("deepspeed")
    data = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    common = _data_parallel_overrides(data)
    one = run_sft(tmp_path, "one", *common, "training.gradient_accumulation_steps=4", data=data)
    two = tmp_path / "two"

    def launch(out, *extra):
        overrides = [*common, "training.gradient_accumulation_steps=2", "training.save_steps=2", *extra]
        return launch_two_processes(
            "alignment/sft.py",
            "recipes/sft.yaml",
            overrides,
            out,
            config_file="recipes/accelerate/zero3.yaml",
        )

    proc = launch(two)
    assert "[train] DeepSpeed ZeRO-3 on" in proc.stdout and ", 2 processes" in proc.stdout
    held = [tuple(map(int, m)) for m in re.findall(r"holds (\d+) of (\d+) parameter entries", proc.stdout)]
    assert len(held) == 2 and held[0][1] == held[1][1]
    assert sum(h for h, _ in held) >= held[0][1]  # every entry held by some process
    assert all(h < 0.6 * total for h, total in held)  # about half each
    # DeepSpeed sums the gradients in another order: 10 of 19.4 M weights differed by up to 2.2e-5 after 3 Adam
    # steps at lr 1e-3 (entries with near-zero gradients, where Adam's update is most sensitive); a step missed
    # or taken twice moves weights by about lr.
    _assert_same_run(one, two, atol=1e-4)

    part = tmp_path / "part"  # the same run stopped after its step-2 checkpoint, then resumed
    shutil.copytree(two, part)
    (part / "model.safetensors").unlink()
    (part / "metrics.jsonl").write_text("".join((two / "metrics.jsonl").read_text().splitlines(True)[:2]))
    resumed = launch(part, "training.resume_from_checkpoint=latest")
    assert "resumed from" in resumed.stdout and "checkpoint-2 at step 2" in resumed.stdout
    _assert_same_run(two, part, atol=0.0)


def test_two_machines_on_localhost_match_one_process(tmp_path):
    """Multi-node as a user launches it, two "machines" on localhost: one `accelerate launch --num_machines 2
    --machine_rank {0,1} --main_process_ip 127.0.0.1` per rank, one process each (gloo on CPU). The losses and
    weights are those of 1 process with the same global batch."""
    import os
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    common = _data_parallel_overrides(data)
    one = run_sft(tmp_path, "one", *common, "training.gradient_accumulation_steps=4", data=data)
    two = tmp_path / "two"
    port = free_port()

    def launch(rank: int) -> subprocess.Popen:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            str(REPO / "alignment/sft.py"), str(REPO / "recipes/sft.yaml"), *common,
            "training.gradient_accumulation_steps=2", f"training.output_dir={two}",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ranks = [launch(0), launch(1)]
    for proc in ranks:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    _assert_same_run(one, two)


def test_lora_sft_saves_adapter_and_merged_model_that_load_back(tmp_path):
    from alignment.config import ModelConfig
    from alignment.models import load_causal_lm

    out = run_sft(tmp_path, "lora", "model.lora={r: 4, alpha: 8, dropout: 0.0}", "training.max_steps=2")
    merged = load_file(f"{out}/model.safetensors")
    assert not any("lora_" in k for k in merged)  # a plain checkpoint vLLM can load
    from_adapter = load_causal_lm(ModelConfig(name_or_path=f"{out}/adapter"), 128, trainable=False)
    state = from_adapter.state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(state[k], v, atol=1e-6, rtol=1e-6)
