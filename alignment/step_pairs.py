"""Step pairs: at the first wrong equation of a sampled answer, the right number against the sampled one.

For an answer y = (y_1 .. y_T) sampled for prompt x whose first wrong equation ``left = c`` (reward/arithmetic.py)
writes the number c as the tokens y_s .. y_e-1, where v is the exact value of ``left``:

    prompt'   = x + y_<s                  the answer up to the wrong number, as sampled
    chosen    = tokens(v) + y_e           the right number, then the token the sample wrote after it
    rejected  = y_s .. y_e-1 + y_e        the sampled number, then the same token

Both answers continue the same on-policy prefix and differ in the number alone, so the DPO term lands on the
digits the policy got wrong and the loss's NLL term on the right ones. It is Step-DPO's pair (Lai et al. 2024,
"Step-DPO: Step-wise Preference Optimization for Long-chain Reasoning of LLMs": the prefix up to the first wrong
step as the prompt, a right and the wrong step as the answers) with a calculator as the judge of the step, an
execution feedback of the Qwen2 report's kind. Only the first wrong equation gives a pair: after it the answer
builds on a wrong number.

No pair from an answer whose equations all hold, whose first wrong right side is an expression or a division by
zero (``first_wrong_step``), or whose wrong number does not start and end on token boundaries (glued to the token
before it, as some tokenizers write " 216" as one token).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignment.data import PairSequences
from alignment.evaluation import answer_sequence
from alignment.generation import Completion
from reward.arithmetic import first_wrong_step, write_like


@dataclass(frozen=True)
class StepPair:
    pair: PairSequences
    answer: int  # which answer of the prompt's group it came from
    wrong: str  # the sampled number
    right: str  # the right one


def token_span(tokenizer, ids: list[int], text: str, start: int, end: int) -> tuple[int, int] | None:
    """Token indices (s, e) with decode(ids[:s]) == text[:start] and decode(ids[:e]) == text[:end], or None
    when ``start`` or ``end`` falls inside a token."""
    s = None
    for k in range(len(ids) + 1):
        got = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if s is None and len(got) >= start:
            if got != text[:start]:
                return None
            s = k
        if s is not None and len(got) >= end:
            return (s, k) if got == text[:end] else None
    return None


def step_pair(prompt_ids: list[int], answer: Completion, tokenizer) -> tuple[PairSequences, str, str] | None:
    """The step pair of one sampled answer (see the module docstring), with the wrong and the right number."""
    step = first_wrong_step(answer.text)
    if step is None:
        return None
    span = token_span(tokenizer, answer.token_ids, answer.text, step.start, step.end)
    if span is None:
        return None
    s, e = span
    right = write_like(step.value, step.right)
    after = answer.token_ids[e : e + 1]  # the token after the number (none when the answer ends there)
    prefix = list(prompt_ids) + answer.token_ids[:s]
    chosen = tokenizer(right, add_special_tokens=False).input_ids + after
    rejected = answer.token_ids[s:e] + after
    if chosen == rejected:  # a right side that only reads wrong (e.g. rounded otherwise): nothing to prefer
        return None
    return (
        PairSequences(answer_sequence(prefix, chosen), answer_sequence(prefix, rejected)),
        step.right,
        right,
    )


def step_pairs(prompt_ids: list[int], answers: list[Completion], tokenizer, limit: int) -> list[StepPair]:
    """Up to ``limit`` step pairs from one prompt's answers, in answer order; the same prefix and wrong number
    twice (two samples alike up to their slip) give one pair."""
    out, seen = [], set()
    for j, answer in enumerate(answers):
        if len(out) >= limit:
            break
        got = step_pair(prompt_ids, answer, tokenizer)
        if got is None:
            continue
        pair, wrong, right = got
        key = (tuple(pair.rejected.input_ids), tuple(pair.rejected.labels))
        if key in seen:
            continue
        seen.add(key)
        out.append(StepPair(pair, j, wrong, right))
    return out
