"""Passkey retrieval past the native window: plain RoPE, YaRN, Dual Chunk Attention, DCA + YaRN (issue 11).

    python bench/bench_passkey.py                                   # SmolLM2, 8k / 16k / 32k, 3 depths
    python bench/bench_passkey.py --lengths 8192 16384 --depths 0.5 --methods dca dca_yarn
    python bench/bench_passkey.py --model tiny-qwen2 --lengths 512 --dca-chunk-size 96 --dca-local-size 16

A five-digit number hides at a depth (0: the start, 1: the end) of filler text, as in the landmark-attention
and ChunkLlama papers; the prompt ends with "What is the pass key? The pass key is" and the answer is right
when the first number of the greedy answer (``--max-new-tokens``) is the key. Each length L is the prompt plus
the answer: a prompt of L - 16 tokens, so the 8k rows fit SmolLM2's native window of 8,192 tokens.

Methods (``alignment.models.load_causal_lm``, generation through the project's transformers generator):
- ``plain``: the model as trained (SDPA, RoPE at the true positions);
- ``yarn``: ``model.rope_scaling: {type: yarn, factor: --yarn-factor}`` (4: 8,192 -> 32,768; the same factor at
  every length, as a deployed model would have);
- ``dca``: ``model.attn_implementation: dca`` (chunk_size / local_size: ChunkLlama's 3/4 and 1/16 of the
  native window unless given);
- ``dca_yarn``: both.

Time is CPU seconds per sample (prefill and decoding, ``time.process_time``): on a shared machine that also
pauses processes, wall time says little. Set OMP_NUM_THREADS to fix the threads. Results go to ``--out`` as
JSON, one row per sample, and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("plain", "yarn", "dca", "dca_yarn")
PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_ROOM = 16


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids of a prompt of about ``length - ANSWER_ROOM`` tokens with the key at ``depth`` of the filler.

    Pieces are tokenized apart and joined (each starts with a space or a newline, so the joins are where the
    tokenizer would cut anyway); the filler is repeated whole, so the prompt can be a few tokens short.
    """
    enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    prefix, filler, needle, question = enc(PREFIX), enc(FILLER), enc(NEEDLE.format(key=key)), enc(QUESTION)
    units = (length - ANSWER_ROOM - len(prefix) - len(needle) - len(question)) // len(filler)
    if units < 1:
        raise ValueError(f"length {length}: too short for the prompt's fixed parts")
    before = round(units * depth)
    return prefix + filler * before + needle + filler * (units - before) + question


def model_settings(method: str, name: str, args):
    from alignment.config import DCAConfig, ModelConfig, RopeScalingConfig

    yarn = "yarn" in method
    return ModelConfig(
        name_or_path=name,
        attn_implementation="dca" if method.startswith("dca") else "sdpa",
        rope_scaling=RopeScalingConfig(factor=args.yarn_factor) if yarn else None,
        dca=DCAConfig(args.dca_chunk_size, args.dca_local_size) if method.startswith("dca") else None,
    )


def first_number(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def run(args) -> list[dict]:
    from alignment.generation import GenerationConfig, SamplingConfig, make_generator
    from alignment.models import load_tokenizer, resolve_model

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    rng = random.Random(args.seed)
    # The same keys for every method: sample i at depth d has key keys[(d, i)].
    keys = {(d, i): rng.randint(10_000, 99_999) for d in args.depths for i in range(args.keys_per_depth)}
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=args.max_new_tokens)
    rows = []
    for method in args.methods:
        gen_cfg = GenerationConfig(backend="transformers", max_model_len=max(args.lengths))
        gen = make_generator(gen_cfg, path, tokenizer, "float32", model_settings(method, path, args))
        print(f"[passkey] {method}: {gen.model.config._attn_implementation}, "
              f"rope {gen.model.config.rope_parameters}, dca {getattr(gen.model.config, 'dca', None)}",
              file=sys.stderr, flush=True)  # fmt: skip
        for length in args.lengths:
            for (depth, _), key in keys.items():
                prompt = passkey_prompt(tokenizer, length, depth, key)
                cpu, wall = time.process_time(), time.perf_counter()
                answer = gen.generate([prompt], 1, greedy)[0][0]
                row = {
                    "method": method, "length": length, "prompt_tokens": len(prompt), "depth": depth,
                    "key": key, "answer": answer.text, "correct": first_number(answer.text) == key,
                    "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        gen.close()
    return rows


def table(rows: list[dict], lengths: list[int], methods: list[str]) -> str:
    """Accuracy (right / samples) and mean CPU seconds per sample, one row per method, one column per length."""
    head = "| method | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |"
    lines = [head, "| --- |" + " --- |" * len(lengths)]
    for method in methods:
        cells = []
        for n in lengths:
            cell = [r for r in rows if r["method"] == method and r["length"] == n]
            if not cell:
                cells.append("not run")
                continue
            right = sum(r["correct"] for r in cell)
            cpu = sum(r["cpu_s"] for r in cell) / len(cell)
            cells.append(f"{right}/{len(cell)} right, {cpu:.0f} s")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--keys-per-depth", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--yarn-factor", type=float, default=4.0)
    parser.add_argument("--dca-chunk-size", type=int, default=None)
    parser.add_argument("--dca-local-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/bench_passkey.json")
    args = parser.parse_args(argv)
    rows = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    print(table(rows, args.lengths, args.methods))


if __name__ == "__main__":
    main()
