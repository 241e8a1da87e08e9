"""Instruction following: IFEval-style constraint checkers, written here, and the reward that uses them.

Each row carries its constraints in a column (``constraints`` by default): a list of mappings, each with a
``type`` and that checker's parameters, e.g.

    [{"type": "word_count", "relation": "at least", "num_words": 100}, {"type": "no_commas"}]

(a JSON string of that list works too). Parameter names follow IFEval's (``num_words``, ``relation``,
``let_frequency``, ``section_spliter``, ...), and IFEval's instruction ids are accepted as types
(``"length_constraints:number_words"``), so IFEval-format data works as is. ``None`` parameters are
dropped first: ``datasets`` fills every mapping in a list column with the union of all keys.

Reward, per completion (``IFEvalReward``, registered as ``"ifeval"``), with K constraints c_k:

    mode="fraction" (default):  r = (1/K) * sum_k 1[response satisfies c_k]     (IFEval instruction level)
    mode="all":                 r = prod_k 1[response satisfies c_k]            (IFEval prompt level, strict)
    r = None  when the row has no constraints, an unknown type, or parameters a checker cannot use (the
              reason names the constraint and the problem: that is a bad row, not a bad response)

The fraction is the default because it gives a denser signal for preference pairs: two responses that
both miss one of three constraints still differ in how many they keep.

Deliberate simplifications: words and sentences are counted with regular expressions (IFEval uses nltk);
there is no "loose" variant (IFEval also retries with the first/last line or markdown stripped); there is
no language constraint (it needs a language detector).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from reward.base import Prompt, RewardOutput
from reward.compose import register_reward

RELATIONS = ("at least", "at most", "less than", "more than", "exactly")
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def _compare(value: int, relation: str, target: int) -> bool:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(f"the count to compare with must be an int >= 0, got {target!r}")
    return {
        "at least": value >= target,
        "at most": value <= target,
        "less than": value < target,
        "more than": value > target,
        "exactly": value == target,
    }[relation]


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _contains_word(text: str, word: str) -> int:
    """How often ``word`` appears as a whole word (or phrase), case-insensitively."""
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"a keyword must be a non-empty str, got {word!r}")
    return len(re.findall(rf"(?<!\w){re.escape(word.strip())}(?!\w)", text, re.IGNORECASE))


def _str_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be a non-empty list of str, got {value!r}")
    return list(value)


# ---------------------------------------------------------------- the checkers: response -> bool


def word_count(response: str, *, num_words: int, relation: str = "at least") -> bool:
    """The number of words compares with ``num_words`` by ``relation``."""
    return _compare(len(_words(response)), relation, num_words)


def sentence_count(response: str, *, num_sentences: int, relation: str = "at least") -> bool:
    """Sentences end with . ! or ? (or a line break); their number compares with ``num_sentences``."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", response.strip())
    return _compare(sum(bool(_words(p)) for p in parts), relation, num_sentences)


def paragraph_count(response: str, *, num_paragraphs: int) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by the markdown divider ***, none of them empty."""
    parts = re.split(r"\s?\*\*\*\s?", response.strip())
    return all(p.strip() for p in parts) and _compare(len(parts), "exactly", num_paragraphs)


def nth_paragraph_first_word(
    response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str
) -> bool:
    """Exactly ``num_paragraphs`` paragraphs split by blank lines; the n-th (1-based) starts with ``first_word``."""
    if not 1 <= nth_paragraph <= num_paragraphs:
        raise ValueError(
            f"nth_paragraph must be in 1..num_paragraphs, got {nth_paragraph} of {num_paragraphs}"
        )
    parts = [p for p in re.split(r"\n\s*\n", response.strip()) if p.strip()]
    if len(parts) != num_paragraphs:
        return False
    words = _words(parts[nth_paragraph - 1])
    return bool(words) and words[0].lower() == first_word.strip().lower()


def keywords_include(response: str, *, keywords: list[str]) -> bool:
    """Every keyword appears (whole word, any case)."""
    return all(_contains_word(response, k) for k in _str_list(keywords, "keywords"))


def keywords_exclude(response: str, *, forbidden_words: list[str]) -> bool:
    """None of the forbidden words appears (whole word, any case)."""
    return not any(_contains_word(response, w) for w in _str_list(forbidden_words, "forbidden_words"))


def keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str = "at least") -> bool:
    """The keyword's count (whole word, any case) compares with ``frequency``."""
    return _compare(_contains_word(response, keyword), relation, frequency)


def letter_frequency(
    response: str, *, letter: str, let_frequency: int, let_relation: str = "at least"
) -> bool:
    """The letter's count (any case) compares with ``let_frequency``."""
    if not isinstance(letter, str) or len(letter) != 1 or not letter.isalpha():
        raise ValueError(f"letter must be a single letter, got {letter!r}")
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


def json_format(response: str) -> bool:
    """The whole response is JSON (a ```json fence around it is allowed)."""
    text = response.strip()
    fenced = re.fullmatch(r"```(?:json|JSON)?\s*\n?(.*?)\n?```", text, re.DOTALL)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return True


def bullet_count(response: str, *, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` markdown bullet lines ("* item" or "- item")."""
    return _compare(len(re.findall(r"^\s*[*-]\s+\S", response, re.MULTILINE)), "exactly", num_bullets)


def title(response: str) -> bool:
    """A title in double angular brackets, like <<poem of joy>>."""
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", response))


def section_count(response: str, *, num_sections: int, section_spliter: str = "Section") -> bool:
    """At least ``num_sections`` sections, each starting with "<section_spliter> <number>"."""
    if not isinstance(section_spliter, str) or not section_spliter.strip():
        raise ValueError(f"section_spliter must be a non-empty str, got {section_spliter!r}")
    parts = re.split(rf"\s?{re.escape(section_spliter.strip())}\s?\d+\s?", response)
    return _compare(len(parts) - 1, "at least", num_sections)


def placeholder_count(response: str, *, num_placeholders: int) -> bool:
    """At least ``num_placeholders`` placeholders in square brackets, like [address]."""
    return _compare(len(re.findall(r"\[[^\[\]\n]+\]", response)), "at least", num_placeholders)


def postscript(response: str, *, postscript_marker: str = "P.S.") -> bool:
    """A line that starts with the postscript marker (P.S., P.P.S, ...), dots and spaces as IFEval allows."""
    if not isinstance(postscript_marker, str) or not postscript_marker.strip():
        raise ValueError(f"postscript_marker must be a non-empty str, got {postscript_marker!r}")
    letters = [re.escape(c) for c in postscript_marker.strip().rstrip(".").split(".")]
    pattern = r"^\s*" + r"\.\s?".join(letters)
    return re.search(pattern, response, re.IGNORECASE | re.MULTILINE) is not None


def highlighted_sections(response: str, *, num_highlights: int) -> bool:
    """At least ``num_highlights`` parts highlighted with markdown, like *highlighted section*."""
    spans = [s for s in re.findall(r"\*([^\n*]+)\*", response) if s.strip()]
    return _compare(len(spans), "at least", num_highlights)


def start_phrase(response: str, *, phrase: str) -> bool:
    """The response starts with ``phrase`` (any case, leading spaces ignored)."""
    return response.strip().lower().startswith(phrase.strip().lower())


def end_phrase(response: str, *, end_phrase: str) -> bool:
    """The response ends with ``end_phrase`` and nothing follows it (any case, trailing spaces ignored)."""
    return response.strip().lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    """The whole response is wrapped in double quotation marks."""
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def all_lowercase(response: str) -> bool:
    """No capital letters (and at least one letter)."""
    return response.islower()


def all_uppercase(response: str) -> bool:
    """Only capital letters (and at least one letter)."""
    return response.isupper()


def capital_word_frequency(
    response: str, *, capital_frequency: int, capital_relation: str = "at least"
) -> bool:
    """The number of words in all capitals (like NOTE) compares with ``capital_frequency``."""
    return _compare(sum(w.isupper() for w in _words(response)), capital_relation, capital_frequency)


def no_commas(response: str) -> bool:
    """No comma anywhere."""
    return "," not in response and "，" not in response


def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    """The response first repeats the request word for word (any case), then answers."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def two_responses(response: str) -> bool:
    """Two different responses separated by six asterisks (******)."""
    parts = response.split("******")
    inner_empty = any(not p.strip() for p in parts[1:-1])
    valid = [p.strip() for p in parts if p.strip()]
    return not inner_empty and len(valid) == 2 and valid[0] != valid[1]


def constrained_response(response: str) -> bool:
    """Contains one of "My answer is yes.", "My answer is no.", "My answer is maybe."."""
    return any(f"My answer is {a}." in response for a in ("yes", "no", "maybe"))


def choose_from(response: str, *, options: list[str]) -> bool:
    """The response is exactly one of ``options`` (any case, a final period allowed)."""
    answer = response.strip().rstrip(".").strip().lower()
    return answer in {o.strip().rstrip(".").strip().lower() for o in _str_list(options, "options")}


CHECKERS: dict[str, Callable[..., bool]] = {
    f.__name__: f
    for f in (
        word_count,
        sentence_count,
        paragraph_count,
        nth_paragraph_first_word,
        keywords_include,
        keywords_exclude,
        keyword_frequency,
        letter_frequency,
        json_format,
        bullet_count,
        title,
        section_count,
        placeholder_count,
        postscript,
        highlighted_sections,
        start_phrase,
        end_phrase,
        quotation,
        all_lowercase,
        all_uppercase,
        capital_word_frequency,
        no_commas,
        repeat_prompt,
        two_responses,
        constrained_response,
        choose_from,
    )
}

# IFEval's instruction ids for the checkers that match theirs.
IFEVAL_IDS = {
    "keywords:existence": "keywords_include",
    "keywords:forbidden_words": "keywords_exclude",
    "keywords:frequency": "keyword_frequency",
    "keywords:letter_frequency": "letter_frequency",
    "length_constraints:number_words": "word_count",
    "length_constraints:number_sentences": "sentence_count",
    "length_constraints:number_paragraphs": "paragraph_count",
    "length_constraints:nth_paragraph_first_word": "nth_paragraph_first_word",
    "detectable_format:json_format": "json_format",
    "detectable_format:number_bullet_lists": "bullet_count",
    "detectable_format:title": "title",
    "detectable_format:multiple_sections": "section_count",
    "detectable_format:number_highlighted_sections": "highlighted_sections",
    "detectable_format:constrained_response": "constrained_response",
    "detectable_content:number_placeholders": "placeholder_count",
    "detectable_content:postscript": "postscript",
    "startend:end_checker": "end_phrase",
    "startend:quotation": "quotation",
    "change_case:english_lowercase": "all_lowercase",
    "change_case:english_capital": "all_uppercase",
    "change_case:capital_word_frequency": "capital_word_frequency",
    "punctuation:no_comma": "no_commas",
    "combination:repeat_prompt": "repeat_prompt",
    "combination:two_responses": "two_responses",
}

# What each constraint asks, in words: the eval set's prompts are built from these.
DESCRIPTIONS = {
    "word_count": "Answer with {relation} {num_words} words.",
    "sentence_count": "Your response should contain {relation} {num_sentences} sentences.",
    "paragraph_count": "There should be {num_paragraphs} paragraphs, separated from each other by the markdown divider: ***",
    "nth_paragraph_first_word": "There should be {num_paragraphs} paragraphs, separated by blank lines. Paragraph {nth_paragraph} must start with the word {first_word}.",
    "keywords_include": "Include the keywords {keywords} in the response.",
    "keywords_exclude": "Do not include the words {forbidden_words} in the response.",
    "keyword_frequency": "In your response, the word {keyword} should appear {relation} {frequency} times.",
    "letter_frequency": "In your response, the letter {letter} should appear {let_relation} {let_frequency} times.",
    "json_format": "Wrap your entire output in JSON format; you can use markdown ticks such as ```.",
    "bullet_count": "Your answer must contain exactly {num_bullets} bullet points. Use markdown bullet points such as:\n* This is point 1.",
    "title": "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
    "section_count": "Your response must have {num_sections} sections. Mark the beginning of each section with {section_spliter} X, such as: {section_spliter} 1",
    "placeholder_count": "The response must contain at least {num_placeholders} placeholders represented by square brackets, such as [address].",
    "postscript": "At the end of your response, please explicitly add a postscript starting with {postscript_marker}",
    "highlighted_sections": "Highlight at least {num_highlights} sections in your answer with markdown, i.e. *highlighted section*.",
    "start_phrase": "Start your response with the exact phrase '{phrase}'.",
    "end_phrase": "Finish your response with this exact phrase '{end_phrase}'. No other words should follow this phrase.",
    "quotation": "Wrap your entire response with double quotation marks.",
    "all_lowercase": "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
    "all_uppercase": "Your entire response should be in English, and in all capital letters.",
    "capital_word_frequency": "In your response, words with all capital letters should appear {capital_relation} {capital_frequency} times.",
    "no_commas": "In your entire response, refrain from the use of any commas.",
    "repeat_prompt": "First repeat the request word for word without change, then give your answer (do not say anything before repeating the request; the request you need to repeat does not include this sentence).",
    "two_responses": "Give two different responses. Responses and only responses should be separated by 6 asterisk symbols: ******.",
    "constrained_response": 'Answer with one of the following options: ("My answer is yes.", "My answer is no.", "My answer is maybe.")',
    "choose_from": "Answer with exactly one of the following options, and nothing else: {options}.",
}


def _normalize(constraint: Any, index: int) -> tuple[str, dict[str, Any]]:
    """(checker name, params) from a row's constraint, or ValueError naming what is wrong."""
    if not isinstance(constraint, dict) or not isinstance(constraint.get("type"), str):
        raise ValueError(f"constraint {index} must be a mapping with a 'type' str, got {constraint!r:.120}")
    kind = IFEVAL_IDS.get(constraint["type"], constraint["type"])
    if kind not in CHECKERS:
        raise ValueError(
            f"constraint {index}: unknown type {constraint['type']!r}; known: {sorted(CHECKERS)}"
        )
    params = {k: v for k, v in constraint.items() if k != "type" and v is not None}
    return kind, params


def check_constraint(response: str, constraint: dict[str, Any], index: int = 0) -> bool:
    """Whether ``response`` satisfies one constraint; ValueError when the constraint itself is unusable."""
    kind, params = _normalize(constraint, index)
    checker = CHECKERS[kind]
    try:
        inspect.signature(checker).bind(response, **params)
    except TypeError as e:
        accepted = [p for p in inspect.signature(checker).parameters if p != "response"]
        raise ValueError(f"constraint {index} ({kind}): {e}; it takes {accepted}") from e
    try:
        return bool(checker(response, **params))
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"constraint {index} ({kind}): {e}") from e


def describe_constraint(constraint: dict[str, Any]) -> str:
    """The instruction text for a constraint, as it would appear in a prompt."""
    kind, params = _normalize(constraint, 0)
    shown = {k: ", ".join(v) if isinstance(v, list) else v for k, v in params.items()}
    return DESCRIPTIONS[kind].format(**shown)


def parse_constraints(value: Any) -> list[dict[str, Any]]:
    """A row's constraint column: a list of mappings, or a JSON string of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"the constraints are a str but not JSON ({e})") from e
    if not isinstance(value, list | tuple):
        raise ValueError(f"the constraints must be a list of mappings, got {type(value).__name__}")
    return list(value)


@register_reward("ifeval")
class IFEvalReward:
    """Fraction (or all) of the row's constraints the completion satisfies; see the module docstring."""

    name = "ifeval"

    def __init__(self, constraints_column: str = "constraints", mode: str = "fraction") -> None:
        if mode not in ("fraction", "all"):
            raise ValueError(f"IFEvalReward: mode must be 'fraction' or 'all', got {mode!r}")
        if not isinstance(constraints_column, str) or not constraints_column:
            raise ValueError(
                f"IFEvalReward: constraints_column must be a column name, got {constraints_column!r}"
            )
        self.constraints_column = constraints_column
        self.mode = mode

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[str], **columns: Sequence[Any]
    ) -> RewardOutput:
        rows = columns.get(self.constraints_column)
        if rows is None:
            reason = f"no column {self.constraints_column!r} with the constraint lists (columns: {sorted(columns)})"
            return RewardOutput([None] * len(completions), [reason] * len(completions))
        if len(rows) != len(completions):
            raise ValueError(f"IFEvalReward: {len(completions)} completions but {len(rows)} constraint lists")
        out = [self.score_one(c, r) for c, r in zip(completions, rows)]
        return RewardOutput([s for s, _, _ in out], [r for _, r, _ in out], [d for _, _, d in out])

    def score_one(self, completion: str, constraints: Any) -> tuple[float | None, str | None, dict]:
        try:
            constraints = parse_constraints(constraints)
            if not constraints:
                return None, "the row has an empty constraint list", {}
            results = [check_constraint(completion or "", c, i) for i, c in enumerate(constraints)]
        except ValueError as e:
            return None, f"bad constraint data: {e}", {}
        kinds = [_normalize(c, i)[0] for i, c in enumerate(constraints)]
        detail = {"satisfied": dict(zip(kinds, results)) if len(set(kinds)) == len(kinds) else results}
        score = sum(results) / len(results) if self.mode == "fraction" else float(all(results))
        return score, None, detail
