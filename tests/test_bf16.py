"""``training.mixed_precision: bf16`` is a first-class path for every training stage.

For SFT, offline DPO, the reward model and online DPO, the first step's loss under bf16 autocast is compared
with the same step in fp32, on the same batch (the batch plan is seeded; online DPO's answers come from an
fp32 engine in both runs, and the test checks that both runs scored the same answers). The bf16 loss must
differ from the fp32 one (else bf16 did not run) and stay within a stated tolerance of it, and the saved
weights are fp32 (the trained weights cannot be bf16: loading them so for training is refused, tested below).

Tolerances, measured on this 2-core EPYC (AVX512-BF16) with the first step of each test below: SFT's loss
moved by 1.3e-4 nats, DPO's by 3.3e-4, the reward model's by 1.3e-4, online DPO's by 9.4e-4. The bounds are
about ten times those (2e-3, 5e-3, 5e-3, 0.01 nats). Seen failing: with the output head's log-softmax left in
bf16 (``alignment/logprobs.py`` without its ``.float()``), SFT moved by 0.010, DPO by 0.030 and online DPO by
0.050, and those three tests failed.

Pure bf16 weights are refused for training: AdamW's small updates vanish against bf16 weights (shown below).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_metrics


def first_loss(out, key: str = "loss") -> float:
    return read_metrics(out)[0][key]


def assert_bf16_close(fp32: float, bf16: float, tol: float) -> None:
    assert bf16 != fp32, "the bf16 run gave exactly the fp32 loss: bf16 autocast did not run"
    assert math.isfinite(bf16)
    assert abs(bf16 - fp32) <= tol, f"bf16 {bf16} vs fp32 {fp32}: more than {tol} apart"


def assert_fp32_weights(out) -> None:
    weights = load_file(f"{out}/model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_sft_bf16_first_loss_is_close_to_fp32(tmp_path):
    from tests.test_sft import run_sft

    fp32 = run_sft(tmp_path, "fp32", "training.max_steps=1")
    bf16 = run_sft(tmp_path, "bf16", "training.max_steps=1", "training.mixed_precision=bf16")
    assert_bf16_close(first_loss(fp32), first_loss(bf16), tol=2e-3)
    assert_fp32_weights(bf16)


def test_dpo_bf16_first_loss_is_close_to_fp32(tmp_path, perturbed_qwen2):
    """Against a perturbed reference, so the first step's margins are not exactly 0 in both precisions; scored
    live (``reference.mode=model``), so the policy and the reference both run under the setting."""
    from tests.test_dpo import run_dpo

    args = ("training.max_steps=1", f"reference.name_or_path={perturbed_qwen2}", "reference.mode=model")
    fp32 = run_dpo(tmp_path, "fp32", *args)
    bf16 = run_dpo(tmp_path, "bf16", *args, "training.mixed_precision=bf16")
    assert abs(first_loss(fp32) - math.log(2)) > 0.01  # the reference is really not the policy
    assert_bf16_close(first_loss(fp32), first_loss(bf16), tol=5e-3)
    margins = [first_loss(run, "rewards/margins") for run in (fp32, bf16)]
    assert abs(margins[0] - margins[1]) <= max(0.05 * abs(margins[0]), 0.02), margins
    assert_fp32_weights(bf16)


def test_reward_model_bf16_first_loss_is_close_to_fp32(tmp_path):
    from tests.test_reward_model import train_rm

    fp32 = train_rm(tmp_path / "fp32", "training.max_steps=1")
    bf16 = train_rm(tmp_path / "bf16", "training.max_steps=1", "training.mixed_precision=bf16")
    assert_bf16_close(first_loss(fp32), first_loss(bf16), tol=5e-3)
    assert_fp32_weights(bf16)


@pytest.mark.vllm
def test_online_dpo_bf16_first_loss_is_close_to_fp32(tmp_path, perturbed_qwen2):
    """The engine samples in fp32 in both runs (``generation.dtype=float32``), so both score the same answers;
    a perturbed reference, so the first step's margins are not exactly 0 in both precisions."""
    from tests.test_online_dpo import run

    args = ("training.max_steps=1", "generation.dtype=float32", f"reference.name_or_path={perturbed_qwen2}",
            "eval.at_start=false", "eval.at_end=false")  # fmt: skip
    fp32 = run(tmp_path, "fp32", *args)
    bf16 = run(tmp_path, "bf16", *args, "training.mixed_precision=bf16")
    a, b = ([m for m in read_metrics(run) if "loss" in m][0] for run in (fp32, bf16))
    assert a["objective/scores"] == b["objective/scores"]  # the same answers were sampled and scored
    assert a["online/pair_fraction"] == b["online/pair_fraction"]
    assert abs(a["loss"] - math.log(2)) > 0.01  # the reference is really not the policy
    assert_bf16_close(a["loss"], b["loss"], tol=0.01)
    assert_fp32_weights(bf16)


def test_pure_bf16_training_is_refused_with_the_key_named(tmp_path):
    from tests.test_sft import run_sft

    with pytest.raises(ValueError, match=r"model\.dtype: bfloat16.*training\.mixed_precision: bf16"):
        run_sft(tmp_path, "pure", "training.max_steps=1", "model.dtype=bfloat16")


def test_why_pure_bf16_is_refused_adamw_steps_vanish_in_bf16_weights():
    """The issue's example: a 7e-6 step against weights of order 1e-2 is below half a bf16 ulp (3e-5 there)."""
    w32 = torch.full((4,), 0.0123)
    w16 = w32.to(torch.bfloat16)
    assert torch.equal(w16 - 7e-6, w16)  # the update is lost: bf16 rounds it away
    assert not torch.equal(w32 - 7e-6, w32)  # fp32 master weights keep it


def test_lora_on_a_bf16_base_trains_fp32_adapters():
    """The one bf16-weights path we allow: the frozen base in bf16, the trained adapter in fp32 (peft upcasts)."""
    from alignment.config import LoraConfig, ModelConfig
    from alignment.models import load_causal_lm

    model = load_causal_lm(ModelConfig(name_or_path="tiny-qwen2", dtype="bfloat16", lora=LoraConfig()), 128)
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
