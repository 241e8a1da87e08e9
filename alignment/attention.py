"""Packed ("padding-free") attention for CPUs and GPUs without flash-attn.

A packed row holds several examples back to back; ``position_ids`` restart at 0 where each example starts.
Transformers' own SDPA path turns that into a (T, T) block-diagonal mask: 1 GiB of booleans at T = 32,768 and
attention computed across every pair of tokens. Here each example attends causally to itself alone, one
``scaled_dot_product_attention(is_causal=True)`` call per example: exact, memory linear in the longest
example, and no token ever sees another example. On CUDA with flash-attn installed, ``flash_attention_2``
does the same from the same ``position_ids``.

Shared prompts: a row may also hold answers that share their prompt with the example before them, the
prompt written once (``alignment.data.collate_shared``). Such a branch is marked by its position_ids alone:
they jump back to p (not to 0), and the branch attends to the first p tokens of the example it branches from,
then causally to itself. Its logits equal those of the whole sequence run alone; the shared tokens are
computed once. Flash-attn reads position_ids differently (a new example only where they restart at 0), so
shared rows are for this implementation only.

Batches with a padding mask (several rows) fall back to ordinary SDPA with that mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "packed_sdpa"


def segment_plan(position_ids: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """[(start, end, trunk_start, shared)] for the segments of a packed row, in order.

    A segment starts where position_ids do not continue the previous token's: at 0 a new example starts
    (shared = 0); at p > 0 a branch starts that attends to the ``shared = p`` tokens from ``trunk_start``, the
    start of the last example, before itself. A row that does not start at 0 starts with an example.
    """
    pos = position_ids.flatten()
    if pos.numel() == 0:
        return []
    breaks = (torch.nonzero(pos[1:] != pos[:-1] + 1, as_tuple=False).flatten() + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, pos.numel()]
    firsts = pos[starts].tolist()
    plan, trunk, trunk_len = [], 0, 0
    for i, (start, end, p) in enumerate(zip(starts, ends, firsts)):
        if p == 0 or i == 0:
            trunk, trunk_len = start, end - start
            plan.append((start, end, start, 0))
            continue
        if p > trunk_len:
            raise ValueError(
                f"position_ids: a segment at token {start} continues at position {p}, but the example it "
                f"would share its prompt with (from token {trunk}) has only {trunk_len} tokens"
            )
        plan.append((start, end, trunk, p))
    return plan


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
    plan = segment_plan(position_ids[0])
    # torch.split, not slicing: a slice's backward writes into a zero-filled full-size gradient, once per
    # example (quadratic in the number of examples); split's backward is one concatenation.
    lengths = [end - start for start, end, _, _ in plan]
    qs, ks, vs = (t.split(lengths, dim=2) for t in (query, key, value))
    first = {start: i for i, (start, _, _, _) in enumerate(plan)}  # segment index by start token
    p_drop = dropout if module.training else 0.0
    outs = []
    for i, (start, end, trunk, shared) in enumerate(plan):
        if not shared:
            outs.append(
                F.scaled_dot_product_attention(
                    qs[i], ks[i], vs[i], is_causal=True, dropout_p=p_drop, scale=scaling
                )
            )
            continue
        t = first[trunk]  # the branch sees the trunk's first `shared` keys, then itself causally
        k = torch.cat([ks[t][:, :, :shared], ks[i]], dim=2)
        v = torch.cat([vs[t][:, :, :shared], vs[i]], dim=2)
        n = end - start
        mask = torch.ones(n, shared + n, dtype=torch.bool, device=query.device).tril(diagonal=shared)
        outs.append(
            F.scaled_dot_product_attention(qs[i], k, v, attn_mask=mask, dropout_p=p_drop, scale=scaling)
        )
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
