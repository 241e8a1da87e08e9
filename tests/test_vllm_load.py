"""Trained outputs (SFT, DPO, LoRA-merged SFT) load in vLLM (the CPU build here) and vLLM computes the same
log-probabilities as transformers on them: the engine serves the weights that were trained, not just "some
tokens came out". Tolerance: 1e-4 per token in float32 (seen: about 1e-6)."""

from __future__ import annotations

import pytest
import torch

from tests.test_dpo import run_dpo
from tests.test_sft import run_sft

PROMPT = [{"role": "user", "content": "What is 12 plus 30?"}]
ANSWER = "The answer is 42."


def transformers_logps(path, prompt_ids, answer_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seq = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = model(seq).logits[0].log_softmax(-1)
    return torch.tensor([logp[t - 1, seq[0, t]].item() for t in range(len(prompt_ids), seq.shape[1])])


@pytest.mark.vllm
def test_vllm_serves_the_trained_weights_of_sft_dpo_and_lora_outputs(tmp_path, tiny_qwen2):
    from alignment.data import encode_prompt
    from alignment.generation import GenerationConfig, SamplingConfig, VLLMGenerator
    from alignment.models import load_tokenizer

    outputs = {
        "sft": run_sft(tmp_path, "sft", "training.max_steps=2"),
        "dpo": str(run_dpo(tmp_path, "dpo", "training.max_steps=2")),
        "lora": run_sft(tmp_path, "lora", "training.max_steps=2", "model.lora={r: 4}", "optimizer.lr=1e-2"),
    }
    start = transformers_logps(tiny_qwen2, *_ids(tiny_qwen2))
    for name, path in outputs.items():
        tok = load_tokenizer(path)
        prompt_ids, answer_ids = encode_prompt(tok, PROMPT), tok(ANSWER, add_special_tokens=False).input_ids
        expected = transformers_logps(path, prompt_ids, answer_ids)
        assert (expected - start).abs().max() > 1e-3, f"{name}: training did not change the model"
        engine = VLLMGenerator(GenerationConfig(max_model_len=256, kv_cache_gib=1), path, tok, "float32")
        try:
            got = torch.tensor(engine.sequence_logprobs(prompt_ids, answer_ids))
            greedy = engine.generate([prompt_ids], 1, SamplingConfig(temperature=0.0, max_new_tokens=4))[0][0]
        finally:
            engine.close()
        assert (got - expected).abs().max() < 1e-4, (name, (got - expected).abs().max())
        assert 1 <= len(greedy.token_ids) <= 4


def _ids(path):
    from alignment.data import encode_prompt
    from alignment.models import load_tokenizer

    tok = load_tokenizer(path)
    return encode_prompt(tok, PROMPT), tok(ANSWER, add_special_tokens=False).input_ids
