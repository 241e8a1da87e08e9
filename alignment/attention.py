"""Packed ("padding-free") attention for CPUs and GPUs without flash-attn.

A packed row holds several examples back to back; ``position_ids`` restart at 0 where each example starts.
Transformers' own SDPA path turns that into a (T, T) block-diagonal mask: 1 GiB of booleans at T = 32,768 and
attention computed across every pair of tokens. Here each example attends causally to itself alone, one
``scaled_dot_product_attention(is_causal=True)`` call per example: exact, memory linear in the longest
example, and no token ever sees another example. On CUDA with flash-attn installed, ``flash_attention_2``
does the same from the same ``position_ids``.

Batches with a padding mask (several rows) fall back to ordinary SDPA with that mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "packed_sdpa"


def segment_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the examples in a packed row: a new example starts wherever position_ids == 0."""
    starts = torch.nonzero(position_ids == 0, as_tuple=False).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    ends = [*starts[1:], position_ids.numel()]
    return list(zip(starts, ends))


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, Hkv, T, D)
    value: torch.Tensor,  # (B, Hkv, T, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = (
        attention_mask is None
        and position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]  # no KV cache: training or scoring, not decoding
    )
    if not packed:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention: share each KV head across its query heads
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    # torch.split, not slicing: a slice's backward writes into a zero-filled full-size gradient, once per
    # example (quadratic in the number of examples); split's backward is one concatenation.
    lengths = [end - start for start, end in segment_bounds(position_ids[0])]
    outs = [
        F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=dropout if module.training else 0.0, scale=scaling
        )
        for q, k, v in zip(
            query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)
        )
    ]
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (1, H, T, D)
    return out.transpose(1, 2).contiguous(), None  # (1, T, H, D), as transformers expects


def _packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask at all for packed rows (the attention reads position_ids); SDPA's mask for padded batches."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_packed_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, _packed_sdpa_mask)
