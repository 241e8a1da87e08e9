"""The shipped datasets say what the README says, checked by an independent solver (not data_synthesis):

- every SFT answer, every chosen answer and every prompt's gold is right; every rejected answer is wrong;
- the worked steps of the demonstrations and chosen answers are true (``a + b = c``, the spelled-out word);
- the SFT, preference and prompt files use disjoint prompts, and the held-out eval sets share no prompt and no
  template with them;
- the reward model's held-out pairs are disjoint from the pairs it trains on (seen through a real run).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, reset_accelerate

DATA = REPO / "data"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _word_problem(m: re.Match) -> str:
    return str(int(m["a"]) + int(m["b"]) - int(m["c"]))


def _arithmetic(m: re.Match) -> str:
    a, b = int(m["a"]), int(m["b"])
    return str({"plus": a + b, "minus": a - b, "times": a * b}[m["op"]])


def _fraction_add(m: re.Match) -> str:
    from fractions import Fraction

    return str(Fraction(int(m["a"]), int(m["b"])) + Fraction(int(m["c"]), int(m["d"])))


def _linear(m: re.Match) -> str:
    a, b, c = int(m["a"]), int(m["b"]), int(m["c"])
    rhs = c - b if m["op"] in ("plus", "more", "increased", "Adding") else c + b
    assert rhs % a == 0
    return str(rhs // a)


def _trip(m: re.Match) -> str:
    return str(int(m["v1"]) * int(m["t1"]) + int(m["v2"]) * int(m["t2"]))


def _change(m: re.Match) -> str:
    return str(int(m["note"]) - int(m["a"]) * int(m["p"]) - int(m["b"]) * int(m["q"]))


def _border(m: re.Match) -> str:
    return str(2 * int(m["l"]) + 2 * int(m["w"]))


def _area(m: re.Match) -> str:
    return str(int(m["l"]) * int(m["w"]))


def _discounted(m: re.Match) -> str:
    return str(int(m["p"]) * (100 - int(m["r"])) // 100)


def _rest(m: re.Match) -> str:
    return str(int(m["t"]) - int(m["t"]) * int(m["n"]) // int(m["d"]))


def _older_later(m: re.Match) -> str:
    return str(int(m["age"]) + int(m["gap"]) + int(m["later"]))


def _sort(m: re.Match) -> str:
    nums = sorted((int(x) for x in m["nums"].split(",")), reverse=m["order"] == "descending")
    return ", ".join(map(str, nums))


# Each training template, written from reading the data, with what its answer is.
SOLVERS = [
    (r"(What is|Compute|Calculate|What do you get for) (?P<a>\d+) (?P<op>plus|minus|times) (?P<b>\d+)"
     r"(\?|\.|\. Answer with the number\.)", _arithmetic),
    (r"How many times does the letter '(?P<l>\w)' appear in the word '(?P<w>\w+)'\?",
     lambda m: str(m["w"].count(m["l"]))),
    (r"Count the letter '(?P<l>\w)' in '(?P<w>\w+)'\.", lambda m: str(m["w"].count(m["l"]))),
    (r"Sort these numbers in (?P<order>ascending|descending) order: (?P<nums>\d+(, \d+)+)\.", _sort),
    (r"(Write the word '(?P<w>\w+)' backwards|Reverse the letters of '(?P<w2>\w+)')\.",
     lambda m: (m["w"] or m["w2"])[::-1]),
    (r"(?P<name>[A-Z]\w+) has (?P<a>\d+) (?P<thing>\w+), gets (?P<b>\d+) more, then gives away (?P<c>\d+)\. "
     r"How many (?P=thing) does (?P=name) have now\?", _word_problem),
    # The multi-step word problems.
    (r"A (cyclist|bus|boat|runner|truck) goes (?P<v1>\d+) km/h for (?P<t1>\d+) hours and after that (?P<v2>\d+) "
     r"km/h for (?P<t2>\d+) hours\. What is the whole distance in km\?",
     _trip),
    (r"(?P<n>[A-Z]\w+) picks (?P<a>\d+) mugs at (?P<p>\d+) dollars each and (?P<b>\d+) spoons at (?P<q>\d+) "
     r"dollars each, paying with a (?P<note>\d+) dollar note\. What change should (?P=n) receive\?",
     _change),
    (r"How long is the border of a (?P<l>\d+) m by (?P<w>\d+) m rectangular [a-z ]+, in metres\?",
     _border),
    (r"How many square metres does a (?P<l>\d+) m by (?P<w>\d+) m rectangular [a-z ]+ cover\?",
     _area),
    (r"With (?P<r>\d+) percent taken off, what does a \w+ that was (?P<p>\d+) dollars cost now\?",
     _discounted),
    (r"Out of (?P<t>\d+) (?P<who>\w+), (?P<n>\d+)/(?P<d>\d+) [a-z ]+\. How many of the (?P=who) do not\?",
     _rest),
    (r"Find the number x such that (?P<a>\d+) times x (?P<op>plus|minus) (?P<b>\d+) equals (?P<c>-?\d+)\.", _linear),
    (r"(?P<y>[A-Z]\w+) turned (?P<age>\d+) this year and (?P<o>[A-Z]\w+) was born (?P<gap>\d+) years before "
     r"(?P=y)\. What age will (?P=o) reach (?P<later>\d+) years from now\?",
     _older_later),
    (r"What is (?P<a>\d+)/(?P<b>\d+) \+ (?P<c>\d+)/(?P<d>\d+)\? Write it in simplest form\.", _fraction_add),
    # The other wordings of the SFT demonstrations (make_default_data: each skill's later templates).
    (r"A (cyclist|bus|boat|runner|truck) covers the first part of a route in (?P<t1>\d+) hours at (?P<v1>\d+) "
     r"km/h and the rest in (?P<t2>\d+) hours at (?P<v2>\d+) km/h\. How many km is the route\?", _trip),
    (r"Leg one: (?P<t1>\d+) hours at (?P<v1>\d+) km/h\. Leg two: (?P<t2>\d+) hours at (?P<v2>\d+) km/h\. "
     r"How many km does a (cyclist|bus|boat|runner|truck) go over both legs\?", _trip),
    (r"How far, in km, does a (cyclist|bus|boat|runner|truck) get by moving (?P<t1>\d+) hours at (?P<v1>\d+) "
     r"km/h and then (?P<t2>\d+) hours at (?P<v2>\d+) km/h\?", _trip),
    (r"(?P<n>[A-Z]\w+) has (?P<note>\d+) dollars and spends them on (?P<a>\d+) sandwiches at (?P<p>\d+) "
     r"dollars apiece and (?P<b>\d+) juices at (?P<q>\d+) dollars apiece\. How many dollars does (?P=n) still "
     r"have\?", _change),
    (r"A cafe charges (?P<p>\d+) dollars per muffin and (?P<q>\d+) dollars per tea\. (?P<n>[A-Z]\w+) orders "
     r"(?P<a>\d+) muffins and (?P<b>\d+) teas and hands over (?P<note>\d+) dollars\. What should come back to "
     r"(?P=n)\?", _change),
    (r"From a (?P<note>\d+) dollar budget, (?P<n>[A-Z]\w+) spends on (?P<a>\d+) candles costing (?P<p>\d+) "
     r"dollars each and (?P<b>\d+) cards costing (?P<q>\d+) dollars each\. What remains of the budget\?", _change),
    (r"A ribbon goes once around the edge of a rectangular [a-z ]+ with sides of (?P<l>\d+) m and (?P<w>\d+) m\. "
     r"How many metres of ribbon is that\?", _border),
    (r"Walking all the way around a rectangular [a-z ]+ that measures (?P<l>\d+) m on one side and (?P<w>\d+) m "
     r"on the other, how many metres do you walk\?", _border),
    (r"The sides of a rectangular [a-z ]+ are (?P<l>\d+) m and (?P<w>\d+) m\. What is the total length of its "
     r"four sides in metres\?", _border),
    (r"A rectangular [a-z ]+ has sides of (?P<l>\d+) m and (?P<w>\d+) m\. How much ground does it take up, in "
     r"square metres\?", _area),
    (r"How many one-metre squares fit exactly on a rectangular [a-z ]+ with sides (?P<l>\d+) m and (?P<w>\d+) "
     r"m\?", _area),
    (r"What is the size in square metres of a rectangular [a-z ]+ with a length of (?P<l>\d+) m and a width of "
     r"(?P<w>\d+) m\?", _area),
    (r"A \w+ priced at (?P<p>\d+) dollars gets a discount of (?P<r>\d+) percent\. How many dollars does it "
     r"cost after the discount\?", _discounted),
    (r"The price of a \w+ is (?P<p>\d+) dollars\. A coupon takes away (?P<r>\d+) percent of that\. What is "
     r"left to pay\?", _discounted),
    (r"What do you pay for a (?P<p>\d+) dollar \w+ once the store reduces it by (?P<r>\d+) percent\?",
     _discounted),
    (r"There are (?P<t>\d+) (?P<who>\w+) and (?P<n>\d+)/(?P<d>\d+) of them [a-z ]+\. How many (?P=who) are "
     r"left who do not\?", _rest),
    (r"(?P<n>\d+)/(?P<d>\d+) of a group of (?P<t>\d+) \w+ [a-z ]+; the others do not\. How many are the "
     r"others\?", _rest),
    (r"If (?P<n>\d+)/(?P<d>\d+) of (?P<t>\d+) (?P<who>\w+) [a-z ]+, how many of those (?P=who) do not\?", _rest),
    (r"(?P<b>\d+) (?P<op>more|less) than (?P<a>\d+) times a number x is (?P<c>-?\d+)\. What is x\?", _linear),
    (r"Which x makes (?P<a>\d+) times x, (?P<op>increased|decreased) by (?P<b>\d+), come to (?P<c>-?\d+)\?",
     _linear),
    (r"(?P<op>Adding|Taking) (?P<b>\d+) (to|away from) the product of (?P<a>\d+) and x gives (?P<c>-?\d+)\. "
     r"Find x\.", _linear),
    (r"(?P<o>[A-Z]\w+) is the elder sibling of (?P<y>[A-Z]\w+), by (?P<gap>\d+) years\. (?P=y) is "
     r"(?P<age>\d+)\. What will (?P=o)'s age be after (?P<later>\d+) more years\?", _older_later),
    (r"(?P<y>[A-Z]\w+) has just turned (?P<age>\d+)\. (?P<o>[A-Z]\w+) reached that same age (?P<gap>\d+) "
     r"years ago\. How many years old will (?P=o) be (?P<later>\d+) years later\?", _older_later),
    (r"The age difference between (?P<o>[A-Z]\w+) and the younger (?P<y>[A-Z]\w+) is (?P<gap>\d+) years, and "
     r"(?P=y) is (?P<age>\d+) at present\. Give (?P=o)'s age (?P<later>\d+) years on\.", _older_later),
    (r"Work out the sum of (?P<a>\d+)/(?P<b>\d+) and (?P<c>\d+)/(?P<d>\d+), simplified\.", _fraction_add),
    (r"(?P<a>\d+)/(?P<b>\d+) plus (?P<c>\d+)/(?P<d>\d+) equals what, as a simplified fraction\?",
     _fraction_add),
    (r"Combine (?P<a>\d+)/(?P<b>\d+) with (?P<c>\d+)/(?P<d>\d+) by adding them\. Reduce the answer fully\.",
     _fraction_add),
]  # fmt: skip


def solve(prompt: str) -> str:
    """The gold answer of a training prompt; fails on a prompt no template matches."""
    found = [(p, f) for p, f in SOLVERS if re.fullmatch(p, prompt)]
    assert len(found) == 1, f"{len(found)} templates match {prompt!r}"
    pattern, answer = found[0]
    return answer(re.fullmatch(pattern, prompt))


def final_answer(text: str) -> str:
    assert "The answer is " in text, text
    return text.rsplit("The answer is ", 1)[1].strip().removesuffix(".")


def check_worked_steps(prompt: str, answer: str) -> None:
    """Every 'a op b = c' in a worked answer is true; a spelled-out word is the prompt's word."""
    # A signed first operand that is not itself the end of a longer chain ("600 × 25 / 100" is skipped).
    for a, op, b, c in re.findall(r"(?<![-+×/] )(?<![\d/])(-?\d+) ([-+×/]) (\d+) = (-?\d+)(?![\d/])", answer):
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "×": a * b, "/": a / b}[op] == c, (prompt, answer)
    if m := re.search(r"Spelling it out: ([\w-]+)\.", answer):
        assert m[1].replace("-", "") in prompt, (prompt, answer)


def user_text(turns: list[dict]) -> str:
    (user,) = [t["content"] for t in turns if t["role"] == "user"]
    return user


# The independent solver itself, on hand-checked cases (one per template).
SOLVER_CASES = [
    ("What is 12 plus 30?", "42"),
    ("Calculate 9 times 96. Answer with the number.", "864"),
    ("Compute 649 minus 295.", "354"),
    ("How many times does the letter 'l' appear in the word 'balloon'?", "2"),
    ("Count the letter 'f' in 'giraffe'.", "2"),
    ("Sort these numbers in descending order: 3, 71, 12.", "71, 12, 3"),
    ("Reverse the letters of 'pizza'.", "azzip"),
    ("Dara has 23 marbles, gets 7 more, then gives away 6. How many marbles does Dara have now?", "24"),
    (
        "A bus goes 40 km/h for 2 hours and after that 10 km/h for 3 hours. What is the whole distance in km?",
        "110",
    ),
    (
        "Ivo picks 2 mugs at 5 dollars each and 3 spoons at 2 dollars each, paying with a 20 dollar note. What change should Ivo receive?",
        "4",
    ),
    ("How long is the border of a 5 m by 3 m rectangular parking lot, in metres?", "16"),
    ("How many square metres does a 5 m by 3 m rectangular field cover?", "15"),
    ("With 25 percent taken off, what does a coat that was 80 dollars cost now?", "60"),
    ("Out of 12 guests, 3/4 drink tea. How many of the guests do not?", "3"),
    ("Find the number x such that 3 times x minus 4 equals -10.", "-2"),
    (
        "Ben turned 10 this year and Leo was born 3 years before Ben. What age will Leo reach 5 years from now?",
        "18",
    ),
    ("What is 1/2 + 1/3? Write it in simplest form.", "5/6"),
    # The other wordings of the SFT demonstrations.
    (
        "A boat covers the first part of a route in 2 hours at 10 km/h and the rest in 3 hours at 20 km/h. How many km is the route?",
        "80",
    ),
    (
        "Leg one: 3 hours at 12 km/h. Leg two: 1 hours at 30 km/h. How many km does a truck go over both legs?",
        "66",
    ),
    ("How far, in km, does a runner get by moving 2 hours at 9 km/h and then 1 hours at 8 km/h?", "26"),
    (
        "Ana has 20 dollars and spends them on 2 sandwiches at 4 dollars apiece and 3 juices at 2 dollars apiece. How many dollars does Ana still have?",
        "6",
    ),
    (
        "A cafe charges 3 dollars per muffin and 2 dollars per tea. Leo orders 4 muffins and 5 teas and hands over 50 dollars. What should come back to Leo?",
        "28",
    ),
    (
        "From a 100 dollar budget, Jun spends on 6 candles costing 9 dollars each and 5 cards costing 5 dollars each. What remains of the budget?",
        "21",
    ),
    (
        "A ribbon goes once around the edge of a rectangular carpet with sides of 4 m and 2 m. How many metres of ribbon is that?",
        "12",
    ),
    (
        "Walking all the way around a rectangular parking lot that measures 10 m on one side and 7 m on the other, how many metres do you walk?",
        "34",
    ),
    (
        "The sides of a rectangular field are 30 m and 20 m. What is the total length of its four sides in metres?",
        "100",
    ),
    (
        "A rectangular playground has sides of 6 m and 7 m. How much ground does it take up, in square metres?",
        "42",
    ),
    ("How many one-metre squares fit exactly on a rectangular tabletop with sides 4 m and 3 m?", "12"),
    (
        "What is the size in square metres of a rectangular field with a length of 9 m and a width of 8 m?",
        "72",
    ),
    (
        "A lamp priced at 200 dollars gets a discount of 30 percent. How many dollars does it cost after the discount?",
        "140",
    ),
    (
        "The price of a chair is 60 dollars. A coupon takes away 75 percent of that. What is left to pay?",
        "15",
    ),
    ("What do you pay for a 40 dollar coat once the store reduces it by 10 percent?", "36"),
    ("There are 20 guests and 1/2 of them drink tea. How many guests are left who do not?", "10"),
    ("2/3 of a group of 15 players wear caps; the others do not. How many are the others?", "5"),
    ("If 3/8 of 72 players wear caps, how many of those players do not?", "45"),
    ("9 less than 8 times a number x is -81. What is x?", "-9"),
    ("5 more than 2 times a number x is 1. What is x?", "-2"),
    ("Which x makes 4 times x, decreased by 3, come to 25?", "7"),
    ("Adding 20 to the product of 3 and x gives -7. Find x.", "-9"),
    ("Taking 4 away from the product of 3 and x gives -34. Find x.", "-10"),
    (
        "Hana is the elder sibling of Eli, by 4 years. Eli is 9. What will Hana's age be after 10 more years?",
        "23",
    ),
    (
        "Chen has just turned 12. Goran reached that same age 5 years ago. How many years old will Goran be 3 years later?",
        "20",
    ),
    (
        "The age difference between Kira and the younger Ivo is 15 years, and Ivo is 15 at present. Give Kira's age 18 years on.",
        "48",
    ),
    ("Work out the sum of 1/4 and 1/4, simplified.", "1/2"),
    ("3/3 plus 8/5 equals what, as a simplified fraction?", "13/5"),
    ("Combine 8/9 with 9/6 by adding them. Reduce the answer fully.", "43/18"),
]


@pytest.mark.parametrize(("prompt", "answer"), SOLVER_CASES)
def test_solver_self_check(prompt, answer):
    assert solve(prompt) == answer


def test_solver_refuses_a_prompt_no_template_matches():
    with pytest.raises(AssertionError):
        solve("What is the capital of France?")


def test_every_sft_answer_is_correct():
    data = rows(DATA / "sft" / "train.jsonl")
    assert len(data) == 800
    for row in data:
        msgs = row["messages"]
        turns = [m for m in msgs if m["role"] != "system"]
        gold = solve(turns[0]["content"])
        assert turns[1]["role"] == "assistant" and final_answer(turns[1]["content"]) == gold, row
        check_worked_steps(turns[0]["content"], turns[1]["content"])
        if len(turns) > 2:  # the two-turn conversations: "Please repeat just the final answer."
            assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"], row
            assert turns[3]["content"] == gold, row


def test_every_chosen_answer_is_correct_and_every_rejected_one_wrong():
    data = rows(DATA / "preference" / "train.jsonl")
    assert len(data) == 300
    for row in data:
        prompt = user_text(row["prompt"])
        gold = solve(prompt)
        assert row["answer"] == gold, row
        ((chosen,), (rejected,)) = (row["chosen"], row["rejected"])
        assert chosen["role"] == rejected["role"] == "assistant"
        assert final_answer(chosen["content"]) == gold, row
        assert final_answer(rejected["content"]) != gold, row
        check_worked_steps(prompt, chosen["content"])


def test_every_prompt_gold_is_right():
    data = rows(DATA / "prompts" / "train.jsonl")
    assert len(data) == 200
    for row in data:
        assert row["answer"] == solve(user_text(row["prompt"])), row


def training_prompts() -> dict[str, set[str]]:
    return {
        "sft": {m["content"] for r in rows(DATA / "sft" / "train.jsonl") for m in r["messages"] if m["role"] == "user"}
        - {"Please repeat just the final answer."},
        "preference": {user_text(r["prompt"]) for r in rows(DATA / "preference" / "train.jsonl")},
        "prompts": {user_text(r["prompt"]) for r in rows(DATA / "prompts" / "train.jsonl")},
    }  # fmt: skip


def test_training_files_use_disjoint_prompts():
    files = training_prompts()
    assert (len(files["sft"]), len(files["preference"]), len(files["prompts"])) == (800, 300, 200)
    assert not files["sft"] & files["preference"]
    assert not files["sft"] & files["prompts"]
    assert not files["preference"] & files["prompts"]


def test_dev_split_is_fresh_solvable_and_apart_from_training():
    """data/dev/math.jsonl tunes recipes: problems from the training generators, none of them a training prompt."""
    data = rows(DATA / "dev" / "math.jsonl")
    prompts = [user_text(r["prompt"]) for r in data]
    assert len(data) >= 180 and len(set(prompts)) == len(prompts)
    assert not set(prompts) & set().union(*training_prompts().values())
    for row, prompt in zip(data, prompts):
        assert row["answer"] == solve(prompt), row


@pytest.mark.parametrize("name", ["math", "ifeval", "code"])
def test_eval_sets_are_disjoint_from_training_and_use_other_templates(name):
    seen = set().union(*training_prompts().values())
    prompts = [user_text(r["prompt"]) for r in rows(DATA / "eval" / f"{name}.jsonl")]
    assert prompts  # (data/eval/ifeval.jsonl repeats 7 of its 200 prompts: within the eval set, no leak)
    assert not set(prompts) & seen
    templated = [p for p in prompts if any(re.fullmatch(pattern, p) for pattern, _ in SOLVERS)]
    assert templated == []  # not even a new instance of a training template


def test_reward_model_held_out_pairs_are_disjoint_from_its_training_pairs(monkeypatch, tmp_path, tiny_qwen2):
    """A real reward-model run on the shipped pairs (recipes/reward.yaml on tiny-qwen2, one epoch): every pair
    the scorer trains on and every pair it is evaluated on is recorded by prompt; the two share none."""
    import alignment.reward_model as rm

    seen = {"train": set(), "eval": set()}
    real = rm.pair_scores

    def recording(scorer, pairs, device):
        split = "train" if scorer.training else "eval"
        for p in pairs:
            labelled = [i for i, lab in enumerate(p.chosen.labels) if lab != -100]
            seen[split].add(tuple(p.chosen.input_ids[: labelled[0] + 1]))  # the prompt's tokens
        return real(scorer, pairs, device)

    monkeypatch.setattr(rm, "pair_scores", recording)
    reset_accelerate()
    rm.main(
        [
            str(REPO / "recipes/reward.yaml"),
            "model.name_or_path=tiny-qwen2",
            "training.mixed_precision=no",
            "training.num_epochs=1",
            "training.per_device_batch_size=27",  # 270 training pairs: one epoch is 10 steps and sees them all
            "eval_steps=0",
            "logging.report_to=[]",
            "logging.progress_bar=false",
            f"training.output_dir={tmp_path / 'rm'}",
        ]
    )
    assert len(seen["eval"]) == 30  # eval_fraction 0.1 of the 300 shipped pairs
    assert len(seen["train"]) == 270
    assert not seen["train"] & seen["eval"]


# data/dev/math_reworded.jsonl: the eight multi-step skills in wordings of its own, solved here independently.
REWORDED = [
    (r"On Saturday (?P<n>\w+) walked for (?P<t1>\d+) hours at a steady (?P<v1>\d+) km per hour\. On Sunday \w+ kept "
     r"up (?P<v2>\d+) km per hour for (?P<t2>\d+) hours\. Over the weekend, how many kilometres did \w+ cover\?",
     lambda m: str(int(m["v1"]) * int(m["t1"]) + int(m["v2"]) * int(m["t2"]))),
    (r"At the market a loaf of bread is (?P<p>\d+) euros and a jar of honey is (?P<q>\d+) euros\. \w+ takes "
     r"(?P<a>\d+) loaves and (?P<b>\d+) jars and hands over (?P<bill>\d+) euros\. How many euros come back\?",
     lambda m: str(int(m["bill"]) - int(m["a"]) * int(m["p"]) - int(m["b"]) * int(m["q"]))),
    (r"A farmer fences all four sides of a pen that is (?P<l>\d+) metres long and (?P<w>\d+) metres wide\. How many "
     r"metres of fence are used\?", lambda m: str(2 * int(m["l"]) + 2 * int(m["w"]))),
    (r"Tiles of one square metre each cover a hall floor measuring (?P<l>\d+) metres by (?P<w>\d+) metres\. How many "
     r"tiles are there\?", lambda m: str(int(m["l"]) * int(m["w"]))),
    (r"A shop marks its (?P<p>\d+)-dollar \w+ down by (?P<r>\d+)%\. What is the sale price in dollars\?",
     lambda m: str(int(m["p"]) * (100 - int(m["r"])) // 100)),
    (r"\w+ has (?P<t>\d+) (?P<w>\w+) to get through and has \w+ (?P<n>\d+)/(?P<d>\d+) of them so far\. How many \w+ "
     r"are left\?", lambda m: str(int(m["t"]) - int(m["t"]) // int(m["d"]) * int(m["n"]))),
    (r"I think of a number, multiply it by (?P<a>\d+) and add (?P<b>\d+)\. The result is (?P<c>-?\d+)\. What was "
     r"my number\?", lambda m: str((int(m["c"]) - int(m["b"])) // int(m["a"]))),
    (r"I think of a number, multiply it by (?P<a>\d+) and subtract (?P<b>\d+)\. The result is (?P<c>-?\d+)\. What "
     r"was my number\?", lambda m: str((int(m["c"]) + int(m["b"])) // int(m["a"]))),
    (r"\w+ is (?P<g>\d+) years older than \w+, who is (?P<a>\d+) today\. How old will \w+ be in (?P<l>\d+) years\?",
     lambda m: str(int(m["g"]) + int(m["a"]) + int(m["l"]))),
    (r"\w+ used (?P<a>\d+)/(?P<b>\d+) of an? [\w ]+ and \w+ used (?P<c>\d+)/(?P<d>\d+) of it\. What fraction of the "
     r"[\w ]+ did they use together, in lowest terms\?", _fraction_add),
]  # fmt: skip


def test_reworded_dev_split_is_solvable_apart_and_in_wordings_of_its_own():
    """data/dev/math_reworded.jsonl (make_dev_reworded): every gold right by this file's own solver, all eight
    skills, no prompt of training, dev or held-out files, and no training template."""
    data = rows(DATA / "dev" / "math_reworded.jsonl")
    prompts = [user_text(r["prompt"]) for r in data]
    assert len(data) == 200 and len(set(prompts)) == 200
    assert {r["task"] for r in data} == {"trip", "shopping", "rectangle", "discount", "part_of_whole", "linear",
                                         "age_gap", "fraction_add"}  # fmt: skip
    others = set().union(*training_prompts().values())
    for name in ("dev/math.jsonl", "eval/math.jsonl"):
        others |= {user_text(r["prompt"]) for r in rows(DATA / name)}
    assert not set(prompts) & others
    for row, prompt in zip(data, prompts):
        assert not any(re.fullmatch(pattern, prompt) for pattern, _ in SOLVERS), prompt
        solved = [solve_(m) for pattern, solve_ in REWORDED if (m := re.fullmatch(pattern, prompt))]
        assert solved == [row["answer"]], row


def test_reworded_dev_split_is_what_its_generator_writes(tmp_path):
    from data_synthesis.make_dev_reworded import KEPT_APART, main

    for name in KEPT_APART:
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_text((DATA / name).read_text())
    main(["--root", str(tmp_path)])
    assert (tmp_path / "data/dev/math_reworded.jsonl").read_text() == (
        DATA / "dev/math_reworded.jsonl"
    ).read_text()
