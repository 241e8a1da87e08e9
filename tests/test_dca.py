"""Dual Chunk Attention (alignment/dca.py): exact within a chunk, equal to a naive reference across chunks, bounded
relative positions, linear memory, a KV cache that agrees with full forwards, and vLLM's positions."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

from alignment import dca
from alignment.config import DCAConfig, ModelConfig, RopeScalingConfig
from alignment.models import load_causal_lm


def small_config(head_dim: int, heads: int, kv_heads: int, rope: dict, chunk_size: int, local_size: int):
    config = Qwen2Config(
        hidden_size=head_dim * heads, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=8, num_hidden_layers=1, vocab_size=8, max_position_embeddings=4096, rope_parameters=rope,
    )  # fmt: skip
    config.dca = {"chunk_size": chunk_size, "local_size": local_size}
    return config


def rotated_inputs(config, B: int, T: int, seed: int = 0):
    """Random raw q, k, v and q, k rotated at positions 0..T-1 by transformers' own rotary module."""
    g = torch.Generator().manual_seed(seed)
    D, H, Hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    q_raw, k_raw, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    cos, sin = Qwen2RotaryEmbedding(config)(v, torch.arange(T)[None])
    q, k = apply_rotary_pos_emb(q_raw, k_raw, cos, sin)
    return q_raw, k_raw, q, k, v


# --------------------------------------------------------------------------------------------------------------
# A naive DCA, written from the paper's definitions with explicit (T, T) position matrices
# --------------------------------------------------------------------------------------------------------------


def naive_dca(q_raw, k_raw, v, rotary, chunk_size: int, local_size: int) -> torch.Tensor:
    """float64; query i and key j <= i get positions by the chunk distance of i and j (0: intra, 1: successive,
    more: inter); each score rotates the raw vectors at those positions; one softmax per query."""
    T, D = q_raw.shape[2], q_raw.shape[3]
    L = chunk_size - local_size
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    gap = i // L - j // L
    pos_q = torch.where(gap == 0, i % L, torch.where(gap == 1, (i % L + L).clamp(max=chunk_size), chunk_size))
    pos_k = (j % L).expand(T, T)

    def rotate(x, pos):  # x (..., D) at integer positions pos (same leading shape), with the rotary's scaling
        angle = pos[..., None].double() * rotary.inv_freq.double()
        cos = torch.cat([angle.cos(), angle.cos()], -1) * rotary.attention_scaling
        sin = torch.cat([angle.sin(), angle.sin()], -1) * rotary.attention_scaling
        return x * cos + torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1) * sin

    n_rep = q_raw.shape[1] // k_raw.shape[1]
    k_raw, v = k_raw.repeat_interleave(n_rep, 1).double(), v.repeat_interleave(n_rep, 1).double()
    q_ij = rotate(q_raw.double()[:, :, :, None, :].expand(-1, -1, T, T, D), pos_q)
    k_ij = rotate(k_raw[:, :, None, :, :].expand(-1, -1, T, T, D), pos_k)
    scores = (q_ij * k_ij).sum(-1) * D**-0.5
    scores = scores.masked_fill(j > i, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, T, H, D)


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10_000.0},
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10_000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_matches_naive_reference_over_many_chunks(rope):
    chunk_size, local_size = 24, 6  # chunks of 18: 100 tokens are 5 full chunks and a partial one
    config = small_config(16, 4, 2, ROPES[rope], chunk_size, local_size)
    q_raw, k_raw, q, k, v = rotated_inputs(config, B=2, T=100)
    out, _ = dca.dca_attention_forward(types.SimpleNamespace(config=config), q, k, v, None, scaling=16**-0.5)
    ref = naive_dca(q_raw, k_raw, v, Qwen2RotaryEmbedding(config), chunk_size, local_size)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_blocked_fallback_matches_the_cpu_flash_kernel():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (20, 20, 20))
    for causal in (False, True):
        for a, b in zip(dca.attend(q, k, v, 0.25, causal), dca.attend_blocked(q, k, v, 0.25, causal)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Instrumented: the relative positions the attention calls actually see
# --------------------------------------------------------------------------------------------------------------


def test_largest_relative_position_stays_below_the_window(monkeypatch):
    """head_dim 2 (one frequency, 1/64 rad per position): a raw [1, 0] rotated to position p is [cos, sin] of p/64,
    so every attention call's q and k reveal their positions. Every causal pair must be attended exactly once,
    at a relative position in [0, chunk_size], chunk_size below the native window; plain RoPE reaches T - 1."""
    chunk_size, local_size, native, T = 20, 4, 32, 150  # 150 tokens: over 4x the native window
    theta = 1 / 64
    config = small_config(2, 1, 1, {"rope_type": "linear", "factor": 64.0, "rope_theta": 10_000.0}, chunk_size, local_size)  # fmt: skip
    assert dca.dca_settings(DCAConfig(chunk_size, local_size), native)["chunk_size"] == chunk_size
    raw = torch.tensor([1.0, 0.0]).expand(1, 1, T, 2)
    cos, sin = Qwen2RotaryEmbedding(config)(raw, torch.arange(T)[None])
    q, k = apply_rotary_pos_emb(raw, raw, cos, sin)
    seen = {"pairs": 0, "max": -1, "min": 10**9}
    attend = dca.attend

    def spy(q, k, v, scale, causal):
        pos_q = (torch.atan2(q[0, 0, :, 1], q[0, 0, :, 0]) / theta).round()
        pos_k = (torch.atan2(k[0, 0, :, 1], k[0, 0, :, 0]) / theta).round()
        rel = pos_q[:, None] - pos_k[None, :]
        if causal:
            rel = rel[torch.ones_like(rel, dtype=torch.bool).tril()]
        seen["pairs"] += rel.numel()
        seen["max"], seen["min"] = max(seen["max"], rel.max().item()), min(seen["min"], rel.min().item())
        return attend(q, k, v, scale, causal)

    monkeypatch.setattr(dca, "attend", spy)
    dca.dca_attention_forward(types.SimpleNamespace(config=config), q, k, torch.randn(1, 1, T, 2), None)
    assert seen["pairs"] == T * (T + 1) // 2  # every causal (query, key) pair, once
    assert seen["min"] >= 0
    assert seen["max"] == chunk_size < native  # reached by the inter-chunk part, and no further
    assert T - 1 >= native  # what plain RoPE would use here


# --------------------------------------------------------------------------------------------------------------
# Memory: linear in the sequence, no (T, T) scores or mask
# --------------------------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """The largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("kernel", ["cpu_flash", "blocked"])
def test_memory_is_linear_in_the_number_of_chunks(kernel, monkeypatch):
    if kernel == "blocked":
        monkeypatch.setattr(dca, "attend", dca.attend_blocked)
    chunk_size, local_size, H, D = 40, 8, 2, 8  # chunks of L = 32
    config = small_config(D, H, 1, ROPES["default"], chunk_size, local_size)
    L = chunk_size - local_size
    for chunks in (8, 16):
        T = chunks * L
        _, _, q, k, v = rotated_inputs(config, B=1, T=T)
        with LargestTensor() as spy:
            dca.dca_attention_forward(types.SimpleNamespace(config=config), q, k, v, None)
        assert spy.numel <= H * T * max(D, L), (chunks, spy.numel)  # O(T x chunk): never T x T
        assert H * T * T > 4 * H * T * max(D, L)  # the bound is far below what a (T, T) tensor would need


# --------------------------------------------------------------------------------------------------------------
# Through transformers: the registry, the KV cache, generation, YaRN
# --------------------------------------------------------------------------------------------------------------


def load(name: str, attn: str, rope_scaling=None, dca_cfg=None):
    cfg = ModelConfig(name_or_path=name, attn_implementation=attn, rope_scaling=rope_scaling, dca=dca_cfg)
    return load_causal_lm(cfg, 512, trainable=False)


@pytest.mark.parametrize(
    ("name", "yarn"), [("tiny-qwen2", False), ("tiny-qwen2", True), ("tiny-qwen2-moe", False)]
)
def test_one_chunk_equals_standard_attention(name, yarn):
    rope = RopeScalingConfig(factor=4.0) if yarn else None
    dca_cfg = DCAConfig(chunk_size=80, local_size=16)  # chunks of 64 tokens
    ids = torch.randint(0, 151_000, (2, 64), generator=torch.Generator().manual_seed(0))
    standard = load(name, "sdpa", rope)(ids).logits
    ours = load(name, "dca", rope, dca_cfg)(ids).logits
    torch.testing.assert_close(ours, standard, atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_full_forward_across_chunks():
    """Prefill 70 tokens, then one token at a time over two chunk boundaries: the same logits as one forward."""
    model = load("tiny-qwen2", "dca", dca_cfg=DCAConfig(chunk_size=40, local_size=8))  # chunks of 32
    ids = torch.randint(0, 151_000, (1, 110), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    out = model(ids[:, :70], use_cache=True)
    cache, logits = out.past_key_values, [out.logits]
    for t in range(70, 110):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)


def test_transformers_generator_runs_dca(tiny_qwen2, qwen_tokenizer):
    """The generation interface's transformers backend with model settings: greedy answers equal a greedy loop
    of full forwards (no cache) under DCA, on a prompt of four chunks."""
    from alignment.generation import GenerationConfig, SamplingConfig, make_generator

    model_cfg = ModelConfig(name_or_path=tiny_qwen2, attn_implementation="dca", dca=DCAConfig(40, 8))
    gen = make_generator(GenerationConfig(backend="transformers", max_model_len=512), tiny_qwen2, qwen_tokenizer,
                         model_cfg=model_cfg)  # fmt: skip
    assert gen.model.config._attn_implementation == "dca"
    prompt = torch.randint(0, 151_000, (120,), generator=torch.Generator().manual_seed(2)).tolist()
    answer = gen.generate([prompt], 1, SamplingConfig(temperature=0.0, max_new_tokens=6))[0][0]
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(gen.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert answer.token_ids == ids[len(prompt) : len(prompt) + len(answer.token_ids)]
    with pytest.raises(ValueError, match="transformers backend only"):
        make_generator(GenerationConfig(backend="vllm"), tiny_qwen2, qwen_tokenizer, model_cfg=model_cfg)


def test_padded_or_shifted_rows_are_refused():
    model = load("tiny-qwen2", "dca", dca_cfg=DCAConfig(40, 8))
    ids = torch.randint(0, 151_000, (2, 20))
    with pytest.raises(ValueError, match="padded batches"):
        model(ids, attention_mask=torch.tensor([[0] * 3 + [1] * 17, [1] * 20]))
    with pytest.raises(ValueError, match="positions run 0..T-1"):
        model(ids, position_ids=torch.arange(5, 25).expand(2, -1))


# --------------------------------------------------------------------------------------------------------------
# Settings, and vLLM's config
# --------------------------------------------------------------------------------------------------------------


def test_settings_defaults_and_errors():
    assert dca.dca_settings(DCAConfig(), 8192) == {
        "chunk_size": 6144, "local_size": 512, "original_max_position_embeddings": 8192,
    }  # fmt: skip
    with pytest.raises(ValueError, match="below the model's native window"):
        dca.dca_settings(DCAConfig(chunk_size=8192), 8192)
    with pytest.raises(ValueError, match="under half of chunk_size"):
        dca.dca_settings(DCAConfig(chunk_size=100, local_size=50), 8192)
    with pytest.raises(ValueError, match="model.dca is set"):
        ModelConfig(dca=DCAConfig())
    assert ModelConfig(attn_implementation="dca").dca == DCAConfig()
    with pytest.raises(ValueError, match="inference and evaluation"):
        load_causal_lm(ModelConfig(name_or_path="tiny-qwen2", attn_implementation="dca"), 512, trainable=True)


def test_yarn_keeps_the_native_window_for_dca():
    """YaRN stretches max_position_embeddings; DCA's chunks still come from the pretraining window."""
    model = load("tiny-qwen2", "dca", RopeScalingConfig(factor=4.0, original_max_position_embeddings=8192))
    assert model.config.dca == {
        "chunk_size": 6144,
        "local_size": 512,
        "original_max_position_embeddings": 8192,
    }
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert torch.equal(dca.rope_inv_freq(model.config), model.model.rotary_emb.inv_freq)


def test_positions_are_vllms(monkeypatch):
    """vLLM's DualChunkRotaryEmbedding tables, read at the positions its forward uses, equal cos/sin at ours."""
    rope_module = pytest.importorskip("vllm.model_executor.layers.rotary_embedding.dual_chunk_rope")
    chunk_size, local_size, D, T = 24, 6, 16, 100
    fake = types.SimpleNamespace(base=10_000.0, rotary_dim=D, chunk_size=chunk_size, local_size=local_size,
                                 max_position_embeddings=T, dtype=torch.float32, device="cpu")  # fmt: skip
    fake._compute_inv_freq = lambda base: rope_module.DualChunkRotaryEmbedding._compute_inv_freq(fake, base)
    q_cache, qc_cache, k_cache, _, _ = rope_module.DualChunkRotaryEmbedding._compute_cos_sin_cache(fake)
    pos = torch.arange(T)
    L = chunk_size - local_size
    theirs = {"intra": q_cache[pos % L], "succ": qc_cache[pos % L], "inter": qc_cache[L - 1].expand(T, -1),
              "key": k_cache[pos]}  # fmt: skip
    inv_freq = fake._compute_inv_freq(10_000.0)
    ours = dict(zip(("intra", "succ", "inter"), dca.query_positions(pos, chunk_size, local_size)))
    ours["key"] = dca.key_positions(pos, chunk_size, local_size)
    for kind, p in ours.items():
        freqs = torch.outer(p.float(), inv_freq)
        torch.testing.assert_close(torch.cat([freqs.cos(), freqs.sin()], -1), theirs[kind], msg=kind)


def test_write_vllm_config(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "qwen2", "max_position_embeddings": 8192})
    )
    dca.write_vllm_config(tmp_path, dca.dca_settings(DCAConfig(), 8192))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dual_chunk_attention_config"] == {
        "chunk_size": 6144, "local_size": 512, "original_max_position_embeddings": 8192,
    }  # fmt: skip
    assert saved["model_type"] == "qwen2"


@pytest.mark.gpu
def test_vllm_serves_the_exported_config_like_ours(tmp_path, tiny_qwen2, monkeypatch):
    """A tiny Qwen2 exported with dual_chunk_attention_config: vLLM's DCA backend (V0 engine, vLLM <= 0.10) gives
    the prompt log-probs our DCA gives on a 4-chunk prompt, in bf16 on the same GPU, and both differ from plain
    attention there (so the comparison has something to find)."""
    import importlib.util
    import shutil

    vllm = pytest.importorskip("vllm")
    if importlib.util.find_spec("vllm.attention.backends.dual_chunk_flash_attn") is None:
        pytest.skip(f"vLLM {vllm.__version__} has no Dual Chunk Attention backend (removed in 0.11)")
    monkeypatch.setenv("VLLM_USE_V1", "0")
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "DUAL_CHUNK_FLASH_ATTN")
    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen2, folder)
    dca_cfg = DCAConfig(chunk_size=64, local_size=16)  # chunks of 48 tokens, a multiple of vLLM's block of 16
    dca.write_vllm_config(folder, dca.dca_settings(dca_cfg, 32_768))
    prompt = torch.randint(0, 151_000, (200,), generator=torch.Generator().manual_seed(3)).tolist()

    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(folder), dtype="bfloat16", enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.3
    )
    got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    theirs = torch.tensor([lp[t].logprob for t, lp in zip(prompt[1:], got.prompt_logprobs[1:])])
    del llm

    def logprobs(attn: str, dca_settings=None) -> torch.Tensor:
        cfg = ModelConfig(str(folder), "bfloat16", attn_implementation=attn, dca=dca_settings)
        model = load_causal_lm(cfg, 512, trainable=False).to("cuda")
        ids = torch.tensor([prompt], device="cuda")
        logp = model(ids).logits[0, :-1].float().log_softmax(-1)
        return logp.gather(-1, ids[0, 1:, None])[:, 0].cpu()

    ours, plain = logprobs("dca", dca_cfg), logprobs("sdpa")
    assert (ours - theirs).abs().max() < 0.05
    assert (plain - theirs).abs().max() > 0.1
