"""The shipped recipes, shortened by overrides only, on the real SmolLM2-135M-Instruct: SFT, then DPO from
the SFT output, then the reward model."""

from __future__ import annotations

import math

import pytest

from tests.conftest import REPO, read_metrics, reset_accelerate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_out(tmp_path_factory):
    from alignment.sft import main

    out = tmp_path_factory.mktemp("slow") / "sft"
    reset_accelerate()
    main([str(REPO / "recipes/sft.yaml"), "training.max_steps=2", "data.max_length=1024", "training.per_device_batch_size=2",
          "logging.report_to=[]", "logging.progress_bar=false", f"training.output_dir={out}"])  # fmt: skip
    return out


def test_sft_recipe_on_smollm2(sft_out):
    m = read_metrics(sft_out)
    assert len(m) == 2 and all(math.isfinite(x["loss"]) for x in m)
    assert m[0]["loss"] < 3.0  # a real instruct model already knows the format: far below log(49152) = 10.8
    assert (sft_out / "model.safetensors").is_file() and (sft_out / "chat_template.jinja").is_file()


def test_dpo_recipe_from_the_sft_output(sft_out, tmp_path):
    from alignment.dpo import main

    reset_accelerate()
    main([str(REPO / "recipes/dpo.yaml"), f"model.name_or_path={sft_out}", "training.max_steps=2",
          "training.per_device_batch_size=4", f"reference.cache_dir={tmp_path / 'ref'}", "logging.report_to=[]",
          "logging.progress_bar=false", f"training.output_dir={tmp_path / 'dpo'}"])  # fmt: skip
    m = read_metrics(tmp_path / "dpo")
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-3) and math.isfinite(m[-1]["loss"])


def test_reward_recipe_on_smollm2(tmp_path):
    from alignment.reward_model import main

    reset_accelerate()
    main([str(REPO / "recipes/reward.yaml"), "training.max_steps=2", "training.per_device_batch_size=4",
          "eval_fraction=0.05", "logging.report_to=[]", "logging.progress_bar=false",
          f"training.output_dir={tmp_path / 'rm'}"])  # fmt: skip
    m = read_metrics(tmp_path / "rm")
    assert 0.0 <= m[-1]["eval/accuracy"] <= 1.0 and math.isfinite(m[-1]["loss"])
