"""Built-in models: the real Qwen2 tokenizer, the tiny models' architecture, packing isolation, YaRN."""

from __future__ import annotations

import pytest
import torch

from alignment.config import ModelConfig, RopeScalingConfig
from alignment.models import load_causal_lm, load_tokenizer, resolve_model

UNICODE = "héllo wörld — 你好，世界! 🤖🚀 ∑x² ‰ \t\n  spaces  Ünïcödé ありがとう \u200b\U0001f9ea"


def test_qwen2_tokenizer_facts(qwen_tokenizer):
    tok = qwen_tokenizer
    assert len(tok) == 151_643 + 3
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    assert tok.all_special_ids and set(tok.all_special_ids) <= {151643, 151644, 151645}
    # Known Qwen2 encodings.
    assert tok("Hello", add_special_tokens=False).input_ids == [9707]
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids == [
        151644,
        872,
        198,
        6023,
        151645,
    ]
    # Qwen2 splits digits one by one.
    assert len(tok("12345", add_special_tokens=False).input_ids) == 5
    # Byte-level: any Unicode round-trips exactly.
    ids = tok(UNICODE, add_special_tokens=False).input_ids
    assert tok.decode(ids) == UNICODE
    assert max(ids) < 151_643  # regular text never produces control tokens


def test_qwen2_chat_template(qwen_tokenizer):
    text = qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert (
        text
        == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen_tokenizer.eos_token == "<|im_end|>" and qwen_tokenizer.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen2-moe"])
def test_tiny_models_have_qwen2_architecture(name):
    model = load_causal_lm(ModelConfig(name_or_path=name), 512)
    c = model.config
    assert c.vocab_size == 151_646
    assert c.num_key_value_heads < c.num_attention_heads  # grouped-query attention
    assert c.hidden_size // c.num_attention_heads >= 32  # vLLM's CPU attention needs head_dim >= 32
    assert c.rope_parameters["rope_theta"] == 1e6
    assert c.hidden_act == "silu"  # SwiGLU: silu(gate) * up
    layer = model.model.layers[0]
    attn = layer.self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None
    assert type(layer.input_layernorm).__name__.endswith("RMSNorm")  # pre-norm
    assert type(layer.post_attention_layernorm).__name__.endswith("RMSNorm")
    if name == "tiny-qwen2-moe":
        mlp = layer.mlp
        assert c.num_experts == 8 and c.num_experts_per_tok == 2
        assert hasattr(mlp, "shared_expert") and hasattr(mlp, "shared_expert_gate")
        assert c.moe_intermediate_size < c.shared_expert_intermediate_size  # fine-grained routed experts
    else:
        assert hasattr(layer.mlp, "gate_proj") and hasattr(layer.mlp, "up_proj")


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen2-moe"])
def test_packed_logits_equal_logits_alone(name):
    """No attention across examples: each packed example's logits equal its logits run alone."""
    model = load_causal_lm(ModelConfig(name_or_path=name), 512, trainable=False)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 151_000, (1, n), generator=g) for n in (7, 13, 5)]
    alone = [model(input_ids=s).logits for s in seqs]
    packed = model(
        input_ids=torch.cat(seqs, 1), position_ids=torch.cat([torch.arange(s.shape[1]) for s in seqs])[None]
    ).logits
    start = 0
    for s, ref in zip(seqs, alone):
        torch.testing.assert_close(packed[:, start : start + s.shape[1]], ref, atol=1e-5, rtol=1e-5)
        start += s.shape[1]
    # And the contamination this guards against is real: without the restarts the later examples differ.
    plain = model(input_ids=torch.cat(seqs, 1)).logits
    assert (plain[:, 7:20] - alone[1]).abs().max() > 1e-3


def test_yarn_setting_stretches_the_context(tiny_qwen2):
    cfg = ModelConfig(
        name_or_path=tiny_qwen2, rope_scaling=RopeScalingConfig(original_max_position_embeddings=8192)
    )
    model = load_causal_lm(cfg, 32768)
    rope = model.config.rope_parameters
    assert (
        rope["rope_type"] == "yarn"
        and rope["factor"] == 4.0
        and rope["original_max_position_embeddings"] == 8192
    )
    # No stretching needed, none applied.
    model = load_causal_lm(ModelConfig(name_or_path=tiny_qwen2, rope_scaling=RopeScalingConfig()), 1024)
    assert model.config.rope_parameters["rope_type"] == "default"


def test_lora_option_only_trains_adapters(tiny_qwen2):
    from alignment.config import LoraConfig

    model = load_causal_lm(ModelConfig(name_or_path=tiny_qwen2, lora=LoraConfig(r=4)), 512)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


def test_unknown_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder. Built-in names"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        resolve_model(str(tmp_path / "empty"))


@pytest.mark.slow
def test_smollm2_builtin_is_the_real_model():
    model = load_causal_lm(ModelConfig(name_or_path="smollm2-135m-instruct"), 2048, trainable=False)
    tok = load_tokenizer("smollm2-135m-instruct")
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert c.vocab_size == 49152 and c.tie_word_embeddings
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    # It is a real instruct model: it knows the capital of France.
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
