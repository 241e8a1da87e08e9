"""Upcycling a dense model into a fine-grained MoE (alignment/upcycle.py), property by property.

Every expected value is derived here from the dense weights, not from the functions under test: kept expert
neurons are searched for in the dense FFN by value, parameter counts are computed from the shapes, and the
exact-reproduction configuration is checked against the dense model's own logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignment.upcycle import (
    UpcycleConfig,
    expert_neurons,
    load_dense,
    main,
    reinit_mask,
    upcycle_model,
)

TINY = dict(
    num_experts=8, expert_intermediate_size=64, num_experts_per_tok=2
)  # tiny-qwen2: hFFN 256, 2 copies


def tiny_llama(vocab_size: int = 1000, dtype=torch.float32):
    """A random 2-layer Llama (SmolLM2's architecture: no QKV bias, tied embeddings), head_dim 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def dense_qwen2():
    return load_dense("tiny-qwen2")[0].eval()


def experts_of(moe, layer: int):
    """(gate (n, hE, H), up (n, hE, H), down (n, H, hE)) of one layer, read from the model's own parameters."""
    experts = moe.model.layers[layer].mlp.experts
    h_e = moe.config.moe_intermediate_size
    return experts.gate_up_proj[:, :h_e], experts.gate_up_proj[:, h_e:], experts.down_proj


# --------------------------------------------------------------------------------------------------------------
# The pure steps
# --------------------------------------------------------------------------------------------------------------


def test_experts_are_cut_in_order_from_shuffled_copies():
    n, h_e, h_ffn = 6, 5, 8  # ceil(30 / 8) = 4 copies, the last one cut short (6 of its 8 positions used)
    neurons = expert_neurons(n, h_e, h_ffn, torch.Generator().manual_seed(0))
    assert neurons.shape == (n, h_e)
    flat = neurons.flatten().tolist()  # the experts back to back: the concatenated copies, in order
    copies = [flat[i : i + h_ffn] for i in range(0, len(flat), h_ffn)]
    assert len(copies) == math.ceil(n * h_e / h_ffn) == 4
    for copy in copies[:-1]:
        assert sorted(copy) == list(range(h_ffn))  # a whole copy: every dense neuron once
    assert len(set(copies[-1])) == len(copies[-1]) == 6  # the rest of the last copy is discarded
    assert len({tuple(c) for c in copies[:-1]}) == 3  # one permutation per copy
    assert copies[0] != list(range(h_ffn))  # shuffled


def test_reinit_mask_draws_exactly_the_fraction_of_each_experts_neurons():
    mask = reinit_mask(16, 64, 0.5, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [32] * 16
    assert len({tuple(row.tolist()) for row in mask}) == 16  # drawn per expert
    assert reinit_mask(4, 10, 0.25, torch.Generator()).sum(1).tolist() == [round(2.5)] * 4
    assert not reinit_mask(4, 10, 0.0, torch.Generator()).any()


# --------------------------------------------------------------------------------------------------------------
# The upcycled model
# --------------------------------------------------------------------------------------------------------------


def test_shapes_and_parameter_counts(dense_qwen2):
    moe = upcycle_model(dense_qwen2, UpcycleConfig(**TINY))
    c, d = moe.config, dense_qwen2.config
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (8, 2, 64)
    assert c.shared_expert_intermediate_size == d.intermediate_size == 256
    assert c.decoder_sparse_step == 1 and c.mlp_only_layers == []
    h, h_ffn, layers = d.hidden_size, d.intermediate_size, d.num_hidden_layers
    mlp = moe.model.layers[0].mlp
    assert mlp.experts.gate_up_proj.shape == (8, 2 * 64, h)
    assert mlp.experts.down_proj.shape == (8, h, 64)
    assert mlp.gate.weight.shape == (8, h) and mlp.shared_expert_gate.weight.shape == (1, h)
    # Counted from the shapes: the dense model minus its FFNs, plus per layer n experts of 3 x H x hE, the
    # shared expert (3 x H x hFFN), the router (n x H) and the shared expert's gate (H).
    dense_ffn = 3 * h * h_ffn
    expected = sum(p.numel() for p in dense_qwen2.parameters()) - layers * dense_ffn
    expected += layers * (8 * 3 * h * 64 + dense_ffn + 8 * h + h)
    assert sum(p.numel() for p in moe.parameters()) == expected


def test_kept_parameters_are_whole_dense_neurons_and_the_fraction_is_redrawn(dense_qwen2):
    import copy

    # The tiny model's random weights are all N(0, 0.02): give each FFN matrix statistics of its own, so the
    # redraw's distribution is told apart from any fixed one.
    dense = copy.deepcopy(dense_qwen2)
    with torch.no_grad():
        for layer in dense.model.layers:
            layer.mlp.gate_proj.weight.mul_(5.0)
            layer.mlp.up_proj.weight.add_(0.03)
            layer.mlp.down_proj.weight.mul_(0.3).sub_(0.01)
    moe = upcycle_model(dense, UpcycleConfig(**TINY, reinit_fraction=0.5))
    h_e = 64
    for i, layer in enumerate(dense.model.layers):
        gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        g_e, u_e, d_e = experts_of(moe, i)
        redrawn = {"gate": [], "up": [], "down": []}
        uses = torch.zeros(gate.shape[0], dtype=torch.long)
        for e in range(8):
            kept = 0
            for j in range(h_e):
                # Search the dense FFN for this neuron by value: its gate row, up row and down column together.
                hit = (gate == g_e[e, j]).all(1).nonzero().flatten().tolist()
                if hit:
                    (k,) = hit
                    assert torch.equal(up[k], u_e[e, j]) and torch.equal(down[:, k], d_e[e, :, j])
                    uses[k] += 1
                    kept += 1
                else:  # a redrawn neuron shares nothing with any dense neuron
                    assert not (up == u_e[e, j]).all(1).any() and not (down.t() == d_e[e, :, j]).all(1).any()
                    redrawn["gate"].append(g_e[e, j])
                    redrawn["up"].append(u_e[e, j])
                    redrawn["down"].append(d_e[e, :, j])
            assert kept == h_e // 2  # exactly half of every expert's neurons (so of its parameters) is new
        # 2 copies: no dense neuron is kept more often than the number of copies.
        assert uses.max() <= 2
        # Redrawn values follow N(mean, std) of the dense matrix they replace (8 x 32 x 128 = 32,768 values).
        for name, dense_w in (("gate", gate), ("up", up), ("down", down)):
            new = torch.stack(redrawn[name])
            assert abs(new.mean() - dense_w.mean()) < 0.05 * dense_w.std()
            assert abs(new.std() / dense_w.std() - 1) < 0.05


def test_shared_expert_is_the_dense_ffn_and_everything_else_is_copied(dense_qwen2):
    moe = upcycle_model(dense_qwen2, UpcycleConfig(**TINY, router_init_std=0.02))
    dense_sd = dense_qwen2.state_dict()
    for name, value in moe.state_dict().items():
        if ".mlp." in name:
            continue
        assert torch.equal(value, dense_sd[name]), name  # embeddings, attention (with bias), norms, head
    for i, layer in enumerate(dense_qwen2.model.layers):
        mlp = moe.model.layers[i].mlp
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(mlp.shared_expert, proj).weight, getattr(layer.mlp, proj).weight)
        assert not mlp.shared_expert_gate.weight.any()  # sigmoid(0) = 1/2 for every token
        assert abs(mlp.gate.weight.std().item() - 0.02) < 0.002  # N(0, 0.02^2): 8 x 128 draws


@pytest.mark.parametrize("source", ["tiny-qwen2", "tiny-llama"])
def test_two_experts_top2_equal_weights_reproduce_the_dense_model_exactly(source):
    """n = 2 experts of hFFN / 2 (one copy), top-2, equal router weights, nothing redrawn: 1/2 (E1 + E2) plus
    sigmoid(0) x FFN is the dense FFN. In float64 the logits agree to 1e-12 (summation order only)."""
    dense = (
        load_dense(source, "float64")[0] if source == "tiny-qwen2" else tiny_llama(dtype=torch.float64)
    ).eval()
    h_ffn = dense.config.intermediate_size
    exact = dict(num_experts=2, expert_intermediate_size=h_ffn // 2, num_experts_per_tok=2, dtype="float64")
    ids = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(ids).logits
        for settings, same in [
            (dict(reinit_fraction=0.0, router_init_std=0.0), True),
            (dict(reinit_fraction=0.5, router_init_std=0.0), False),  # the test can tell: redrawn neurons
            (dict(reinit_fraction=0.0, router_init_std=0.0, num_experts_per_tok=1), False),  # half the FFN
        ]:
            moe = upcycle_model(dense, UpcycleConfig(**{**exact, **settings})).eval()
            moe.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
            gap = (moe(ids).logits - expected).abs().max().item()
            assert (gap < 1e-12) if same else (gap > 1e-3), (settings, gap)


def test_llama_maps_onto_qwen2_with_zero_qkv_bias():
    dense = tiny_llama()
    moe = upcycle_model(
        dense, UpcycleConfig(num_experts=4, expert_intermediate_size=64, num_experts_per_tok=2)
    )
    assert moe.config.qkv_bias and moe.config.tie_word_embeddings
    assert moe.config.rope_parameters["rope_theta"] == 100000.0
    for i, layer in enumerate(moe.model.layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            lin = getattr(layer.self_attn, proj)
            assert not lin.bias.any()
            assert torch.equal(lin.weight, getattr(dense.model.layers[i].self_attn, proj).weight)
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()  # still tied


def test_seeded_and_deterministic(dense_qwen2):
    a = upcycle_model(dense_qwen2, UpcycleConfig(**TINY, seed=3)).state_dict()
    b = upcycle_model(dense_qwen2, UpcycleConfig(**TINY, seed=3)).state_dict()
    c = upcycle_model(dense_qwen2, UpcycleConfig(**TINY, seed=4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differ = {k for k in a if not torch.equal(a[k], c[k])}
    assert differ == {
        k for k in a if k.endswith(("experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"))
    }


def test_refuses_what_qwen2_moe_cannot_hold():
    from transformers import LlamaConfig, LlamaForCausalLM

    small = dict(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2
    )
    for bad, message in [({"attention_bias": True}, "attention_bias"), ({"mlp_bias": True}, "mlp_bias")]:
        with pytest.raises(ValueError, match=message):
            upcycle_model(
                LlamaForCausalLM(LlamaConfig(**small, **bad)),
                UpcycleConfig(num_experts=2, num_experts_per_tok=2),
            )
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        UpcycleConfig(num_experts=4, num_experts_per_tok=5)


def test_cli_writes_a_folder_that_transformers_loads(tmp_path, dense_qwen2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "moe"
    main(
        [
            "model=tiny-qwen2",
            "num_experts=8",
            "expert_intermediate_size=64",
            "num_experts_per_tok=2",
            f"output_dir={out}",
        ]
    )
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "Qwen2MoeForCausalLM"
    expected = upcycle_model(dense_qwen2, UpcycleConfig(**TINY)).state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert (out / "recipe.yaml").is_file()


@pytest.mark.slow
@pytest.mark.vllm
def test_upcycled_models_load_in_vllm_with_the_same_logprobs(tmp_path, qwen_tokenizer):
    """Upcycled tiny-qwen2 and an upcycled Llama (SmolLM2's architecture) serve in vLLM: its log-probs of an
    answer equal transformers' on the saved folder (1e-4 per token in float32, as tests/test_vllm_load.py)."""
    from alignment.data import encode_prompt
    from alignment.generation import GenerationConfig, SamplingConfig, VLLMGenerator
    from tests.test_vllm_load import ANSWER, PROMPT, transformers_logps

    llama_dir = tmp_path / "llama"
    tiny_llama(vocab_size=len(qwen_tokenizer)).save_pretrained(llama_dir)
    qwen_tokenizer.save_pretrained(llama_dir)
    for k, source in enumerate(("tiny-qwen2", str(llama_dir))):
        out = tmp_path / f"moe-{k}"
        main([f"model={source}", "num_experts=8", "expert_intermediate_size=32", f"output_dir={out}"])
        prompt_ids = encode_prompt(qwen_tokenizer, PROMPT)
        answer_ids = qwen_tokenizer(ANSWER, add_special_tokens=False).input_ids
        expected = transformers_logps(out, prompt_ids, answer_ids)
        engine = VLLMGenerator(
            GenerationConfig(max_model_len=256, kv_cache_gib=1), str(out), qwen_tokenizer, "float32"
        )
        try:
            got = torch.tensor(engine.sequence_logprobs(prompt_ids, answer_ids))
            greedy = engine.generate([prompt_ids], 1, SamplingConfig(temperature=0.0, max_new_tokens=4))[0][0]
        finally:
            engine.close()
        assert (got - expected).abs().max() < 1e-4, (source, (got - expected).abs().max())
        assert 1 <= len(greedy.token_ids) <= 4
