"""Turn N scored answers to one prompt into one preference pair, or into a counted reason for having none.

Per prompt, with scores s_j from the composed reward (None: the reward could not judge answer j):

    adjusted_j = s_j - length_penalty * tokens_j - unfinished_penalty * [answer j has no end-of-turn token]

(the length penalty is RLHFlow's max_min_p: reward minus coef x length). Then

    best_worst   chosen = argmax_j adjusted_j,  rejected = argmin_j adjusted_j     (Qwen2's online DPO)
    best_random  chosen = argmax_j adjusted_j,  rejected = a random other answer
    greedy_anchor  answer 0 is the policy's greedy answer g, the others sampled; with b = argmax and
                 w = argmin over the sampled answers:  (b, g) when adjusted_b > adjusted_g, else (g, w)

greedy_anchor puts the policy's mode in every pair: a sampled answer that beats the greedy one is preferred
to it (the step moves the mode itself), and a greedy answer that beats every sample is preferred to the worst.
It is the greedy baseline of ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement
Learning Method for Aligning Large Language Models") turned into a pair: the online stage's target is greedy
accuracy, and best-vs-worst pairs often leave the greedy answer out of the pair.

among the answers that were scored, where the rejected answer's text must differ from the chosen one's
(byte-identical answers never form a pair). The pair is dropped, with its reason counted, when fewer than two
answers were scored, when every scored answer is the same text, or when chosen and rejected differ by less than
``min_margin`` or not at all (ties never become pairs: TRL's online DPO keeps them and calls the first one
chosen). Ties for the best go to the earliest answer, so the choice is deterministic.

``chosen_must_pass`` names verifier components of the reward (e.g. ``math``): where one of them judged a
prompt's answers, only an answer with full marks (score >= 1) from every such verifier may be chosen:

    eligible = {j : passed_j}   if any verifier judged the prompt,   else every scored answer
    best_worst / best_random   chosen = argmax_{j in eligible} adjusted_j   (rejected as above)
    greedy_anchor              the pair as above, dropped when its chosen answer is not eligible

and a prompt with no eligible answer is dropped as ``unverified``. Without it, a prompt none of whose answers is
right still gives a pair whose chosen answer is wrong (the reward model ranks two wrong answers), and DPO raises
the likelihood of that wrong answer.

``unverified: judge`` keeps such a prompt instead: its pair is chosen among all scored answers, as without
``chosen_must_pass``, and is marked unverified (``Selection.verified`` False), so that the loss's NLL term
skips its chosen answer. A verified pair teaches correctness (DPO + NLL of a right answer, Iterative RPO); an
unverified one only the judge's taste between two answers no verifier passed (the DPO term alone).

``rejected_must_pass`` names verifier components the rejected answer must pass where they judged it (an answer
they did not judge may still be rejected):

    best_worst     rejected = argmin adjusted_j over the answers j != chosen with rejected_ok_j
    best_random    rejected = a random one of them
    greedy_anchor  the pair as above, dropped when its rejected answer is not allowed

and a prompt left with no allowed rejected answer is dropped as ``no_rejected``. With ``[arithmetic]`` (every
written equation holds) next to ``chosen_must_pass: [math, arithmetic]``, a pair is a right answer against a
wrong one whose arithmetic holds: the two differ in the plan (a wrong formula, a skipped step), not in a slipped
digit. Pairs whose difference is a slipped number teach which digits follow which prefixes and cost greedy
accuracy on this project's 135 M model (README, "What moved the numbers").

``per_prompt`` > 1 (best_worst and best_random) takes more pairs from the same answers, a ladder:

    pair 1 as above; pair k+1 by the same rule over the answers whose texts no earlier pair holds

stopping at the first that fails or is verified otherwise than pair 1 (so a prompt with one right answer gives
one pair, and unverified pairs never follow verified ones). With 8 answers, pair 2 is the second best against
the second worst. The answers are sampled once either way; more pairs a step only average the step's
gradient over more of them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Literal

DROP_REASONS = ("unscored", "identical", "tie", "small_margin", "unverified", "no_rejected")


@dataclass
class PairSelectionConfig:
    strategy: Literal["best_worst", "best_random", "greedy_anchor"] = "best_worst"
    # Drop a prompt whose chosen and rejected adjusted scores differ by less than this (ties always dropped).
    min_margin: float = 0.0
    # Subtract coef x answer tokens from each score (0: off).
    length_penalty: float = 0.0
    # Subtract this from the score of an answer cut at max_new_tokens (no end-of-turn token; 0: off).
    unfinished_penalty: float = 0.0
    # Labels of verifier components (e.g. [math]): where one judged a prompt, the chosen answer must pass it.
    chosen_must_pass: list[str] = field(default_factory=list)
    # A prompt where chosen_must_pass leaves no eligible answer: drop it (counted as unverified), or judge: pair
    # its answers by score alone, marked unverified (no NLL term on its chosen answer).
    unverified: Literal["drop", "judge"] = "drop"
    # Labels of verifier components (e.g. [arithmetic]): the rejected answer must pass those that judged it.
    rejected_must_pass: list[str] = field(default_factory=list)
    # Per prompt, up to this many more pairs at the first wrong equation of a sampled answer: the right number
    # against the sampled one after the same prefix (alignment/step_pairs.py). 0: off.
    step_pairs: int = 0
    # Up to this many pairs per prompt from its answers, none sharing an answer text (a ladder: see above).
    per_prompt: int = 1

    def __post_init__(self) -> None:
        if min(self.min_margin, self.length_penalty, self.unfinished_penalty, self.step_pairs) < 0:
            raise ValueError(
                "pairs.min_margin, length_penalty, unfinished_penalty and step_pairs must be >= 0"
            )
        if self.per_prompt < 1:
            raise ValueError(f"pairs.per_prompt must be >= 1, got {self.per_prompt}")
        if self.per_prompt > 1 and self.strategy == "greedy_anchor":
            raise ValueError(
                "pairs.per_prompt > 1 needs best_worst or best_random: greedy_anchor makes one pair"
            )
        for key in ("chosen_must_pass", "rejected_must_pass"):
            labels = getattr(self, key)
            if len(set(labels)) != len(labels):
                raise ValueError(f"pairs.{key}: a label is listed twice: {labels}")


@dataclass
class Selection:
    """The chosen and rejected answer indices, or None and the reason (one of DROP_REASONS)."""

    chosen: int | None
    rejected: int | None
    reason: str | None = None
    margin: float = 0.0  # adjusted chosen - adjusted rejected
    verified: bool = True  # False: chosen_must_pass judged the prompt and its chosen answer did not pass

    @property
    def ok(self) -> bool:
        return self.reason is None


def adjusted_scores(
    scores: list[float | None], lengths: list[int], finished: list[bool], cfg: PairSelectionConfig
) -> list[float | None]:
    return [
        None if s is None else s - cfg.length_penalty * n - (cfg.unfinished_penalty if not done else 0.0)
        for s, n, done in zip(scores, lengths, finished)
    ]


def verified(components: dict[str, list[float | None]], labels: list[str]) -> list[bool | None]:
    """Per answer: True when every named verifier that judged it gave full marks (>= 1), False when one gave
    less, None when none of them judged it (e.g. the prompt has no gold answer)."""
    n = len(next(iter(components.values()), []))
    out: list[bool | None] = []
    for j in range(n):
        judged = [
            components[lab][j] for lab in labels if lab in components and components[lab][j] is not None
        ]
        out.append(None if not judged else all(v >= 1.0 for v in judged))
    return out


def select_pair(
    scores: list[float | None],
    texts: list[str],
    lengths: list[int],
    finished: list[bool],
    cfg: PairSelectionConfig,
    rng: random.Random,
    passed: list[bool | None] | None = None,
    rejected_ok: list[bool | None] | None = None,
) -> Selection:
    """One prompt's N answers -> Selection. ``rng`` is used by best_random only; greedy_anchor reads answer 0
    as the greedy one. ``passed`` (from ``verified``) limits the chosen answer when a verifier judged any;
    ``rejected_ok`` (from ``verified`` over ``rejected_must_pass``) excludes an answer that failed a verifier
    from being rejected (None: not judged, allowed)."""
    adj = adjusted_scores(scores, lengths, finished, cfg)
    scored = [j for j, a in enumerate(adj) if a is not None]
    may_reject = [rejected_ok is None or rejected_ok[j] is not False for j in range(len(adj))]
    if len(scored) < 2:
        return Selection(None, None, "unscored")
    eligible = scored
    if passed is not None and any(p is not None for p in passed):
        eligible = [j for j in scored if passed[j]]
        if not eligible and cfg.unverified == "drop":
            return Selection(None, None, "unverified")
    if cfg.strategy == "greedy_anchor":
        sel = _greedy_anchor(adj, texts, scored, cfg.min_margin)
        if sel.ok and not may_reject[sel.rejected]:
            return Selection(None, None, "no_rejected")
    else:
        best = max(eligible or scored, key=lambda j: (adj[j], -j))  # the earliest of equal bests
        others = [j for j in scored if texts[j] != texts[best]]
        if not others:
            return Selection(None, None, "identical")
        others = [j for j in others if may_reject[j]]
        if not others:
            return Selection(None, None, "no_rejected")
        if cfg.strategy == "best_worst":
            worst = min(others, key=lambda j: (adj[j], j))
        else:
            worst = rng.choice(others)
        sel = _pair(best, worst, adj, cfg.min_margin)
    if not sel.ok or sel.chosen in eligible:
        return sel
    # The chosen answer failed a verifier: only a prompt with no eligible answer may keep it, marked unverified.
    if eligible or cfg.unverified == "drop":
        return Selection(None, None, "unverified")
    return replace(sel, verified=False)


def select_pairs(
    scores: list[float | None],
    texts: list[str],
    lengths: list[int],
    finished: list[bool],
    cfg: PairSelectionConfig,
    rng: random.Random,
    passed: list[bool | None] | None = None,
    rejected_ok: list[bool | None] | None = None,
) -> list[Selection]:
    """Up to ``cfg.per_prompt`` pairs of one prompt's answers: ``select_pair``'s, then the ladder over the
    answers no earlier pair used (by text). The list holds one failed Selection, with its reason, when the
    prompt gives no pair."""
    first = select_pair(scores, texts, lengths, finished, cfg, rng, passed, rejected_ok)
    out = [first]
    used = {texts[first.chosen], texts[first.rejected]} if first.ok else set()
    while first.ok and len(out) < cfg.per_prompt:
        rest = [None if t in used else s for s, t in zip(scores, texts)]
        sel = select_pair(rest, texts, lengths, finished, cfg, rng, passed, rejected_ok)
        if not sel.ok or sel.verified != first.verified:
            break
        out.append(sel)
        used |= {texts[sel.chosen], texts[sel.rejected]}
    return out


def _pair(chosen: int, rejected: int, adj, min_margin: float) -> Selection:
    """The pair, or a tie / small_margin drop when chosen does not clear rejected by min_margin."""
    margin = adj[chosen] - adj[rejected]
    if margin <= 0:
        return Selection(None, None, "tie", margin)
    if margin < min_margin:
        return Selection(None, None, "small_margin", margin)
    return Selection(chosen, rejected, None, margin)


def _greedy_anchor(adj, texts, scored, min_margin: float) -> Selection:
    if adj[0] is None:
        return Selection(None, None, "unscored")
    others = [j for j in scored if j and texts[j] != texts[0]]
    if not others:
        return Selection(None, None, "identical")
    best = max(others, key=lambda j: (adj[j], -j))
    worst = min(others, key=lambda j: (adj[j], j))
    return _pair(best, 0, adj, min_margin) if adj[best] > adj[0] else _pair(0, worst, adj, min_margin)
