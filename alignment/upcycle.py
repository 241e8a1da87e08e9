"""Upcycling a dense model into a fine-grained mixture of experts, as the Qwen2 report builds Qwen2-57B-A14B.

    python -m alignment.upcycle recipes/upcycle.yaml [key=value ...]       (or: make upcycle)

Tiny CPU smoke run (seconds):

    python -m alignment.upcycle recipes/upcycle.yaml model=tiny-qwen2 num_experts=8 \
        expert_intermediate_size=64 num_experts_per_tok=2 output_dir=outputs/upcycle-smoke

The recipe (Qwen2 technical report, section 2.2.3, "Expert Initialization"), layer by layer. Given the expert
intermediate size hE, the number of routed experts n and the dense FFN's intermediate size hFFN:

1. copy the dense FFN ceil(n x hE / hFFN) times;
2. shuffle each copy along the intermediate dimension: one permutation per copy, applied to the rows of
   gate_proj and up_proj and the columns of down_proj together, so every intermediate neuron stays whole;
3. concatenate the copies and cut the n experts of hE neurons out of them in order, discarding the rest;
4. re-initialise ``reinit_fraction`` (the report: 50%) of each expert's parameters. How: per expert, exactly
   round(reinit_fraction x hE) of its hE neurons are drawn uniformly without replacement, and each drawn
   neuron's gate row, up row and down column are redrawn i.i.d. from N(mu, sigma^2), where mu and sigma are
   the mean and standard deviation of the dense layer's matrix they replace (gate_proj, up_proj or
   down_proj), as Drop-Upcycling does (Nakamura et al. 2025). Every neuron has the same 3 x hidden
   parameters, so exactly that fraction of the expert's parameters is new, and the kept ones stay whole
   neurons of the dense FFN.

Steps 1-3 amount to choosing, for each expert, hE indices into the dense FFN's neurons (``expert_neurons``);
only the chosen rows and columns are ever copied.

The rest of Qwen2-MoE's block (``Qwen2MoeForCausalLM``: top-k routed experts plus a shared expert behind a
sigmoid gate):

- the shared expert is the dense FFN itself, copied whole (intermediate size hFFN), never re-initialised;
- its gate (``shared_expert_gate``, hidden -> 1) starts at zero, so sigmoid(0) = 1/2 for every token;
- the router (``gate``, hidden -> n) is drawn from N(0, ``router_init_std``^2) (0.02: transformers' own
  initialisation of Qwen2-MoE); 0 gives equal router weights, 1/n, for every token.

Everything else (embeddings, attention, norms, the output head) is copied. A Llama-architecture model (e.g.
SmolLM2) maps onto Qwen2's layout with zero QKV biases (Qwen2 has them, Llama does not; vLLM's Qwen2-MoE
always loads them). The output is a standard ``Qwen2MoeForCausalLM`` folder (weights, config, tokenizer,
generation config, and the settings in ``recipe.yaml``) that transformers and vLLM load. One seeded generator
draws everything in a fixed order, so the same settings give bit-identical weights.

A known configuration that reproduces the dense model exactly (up to float summation order; a test checks it):
n = 2 experts of hE = hFFN / 2 (one copy, split in two), top-2 routing, ``router_init_std: 0`` and
``reinit_fraction: 0``. Both experts get weight 1/2, so the routed part is 1/2 (E1 + E2) = 1/2 FFN, and the
shared expert adds sigmoid(0) x FFN = 1/2 FFN.

Deliberate simplifications: every layer becomes an MoE layer (``decoder_sparse_step: 1``); one shared expert
of the dense FFN's size; the dense and the new model are both held in memory (SmolLM2-135M with 16 experts of
384, top-4: 0.45 B parameters, 1.8 GB in float32).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml

from alignment.config import parse_cli, run_cli, to_dict


@dataclass
class UpcycleConfig:
    # The dense source: a built-in name, a local HF folder or a hub id; a Qwen2 or Llama-architecture model.
    model: str = "smollm2-135m-instruct"
    output_dir: str = "outputs/upcycle"
    # n: routed experts per layer.
    num_experts: int = 16
    # hE: each routed expert's intermediate size. null: a quarter of the dense FFN's (hFFN / 4, rounded down).
    expert_intermediate_size: int | None = None
    # Routed experts per token (top-k).
    num_experts_per_tok: int = 4
    # Renormalise the top-k router weights to sum to 1 (Qwen2-MoE's released models: false).
    norm_topk_prob: bool = False
    # Fraction of each expert's neurons (so of its parameters) redrawn at random; the report: 0.5.
    reinit_fraction: float = 0.5
    # Standard deviation of the router's initial weights; 0: equal weights for every expert and token.
    router_init_std: float = 0.02
    # Written into the model's config: the weight SFT gives the load-balancing loss (model.router_aux_loss_coef).
    router_aux_loss_coef: float = 0.001
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"

    def __post_init__(self) -> None:
        if self.num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {self.num_experts}")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}), got {self.num_experts_per_tok}"
            )
        if self.expert_intermediate_size is not None and self.expert_intermediate_size <= 0:
            raise ValueError(
                f"expert_intermediate_size must be positive, got {self.expert_intermediate_size}"
            )
        if not 0.0 <= self.reinit_fraction <= 1.0:
            raise ValueError(f"reinit_fraction must be in [0, 1], got {self.reinit_fraction}")
        if self.router_init_std < 0:
            raise ValueError(f"router_init_std must be >= 0, got {self.router_init_std}")


# --------------------------------------------------------------------------------------------------------------
# The recipe, as pure functions of the dense weights and a generator
# --------------------------------------------------------------------------------------------------------------


def num_copies(num_experts: int, expert_size: int, dense_size: int) -> int:
    """How many copies of the dense FFN the experts are cut from: ceil(n x hE / hFFN)."""
    return math.ceil(num_experts * expert_size / dense_size)


def expert_neurons(
    num_experts: int, expert_size: int, dense_size: int, generator: torch.Generator
) -> torch.Tensor:
    """(n, hE) indices into the dense FFN's intermediate neurons: expert e is made of neurons [e, :].

    Copy c, shuffled by a fresh permutation pi_c of range(hFFN), holds dense neuron pi_c[j] at position j. The
    shuffled copies are concatenated (copies x hFFN positions) and cut into consecutive blocks of hE, in order;
    the positions after n x hE are discarded.
    """
    copies = num_copies(num_experts, expert_size, dense_size)
    order = torch.cat([torch.randperm(dense_size, generator=generator) for _ in range(copies)])
    return order[: num_experts * expert_size].view(num_experts, expert_size)


def reinit_mask(
    num_experts: int, expert_size: int, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """(n, hE) booleans: exactly round(fraction x hE) neurons of each expert, drawn uniformly without replacement."""
    k = round(fraction * expert_size)
    mask = torch.zeros(num_experts, expert_size, dtype=torch.bool)
    for e in range(num_experts):
        mask[e, torch.randperm(expert_size, generator=generator)[:k]] = True
    return mask


def _redraw_like(dense: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, dense.shape[1]) values from N(mean(dense), std(dense)^2), computed in float64."""
    d = dense.double()
    mean, std = d.mean().item(), d.std().item()
    return torch.normal(mean, std, (n, dense.shape[1]), generator=generator, dtype=torch.float64)


def upcycle_ffn(
    gate: torch.Tensor,  # (hFFN, H)
    up: torch.Tensor,  # (hFFN, H)
    down: torch.Tensor,  # (H, hFFN)
    neurons: torch.Tensor,  # (n, hE) from expert_neurons
    reinit: torch.Tensor,  # (n, hE) from reinit_mask
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts' (gate (n, hE, H), up (n, hE, H), down (n, H, hE)): chosen neurons, some redrawn.

    Neuron j of expert e is dense neuron neurons[e, j] (its gate row, up row and down column), unless
    reinit[e, j]: then the three are redrawn from N(mu, sigma^2) of the dense matrix each replaces.
    """
    gate_e, up_e = gate[neurons].clone(), up[neurons].clone()  # (n, hE, H)
    down_t = down.t()[neurons].clone()  # (n, hE, H): down's columns as rows, so one mask indexes all three
    k = int(reinit.sum())
    for expert_w, dense_w in ((gate_e, gate), (up_e, up), (down_t, down.t())):
        expert_w[reinit] = _redraw_like(dense_w, k, generator).to(expert_w.dtype)
    return gate_e, up_e, down_t.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------------------------


def check_dense_config(config) -> None:
    """Refuse what Qwen2-MoE's layout cannot hold, naming what to change."""
    kind = config.model_type
    if kind not in ("qwen2", "llama"):
        raise ValueError(f"upcycling reads dense Qwen2 or Llama-architecture models; this one is {kind!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"the dense FFN uses {config.hidden_act!r}; Qwen2-MoE's experts are SwiGLU (silu)")
    if getattr(config, "mlp_bias", False):
        raise ValueError("the dense FFN has biases (mlp_bias: true); Qwen2-MoE's experts have none")
    if kind == "llama" and getattr(config, "attention_bias", False):
        raise ValueError(
            "the dense attention has an output-projection bias (attention_bias: true); Qwen2 has none"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(
            f"head_dim {head_dim} x {config.num_attention_heads} heads != hidden size {config.hidden_size}; "
            "Qwen2-MoE derives head_dim from the hidden size"
        )


def moe_config(dense_config, cfg: UpcycleConfig):
    """The Qwen2MoeConfig of the upcycled model: the dense model's shapes plus the experts' settings."""
    from transformers import Qwen2MoeConfig

    check_dense_config(dense_config)
    d = dense_config
    h_ffn = d.intermediate_size
    return Qwen2MoeConfig(
        vocab_size=d.vocab_size,
        hidden_size=d.hidden_size,
        intermediate_size=h_ffn,
        num_hidden_layers=d.num_hidden_layers,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=d.max_position_embeddings,
        initializer_range=d.initializer_range,
        rms_norm_eps=d.rms_norm_eps,
        tie_word_embeddings=d.tie_word_embeddings,
        rope_parameters=dict(d.rope_parameters),
        use_sliding_window=getattr(d, "use_sliding_window", False),
        sliding_window=getattr(d, "sliding_window", None),
        max_window_layers=getattr(d, "max_window_layers", d.num_hidden_layers),
        attention_dropout=d.attention_dropout,
        decoder_sparse_step=1,
        moe_intermediate_size=cfg.expert_intermediate_size or h_ffn // 4,
        shared_expert_intermediate_size=h_ffn,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        norm_topk_prob=cfg.norm_topk_prob,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        qkv_bias=True,
        bos_token_id=d.bos_token_id,
        eos_token_id=d.eos_token_id,
        pad_token_id=d.pad_token_id,
    )


def _attention_state(layer) -> dict[str, torch.Tensor]:
    """A dense layer's attention weights under Qwen2's names; absent QKV biases (Llama) become zeros."""
    attn = layer.self_attn
    out = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        lin = getattr(attn, name)
        out[f"self_attn.{name}.weight"] = lin.weight
        out[f"self_attn.{name}.bias"] = (
            lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
        )
    out["self_attn.o_proj.weight"] = attn.o_proj.weight
    out["input_layernorm.weight"] = layer.input_layernorm.weight
    out["post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    return out


@torch.no_grad()
def upcycle_model(dense, cfg: UpcycleConfig):
    """A ``Qwen2MoeForCausalLM`` upcycled from the dense causal LM ``dense`` (see the module docstring)."""
    from transformers import Qwen2MoeForCausalLM

    config = moe_config(dense.config, cfg)
    h_ffn, h_e = config.intermediate_size, config.moe_intermediate_size
    dtype = getattr(torch, cfg.dtype)
    moe = Qwen2MoeForCausalLM(config).to(dtype)
    params = dict(moe.named_parameters())  # tied output head: listed once, as the embedding
    written: set[str] = set()

    def put(name: str, value: torch.Tensor) -> None:
        if params[name].shape != value.shape:
            raise RuntimeError(
                f"{name}: expected shape {tuple(params[name].shape)}, got {tuple(value.shape)}"
            )
        params[name].copy_(value.to(dtype))
        written.add(name)

    g = torch.Generator().manual_seed(cfg.seed)
    put("model.embed_tokens.weight", dense.model.embed_tokens.weight)
    put("model.norm.weight", dense.model.norm.weight)
    if not config.tie_word_embeddings:
        put("lm_head.weight", dense.lm_head.weight)
    for i, layer in enumerate(dense.model.layers):
        pre = f"model.layers.{i}."
        for name, value in _attention_state(layer).items():
            put(pre + name, value)
        mlp = layer.mlp
        gate, up, down = (
            mlp.gate_proj.weight,
            mlp.up_proj.weight,
            mlp.down_proj.weight,
        )  # (hFFN,H) x2, (H,hFFN)
        neurons = expert_neurons(cfg.num_experts, h_e, h_ffn, g)
        mask = reinit_mask(cfg.num_experts, h_e, cfg.reinit_fraction, g)
        gate_e, up_e, down_e = upcycle_ffn(gate, up, down, neurons, mask, g)
        put(
            pre + "mlp.experts.gate_up_proj", torch.cat([gate_e, up_e], dim=1)
        )  # (n, 2 hE, H): gate rows first
        put(pre + "mlp.experts.down_proj", down_e)
        put(pre + "mlp.shared_expert.gate_proj.weight", gate)
        put(pre + "mlp.shared_expert.up_proj.weight", up)
        put(pre + "mlp.shared_expert.down_proj.weight", down)
        put(pre + "mlp.shared_expert_gate.weight", torch.zeros(1, config.hidden_size))
        router = torch.normal(
            0.0, 1.0, (cfg.num_experts, config.hidden_size), generator=g, dtype=torch.float64
        )
        put(pre + "mlp.gate.weight", router * cfg.router_init_std)
    missing = sorted(set(params) - written)
    if missing:  # a parameter left at transformers' random init would break determinism and the recipe
        raise RuntimeError(f"upcycling left {len(missing)} parameters unset, e.g. {missing[0]}")
    if dense.generation_config is not None:
        moe.generation_config = dense.generation_config
    return moe


def load_dense(name_or_path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    from alignment.models import resolve_model

    path = resolve_model(name_or_path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)), path


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    cfg: UpcycleConfig = parse_cli(UpcycleConfig, sys.argv[1:] if argv is None else argv)
    # The dense weights in float64 when asked for, else float32: the redraw statistics come from them.
    dense, path = load_dense(cfg.model, "float64" if cfg.dtype == "float64" else "float32")
    moe = upcycle_model(dense, cfg)
    c = moe.config
    copies = num_copies(c.num_experts, c.moe_intermediate_size, c.intermediate_size)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_moe = sum(p.numel() for p in moe.parameters())
    # A token uses all but the n - k routed experts it is not sent to.
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    n_active = n_moe - c.num_hidden_layers * (c.num_experts - c.num_experts_per_tok) * per_expert
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    (out / "recipe.yaml").write_text(yaml.safe_dump({**to_dict(cfg), "source": path}, sort_keys=False))
    print(
        f"[upcycle] {cfg.model}: {c.num_hidden_layers} layers, FFN {c.intermediate_size} -> {copies} copies -> "
        f"{c.num_experts} experts of {c.moe_intermediate_size} (top-{c.num_experts_per_tok}) + a shared expert; "
        f"{n_dense / 1e6:.1f} M -> {n_moe / 1e6:.1f} M parameters ({n_active / 1e6:.1f} M per token); saved {out}",
        flush=True,
    )


if __name__ == "__main__":
    run_cli(main)
