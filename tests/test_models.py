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


def _shared_groups():
    """Two prompts, three and two answers each, labels on the answers; one answer leaves the prompt early."""
    from alignment.data import IGNORE, Sequence

    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, 151_000, (n,), generator=g).tolist()  # noqa: E731

    def seq(prompt, answer):
        ids = prompt + answer
        return Sequence(ids, [IGNORE] * (len(prompt) - 1) + answer + [IGNORE])

    p1, p2 = rand(9), rand(6)
    return [
        [seq(p1, rand(5)), seq(p1, rand(3)), seq(p1[:4], rand(6))],
        [seq(p2, rand(4)), seq(p2, rand(7))],
    ]


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen2-moe"])
def test_shared_prompt_rows_give_each_sequence_its_own_logits_and_gradients(name):
    """An answer written after its group's first sequence sees that sequence's prompt and itself, nothing else:
    its logits, and the gradients of the summed answer log-probs, equal those of each sequence run alone."""
    from alignment.data import IGNORE, collate, collate_shared
    from alignment.logprobs import TokenLogProbs

    model = load_causal_lm(ModelConfig(name_or_path=name), 512, trainable=True)
    f = TokenLogProbs(model, chunk_size=8)
    groups = _shared_groups()
    flat = [s for grp in groups for s in grp]
    shared, last = collate_shared(groups)
    alone = collate(flat)
    assert shared.num_tokens < alone.num_tokens - 10  # the prompts were written once
    assert shared.num_labels == alone.num_labels
    grads = []
    for b in (shared, alone):
        model.zero_grad()
        lp = f(b.input_ids, b.position_ids, b.labels)
        owner = b.seq_ids[b.labels[0] != IGNORE]
        sums = torch.zeros(len(flat)).index_add(0, owner, lp)
        (sums * torch.arange(1.0, len(flat) + 1)).sum().backward()
        grads.append((sums.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # The last position of every sequence holds its last token, with its logits as when run alone.
    with torch.no_grad():
        logits = model(input_ids=shared.input_ids, position_ids=shared.position_ids).logits[0]
        for s, i in zip(flat, last.tolist()):
            assert shared.input_ids[0, i] == s.input_ids[-1]
            ref = model(input_ids=torch.tensor([s.input_ids])).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=1e-5)


def test_shared_prompt_branch_never_reads_as_the_previous_answers_continuation():
    """A branch that would start at the position after the previous answer's end starts one token earlier:
    position_ids alone mark where a branch starts."""
    from alignment.attention import segment_plan
    from alignment.data import IGNORE, Sequence, collate_shared

    a = Sequence([1, 2, 3, 4, 5, 6], [IGNORE, IGNORE, IGNORE, 5, 6, IGNORE])
    b = Sequence([1, 2, 9], [IGNORE, 9, IGNORE])  # shares 1 token, then positions 1-2
    c = Sequence([1, 2, 3, 7, 8], [IGNORE, IGNORE, IGNORE, 8, IGNORE])  # 3 shared would continue b at 3
    batch, last = collate_shared([[a, b, c]])
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 1, 2, 2, 3, 4]
    assert batch.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 2, 9, 3, 7, 8]
    assert segment_plan(batch.position_ids[0]) == [(0, 6, 0, 0), (6, 8, 0, 1), (8, 11, 0, 2)]
    assert last.tolist() == [5, 7, 10]
    assert batch.seq_ids.tolist() == [0] * 6 + [1] * 2 + [2] * 3
    with pytest.raises(ValueError, match="only 2 tokens"):
        segment_plan(torch.tensor([0, 1, 5, 6]))
