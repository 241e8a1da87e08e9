"""Upcycled MoE against the dense model and the same MoE from scratch: held-out loss after one SFT budget.

    python bench/bench_upcycle.py                     # SmolLM2-135M -> 16 experts of 384, top-4; 8 steps each
    python bench/bench_upcycle.py --model tiny-qwen2 --experts 8 --expert-size 64 --top-k 2 --steps 2 \
        --heldout 16 --max-length 256                 # tiny CPU smoke run (about a minute)

The README's upcycling figure. Three models get the same SFT budget: ``alignment/sft.py`` with the SFT recipe
(``--recipe``, copied into ``--out`` first so that all three runs read the same file; its optimizer, schedule
and precision are printed and saved with the results), ``--steps`` optimizer steps of ``--batch`` packs of
``--max-length`` tokens, the same data in the same order:

- ``dense``: the model itself;
- ``upcycled``: ``python -m alignment.upcycle`` of it (the report's recipe; half of each expert redrawn);
- ``scratch``: the same Qwen2-MoE configuration with every weight at transformers' random initialisation.

Data: the shipped demonstrations (data/sft/train.jsonl), split by a seeded shuffle into ``--heldout`` rows kept
apart and the rest for training. Held-out loss: the NLL per answer token over the held-out rows (the SFT
loss, assistant tokens only), before and after training. Each SFT run is its own subprocess; the MoE runs add
the load-balancing loss with Qwen2-MoE's coefficient 0.001 (its ``aux_loss`` is printed, not in the NLL).

Deliberate simplifications: one seed, one budget; a fixed tiny budget favours whichever model starts closest to
the data, which is the question asked (how far ahead does upcycling start), not which model ends best.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def split_data(out: Path, heldout: int, seed: int) -> tuple[Path, Path]:
    rows = (REPO / "data/sft/train.jsonl").read_text().splitlines()
    random.Random(seed).shuffle(rows)
    train, held = out / "train.jsonl", out / "heldout.jsonl"
    train.write_text("\n".join(rows[heldout:]) + "\n")
    held.write_text("\n".join(rows[:heldout]) + "\n")
    return train, held


def recipe_settings(recipe: Path) -> dict:
    """What the SFT runs train with: the recipe's optimizer, schedule and precision, as its schema reads them."""
    from alignment.config import load_config, to_dict
    from alignment.sft import SFTConfig

    cfg = to_dict(load_config(SFTConfig, recipe))
    return {
        "optimizer": cfg["optimizer"]["name"], "lr": cfg["optimizer"]["lr"],
        "weight_decay": cfg["optimizer"]["weight_decay"], "scheduler": cfg["scheduler"],
        "max_grad_norm": cfg["training"]["max_grad_norm"], "mixed_precision": cfg["training"]["mixed_precision"],
    }  # fmt: skip


def make_models(args, out: Path) -> dict[str, str]:
    """The three start points as HF folders: dense (as is), upcycled, and the same MoE from scratch."""
    import torch
    from transformers import AutoTokenizer, Qwen2MoeForCausalLM

    from alignment.upcycle import UpcycleConfig, load_dense, moe_config
    from alignment.upcycle import main as upcycle

    settings = [f"num_experts={args.experts}", f"num_experts_per_tok={args.top_k}", f"seed={args.seed}"]
    settings += [f"expert_intermediate_size={args.expert_size}"] if args.expert_size else []
    upcycle([f"model={args.model}", *settings, f"output_dir={out / 'upcycled'}"])
    dense, path = load_dense(args.model)
    cfg = UpcycleConfig(
        num_experts=args.experts, expert_intermediate_size=args.expert_size, num_experts_per_tok=args.top_k
    )
    torch.manual_seed(args.seed)
    scratch = Qwen2MoeForCausalLM(
        moe_config(dense.config, cfg)
    )  # transformers' own init: N(0, 0.02), norms 1
    scratch.generation_config = dense.generation_config
    scratch.save_pretrained(out / "scratch")
    AutoTokenizer.from_pretrained(path).save_pretrained(out / "scratch")
    return {"dense": path, "upcycled": str(out / "upcycled"), "scratch": str(out / "scratch")}


def parameter_counts(model) -> dict[str, int]:
    """Total parameters, and those a token uses: all but the (n - k) routed experts it is not sent to."""
    total = sum(p.numel() for p in model.parameters())
    c = model.config
    if c.model_type != "qwen2_moe":
        return {"total": total, "active": total}
    unused = (
        c.num_hidden_layers
        * (c.num_experts - c.num_experts_per_tok)
        * 3
        * c.hidden_size
        * c.moe_intermediate_size
    )
    return {"total": total, "active": total - unused}


def heldout_loss(path: str, data: Path, max_length: int) -> tuple[float, dict[str, int]]:
    """NLL per answer token over the held-out rows, packed into sequences of max_length (no cross-attention);
    and the model's parameter counts."""
    import torch

    from alignment.config import ModelConfig
    from alignment.data import Sequence, collate, pack
    from alignment.data import tokenize_conversation as tokenize
    from alignment.logprobs import TokenLogProbs
    from alignment.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(path)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    seqs = [Sequence(*tokenize(tok, r["messages"], where=f"held-out {i}")) for i, r in enumerate(rows)]
    seqs = [Sequence(s.input_ids[:max_length], s.labels[:max_length]) for s in seqs]
    model = load_causal_lm(ModelConfig(name_or_path=path), max_length, trainable=False)
    scorer = TokenLogProbs(model, 1024)
    nll, n = 0.0, 0
    with torch.no_grad():
        for group in pack(seqs, max_length):
            batch = collate(group)
            logps = scorer(batch.input_ids, batch.position_ids, batch.labels)
            nll, n = nll - logps.sum().item(), n + logps.numel()
    return nll / n, parameter_counts(model)


def sft_overrides(start: str, data: Path, args, run: Path) -> list[str]:
    return [
        f"model.name_or_path={start}", f"data.sources=[{{path: {data}}}]", f"data.max_length={args.max_length}",
        f"training.max_steps={args.steps}", f"training.per_device_batch_size={args.batch}",
        f"training.logits_chunk_size={args.max_length}", "logging.report_to=[]", "logging.progress_bar=false",
        f"training.output_dir={run}",
    ]  # fmt: skip


def train(name: str, start: str, recipe: Path, data: Path, args, out: Path) -> dict:
    run = out / f"sft-{name}"
    cmd = [
        sys.executable,
        str(REPO / "alignment/sft.py"),
        str(recipe),
        *sft_overrides(start, data, args, run),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    result = {"path": str(run), "train_s": time.perf_counter() - t0, "train_loss_last": rows[-1]["loss"]}
    result["tokens_per_s"] = sorted(r["tokens_per_second"] for r in rows)[len(rows) // 2]
    if "aux_loss" in rows[-1]:
        result |= {k: rows[-1][k] for k in ("aux_loss", "moe/load_max", "moe/load_min")}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--recipe", default=str(REPO / "recipes/sft.yaml"))
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--expert-size", type=int, default=None, help="hE; default: a quarter of the dense FFN")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench_upcycle")
    p.add_argument("--only", nargs="*", default=["dense", "upcycled", "scratch"])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train_data, held = split_data(out, args.heldout, args.seed)
    recipe = out / "sft_recipe.yaml"
    shutil.copyfile(args.recipe, recipe)
    settings = recipe_settings(recipe)
    print(f"[bench] SFT settings: {json.dumps(settings)}", flush=True)
    starts = make_models(args, out)
    results = {}
    for name in args.only:
        before, params = heldout_loss(starts[name], held, args.max_length)
        run = train(name, starts[name], recipe, train_data, args, out)
        after, _ = heldout_loss(run["path"], held, args.max_length)
        results[name] = {"heldout_before": before, "heldout_after": after, **params, **run}
        print(
            f"[bench] {name}: held-out {before:.4f} -> {after:.4f}  {json.dumps(results[name])}", flush=True
        )
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "sft": settings, "results": results}, indent=2)
    )
    print("\n| start | parameters (active) | held-out loss before | after | SFT tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(
            f"| {name} | {r['total'] / 1e6:.1f} M ({r['active'] / 1e6:.1f} M) | {r['heldout_before']:.3f} "
            f"| {r['heldout_after']:.3f} | {r['tokens_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
