"""Make the small datasets the default recipes train on, from verifiable tasks, offline and seeded.

    python -m data_synthesis.make_default_data            # writes data/sft, data/preference, data/prompts

Every task has a computed gold answer, so the same generators give
- SFT demonstrations (``data/sft/train.jsonl``, ``messages``): a worked answer that ends "The answer is X.";
- preference pairs (``data/preference/train.jsonl``, ``prompt``/``chosen``/``rejected``): the correct worked
  answer is chosen, a plausible wrong one (an off-by-some result, a carry error, a miscount) is rejected;
- prompts with gold answers (``data/prompts/train.jsonl``) for online DPO and rejection sampling.

The three use disjoint prompts (the generator never repeats a prompt across files). The held-out evaluation
sets live apart in ``data/eval`` (``python -m data_synthesis.make_eval_sets``) and use other templates.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

WORDS = (
    "apple banana cherry strawberry mississippi committee bookkeeper balloon letter coffee pepper "
    "raspberry tomato potato umbrella giraffe elephant kangaroo hippopotamus penguin dolphin octopus "
    "parallel necessary occasion embarrass accommodate success address possess assessment millennium "
    "bubble puzzle jazz pizza mammal summer hammer yellow butter kitten mirror carrot cinnamon broccoli "
    "zucchini spaghetti calendar cemetery definitely separate tomorrow rhythm village window"
).split()

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful assistant. Show your work briefly, then give the answer.",
    "You are a math tutor who explains each step.",
)

Task = tuple[str, str, str, str]  # prompt, worked answer, gold, a wrong worked answer


def _arith(rng: random.Random) -> Task:
    op = rng.choice(["plus", "minus", "times"])
    if op == "times":
        a, b = rng.randint(2, 12), rng.randint(10, 99)
    else:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
    if op == "minus" and b > a:
        a, b = b, a
    gold = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    sym = {"plus": "+", "minus": "-", "times": "×"}[op]
    wrong = (
        gold + rng.choice([-10, -1, 1, 10, 100, -100]) if gold > 100 else gold + rng.choice([-2, -1, 1, 2])
    )
    template = rng.choice(
        [
            "What is {a} {op} {b}?",
            "Compute {a} {op} {b}.",
            "Calculate {a} {op} {b}. Answer with the number.",
            "What do you get for {a} {op} {b}?",
        ]
    )
    prompt = template.format(a=a, b=b, op=op)
    return (
        prompt,
        f"{a} {sym} {b} = {gold}. The answer is {gold}.",
        str(gold),
        f"{a} {sym} {b} = {wrong}. The answer is {wrong}.",
    )


def _count_letter(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    spelled = "-".join(word)
    prompt = rng.choice(
        [
            "How many times does the letter '{l}' appear in the word '{w}'?",
            "Count the letter '{l}' in '{w}'.",
        ]
    ).format(l=letter, w=word)
    answer = f"Spelling it out: {spelled}. The letter '{letter}' appears {n} time{'s' * (n != 1)}. The answer is {n}."
    wrong_n = n + rng.choice([-1, 1]) if n > 1 else n + 1
    wrong = f"The letter '{letter}' appears {wrong_n} times in '{word}'. The answer is {wrong_n}."
    return prompt, answer, str(n), wrong


def _sort_numbers(rng: random.Random) -> Task:
    nums = rng.sample(range(1, 100), rng.randint(4, 7))
    desc = rng.random() < 0.3
    gold = sorted(nums, reverse=desc)
    order = "descending" if desc else "ascending"
    prompt = f"Sort these numbers in {order} order: {', '.join(map(str, nums))}."
    text = ", ".join(map(str, gold))
    bad = gold[:]
    i = rng.randrange(len(bad) - 1)
    bad[i], bad[i + 1] = bad[i + 1], bad[i]
    return (
        prompt,
        f"In {order} order: {text}. The answer is {text}.",
        text,
        f"The answer is {', '.join(map(str, bad))}.",
    )


def _reverse_word(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    gold = word[::-1]
    prompt = rng.choice(["Write the word '{w}' backwards.", "Reverse the letters of '{w}'."]).format(w=word)
    wrong = gold[:-2] + gold[-1] + gold[-2] if gold[-1] != gold[-2] else gold[1:]
    return (
        prompt,
        f"Reading '{word}' from the end: {gold}. The answer is {gold}.",
        gold,
        f"The answer is {wrong}.",
    )


def _word_problem(rng: random.Random) -> Task:
    name = rng.choice(["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana"])
    thing = rng.choice(["apples", "stickers", "marbles", "books", "coins", "shells"])
    a, b, c = rng.randint(5, 60), rng.randint(2, 30), rng.randint(1, 20)
    gold = a + b - c
    prompt = (
        f"{name} has {a} {thing}, gets {b} more, then gives away {c}. How many {thing} does {name} have now?"
    )
    answer = f"{a} + {b} = {a + b}, and {a + b} - {c} = {gold}. The answer is {gold}."
    wrong = f"{a} + {b} = {a + b}, and {a + b} - {c} = {gold + 1}. The answer is {gold + 1}."
    return prompt, answer, str(gold), wrong


TASKS: dict[str, Callable[[random.Random], Task]] = {
    "arithmetic": _arith,
    "count_letter": _count_letter,
    "sort_numbers": _sort_numbers,
    "reverse_word": _reverse_word,
    "word_problem": _word_problem,
}
WEIGHTS = {"arithmetic": 4, "count_letter": 2, "sort_numbers": 1, "reverse_word": 1, "word_problem": 2}


def generate(n: int, rng: random.Random, seen: set[str]) -> list[tuple[str, Task]]:
    names = list(TASKS)
    out = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            raise RuntimeError(f"could not make {n} distinct prompts")
        kind = rng.choices(names, weights=[WEIGHTS[k] for k in names])[0]
        task = TASKS[kind](rng)
        if task[0] in seen:
            continue
        seen.add(task[0])
        out.append((kind, task))
    return out


def sft_rows(tasks: list[tuple[str, Task]], rng: random.Random) -> list[dict]:
    rows = []
    for i, (kind, (prompt, answer, _gold, _wrong)) in enumerate(tasks):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        # Every fifth example is a two-turn conversation, so multi-turn labelling is exercised.
        if i % 5 == 4:
            messages += [
                {"role": "user", "content": "Please repeat just the final answer."},
                {"role": "assistant", "content": answer.rsplit("The answer is ", 1)[1].rstrip(".")},
            ]
        rows.append({"messages": messages, "task": kind})
    return rows


def preference_rows(tasks: list[tuple[str, Task]]) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": wrong}],
            "answer": gold,
            "task": kind,
        }
        for kind, (prompt, answer, gold, wrong) in tasks
    ]


def prompt_rows(tasks: list[tuple[str, Task]]) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": prompt}], "answer": gold, "task": kind}
        for kind, (prompt, _answer, gold, _wrong) in tasks
    ]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data", help="output folder (default: data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft", type=int, default=400, help="SFT demonstrations")
    ap.add_argument("--preference", type=int, default=300, help="preference pairs")
    ap.add_argument("--prompts", type=int, default=200, help="prompts with gold answers")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    seen: set[str] = set()
    out = Path(args.out)
    write_jsonl(out / "sft" / "train.jsonl", sft_rows(generate(args.sft, rng, seen), rng))
    write_jsonl(out / "preference" / "train.jsonl", preference_rows(generate(args.preference, rng, seen)))
    write_jsonl(out / "prompts" / "train.jsonl", prompt_rows(generate(args.prompts, rng, seen)))


if __name__ == "__main__":
    main()
