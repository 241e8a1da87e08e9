"""A Bradley-Terry reward model behind the reward interface: score (prompt, completion) pairs in batches.

The model is a standard Hugging Face ``...ForSequenceClassification`` checkpoint with one label (what
``make reward`` saves). The score of a conversation is the head's output at its last token.

The conversation is always rendered with the reward model's own tokenizer and chat template, from the
messages, never from text the policy rendered with its template: a policy with another tokenizer or template
gets the same scores as one that shares the reward model's (the bug of TRL issue #1979). Inputs longer than
``max_length`` lose tokens from the left of the prompt; the scorer never fails on length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from alignment.data import IGNORE, collate_shared, shared_prefix_len
from alignment.data import Sequence as Tokens
from alignment.logprobs import supports_shared_prompts
from reward.base import Prompt, RewardOutput


def to_messages(prompt: Prompt, completion: str) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    return turns + [{"role": "assistant", "content": completion}]


class SequenceScores(nn.Module):
    """forward(input_ids, position_ids, last_index) -> one score per packed sequence: (S,).

    input_ids / position_ids: (1, T) padding-free row; last_index: (S,) position of each sequence's last token.
    """

    def __init__(self, model: nn.Module, share_prompt: bool | None = None):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)
        # Rows of answers that write their common prompt once (alignment.data.collate_shared); None: on
        # exactly when the model's attention reads them (packed_sdpa).
        self.share_prompt = supports_shared_prompts(model) if share_prompt is None else share_prompt

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, last_index: torch.Tensor
    ) -> torch.Tensor:
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return self.model.score(hidden[0, last_index]).squeeze(-1).float()


def load_reward_model(name_or_path: str, dtype: str = "float32", trainable: bool = False, attn: str = "auto"):
    """A sequence-classification model with one output (a new score head when loading a causal LM)."""
    from transformers import AutoModelForSequenceClassification

    from alignment.models import (
        load_tokenizer,
        pick_attn_implementation,
        refuse_pure_bf16_training,
        resolve_model,
    )

    if trainable:
        refuse_pure_bf16_training(dtype)
    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=1,
        dtype=getattr(torch, dtype),
        attn_implementation=pick_attn_implementation(attn),
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    model.requires_grad_(trainable)
    return model if trainable else model.eval(), tokenizer


class RewardModelScorer:
    """``scorer(prompts, completions) -> RewardOutput``; ``scorer.score(...)`` gives the floats alone."""

    name = "reward_model"

    def __init__(
        self,
        name_or_path: str,
        device: str | torch.device = "cpu",
        max_length: int = 2048,
        batch_tokens: int = 8192,
        dtype: str = "float32",
    ):
        model, self.tokenizer = load_reward_model(name_or_path, dtype)
        self.scores = SequenceScores(model.to(device))
        self.device = torch.device(device)
        self.max_length = max_length
        self.batch_tokens = batch_tokens

    def encode(self, prompt: Prompt, completion: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(to_messages(prompt, completion), tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids[-self.max_length :]  # over-long: the prompt loses its start, the answer stays whole

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        """Scores in order. Answers to the same prompt next to each other (online DPO's N samples) share one
        copy of the prompt's tokens in the packed row when the attention allows it; the scores are those of
        each conversation alone."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions)]
        share = self.scores.share_prompt
        out: list[float] = []
        start = 0
        while start < len(encoded):
            # fill a padding-free row up to batch_tokens (at least one sequence); a shared prompt counts once
            end, tokens, groups = start, 0, []
            while end < len(encoded):
                seq = encoded[end]
                same = share and end > start and prompts[end] == prompts[end - 1]
                cost = len(seq) - (shared_prefix_len(groups[-1][0], seq, len(seq) - 1) if same else 0)
                if end > start and tokens + cost > self.batch_tokens:
                    break
                if same:
                    groups[-1].append(seq)
                else:
                    groups.append([seq])
                tokens += cost
                end += 1
            out += self._score_row(groups)
            start = end
        return out

    def _score_row(self, groups: list[list[list[int]]]) -> list[float]:
        batch, last = collate_shared([[Tokens(s, [IGNORE] * len(s)) for s in g] for g in groups])
        d = self.device
        return self.scores(batch.input_ids.to(d), batch.position_ids.to(d), last.to(d)).tolist()

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], **columns) -> RewardOutput:
        try:
            return RewardOutput(scores=self.score(prompts, completions))
        except Exception as e:  # a reward never crashes training: report why for every item
            reason = f"reward model failed: {type(e).__name__}: {e}"
            return RewardOutput(scores=[None] * len(completions), reasons=[reason] * len(completions))
