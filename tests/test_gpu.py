"""GPU checks: they skip themselves on machines without CUDA (conftest), and run on a lent GPU machine."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from alignment.config import ModelConfig
from alignment.logprobs import TokenLogProbs
from alignment.models import load_causal_lm

pytestmark = pytest.mark.gpu


def _packed_inputs(device):
    g = torch.Generator().manual_seed(0)
    lengths = (37, 101, 64)
    ids = torch.randint(0, 151_000, (1, sum(lengths)), generator=g).to(device)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    return ids, pos


def test_packed_sdpa_on_cuda_matches_cpu():
    ids, pos = _packed_inputs("cuda")
    cpu = load_causal_lm(
        ModelConfig(name_or_path="tiny-qwen2", attn_implementation="packed_sdpa"), 512, trainable=False
    )
    ref = cpu(input_ids=ids.cpu(), position_ids=pos.cpu()).logits
    gpu = cpu.to("cuda")(input_ids=ids, position_ids=pos).logits
    torch.testing.assert_close(gpu.cpu(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_packing_matches_packed_sdpa_in_bf16():
    ids, pos = _packed_inputs("cuda")
    outs = []
    for attn in ("flash_attention_2", "packed_sdpa"):
        cfg = ModelConfig(name_or_path="tiny-qwen2", dtype="bfloat16", attn_implementation=attn)
        model = load_causal_lm(cfg, 512, trainable=False).to("cuda")
        outs.append(model(input_ids=ids, position_ids=pos).logits.float())
    torch.testing.assert_close(outs[0], outs[1], atol=5e-2, rtol=5e-2)


def test_bf16_autocast_training_step_on_cuda():
    model = load_causal_lm(ModelConfig(name_or_path="tiny-qwen2"), 512).to("cuda")
    f = TokenLogProbs(model, chunk_size=64)
    ids, pos = _packed_inputs("cuda")
    labels = ids.roll(-1, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = -f(ids, pos, labels).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
    )
