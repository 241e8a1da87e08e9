"""Pair selection by hand-made score tables: ties, margins, None scores, identical answers, penalties, the
verifier that limits the chosen answer, and unverified pairs that reach the loss without the NLL term."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from alignment.data import IGNORE
from alignment.evaluation import answer_sequence
from alignment.generation import Completion
from alignment.online_dpo import pick_pairs
from alignment.pair_selection import (
    PairSelectionConfig,
    adjusted_scores,
    select_pair,
    select_pairs,
    verified,
)
from alignment.preference import LossConfig, Reference, preference_step

TEXTS = ["a", "b", "c", "d"]
LENS = [10, 10, 10, 10]
DONE = [True, True, True, True]


def pick(scores, texts=TEXTS, lens=LENS, done=DONE, seed=0, passed=None, rejected_ok=None, **cfg):
    cfg = PairSelectionConfig(**cfg)
    return select_pair(scores, texts, lens, done, cfg, random.Random(seed), passed, rejected_ok)


def test_best_and_worst_by_score():
    sel = pick([0.2, 0.9, -0.5, 0.1])
    assert (sel.chosen, sel.rejected, sel.reason) == (1, 2, None)
    assert sel.margin == pytest.approx(1.4)


def test_all_tied_is_dropped_as_tie_never_a_pair():
    sel = pick([0.5, 0.5, 0.5, 0.5])
    assert not sel.ok and sel.reason == "tie" and sel.chosen is None


def test_equal_bests_go_to_the_earliest_and_worst_to_the_earliest_lowest():
    sel = pick([1.0, 0.0, 1.0, 0.0])
    assert (sel.chosen, sel.rejected) == (0, 1)


def test_min_margin_drops_close_pairs_and_keeps_wide_ones():
    assert pick([0.30, 0.25, 0.28, 0.26], min_margin=0.1).reason == "small_margin"
    assert pick([0.30, 0.15, 0.28, 0.26], min_margin=0.1).ok


def test_none_scores_are_left_out_and_too_few_scored_drops():
    sel = pick([None, 0.2, None, 0.8])
    assert (sel.chosen, sel.rejected) == (3, 1)
    assert pick([None, None, 0.3, None]).reason == "unscored"
    assert pick([None, None, None, None]).reason == "unscored"


def test_byte_identical_answers_never_form_a_pair():
    # The worst-scored answer is the same text as the best: the next distinct answer is the rejected one.
    sel = pick([0.9, 0.5, 0.7, 0.9], texts=["x", "y", "z", "x"])
    assert (sel.chosen, sel.rejected) == (0, 1)
    assert pick([0.9, 0.1, 0.3, 0.5], texts=["same"] * 4).reason == "identical"


def test_length_penalty_is_reward_minus_coef_times_tokens():
    # Raw: answer 0 best (1.0), answer 1 worst (0.6). With 0.01 per token the long answer 0 falls below.
    lens = [100, 10, 20, 30]
    assert adjusted_scores(
        [1.0, 0.6, 0.8, 0.9], lens, DONE, PairSelectionConfig(length_penalty=0.01)
    ) == pytest.approx([0.0, 0.5, 0.6, 0.6])
    sel = pick([1.0, 0.6, 0.8, 0.9], lens=lens, length_penalty=0.01)
    assert (sel.chosen, sel.rejected) == (2, 0)


def test_unfinished_answers_are_penalised():
    sel = pick([1.0, 0.2, 0.5, 0.4], done=[False, True, True, True], unfinished_penalty=1.0)
    assert (sel.chosen, sel.rejected) == (2, 0)


def test_best_random_takes_a_distinct_other_answer_seeded():
    picks = {pick([0.9, 0.1, 0.3, 0.5], strategy="best_random", seed=s).rejected for s in range(40)}
    assert picks == {1, 2, 3}
    a = pick([0.9, 0.1, 0.3, 0.5], strategy="best_random", seed=7)
    b = pick([0.9, 0.1, 0.3, 0.5], strategy="best_random", seed=7)
    assert (a.chosen, a.rejected) == (b.chosen, b.rejected) and a.chosen == 0


def test_negative_settings_are_refused():
    with pytest.raises(ValueError, match="min_margin"):
        PairSelectionConfig(min_margin=-1)


def test_greedy_anchor_puts_the_greedy_answer_in_every_pair():
    # Answer 0 is the greedy one. A sample beats it: (best sample, greedy), the margin between those two.
    sel = pick([0.2, 0.9, -0.5, 0.1], strategy="greedy_anchor")
    assert (sel.chosen, sel.rejected, sel.reason) == (1, 0, None)
    assert sel.margin == pytest.approx(0.7)
    # The greedy answer beats every sample: (greedy, worst sample).
    sel = pick([1.0, 0.9, -0.5, 0.1], strategy="greedy_anchor")
    assert (sel.chosen, sel.rejected) == (0, 2)
    assert sel.margin == pytest.approx(1.5)
    # best_worst on the first table leaves the greedy answer out.
    assert (pick([0.2, 0.9, -0.5, 0.1]).chosen, pick([0.2, 0.9, -0.5, 0.1]).rejected) == (1, 2)


def test_greedy_anchor_ties_margins_none_and_identical_answers():
    # The best sample only ties the greedy answer, which beats nothing else either: a tie, never a pair.
    assert pick([0.5, 0.5, 0.5, 0.5], strategy="greedy_anchor").reason == "tie"
    # Greedy equals the best sample and beats the worst: (greedy, worst).
    sel = pick([0.5, 0.5, 0.1, 0.3], strategy="greedy_anchor")
    assert (sel.chosen, sel.rejected) == (0, 2)
    assert pick([0.5, 0.6, 0.4, 0.45], strategy="greedy_anchor", min_margin=0.2).reason == "small_margin"
    # The greedy answer unscored: no anchor, no pair (even though the samples could form one).
    assert pick([None, 0.9, 0.1, 0.5], strategy="greedy_anchor").reason == "unscored"
    # Samples identical to the greedy text are not its partner; none distinct: identical.
    sel = pick([0.2, 0.9, 0.1, 0.5], texts=["g", "g", "y", "z"], strategy="greedy_anchor")
    assert (sel.chosen, sel.rejected) == (3, 0)
    assert pick([0.2, 0.9, 0.1, 0.5], texts=["g"] * 4, strategy="greedy_anchor").reason == "identical"


# chosen_must_pass: where a verifier judged the prompt, only an answer it passed may be chosen.


def test_a_verifier_limits_the_chosen_answer_to_one_that_passed():
    # Answer 0 scores highest (the reward model liked it) but failed the verifier; 1 is the best that passed.
    sel = pick([3.0, 2.0, -1.0, 0.5], passed=[False, True, False, True])
    assert (sel.chosen, sel.rejected, sel.reason) == (1, 2, None)
    assert sel.margin == pytest.approx(3.0)  # 2.0 - (-1.0)


def test_a_prompt_no_answer_passed_is_dropped_as_unverified():
    sel = pick([3.0, 2.0, -1.0, 0.5], passed=[False, False, False, False])
    assert not sel.ok and sel.reason == "unverified" and sel.chosen is None


def test_a_prompt_no_verifier_judged_keeps_the_plain_best():
    # No gold answer: every answer is None for the verifier, so the reward model alone decides.
    sel = pick([3.0, 2.0, -1.0, 0.5], passed=[None, None, None, None])
    assert (sel.chosen, sel.rejected) == (0, 2)


def test_greedy_anchor_drops_a_pair_whose_chosen_answer_failed():
    # The greedy answer 0 beats every sample, so the pair is (0, worst) - but 0 failed the verifier.
    sel = pick([3.0, 2.0, -1.0, 0.5], strategy="greedy_anchor", passed=[False, True, False, True])
    assert sel.reason == "unverified"
    sel = pick([1.0, 2.0, -1.0, 0.5], strategy="greedy_anchor", passed=[False, True, False, True])
    assert (sel.chosen, sel.rejected) == (1, 0)  # sampled 1 beats the greedy answer, and it passed


def test_unverified_judge_keeps_a_prompt_no_answer_passed_as_an_unverified_pair_by_score():
    sel = pick([3.0, 2.0, -1.0, 0.5], passed=[False, False, False, False], unverified="judge")
    assert (sel.chosen, sel.rejected, sel.reason, sel.verified) == (0, 2, None, False)
    assert sel.margin == pytest.approx(4.0)  # 3.0 - (-1.0)
    # A prompt with a right answer still gets the verified pair, whatever the setting.
    sel = pick([3.0, 2.0, -1.0, 0.5], passed=[False, True, False, True], unverified="judge")
    assert (sel.chosen, sel.rejected, sel.verified) == (1, 2, True)
    # Ties and identical answers are still dropped for their own reasons.
    sel = pick([1.0, 1.0, 1.0, 1.0], passed=[False] * 4, unverified="judge")
    assert sel.reason == "tie"


def test_unverified_judge_with_greedy_anchor_keeps_only_prompts_with_no_right_answer():
    # No answer passed: the greedy-anchored pair (0, worst) is kept, unverified.
    sel = pick([3.0, 2.0, -1.0, 0.5], strategy="greedy_anchor", passed=[False] * 4, unverified="judge")
    assert (sel.chosen, sel.rejected, sel.verified) == (0, 2, False)
    # A right answer exists (1) but the pair chose the failed greedy answer: dropped, as with drop.
    sel = pick(
        [3.0, 2.0, -1.0, 0.5], strategy="greedy_anchor", passed=[False, True, False, True], unverified="judge"
    )
    assert sel.reason == "unverified"


def test_verified_needs_full_marks_from_every_named_verifier_that_judged():
    components = {
        "math": [1.0, 0.0, None, None, 1.0],
        "code": [None, 1.0, 0.5, None, 1.0],
        "reward_model": [-3.0, 2.0, 1.0, 0.0, 0.0],  # not named: never a verifier here
    }
    assert verified(components, ["math", "code"]) == [True, False, False, None, True]
    assert verified(components, ["math"]) == [True, False, None, None, True]


def test_a_label_listed_twice_is_an_error():
    with pytest.raises(ValueError, match="chosen_must_pass"):
        PairSelectionConfig(chosen_must_pass=["math", "math"])
    with pytest.raises(ValueError, match="rejected_must_pass"):
        PairSelectionConfig(rejected_must_pass=["arithmetic", "arithmetic"])


# rejected_must_pass: an answer a named verifier judged and failed is never the rejected one.


def test_the_rejected_answer_is_the_worst_that_passed_or_was_not_judged():
    # Answers 2 (-1.0, the worst) and 3 (0.5) slipped in their arithmetic; 0 is chosen, so 1 is the worst allowed.
    sel = pick([3.0, 2.0, -1.0, 0.5], rejected_ok=[True, True, False, False])
    assert (sel.chosen, sel.rejected) == (0, 1)
    assert sel.margin == pytest.approx(1.0)  # 3.0 - 2.0
    # Not judged (None: e.g. no equation written) may be rejected: 3 is now the worst allowed.
    sel = pick([3.0, 2.0, -1.0, 0.5], rejected_ok=[True, True, False, None])
    assert (sel.chosen, sel.rejected) == (0, 3)
    # The chosen answer itself may have failed it: the rule limits the rejected answer only.
    sel = pick([3.0, 2.0, -1.0, 0.5], rejected_ok=[False, False, True, True])
    assert (sel.chosen, sel.rejected) == (0, 2)


def test_a_prompt_with_no_allowed_rejected_answer_is_dropped_as_no_rejected():
    sel = pick([3.0, 2.0, -1.0, 0.5], rejected_ok=[True, False, False, False])
    assert not sel.ok and sel.reason == "no_rejected" and sel.chosen is None
    # With the chosen answer limited too: 1 is chosen (it passed), 0 and 3 may not be rejected, 2 may.
    sel = pick(
        [3.0, 2.0, -1.0, 0.5], passed=[False, True, False, True], rejected_ok=[False, True, True, False]
    )
    assert (sel.chosen, sel.rejected) == (1, 2)
    # best_random draws among the allowed answers only.
    for seed in range(20):
        sel = pick(
            [3.0, 2.0, -1.0, 0.5], seed=seed, strategy="best_random", rejected_ok=[True, True, False, False]
        )
        assert (sel.chosen, sel.rejected) == (0, 1)


def test_greedy_anchor_drops_a_pair_whose_rejected_answer_failed():
    # The greedy answer 0 beats every sample: (0, worst sampled = 2), but 2 slipped.
    sel = pick([3.0, 2.0, -1.0, 0.5], strategy="greedy_anchor", rejected_ok=[True, True, False, True])
    assert sel.reason == "no_rejected"
    # A sample beats the greedy answer: (1, 0), and the greedy answer's arithmetic holds.
    sel = pick([1.0, 2.0, -1.0, 0.5], strategy="greedy_anchor", rejected_ok=[True, True, False, True])
    assert (sel.chosen, sel.rejected) == (1, 0)


def test_an_unverified_pair_reaches_the_loss_without_the_nll_term():
    """pick_pairs marks the pair of a prompt with no right answer, and preference_step leaves the NLL term out of
    it. The fake policy gives every answer token log-prob w = -1 (reference equal, so each DPO term is log 2):
    chosen answers of 2 tokens, NLL 2 / 2 = 1; the step's loss is the mean over its 2 pairs, (log 2 + 1 + log 2)/2
    with the mask, log 2 + 1 without."""

    def group(*token_lists):
        return [Completion(f"answer {t}", t, True) for t in token_lists]

    answers = [group([5, 6], [7], [8, 9, 10]), group([11, 12], [13], [14, 15, 16])]
    scores = [[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]]
    passed = [[True, False, False], [False, False, False]]  # prompt 1: no right answer
    cfg = PairSelectionConfig(chosen_must_pass=["math"], unverified="judge")
    pairs, drops, _, rows = pick_pairs(
        [0, 1], answers, scores, [[1, 2], [3, 4]], cfg, random.Random(0), passed
    )
    assert [p.nll for p in pairs] == [True, False] and [r["verified"] for r in rows] == [True, False]
    assert drops["unverified"] == 0
    # The same prompts with rejected_must_pass: prompt 0's worst answer (2) failed it, so its pair rejects 1;
    # prompt 1 has no answer it allows other than the chosen one, so it is dropped and counted.
    rejected_ok = [[True, True, False], [True, False, False]]
    got, got_drops, _, got_rows = pick_pairs(
        [0, 1], answers, scores, [[1, 2], [3, 4]], cfg, random.Random(0), passed, rejected_ok
    )
    assert [(r["chosen"], r["rejected"], r["dropped"]) for r in got_rows] == [
        (0, 1, None),
        (None, None, "no_rejected"),
    ]
    assert got_drops["no_rejected"] == 1 and got[0].rejected == answer_sequence([1, 2], [7])

    class Policy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))

        def forward(self, input_ids, position_ids, labels):
            return self.w.expand(int((labels != IGNORE).sum()))

    accelerator = SimpleNamespace(device="cpu", num_processes=1, backward=lambda loss: loss.backward())
    reference = Reference("model", frozen=Policy())  # the same log-probs: each DPO term is log 2
    loss_cfg = LossConfig(name="sigmoid", beta=0.1, nll_weight=1.0)

    def step_loss(pairs):  # the mean loss over the step's pairs
        return preference_step(Policy(), reference, pairs, None, loss_cfg, accelerator, len(pairs))[
            "loss"
        ].item() / len(pairs)

    assert step_loss(pairs) == pytest.approx((2 * math.log(2) + 1) / 2, rel=1e-12)
    for p in pairs:
        p.nll = True
    assert step_loss(pairs) == pytest.approx(math.log(2) + 1, rel=1e-12)


def ladder(scores, texts, passed=None, rejected_ok=None, seed=0, **cfg):
    cfg = PairSelectionConfig(**cfg)
    n = len(scores)
    got = select_pairs(scores, texts, [10] * n, [True] * n, cfg, random.Random(seed), passed, rejected_ok)
    return [(s.chosen, s.rejected, s.reason) for s in got]


def test_per_prompt_takes_a_ladder_of_pairs_over_answers_no_earlier_pair_used():
    s = [0.9, 0.1, 0.5, 0.7, 0.3, 0.2]
    texts = ["a", "b", "c", "d", "e", "f"]
    # Best 0.9 (0) vs worst 0.1 (1); then 0.7 (3) vs 0.2 (5); then 0.5 (2) vs 0.3 (4).
    assert ladder(s, texts, per_prompt=3) == [(0, 1, None), (3, 5, None), (2, 4, None)]
    assert ladder(s, texts, per_prompt=2) == [(0, 1, None), (3, 5, None)]
    assert ladder(s, texts, per_prompt=1) == [(0, 1, None)]  # the default: select_pair's one pair
    assert ladder(s, texts, per_prompt=9) == ladder(s, texts, per_prompt=3)  # 6 answers make 3 pairs at most
    # An answer whose text an earlier pair holds is never used again: "d" (3) is the text of answer 0, so the
    # second pair is 2 vs 5, and the third would be 4 alone: no pair.
    assert ladder(s, ["a", "b", "c", "a", "e", "f"], per_prompt=3) == [(0, 1, None), (2, 5, None)]
    # A tie ends the ladder: after (0, 1) the rest score 0.5 each.
    assert ladder([0.9, 0.1, 0.5, 0.5], texts[:4], per_prompt=3) == [(0, 1, None)]
    # A prompt with no pair: one failed selection with its reason, as select_pair gives it.
    assert ladder([0.5, 0.5, 0.5], texts[:3], per_prompt=3) == [(None, None, "tie")]


def test_per_prompt_keeps_every_pair_verified_and_each_rejected_answer_allowed():
    s = [3.0, 2.5, 2.0, 1.0, 0.5, 0.0]
    texts = ["a", "b", "c", "d", "e", "f"]
    cfg = dict(chosen_must_pass=["math"], unverified="judge", per_prompt=3)
    # Two right answers (0, 2): the ladder stops where no right answer is left, never making an unverified
    # pair after a verified one (pair 3 would be 1 vs 4 by score alone).
    passed = [True, False, True, False, False, False]
    assert ladder(s, texts, passed, **cfg) == [(0, 5, None), (2, 4, None)]
    # Answers 4 and 5 may not be rejected: the first rung rejects 3; the second would reject 1, which scores
    # above 2 (2.5 against 2.0), a negative margin, so the ladder ends.
    rejected_ok = [True, True, True, True, False, False]
    assert ladder(s, texts, passed, rejected_ok, **cfg) == [(0, 3, None)]
    assert ladder([3.0, 1.5, 2.0, 1.0, 0.5, 0.0], texts, passed, rejected_ok, **cfg) == [
        (0, 3, None),
        (2, 1, None),
    ]
    # No right answer at all: every pair is an unverified one, by score.
    assert ladder(s, texts, [False] * 6, **cfg) == [(0, 5, None), (1, 4, None), (2, 3, None)]


def test_per_prompt_above_one_is_refused_for_greedy_anchor_and_below_one_always():
    with pytest.raises(ValueError, match="per_prompt"):
        PairSelectionConfig(strategy="greedy_anchor", per_prompt=2)
    with pytest.raises(ValueError, match="per_prompt"):
        PairSelectionConfig(per_prompt=0)


def test_pick_pairs_trains_on_every_rung_and_counts_a_prompt_once():
    def group(*token_lists):
        return [Completion(f"answer {t}", t, True) for t in token_lists]

    answers = [group([5], [6], [7], [8]), group([9], [10], [11], [12])]
    scores = [[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]]  # prompt 1: all tied
    cfg = PairSelectionConfig(per_prompt=2)
    pairs, drops, margins, rows = pick_pairs([0, 1], answers, scores, [[1], [2]], cfg, random.Random(0))
    assert [(p.chosen, p.rejected) for p in pairs] == [
        (answer_sequence([1], [5]), answer_sequence([1], [8])),
        (answer_sequence([1], [6]), answer_sequence([1], [7])),
    ]
    assert margins == [3.0, 1.0] and drops["tie"] == 1
    assert [(r["chosen"], r["rejected"], r["more_pairs"]) for r in rows] == [
        (0, 3, [[1, 2]]),
        (None, None, []),
    ]
