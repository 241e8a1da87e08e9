"""Arithmetic steps: check every equation a completion writes between plain numbers.

Reward, per completion (``ArithmeticReward``, registered as ``"arithmetic"``), over the equations E the
completion writes whose two sides are arithmetic on literal numbers ("18 x 18 = 324", "2 x (14 + 20) = 68",
"9/4 = 27/12"; a chain "a = b = c" is the equations a = b and b = c):

    r = 1.0   every e in E holds (its sides are equal as exact fractions; a right side written with d
              decimals is compared after rounding the left side to d decimals)
    r = 0.0   some e in E does not hold (details name the first one)
    r = None  E is empty: the completion writes no equation this can check (a sorted list, a reversed word)

A side that touches a variable or a word is not checked: in "5x - 3 = 47" the "3" belongs to "5x - 3", and in
"7x = -46 + 4 = -42" only "-46 + 4 = -42" is checked. "x" counts as a multiplication sign only between spaces.

Why: the ``math`` reward reads the final answer only, and a small model's right final answer can sit on wrong
steps ("x = -32 / 7 = -6. The answer is -6."). Gating the chosen answer of online DPO on both
(``pairs.chosen_must_pass: [math, arithmetic]``) keeps such lucky answers out of the pairs. No columns read.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from reward.base import Prompt, RewardOutput
from reward.compose import register_reward

_NUM = r"-?\$?\d+(?:,\d{3})*(?:\.\d+)?"
_OP = r"(?:\s*[-+×*/÷]\s*|\s+x\s+)"
_SIDE = rf"(?:\(\s*)*{_NUM}(?:\s*\))*(?:{_OP}(?:\(\s*)*{_NUM}(?:\s*\))*)*"
_CHAIN = re.compile(rf"{_SIDE}(?:\s*=\s*{_SIDE})+")
# What may not touch an equation: before it an operator (spaces between allowed) or a letter, digit or point
# glued to it; after it the same.
_BEFORE_BAD = re.compile(r"(?:[-+×*/÷^%(]\s*|[\w.])$")
_AFTER_BAD = re.compile(r"^(?:\s*[-+×*/÷^%(]|\w|\.\d)")


def _value(side: str) -> Fraction:
    """Exact value of one side: numbers (``$``, thousands commas dropped), + - x / and parentheses."""
    expr = re.sub(r"\s+x\s+", " * ", side).replace("×", "*").replace("÷", "/").replace("$", "")
    expr = re.sub(r"(?<=\d),(?=\d{3})", "", expr)
    return _eval(ast.parse(expr.strip(), mode="eval").body)


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval(node: ast.AST) -> Fraction:
    """Exact value of a parsed side; a division by zero raises ZeroDivisionError (Fraction's own)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left), _eval(node.right))
    raise ValueError(f"not plain arithmetic: {ast.dump(node)}")


def _holds(left: Fraction, right_text: str, right: Fraction) -> bool:
    """left = right, allowing a right side that is one decimal number rounded to its written decimals."""
    if left == right:
        return True
    m = re.fullmatch(r"\s*-?\$?[\d,]*\.(\d+)\s*", right_text)
    if m:
        d = len(m.group(1))
        return round(left, d) == right
    return False


@dataclass(frozen=True)
class Equation:
    """One checked equation ``left = right`` of a text: ``start:end`` is the right side's span in the text
    (without surrounding spaces), ``value`` the exact value of the left side."""

    left: str
    right: str
    start: int
    end: int
    value: Fraction | None  # None: a side divides by zero
    holds: bool


def equations(text: str) -> Iterator[Equation]:
    """Every equation between plain numbers that ``text`` writes, in order (what ``check_equations`` checks)."""
    for m in _CHAIN.finditer(text):
        if _BEFORE_BAD.search(text[: m.start()]) or _AFTER_BAD.search(text[m.end() :]):
            continue
        spans = [(p.start(), p.end()) for p in re.finditer(r"[^=]+", m.group(0))]
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            a, b = m.group(0)[a0:a1].strip(), m.group(0)[b0:b1]
            start = m.start() + b0 + len(b) - len(b.lstrip())
            b = b.strip()
            if not re.search(_OP, a) and not re.search(_OP, b):
                continue  # "= 9 = 9" checks nothing
            try:
                left = _value(a)
                ok = _holds(left, b, _value(b))
            except ZeroDivisionError:
                left, ok = None, False
            except (SyntaxError, ValueError):
                continue  # unbalanced parentheses: not an equation we can read
            yield Equation(a, b, start, start + len(b), left, ok)


def check_equations(text: str) -> tuple[int, str | None]:
    """(number of equations checked, the first one that does not hold or None)."""
    checked = 0
    for eq in equations(text):
        checked += 1
        if not eq.holds:
            return checked, f"{eq.left} = {eq.right}"
    return checked, None


def first_wrong_step(text: str) -> Equation | None:
    """The first equation of ``text`` that does not hold, when its right side is one written number the left
    side's value can replace (not an expression, not a division by zero); None otherwise or when all hold."""
    for eq in equations(text):
        if not eq.holds:
            if eq.value is None or not re.fullmatch(_NUM, eq.right):
                return None
            return eq
    return None


def write_like(value: Fraction, written: str) -> str:
    """``value`` written as ``written`` is: with as many decimals as ``written`` has (2 for a non-integer value
    written as an integer), a leading ``$`` kept, no thousands commas."""
    sign, v = ("-" if value < 0 else ""), abs(value)
    dollar = "$" if "$" in written else ""
    if v.denominator == 1 and "." not in written:
        body = str(v.numerator)
    else:  # rounded as _holds rounds the left side
        d = len(written.split(".")[1]) if "." in written else 2
        body = f"{float(round(v, d)):.{d}f}"
    return f"{sign}{dollar}{body}"


@register_reward("arithmetic")
class ArithmeticReward:
    """1.0 when every checked equation holds, 0.0 when one does not, None when there is none to check."""

    name = "arithmetic"

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[str], **columns: Sequence[Any]
    ) -> RewardOutput:
        scores, reasons, details = [], [], []
        for completion in completions:
            n, wrong = check_equations(completion or "")
            details.append({"equations": n, "wrong": wrong})
            if n == 0:
                scores.append(None)
                reasons.append("no equation between plain numbers to check")
            else:
                scores.append(0.0 if wrong else 1.0)
                reasons.append(None)
        return RewardOutput(scores, reasons, details)
