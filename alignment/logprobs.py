"""Per-token log-probabilities of the labelled tokens, without ever holding the full (T, vocab) logits.

SFT and every preference loss need log p(label_t | tokens < t) at the labelled positions only. Computing
the full logits of a 32k-token pack with a 49k (SmolLM2) or 152k (Qwen2) vocabulary costs 6-20 GB in fp32,
three times over with the softmax and its gradient. Instead: run the backbone once, keep the hidden states
of labelled positions, and turn them into log-probs chunk by chunk under activation checkpointing, so only
one chunk of logits exists at a time (forward and backward). The price is one extra output-head matmul per
chunk in the backward pass.

The wrapper is an ``nn.Module`` so that DDP / FSDP / DeepSpeed wrap it and see its forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from alignment.data import IGNORE


def _chunk_logprobs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V); fp32 for a stable normaliser under bf16 autocast
    # log_softmax is one fused kernel forward and backward; logit - logsumexp is several passes over (n, V)
    # on CPU (max, subtract, exp, sum, and again backward): 1.7x slower for a 512 x 49,152 chunk, one thread.
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def chunked_logprobs(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """log softmax(head(hidden))[targets], chunk rows at a time: (N, H), (N,) -> (N,)."""
    out = []
    # split, not slicing: each slice's backward would zero-fill a gradient of the full (N, H) size.
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        if torch.is_grad_enabled() and h.requires_grad:
            out.append(checkpoint(_chunk_logprobs, h, head, t, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(h, head, t))
    return torch.cat(out) if out else hidden.new_zeros(0)


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack and the output head of a causal LM (plain or wrapped by peft)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def supports_shared_prompts(model: nn.Module) -> bool:
    """Whether the model's attention reads shared-prompt rows (alignment/attention.py's packed_sdpa)."""
    from alignment.attention import NAME

    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / DeepSpeed wrappers (FSDP2 keeps the class)."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


class TokenLogProbs(nn.Module):
    """forward(input_ids, position_ids, labels) -> log-probs of the labelled tokens, in order: (N,)."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024, share_prompt: bool | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        # Rows whose answers write their common prompt once (alignment.data.collate_shared) need the packed
        # attention that reads them; None: on exactly when the model uses it.
        self.share_prompt = supports_shared_prompts(model) if share_prompt is None else share_prompt
        # FSDP's transformer-based auto-wrap reads the decoder-layer class names from here.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        backbone, head = backbone_and_head(self.model)
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        mask = labels != IGNORE  # (1, T)
        return chunked_logprobs(hidden[mask], head, labels[mask], self.chunk_size)
