"""Dual Chunk Attention (DCA): reading inputs longer than the pretraining window, without training.

An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models" (ChunkLlama), which Qwen2 uses with
YaRN for its long inputs. A model trained on windows of c tokens has never seen a relative position of c or more;
plain RoPE past c feeds it distances it cannot read. DCA cuts the sequence into chunks of L = chunk_size -
local_size tokens and gives each query one of three positions, depending on where the key is, so that every
relative position stays at most chunk_size < c.

A key at position j keeps P_k(j) = j mod L. A query at position i uses, for keys

- in its own chunk (intra):              P_q = i mod L                    relative = i - j, exact, < L;
- in the previous chunk (successive):    P_q = min(i mod L + L, chunk_size)
                                          relative = i - j (exact) for the first local_size queries of a
                                          chunk, then capped at chunk_size - j mod L;
- two or more chunks back (inter):       P_q = chunk_size                 relative = chunk_size - j mod L,
                                          in [local_size + 1, chunk_size].

These are ChunkLlama's and vLLM's positions (``DualChunkRotaryEmbedding``: ``chunk_size`` there is ours), so a
model exported with vLLM's ``dual_chunk_attention_config`` (``write_vllm_config``) computes the same scores.

The three kinds are one softmax over the causal keys with different scores, split over disjoint key sets. Each
part p returns its normalised output o_p and the log-sum-exp l_p of its scores; the exact softmax is

    o = sum_p exp(l_p - l) o_p,    l = log sum_p exp(l_p)

as flash attention merges blocks. Queries are taken one chunk at a time; each part is one attention call with
its log-sum-exp (torch's flash kernel on CPU, a blocked matmul elsewhere), so no (T, T) scores or mask ever
exist: memory is linear in the sequence (O(T x D), plus at most O(T x L) scores in the blocked fallback), and
the arithmetic is full causal attention's.

How the positions reach q and k: transformers rotates q and k at their true positions before it calls the
attention function (and caches the rotated keys). Rotations compose, R(a) R(b) = R(a + b), so this function
rotates them once more, by (DCA position - true position). That keeps the model's own code, its rotary scaling
(YaRN's interpolated frequencies and attention factor included, which is how DCA combines with
``model.rope_scaling``) and its KV cache untouched, for any model whose attention calls the registry with
rotate-half RoPE (Llama, Qwen2, Qwen2-MoE). The alternative, a patched attention forward per architecture that
hands over un-rotated q and k, would copy transformers' forward for each model class and break when it changes.

Limits: inference only (``load_causal_lm`` refuses to train with it); rows without padding or packing whose
positions run 0..T-1 (the transformers generator's rows are); RoPE types with fixed frequencies (default, yarn,
linear, llama3), not dynamic ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

NAME = "dca"
# The blocked fallback keeps its scores under this many elements per call (256 MiB in float32).
_BLOCK_ELEMENTS = 1 << 26


# --------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------


def native_window(config, rope_scaling=None) -> int:
    """The window the model was pretrained on: YaRN's original length where one is given, else the config's."""
    if rope_scaling is not None and rope_scaling.original_max_position_embeddings:
        return int(rope_scaling.original_max_position_embeddings)
    saved = (getattr(config, "rope_parameters", None) or {}).get("original_max_position_embeddings")
    return int(saved or config.max_position_embeddings)


def dca_settings(dca, native: int) -> dict:
    """chunk_size and local_size from ``model.dca`` (null: ChunkLlama's 3/4 and 1/16 of the native window),
    checked: the largest relative position DCA uses is chunk_size, so it must stay below the native window."""
    chunk_size = dca.chunk_size or native * 3 // 4
    local_size = dca.local_size or native // 16
    if chunk_size >= native:
        raise ValueError(
            f"model.dca.chunk_size={chunk_size}: DCA's largest relative position is chunk_size, which must stay "
            f"below the model's native window ({native}); use at most {native - 1}"
        )
    if local_size >= chunk_size - local_size:
        raise ValueError(
            f"model.dca.local_size={local_size}: must be under half of chunk_size={chunk_size} (chunks are "
            "chunk_size - local_size tokens and the successive-chunk window must fit in one)"
        )
    return {
        "chunk_size": int(chunk_size),
        "local_size": int(local_size),
        "original_max_position_embeddings": native,
    }


def write_vllm_config(folder: str | Path, settings: dict) -> Path:
    """Add vLLM's ``dual_chunk_attention_config`` to a saved model's config.json (for serving on CUDA).

    Opt-in, never written by training: vLLM's Qwen2, Qwen2-MoE and Qwen3 models switch to DCA when they see the
    key, and only vLLM up to 0.10 has the attention backend for it (V0 engine, DUAL_CHUNK_FLASH_ATTN; removed
    in 0.11). Llama models ignore it, and vLLM 0.32 (this project's pin) fails on it. vLLM also applies its own
    attention temperature, max(1, 0.1 ln(T / original_max_position_embeddings) + 1), to inputs longer than
    original_max_position_embeddings; this module does not (use ``model.rope_scaling`` for YaRN).
    """
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["dual_chunk_attention_config"] = {
        k: int(settings[k]) for k in ("chunk_size", "local_size", "original_max_position_embeddings")
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


# --------------------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------------------


def key_positions(pos: torch.Tensor, chunk_size: int, local_size: int) -> torch.Tensor:
    """P_k(j) = j mod L."""
    return pos % (chunk_size - local_size)


def query_positions(
    pos: torch.Tensor, chunk_size: int, local_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(intra, successive, inter) positions of queries at true positions ``pos``."""
    within = pos % (chunk_size - local_size)
    return within, (within + chunk_size - local_size).clamp(max=chunk_size), torch.full_like(pos, chunk_size)


def rope_inv_freq(config, device=None) -> torch.Tensor:
    """The rotary frequencies transformers uses for this config (the same init function its rotary module calls)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(
            f"DCA needs fixed rotary frequencies; rope_type {rope_type!r} changes them with length"
        )
    init = LlamaRotaryEmbedding.compute_default_rope_parameters if rope_type == "default" else None
    inv_freq, _ = (init or ROPE_INIT_FUNCTIONS[rope_type])(config)
    return inv_freq.to(device) if device is not None else inv_freq


def rerotate(
    x: torch.Tensor, true_pos: torch.Tensor, new_pos: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """x (..., T, D), rotate-half RoPE applied at ``true_pos`` (T,), rotated to ``new_pos`` (T,) instead.

    R(new) = R(new - true) R(true). The angle already applied is computed as transformers does (float32 product
    of position and frequency), the difference in float64, so the result is R(new) to float32 rounding even at
    positions where a float32 angle is off by 1e-3 radians.
    """
    freq = inv_freq.to(device=x.device, dtype=torch.float32)
    applied = (true_pos.to(x.device)[:, None].float() * freq).double()
    delta = new_pos.to(x.device)[:, None].double() * freq.double() - applied  # (T, D/2)
    cos = torch.cat([delta.cos(), delta.cos()], dim=-1).float()
    sin = torch.cat([delta.sin(), delta.sin()], dim=-1).float()
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated_half = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated_half * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Attention with its log-sum-exp, and the exact merge
# --------------------------------------------------------------------------------------------------------------


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v and the log-sum-exp of each row's scores: (B, H, Tq, D) and (B, H, Tq), float32.

    ``causal``: query r sees keys 0..r (top-left aligned; the callers pass square blocks).
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )
        return out.float(), lse.float()
    return attend_blocked(q, k, v, scale, causal)


def attend_blocked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as ``attend`` with plain matmuls, query rows in blocks so the scores stay under _BLOCK_ELEMENTS."""
    B, H, Tq, _ = q.shape
    K = k.shape[2]
    rows = max(1, _BLOCK_ELEMENTS // (B * H * K))
    kt, vf = k.float().transpose(-1, -2), v.float()
    outs, lses = [], []
    for start in range(0, Tq, rows):
        scores = (q[:, :, start : start + rows].float() @ kt) * scale  # (B, H, rows, K)
        if causal:
            r = torch.arange(start, start + scores.shape[2], device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(K, device=q.device)[None, :] > r, float("-inf"))
        lse = scores.logsumexp(-1)
        outs.append((scores - lse[..., None]).exp_() @ vf)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax from softmaxes over disjoint key sets: o = sum_p exp(l_p - l) o_p, l = logsumexp_p l_p."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([p[1] for p in parts])  # (P, B, H, Tq)
    weights = (lse - lse.logsumexp(0)).exp()
    return sum(w[..., None] * out for w, (out, _) in zip(weights, parts))


def dual_chunk_attention(
    q_intra: torch.Tensor,
    q_succ: torch.Tensor,
    q_inter: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_len: int,
    scale: float,
) -> torch.Tensor:
    """DCA over keys 0..K-1 for the last Tq positions (a prefill has Tq = K, a decoding step Tq = 1).

    q_*: (B, H, Tq, D), each rotated to its kind's positions; k (B, H, K, D) rotated to j mod L; v (B, H, K, D).
    Queries go chunk by chunk; within the query's chunk, the keys before the first query of the block (a decoding
    step, or a prefill continuing a cache) are a separate unmasked part, so every causal call is square.
    """
    Tq, K = q_intra.shape[2], k.shape[2]
    q0 = K - Tq
    outs = []
    a = q0
    while a < K:
        cs = a // chunk_len * chunk_len  # start of this query block's chunk
        b = min(cs + chunk_len, K)
        rows = slice(a - q0, b - q0)
        parts = [attend(q_intra[:, :, rows], k[:, :, a:b], v[:, :, a:b], scale, causal=True)]
        if a > cs:
            parts.append(attend(q_intra[:, :, rows], k[:, :, cs:a], v[:, :, cs:a], scale, causal=False))
        if cs >= chunk_len:
            prev = slice(cs - chunk_len, cs)
            parts.append(attend(q_succ[:, :, rows], k[:, :, prev], v[:, :, prev], scale, causal=False))
        if cs >= 2 * chunk_len:
            early = slice(0, cs - chunk_len)
            parts.append(attend(q_inter[:, :, rows], k[:, :, early], v[:, :, early], scale, causal=False))
        outs.append(merge(parts))
        a = b
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


# --------------------------------------------------------------------------------------------------------------
# The transformers attention function
# --------------------------------------------------------------------------------------------------------------


def dca_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, Tq, D), rotated at true positions
    key: torch.Tensor,  # (B, Hkv, K, D), the cache included, rotated at true positions
    value: torch.Tensor,  # (B, Hkv, K, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    settings = module.config.dca
    chunk_size, local_size = settings["chunk_size"], settings["local_size"]
    Tq, K = query.shape[2], key.shape[2]
    true_k = torch.arange(K, device=query.device)
    true_q = true_k[K - Tq :]
    if position_ids is not None and not bool((position_ids == true_q).all()):
        raise ValueError(
            "attn_implementation dca: needs rows whose positions run 0..T-1 (no padding, no packing); "
            f"got positions {position_ids[0, :4].tolist()}... for query {K - Tq}..{K - 1}"
        )
    if dropout > 0:
        raise ValueError("attn_implementation dca is for inference: no attention dropout")
    inv_freq = rope_inv_freq(module.config, query.device)
    k = rerotate(key, true_k, key_positions(true_k, chunk_size, local_size), inv_freq)
    q_intra, q_succ, q_inter = (
        rerotate(query, true_q, p, inv_freq) for p in query_positions(true_q, chunk_size, local_size)
    )
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention: share each KV head across its query heads
        k, value = k.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = dual_chunk_attention(q_intra, q_succ, q_inter, k, value, chunk_size - local_size, scale)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None  # (B, Tq, H, D), as transformers expects


def _dca_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask: DCA is causal by construction. Padded rows are refused (their positions would be off)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "attn_implementation dca: padded batches are not supported; send rows of equal length"
        )
    return None


def register_dca() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, dca_attention_forward)
    AttentionMaskInterface.register(NAME, _dca_mask)


def main(argv: list[str] | None = None) -> None:
    """python -m alignment.dca FOLDER [--chunk-size N] [--local-size N]: add vLLM's dual_chunk_attention_config."""
    import argparse

    from transformers import AutoConfig

    from alignment.config import DCAConfig

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--local-size", type=int, default=None)
    args = parser.parse_args(argv)
    config = AutoConfig.from_pretrained(args.folder)
    settings = dca_settings(DCAConfig(args.chunk_size, args.local_size), native_window(config))
    print(f"[dca] {write_vllm_config(args.folder, settings)}: dual_chunk_attention_config = {settings}")


if __name__ == "__main__":
    main()
