"""Make the small datasets the default recipes train on, from verifiable tasks, offline and seeded.

    python -m data_synthesis.make_default_data            # writes data/sft, data/preference, data/prompts

Every task has a computed gold answer, so the same generators give
- SFT demonstrations (``data/sft/train.jsonl``, ``messages``): a worked answer that writes every intermediate
  result and ends "The answer is X.";
- preference pairs (``data/preference/train.jsonl``, ``prompt``/``chosen``/``rejected``): the correct worked
  answer is chosen, a plausible wrong one (an off-by-some result, a carry error, a miscount) is rejected;
- prompts with gold answers (``data/prompts/train.jsonl``) for online DPO and rejection sampling;
- a validation split (``data/dev/math.jsonl``): fresh multi-step problems from the same generators, for tuning
  recipes (``python -m alignment.eval recipes/eval.yaml math.path=data/dev/math.jsonl``).

The three use disjoint prompts (the generator never repeats a prompt across files). The held-out evaluation
sets live apart in ``data/eval`` (``python -m data_synthesis.make_eval_sets``) and use other templates.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from fractions import Fraction
from functools import partial
from math import lcm
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


# Multi-step word problems: the skills of data/eval/math.jsonl (rates, totals and change, rectangles, discounts,
# parts of a whole, linear equations, ages, fraction sums) in this file's own scenarios and wording. Every
# worked answer writes each intermediate result, so a small model learns to compute one step at a time.
# Each skill has several wordings: the first is the one the preference pairs and the validation split
# (data/dev/math.jsonl) use; the SFT demonstrations and the online prompts draw among all of them, the first half
# the time (``wording`` in ``generate``), so the model meets a skill in more than one sentence. (Online
# prompts in four wordings were tried against online DPO's loss on other wordings: it shrank in one run and
# not in another; see "What moved the numbers" in the README.) They were written apart from the held-out
# templates (data_synthesis/make_eval_sets.py) and the reworded validation split (make_dev_reworded.py): the
# held-out ones' scenarios and key phrases are not used, and
# tests/test_shipped_data.py checks that no held-out or reworded prompt matches any training template.
PEOPLE = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kira", "Leo")

Pick = Callable[[list[str]], str]


def _first(options: list[str]) -> str:
    return options[0]


def _half_first(rng: random.Random, options: list[str]) -> str:
    """The first wording half the time, the others share the rest. Tuned on the two validation splits (SFT alone,
    greedy math accuracy): every wording equally often 49/191 on data/dev/math.jsonl and 28/200 on
    data/dev/math_reworded.jsonl; half first 65/191 and 35/200; the first wording only 57/191 and 22/200."""
    return rng.choices(options, weights=[len(options) - 1] + [1] * (len(options) - 1))[0]


def _trip(rng: random.Random, pick: Pick = _first) -> Task:
    who = rng.choice(["A cyclist", "A bus", "A boat", "A runner", "A truck"])
    v1, t1, v2, t2 = rng.randint(8, 60), rng.randint(2, 5), rng.randint(8, 60), rng.randint(1, 4)
    d1, d2 = v1 * t1, v2 * t2
    gold = d1 + d2
    prompt = pick(
        [
            "{who} goes {v1} km/h for {t1} hours and after that {v2} km/h for {t2} hours. "
            "What is the whole distance in km?",
            "{who} covers the first part of a route in {t1} hours at {v1} km/h and the rest in {t2} hours at "
            "{v2} km/h. How many km is the route?",
            "Leg one: {t1} hours at {v1} km/h. Leg two: {t2} hours at {v2} km/h. How many km does {lwho} go "
            "over both legs?",
            "How far, in km, does {lwho} get by moving {t1} hours at {v1} km/h and then {t2} hours at {v2} km/h?",
        ]
    ).format(who=who, lwho=who[0].lower() + who[1:], v1=v1, t1=t1, v2=v2, t2=t2)
    answer = (
        f"{v1} × {t1} = {d1} km and {v2} × {t2} = {d2} km, so {d1} + {d2} = {gold}. The answer is {gold}."
    )
    wrong = f"{v1} × {t1} = {d1} km and {v2} × {t2} = {d2} km, so {d1} + {d2} = {gold + 10}. The answer is {gold + 10}."
    return prompt, answer, str(gold), wrong


def _shopping(rng: random.Random, pick: Pick = _first) -> Task:
    name = rng.choice(PEOPLE)
    a, p, b, q = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 6), rng.randint(1, 5)
    x, y = a * p, b * q
    total = x + y
    note = next(v for v in (20, 50, 100) if v > total)
    gold = note - total
    prompt = pick(
        [
            "{n} picks {a} mugs at {p} dollars each and {b} spoons at {q} dollars each, paying with a "
            "{note} dollar note. What change should {n} receive?",
            "{n} has {note} dollars and spends them on {a} sandwiches at {p} dollars apiece and {b} juices at "
            "{q} dollars apiece. How many dollars does {n} still have?",
            "A cafe charges {p} dollars per muffin and {q} dollars per tea. {n} orders {a} muffins and {b} "
            "teas and hands over {note} dollars. What should come back to {n}?",
            "From a {note} dollar budget, {n} spends on {a} candles costing {p} dollars each and {b} cards "
            "costing {q} dollars each. What remains of the budget?",
        ]
    ).format(n=name, a=a, p=p, b=b, q=q, note=note)
    steps = f"{a} × {p} = {x} and {b} × {q} = {y}, so the total is {x} + {y} = {total}."
    answer = f"{steps} The change is {note} - {total} = {gold}. The answer is {gold}."
    wrong = f"{steps} The change is {note} - {total} = {gold + 2}. The answer is {gold + 2}."
    return prompt, answer, str(gold), wrong


def _rectangle(rng: random.Random, pick: Pick = _first) -> Task:
    thing = rng.choice(["field", "playground", "carpet", "tabletop", "parking lot"])
    length, width = rng.randint(4, 30), rng.randint(2, 20)
    if rng.random() < 0.5:
        gold = 2 * (length + width)
        prompt = pick(
            [
                "How long is the border of a {l} m by {w} m rectangular {t}, in metres?",
                "A ribbon goes once around the edge of a rectangular {t} with sides of {l} m and {w} m. How "
                "many metres of ribbon is that?",
                "Walking all the way around a rectangular {t} that measures {l} m on one side and {w} m on the "
                "other, how many metres do you walk?",
                "The sides of a rectangular {t} are {l} m and {w} m. What is the total length of its four sides "
                "in metres?",
            ]
        ).format(l=length, w=width, t=thing)
        answer = (
            f"The border is 2 × ({length} + {width}) = 2 × {length + width} = {gold}. The answer is {gold}."
        )
        wrong = f"The border is {length} + {width} = {length + width}. The answer is {length + width}."
    else:
        gold = length * width
        prompt = pick(
            [
                "How many square metres does a {l} m by {w} m rectangular {t} cover?",
                "A rectangular {t} has sides of {l} m and {w} m. How much ground does it take up, in square "
                "metres?",
                "How many one-metre squares fit exactly on a rectangular {t} with sides {l} m and {w} m?",
                "What is the size in square metres of a rectangular {t} with a length of {l} m and a width of "
                "{w} m?",
            ]
        ).format(l=length, w=width, t=thing)
        answer = f"The area is {length} × {width} = {gold}. The answer is {gold}."
        bad = (
            2 * (length + width) if 2 * (length + width) != gold else length + width
        )  # the border, or half of it
        wrong = f"The area is {bad}. The answer is {bad}."
    return prompt, answer, str(gold), wrong


def _discount(rng: random.Random, pick: Pick = _first) -> Task:
    item = rng.choice(["lamp", "bicycle", "coat", "chair", "guitar"])
    rate = rng.choice([10, 20, 25, 30, 40, 50, 75])
    price = rng.randint(2, 25) * 20
    off = price * rate // 100
    gold = price - off
    prompt = pick(
        [
            "With {r} percent taken off, what does a {i} that was {p} dollars cost now?",
            "A {i} priced at {p} dollars gets a discount of {r} percent. How many dollars does it cost after "
            "the discount?",
            "The price of a {i} is {p} dollars. A coupon takes away {r} percent of that. What is left to pay?",
            "What do you pay for a {p} dollar {i} once the store reduces it by {r} percent?",
        ]
    ).format(r=rate, i=item, p=price)
    answer = f"{rate}% of {price} is {price} × {rate} / 100 = {off}, and {price} - {off} = {gold}. The answer is {gold}."
    if off != gold:  # the discount itself given as the price
        wrong = f"{rate}% of {price} is {price} × {rate} / 100 = {off}. The answer is {off}."
    else:  # 50% off: the discount added instead of taken off
        wrong = (
            f"{rate}% of {price} is {off}, and {price} + {off} = {price + off}. The answer is {price + off}."
        )
    return prompt, answer, str(gold), wrong


def _part_of_whole(rng: random.Random, pick: Pick = _first) -> Task:
    den = rng.choice([2, 3, 4, 5, 6, 8])
    num = rng.randint(1, den - 1)
    unit = rng.randint(2, 12)
    total = den * unit
    part = num * unit
    gold = total - part
    who, verb = rng.choice(
        [("students", "walk to school"), ("guests", "drink tea"), ("players", "wear caps")]
    )
    prompt = pick(
        [
            "Out of {t} {who}, {n}/{d} {v}. How many of the {who} do not?",
            "There are {t} {who} and {n}/{d} of them {v}. How many {who} are left who do not?",
            "{n}/{d} of a group of {t} {who} {v}; the others do not. How many are the others?",
            "If {n}/{d} of {t} {who} {v}, how many of those {who} do not?",
        ]
    ).format(t=total, who=who, n=num, d=den, v=verb)
    answer = f"{total} / {den} = {unit}, so {num} × {unit} = {part} {verb}. {total} - {part} = {gold}. The answer is {gold}."
    bad = part if part != gold else total  # the part that does, or (for a half) the whole
    wrong = f"{total} / {den} = {unit}, so {num} × {unit} = {part} {verb}. The answer is {bad}."
    return prompt, answer, str(gold), wrong


def _linear(rng: random.Random, pick: Pick = _first) -> Task:
    a, x, b = rng.randint(2, 9), rng.randint(-10, 15), rng.randint(1, 25)
    if rng.random() < 0.5:  # a·x + b = c
        c = a * x + b
        words = {"op": "plus", "than": "more", "by": "increased", "verb": "Adding", "to": "to"}
        answer = f"{a}x = {c} - {b} = {c - b}, so x = {c - b} / {a} = {x}. The answer is {x}."
    else:  # a·x - b = c
        c = a * x - b
        words = {"op": "minus", "than": "less", "by": "decreased", "verb": "Taking", "to": "away from"}
        answer = f"{a}x = {c} + {b} = {c + b}, so x = {c + b} / {a} = {x}. The answer is {x}."
    prompt = pick(
        [
            "Find the number x such that {a} times x {op} {b} equals {c}.",
            "{b} {than} than {a} times a number x is {c}. What is x?",
            "Which x makes {a} times x, {by} by {b}, come to {c}?",
            "{verb} {b} {to} the product of {a} and x gives {c}. Find x.",
        ]
    ).format(a=a, b=b, c=c, **words)
    wrong = f"x = {c} / {a}. The answer is {x + 1}."
    return prompt, answer, str(x), wrong


def _age_gap(rng: random.Random, pick: Pick = _first) -> Task:
    young, old = rng.sample(PEOPLE, 2)
    age, gap, later = rng.randint(3, 30), rng.randint(2, 15), rng.randint(2, 20)
    now = age + gap
    gold = now + later
    prompt = pick(
        [
            "{y} turned {age} this year and {o} was born {gap} years before {y}. What age will {o} reach "
            "{later} years from now?",
            "{o} is the elder sibling of {y}, by {gap} years. {y} is {age}. What will {o}'s age be after "
            "{later} more years?",
            "{y} has just turned {age}. {o} reached that same age {gap} years ago. How many years old will {o} "
            "be {later} years later?",
            "The age difference between {o} and the younger {y} is {gap} years, and {y} is {age} at present. "
            "Give {o}'s age {later} years on.",
        ]
    ).format(y=young, o=old, age=age, gap=gap, later=later)
    answer = f"{old} is {age} + {gap} = {now} now, and {now} + {later} = {gold}. The answer is {gold}."
    wrong = f"{old} is {age} + {gap} = {now} now. The answer is {now}."
    return prompt, answer, str(gold), wrong


def _fraction_add(rng: random.Random, pick: Pick = _first) -> Task:
    a, b, c, d = rng.randint(1, 9), rng.randint(2, 10), rng.randint(1, 9), rng.randint(2, 10)
    m = lcm(b, d)
    total = Fraction(a, b) + Fraction(c, d)
    prompt = pick(
        [
            "What is {a}/{b} + {c}/{d}? Write it in simplest form.",
            "Work out the sum of {a}/{b} and {c}/{d}, simplified.",
            "{a}/{b} plus {c}/{d} equals what, as a simplified fraction?",
            "Combine {a}/{b} with {c}/{d} by adding them. Reduce the answer fully.",
        ]
    ).format(a=a, b=b, c=c, d=d)
    n = a * m // b + c * m // d
    simplified = "" if f"{n}/{m}" == str(total) else f" = {total}"
    answer = (
        f"Over {m}: {a}/{b} = {a * m // b}/{m} and {c}/{d} = {c * m // d}/{m}, "
        f"so the sum is {n}/{m}{simplified}. The answer is {total}."
    )
    wrong = f"{a}/{b} + {c}/{d} = {a + c}/{b + d}. The answer is {Fraction(a + c, b + d)}."
    return prompt, answer, str(total), wrong


TASKS: dict[str, Callable[..., Task]] = {
    "arithmetic": _arith,
    "count_letter": _count_letter,
    "sort_numbers": _sort_numbers,
    "reverse_word": _reverse_word,
    "word_problem": _word_problem,
    "trip": _trip,
    "shopping": _shopping,
    "rectangle": _rectangle,
    "discount": _discount,
    "part_of_whole": _part_of_whole,
    "linear": _linear,
    "age_gap": _age_gap,
    "fraction_add": _fraction_add,
}
MULTI_STEP = (
    "trip",
    "shopping",
    "rectangle",
    "discount",
    "part_of_whole",
    "linear",
    "age_gap",
    "fraction_add",
)
# About 60% multi-step word problems: the skill the held-out math set measures.
WEIGHTS = {"arithmetic": 3, "count_letter": 2, "sort_numbers": 1, "reverse_word": 1, "word_problem": 1}
WEIGHTS |= dict.fromkeys(MULTI_STEP, 1.5)


def generate(
    n: int, rng: random.Random, seen: set[str], wording: random.Random | None = None
) -> list[tuple[str, Task]]:
    """n tasks with prompts not in ``seen``. With ``wording``, each multi-step prompt's wording is drawn from that
    stream among its skill's templates (the first one half the time; the numbers drawn from ``rng`` stay the
    same); without it, every prompt has the first wording."""
    names = list(TASKS)
    pick = _first if wording is None else partial(_half_first, wording)
    out = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            raise RuntimeError(f"could not make {n} distinct prompts")
        kind = rng.choices(names, weights=[WEIGHTS[k] for k in names])[0]
        if kind in MULTI_STEP:
            state = rng.getstate()
            task = TASKS[kind](rng, pick)
            # The same problem in the first wording: kept in `seen` too, so no later file (preference pairs,
            # prompts, the validation split) asks a problem the SFT data asked in other words.
            first = random.Random()
            first.setstate(state)
            keys = {task[0], TASKS[kind](first)[0]}
        else:
            task = TASKS[kind](rng)
            keys = {task[0]}
        if keys & seen:
            continue
        seen |= keys
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


def dev_rows(rng: random.Random, per_family: int, seen: set[str]) -> list[dict]:
    """A validation split for tuning: fresh multi-step problems from the training generators (never a training
    prompt). Recipes are tuned on it; the held-out sets of data/eval are for measuring only."""
    rows = []
    for kind in MULTI_STEP:
        for _ in range(per_family):
            prompt, _answer, gold, _wrong = TASKS[kind](rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append(
                {
                    "id": f"dev-{len(rows):04d}",
                    "prompt": [{"role": "user", "content": prompt}],
                    "answer": gold,
                    "task": kind,
                }
            )
    return rows


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
    ap.add_argument("--sft", type=int, default=800, help="SFT demonstrations")
    ap.add_argument("--preference", type=int, default=300, help="preference pairs")
    ap.add_argument("--prompts", type=int, default=200, help="prompts with gold answers")
    ap.add_argument("--dev", type=int, default=25, help="validation problems per multi-step family")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    seen: set[str] = set()
    out = Path(args.out)
    sft_tasks = generate(args.sft, rng, seen, wording=random.Random(args.seed + 1))
    write_jsonl(out / "sft" / "train.jsonl", sft_rows(sft_tasks, rng))
    write_jsonl(out / "preference" / "train.jsonl", preference_rows(generate(args.preference, rng, seen)))
    prompts = generate(args.prompts, rng, seen, wording=random.Random(args.seed + 2))
    write_jsonl(out / "prompts" / "train.jsonl", prompt_rows(prompts))
    # Its own stream, so the training files stay the same whatever its size.
    write_jsonl(out / "dev" / "math.jsonl", dev_rows(random.Random(args.seed + 999), args.dev, seen))


if __name__ == "__main__":
    main()
