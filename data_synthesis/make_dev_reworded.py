"""A second validation split: the multi-step skills of the training data in wordings of its own.

    python -m data_synthesis.make_dev_reworded          # writes data/dev/math_reworded.jsonl

``data/dev/math.jsonl`` draws fresh problems from the training generators (``make_default_data``): the same
templates the model trained on, so it cannot see what a stage does to problems phrased another way. The held-out
set (``data/eval/math.jsonl``) uses other wordings, and a stage can gain on the first and lose on the second
(offline DPO in the chain: 57 -> 57 of 191 on ``data/dev/math.jsonl``, 36 -> 27 of 200 held out). This split
asks the same eight skills (two-leg trips, change after shopping, rectangle border or area, discounts, the rest
of a fraction of a group, one linear equation, ages, fraction sums) in scenarios and sentences written for it
alone, neither the training templates nor the held-out ones, so a recipe can be tuned for wording shift without
looking at the held-out set. Rows: ``prompt``, ``answer`` (the gold final answer), ``task``, as the other
math sets; seeded, and no prompt repeats one of the training or validation files.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

NAMES = ("Mira", "Tomas", "Ines", "Rafael", "Yuki", "Omar", "Lena", "Pavel", "Sara", "Nikhil")

Problem = tuple[str, str]  # prompt, gold answer


def _trip(rng: random.Random) -> Problem:
    who = rng.choice(NAMES)
    v1, t1, v2, t2 = rng.randint(3, 15), rng.randint(2, 6), rng.randint(3, 15), rng.randint(2, 6)
    return (
        f"On Saturday {who} walked for {t1} hours at a steady {v1} km per hour. On Sunday {who} kept up "
        f"{v2} km per hour for {t2} hours. Over the weekend, how many kilometres did {who} cover?",
        str(v1 * t1 + v2 * t2),
    )


def _shopping(rng: random.Random) -> Problem:
    who = rng.choice(NAMES)
    a, p, b, q = rng.randint(2, 5), rng.randint(2, 8), rng.randint(2, 5), rng.randint(2, 8)
    total = a * p + b * q
    bill = next(v for v in (20, 50, 100) if v > total)
    return (
        f"At the market a loaf of bread is {p} euros and a jar of honey is {q} euros. {who} takes {a} loaves "
        f"and {b} jars and hands over {bill} euros. How many euros come back?",
        str(bill - total),
    )


def _rectangle(rng: random.Random) -> Problem:
    length, width = rng.randint(5, 40), rng.randint(3, 25)
    if rng.random() < 0.5:
        return (
            f"A farmer fences all four sides of a pen that is {length} metres long and {width} metres wide. "
            "How many metres of fence are used?",
            str(2 * (length + width)),
        )
    return (
        f"Tiles of one square metre each cover a hall floor measuring {length} metres by {width} metres. "
        "How many tiles are there?",
        str(length * width),
    )


def _discount(rng: random.Random) -> Problem:
    item = rng.choice(["backpack", "kettle", "jacket", "printer", "tent"])
    rate = rng.choice([10, 20, 25, 40, 50])
    price = rng.randint(3, 30) * 20
    return (
        f"A shop marks its {price}-dollar {item} down by {rate}%. What is the sale price in dollars?",
        str(price - price * rate // 100),
    )


def _part_of_whole(rng: random.Random) -> Problem:
    den = rng.choice([3, 4, 5, 6, 10])
    num = rng.randint(1, den - 1)
    total = den * rng.randint(2, 10)
    what, done = rng.choice([("pages", "has read"), ("tickets", "has sold"), ("trees", "has watered")])
    who = rng.choice(NAMES)
    return (
        f"{who} has {total} {what} to get through and {done} {num}/{den} of them so far. How many "
        f"{what} are left?",
        str(total - total * num // den),
    )


def _linear(rng: random.Random) -> Problem:
    a, x, b = rng.randint(2, 9), rng.randint(1, 20), rng.randint(2, 30)
    if rng.random() < 0.5:
        return (
            f"I think of a number, multiply it by {a} and add {b}. The result is {a * x + b}. What was my "
            "number?",
            str(x),
        )
    return (
        f"I think of a number, multiply it by {a} and subtract {b}. The result is {a * x - b}. What was my "
        "number?",
        str(x),
    )


def _age_gap(rng: random.Random) -> Problem:
    child, parent = rng.sample(NAMES, 2)
    age, gap, later = rng.randint(4, 20), rng.randint(20, 35), rng.randint(3, 15)
    return (
        f"{parent} is {gap} years older than {child}, who is {age} today. How old will {parent} be in "
        f"{later} years?",
        str(age + gap + later),
    )


def _fraction_add(rng: random.Random) -> Problem:
    a, b, c, d = rng.randint(1, 7), rng.randint(2, 9), rng.randint(1, 7), rng.randint(2, 9)
    what = rng.choice(["pizza", "cake", "tank of water", "bag of rice"])
    who1, who2 = rng.sample(NAMES, 2)
    return (
        f"{who1} used {a}/{b} of a {what} and {who2} used {c}/{d} of it. What fraction of the {what} did "
        "they use together, in lowest terms?",
        str(Fraction(a, b) + Fraction(c, d)),
    )


TASKS: dict[str, Callable[[random.Random], Problem]] = {
    "trip": _trip,
    "shopping": _shopping,
    "rectangle": _rectangle,
    "discount": _discount,
    "part_of_whole": _part_of_whole,
    "linear": _linear,
    "age_gap": _age_gap,
    "fraction_add": _fraction_add,
}


# The files (under data/) whose prompts this split never repeats.
KEPT_APART = (
    "sft/train.jsonl",
    "preference/train.jsonl",
    "prompts/train.jsonl",
    "dev/math.jsonl",
    "eval/math.jsonl",
)


def rows(per_task: int, seed: int, exclude: set[str]) -> list[dict]:
    """``per_task`` problems of each skill, none of them in ``exclude`` nor repeated."""
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    for task, make in TASKS.items():
        made = 0
        for _ in range(per_task * 50):
            prompt, gold = make(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            row = {"id": f"dev-rw-{len(out):04d}", "prompt": [{"role": "user", "content": prompt}]}
            out.append(row | {"answer": gold, "task": task})
            made += 1
            if made == per_task:
                break
    return out


def _prompts(path: Path) -> set[str]:
    """The text of every user turn of a JSONL file (``prompt`` or ``messages``), to keep this split apart from
    it; a plain string prompt counts as one user turn."""
    found = set()
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        turns = row.get("prompt", row.get("messages"))
        if isinstance(turns, str):
            found.add(turns)
        elif isinstance(turns, list):
            found |= {t["content"] for t in turns if isinstance(t, dict) and t.get("role") == "user"}
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the repository root (data/ is under it)")
    ap.add_argument("--per-task", type=int, default=25)
    ap.add_argument("--seed", type=int, default=4242)
    args = ap.parse_args(argv)
    root = Path(args.root)
    exclude = set()
    for name in KEPT_APART:
        exclude |= _prompts(root / "data" / name)
    out = root / "data/dev/math_reworded.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    made = rows(args.per_task, args.seed, exclude)
    out.write_text("".join(json.dumps(r) + "\n" for r in made))
    print(f"wrote {out}: {len(made)} problems, {args.per_task} per skill")


if __name__ == "__main__":
    main()
