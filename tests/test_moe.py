"""The router load-balancing loss (alignment/moe.py) and SFT on a mixture-of-experts model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment.moe import expert_load, load_balancing_loss, load_metrics
from tests.conftest import read_metrics
from tests.test_sft import run_sft


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()  # softmax(log p) = p


# Two layers, three experts. Layer 1 rows pick (top-1) experts 0, 0; layer 2's row picks 2.
LAYERS = [logits_of([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]), logits_of([[0.2, 0.3, 0.5]])]


def test_load_balancing_loss_by_hand():
    # Pooled over the 3 rows of both layers: P = mean p = (1.5, 0.8, 0.7) / 3.
    # top-1: f = (2, 0, 1) / 3; loss = 3 x sum f P = 3 x (2 x 1.5 + 1 x 0.7) / 9 = 3.7 / 3.
    assert load_balancing_loss(LAYERS, top_k=1).item() == pytest.approx(3.7 / 3, abs=1e-6)
    # top-2: picks {0,1}, {0,1}, {2,1}: f = (2, 3, 1) / 3; loss = 3 x (2 x 1.5 + 3 x 0.8 + 1 x 0.7) / 9.
    assert load_balancing_loss(LAYERS, top_k=2).item() == pytest.approx(6.1 / 3, abs=1e-6)
    # Uniform routing reaches the minimum, k.
    uniform = [torch.zeros(5, 4)]
    assert load_balancing_loss(uniform, top_k=2).item() == pytest.approx(2.0)


def test_load_balancing_loss_is_qwen2_moes():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(37, 8, generator=g) * 2 for _ in range(3))
    for k in (1, 2, 4):
        ours = load_balancing_loss(layers, top_k=k)
        theirs = load_balancing_loss_func(layers, num_experts=8, top_k=k)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_expert_load_and_its_metrics():
    counts = expert_load(LAYERS, top_k=1)
    assert counts.tolist() == [[2, 0, 0], [0, 0, 1]]
    # Load = share of the layer's slots x E: layer 1 sends everything to expert 0 (3.0), nothing elsewhere (0).
    assert load_metrics(counts) == {"moe/load_max": 3.0, "moe/load_min": 0.0}
    balanced = load_metrics(torch.tensor([[4.0, 4.0], [1.0, 1.0]]))
    assert balanced == {"moe/load_max": 1.0, "moe/load_min": 1.0}


def test_sft_on_moe_logs_the_balance_and_saves_the_coefficient(tmp_path):
    out = run_sft(tmp_path, "moe", "model.name_or_path=tiny-qwen2-moe", "training.max_steps=2")
    rows = read_metrics(out)
    for row in rows:
        assert row["aux_loss"] >= 2.0 - 1e-4  # never below its minimum, k = 2
        assert 0.0 <= row["moe/load_min"] <= 1.0 <= row["moe/load_max"] <= 8 / 2
    config = json.load(open(f"{out}/config.json"))
    assert config["router_aux_loss_coef"] == 0.001  # null: the model's own coefficient
    out = run_sft(tmp_path, "moe-coef", "model.name_or_path=tiny-qwen2-moe", "training.max_steps=1",
                  "model.router_aux_loss_coef=0.05")  # fmt: skip
    assert json.load(open(f"{out}/config.json"))["router_aux_loss_coef"] == 0.05


def test_dense_model_gets_no_balance_and_refuses_a_coefficient(tmp_path):
    out = run_sft(tmp_path, "dense", "training.max_steps=1")
    assert not {"aux_loss", "moe/load_max"} & read_metrics(out)[0].keys()
    with pytest.raises(ValueError, match="not a mixture-of-experts"):
        run_sft(tmp_path, "dense-coef", "training.max_steps=1", "model.router_aux_loss_coef=0.01")


def test_the_balance_loss_balances_the_routers(tmp_path):
    """Trained with a large coefficient the routers end more balanced than with none: the loss reaches them."""
    common = ["model.name_or_path=tiny-qwen2-moe", "training.max_steps=12", "optimizer.lr=1e-2"]
    off = read_metrics(run_sft(tmp_path, "off", *common, "model.router_aux_loss_coef=0"))
    on = read_metrics(run_sft(tmp_path, "on", *common, "model.router_aux_loss_coef=1.0"))
    assert math.isclose(off[0]["aux_loss"], on[0]["aux_loss"], rel_tol=1e-5)  # same start
    mean_last = lambda rows: sum(r["aux_loss"] for r in rows[-4:]) / 4  # noqa: E731
    assert mean_last(on) < mean_last(off) - 0.05, (mean_last(on), mean_last(off))
