"""Step pairs: the right number against a sampled wrong one, after the same on-policy prefix."""

from __future__ import annotations

import pytest

from alignment.data import IGNORE
from alignment.generation import Completion
from alignment.step_pairs import step_pair, step_pairs, token_span

PROMPT = "<|im_start|>user\nHow far?<|im_end|>\n<|im_start|>assistant\n"


def completion(tok, text: str) -> Completion:
    return Completion(text, tok(text, add_special_tokens=False).input_ids, True)


def learned(tok, seq) -> str:
    """The text of the tokens a sequence's labels train (labels are shifted by one)."""
    return tok.decode([t for t in seq.labels if t != IGNORE])


def test_the_pair_swaps_the_first_wrong_number_and_keeps_the_prefix_and_the_next_token(qwen_tokenizer):
    tok = qwen_tokenizer
    prompt = tok(PROMPT, add_special_tokens=False).input_ids
    answer = completion(tok, "44 × 5 = 216 km and 38 × 2 = 76 km, so 216 + 76 = 292.")
    pair, wrong, right = step_pair(prompt, answer, tok)
    assert (wrong, right) == ("216", "220")
    assert tok.decode(pair.chosen.input_ids) == PROMPT + "44 × 5 = 220 km"
    assert tok.decode(pair.rejected.input_ids) == PROMPT + "44 × 5 = 216 km"
    # the number and the token after it are learnt; the prompt and the answer's prefix are not
    assert (learned(tok, pair.chosen), learned(tok, pair.rejected)) == ("220 km", "216 km")
    n = len(pair.rejected.input_ids) - 4
    assert (
        pair.chosen.input_ids[:n]
        == pair.rejected.input_ids[:n]
        == prompt + answer.token_ids[: n - len(prompt)]
    )
    assert (
        pair.rejected.input_ids[len(prompt) :]
        == answer.token_ids[: len(pair.rejected.input_ids) - len(prompt)]
    )
    assert pair.nll  # the right number is a verified answer: the NLL term covers it


def test_a_later_wrong_equation_and_an_answer_ending_on_the_number(qwen_tokenizer):
    tok = qwen_tokenizer
    pair, wrong, right = step_pair([], completion(tok, "15 + 15 = 30, and 30 + 18 = 49"), tok)
    assert (wrong, right) == ("49", "48")
    assert (learned(tok, pair.chosen), learned(tok, pair.rejected)) == ("48", "49")
    assert tok.decode(pair.chosen.input_ids) == "15 + 15 = 30, and 30 + 18 = 48"


@pytest.mark.parametrize(
    "text",
    ["15 + 15 = 30, and 30 + 18 = 48.", "The answer is 42.", "So 3 + 4 = 2 + 6.", "6 / 0 = 0"],
)
def test_no_pair_without_a_wrong_number_to_replace(qwen_tokenizer, text):
    assert step_pair([1, 2], completion(qwen_tokenizer, text), qwen_tokenizer) is None


class GluedTokenizer:
    """Decodes by joining pieces: " 216" is one token, as some tokenizers write a number with its space."""

    pieces = ["44", " ×", " 5", " =", " 216", " km", " 2", "16"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_a_number_glued_to_the_token_before_it_gives_no_pair():
    tok, text = GluedTokenizer(), "44 × 5 = 216 km"
    assert token_span(tok, [0, 1, 2, 3, 4, 5], text, text.index("216"), text.index("216") + 3) is None
    assert token_span(tok, [0, 1, 2, 3, 6, 7, 5], text, text.index(" 216"), text.index(" 216") + 4) == (4, 6)
    assert step_pair([], Completion(text, [0, 1, 2, 3, 4, 5], True), tok) is None


def test_step_pairs_keeps_answer_order_drops_repeats_and_stops_at_the_limit(qwen_tokenizer):
    tok = qwen_tokenizer
    texts = [
        "4 × 5 = 21. The answer is 21.",
        "4 × 5 = 21. The answer is 21!",  # the same prefix and wrong number: one pair
        "4 × 5 = 20. The answer is 20.",  # right: no pair
        "4 × 5 = 24. The answer is 24.",
        "4 × 5 = 25. The answer is 25.",
    ]
    got = step_pairs([7], [completion(tok, t) for t in texts], tok, limit=2)
    assert [(sp.answer, sp.wrong, sp.right) for sp in got] == [(0, "21", "20"), (3, "24", "20")]
    assert len(step_pairs([7], [completion(tok, t) for t in texts], tok, limit=5)) == 3
    assert step_pairs([7], [completion(tok, t) for t in texts], tok, limit=0) == []
