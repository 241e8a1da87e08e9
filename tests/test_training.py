"""training.mixed_precision: auto follows the hardware (bf16 only where it is fast)."""

from __future__ import annotations

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


# bf16 autocast against fp32 on the same first batch: the losses agree to bf16's precision. A path that ignored
# the setting would agree exactly, so the bf16 loss must also differ a little (it is not a copy of fp32).
TOL = 2e-2  # relative; bf16 keeps 8 bits of mantissa (about 4e-3 per op)


def first_loss(main, recipe: str, tmp_path, precision: str, *extra: str) -> float:
    from tests.conftest import REPO, read_metrics, reset_accelerate

    reset_accelerate()
    out = tmp_path / precision
    main([str(REPO / recipe), "model.name_or_path=tiny-qwen2", f"training.mixed_precision={precision}",
          "training.max_steps=1", "logging.report_to=[]", "logging.progress_bar=false",
          f"training.output_dir={out}", *extra])  # fmt: skip
    return read_metrics(out)[0]["loss"]


def check_close(fp32: float, bf16: float) -> None:
    assert bf16 == pytest.approx(fp32, rel=TOL), (fp32, bf16)
    assert bf16 != fp32, "bf16 gave exactly the fp32 loss: autocast did not run"


def test_sft_bf16_loss_is_close_to_fp32(tmp_path):
    from alignment.sft import main
    from tests.conftest import write_jsonl
    from tests.test_sft import ROWS

    data = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    args = ("model.rope_scaling=null", f"data.sources=[{{path: {data}}}]", "data.max_length=128",
            "data.packing=false", "training.per_device_batch_size=2")  # fmt: skip
    check_close(first_loss(main, "recipes/sft.yaml", tmp_path, "no", *args),
                first_loss(main, "recipes/sft.yaml", tmp_path, "bf16", *args))  # fmt: skip


def test_dpo_bf16_loss_is_close_to_fp32(tmp_path):
    from alignment.dpo import main
    from tests.conftest import write_jsonl
    from tests.test_dpo import PAIRS

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    # reference.mode=model: both policy and reference run under the setting; nll_weight 1 (the recipe's) makes
    # the loss more than the DPO term's log 2 at the start.
    args = (f"data.sources=[{{path: {data}}}]", "data.max_length=64", "training.per_device_batch_size=4",
            "reference.mode=model", "loss.nll_weight=1.0")  # fmt: skip
    check_close(first_loss(main, "recipes/dpo.yaml", tmp_path, "no", *args),
                first_loss(main, "recipes/dpo.yaml", tmp_path, "bf16", *args))  # fmt: skip


def test_reward_model_bf16_loss_is_close_to_fp32(tmp_path):
    from alignment.reward_model import main
    from tests.conftest import write_jsonl
    from tests.test_reward_model import toy_pairs

    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(20, 0))
    args = (f"data.sources=[{{path: {data}}}]", "data.max_length=128", "eval_steps=0",
            "training.per_device_batch_size=5")  # fmt: skip
    check_close(first_loss(main, "recipes/reward.yaml", tmp_path, "no", *args),
                first_loss(main, "recipes/reward.yaml", tmp_path, "bf16", *args))  # fmt: skip
