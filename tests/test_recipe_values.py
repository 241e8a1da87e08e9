"""recipes/sft_qwen2.yaml is Qwen2's SFT recipe as the README states it: 2 epochs, 32,768-token sequences
(SmolLM2's 8,192 stretched by YaRN), LR 7e-6 annealed to 7e-7, weight decay 0.1, clipping at 1.0. A change to any
of these numbers must be a decision, made here too. (recipes/sft.yaml is the default tuned for the embedded model.)"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from alignment.config import load_config
from alignment.models import yarn_rope_parameters
from alignment.sft import SFTConfig
from alignment.training import lr_factor
from tests.conftest import REPO


@pytest.fixture(scope="module")
def sft():
    return load_config(SFTConfig, REPO / "recipes/sft_qwen2.yaml")


def test_sft_recipe_values(sft):
    assert sft.training.num_epochs == 2
    assert sft.data.max_length == 32768 and sft.data.packing
    assert sft.optimizer.name == "adamw"
    assert sft.optimizer.lr == 7e-6 and isinstance(sft.optimizer.lr, float)
    assert sft.scheduler.min_lr == 7e-7
    assert sft.optimizer.weight_decay == 0.1
    assert sft.training.max_grad_norm == 1.0
    assert sft.model.name_or_path == "smollm2-135m-instruct"


def test_sft_schedule_anneals_from_7e6_to_7e7(sft):
    """The LR the recipe's schedule gives: the peak at the first step, the floor exactly at the last."""
    for total in (2, 10, 1000):
        lrs = [sft.optimizer.lr * lr_factor(s, total, sft.optimizer.lr, sft.scheduler) for s in range(total)]
        assert lrs[0] == pytest.approx(7e-6, rel=1e-12)
        assert lrs[-1] == pytest.approx(7e-7, rel=1e-9)
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # no warmup, monotone decay


def test_sft_recipe_stretches_smollm2_context_to_32768_with_yarn(sft):
    smollm2 = SimpleNamespace(max_position_embeddings=8192, rope_parameters={"rope_theta": 1e5})
    rope = yarn_rope_parameters(smollm2, sft.model, sft.data.max_length)
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0
    assert rope["original_max_position_embeddings"] * rope["factor"] == 32768
    assert math.isclose(rope["rope_theta"], 1e5)
