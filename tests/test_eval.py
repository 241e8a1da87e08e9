"""Held-out evaluation (alignment/eval.py and the metric functions of alignment/evaluation.py): scores counted by
hand on fixed answers, ties in the win rate, the start model's answer cache, missing metrics named with their
reason (never a silent 0), bad config and data failing before any model loads, and the CLI end to end on
tiny-qwen2."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from alignment.config import ConfigError, load_config
from alignment.data import DataError, PromptExample, encode_prompt
from alignment.eval import EvalConfig, Report
from alignment.evaluation import (
    cache_key,
    cached_values,
    code_pass_at_1,
    fingerprint_weights,
    greedy_answers,
    ifeval_accuracy,
    judged_scores,
    mean_reward,
    win_outcomes,
    win_rate,
)
from alignment.generation import Completion
from alignment.models import load_tokenizer
from reward.base import RewardOutput
from tests.conftest import REPO, write_jsonl


class FixedAnswers:
    """A Generator test double: the i-th prompt of a call gets texts[i]; records what it was asked."""

    name = "fixed"

    def __init__(self, texts: list[str]):
        self.texts, self.calls = texts, []

    def generate(self, prompt_ids, n, sampling):
        self.calls.append((prompt_ids, n, sampling))
        return [[Completion(self.texts[i], [7] * (i + 1), True)] * n for i in range(len(prompt_ids))]

    def load_weights(self, named_tensors):
        pass

    def sequence_logprobs(self, prompt_ids, answer_ids):
        return [0.0] * len(answer_ids)

    def close(self):
        pass


def ex(prompt: str, **columns) -> PromptExample:
    return PromptExample([{"role": "user", "content": prompt}], columns)


class Continues:
    """A Generator test double that continues an answer prefix the way a model with a right plan would."""

    name = "continues"
    AFTER = {"4 × 5 = 20": ", so 20 + 3 = 24. The answer is 24.", "20 + 3 = 23": ". The answer is 23."}  # fmt: skip

    def __init__(self, tokenizer):
        self.tok, self.calls = tokenizer, 0

    def generate(self, prompt_ids, n, sampling):
        assert sampling.temperature == 0.0
        self.calls += 1
        out = []
        for ids in prompt_ids:
            text = self.tok.decode(ids)
            tail = next(v for k, v in self.AFTER.items() if text.endswith(k))
            out.append([Completion(tail, self.tok(tail, add_special_tokens=False).input_ids, True)])
        return out


def test_right_arithmetic_fixes_each_first_slip_and_lets_the_model_go_on(qwen_tokenizer):
    from alignment.evaluation import math_correct, right_arithmetic_answers

    rows = [ex("4 kids get 5 each, then 3 more.", answer="23"), ex("Same again.", answer="23"),
            ex("No slip.", answer="23")]  # fmt: skip
    texts = ["4 × 5 = 21, so 21 + 3 = 24. The answer is 24.", "4 × 5 = 20, so 20 + 3 = 24. The answer is 24.",
             "4 × 5 = 20, so 20 + 3 = 23. The answer is 23."]  # fmt: skip
    gen = Continues(qwen_tokenizer)
    fixed = right_arithmetic_answers(gen, qwen_tokenizer, rows, texts, rounds=3, max_new_tokens=32)
    # row 0: 21 -> 20, the model goes on and slips again (24), fixed in round 2; row 1: one slip; row 2: none
    assert fixed == ["4 × 5 = 20, so 20 + 3 = 23. The answer is 23."] * 3
    assert math_correct(fixed, rows) == [True] * 3 and math_correct(texts, rows) == [False, False, True]
    assert gen.calls == 2  # a third round has nothing left to fix
    once = right_arithmetic_answers(Continues(qwen_tokenizer), qwen_tokenizer, rows, texts, 1, 32)
    assert once[0] == "4 × 5 = 20, so 20 + 3 = 24. The answer is 24." and once[1] == fixed[1]
    assert right_arithmetic_answers(gen, qwen_tokenizer, rows, texts, 0, 32) == texts


# --------------------------------------------------------------------------------------------------------------
# Instruction following: strict (per prompt) vs per constraint
# --------------------------------------------------------------------------------------------------------------

IFEVAL_ROWS = [
    ex("a", constraints=[{"type": "all_lowercase"}, {"type": "no_commas"}]),
    ex(
        "b",
        constraints=[
            {"type": "all_lowercase"},
            {"type": "no_commas"},
            {"type": "word_count", "relation": "at least", "num_words": 3},
        ],
    ),  # fmt: skip
    ex("c", constraints=json.dumps([{"type": "all_uppercase"}])),  # a JSON string of the list works too
]
# Row a: both hold. Row b: lowercase holds, a comma, 2 words < 3: 1 of 3. Row c: not all uppercase: 0 of 1.
IFEVAL_ANSWERS = ["hello world", "hello, world", "Hi THERE"]


def test_ifeval_strict_counts_prompts_whose_every_constraint_holds_and_the_other_counts_each(qwen_tokenizer):
    gen = FixedAnswers(IFEVAL_ANSWERS)
    answers = greedy_answers(gen, qwen_tokenizer, IFEVAL_ROWS, max_new_tokens=12)
    strict, each = ifeval_accuracy([a.text for a in answers], IFEVAL_ROWS)
    assert strict == pytest.approx(1 / 3)  # row a only
    assert each == pytest.approx(3 / 6)  # 2 + 1 + 0 of 2 + 3 + 1 constraints
    # The generator saw the encoded prompts, one greedy answer each.
    prompt_ids, n, sampling = gen.calls[0]
    assert prompt_ids == [encode_prompt(qwen_tokenizer, e.prompt) for e in IFEVAL_ROWS]
    assert n == 1 and sampling.temperature == 0.0 and sampling.max_new_tokens == 12


def test_ifeval_bad_constraint_names_the_row():
    rows = [IFEVAL_ROWS[0], ex("d", constraints=[{"type": "no_such_check"}])]
    with pytest.raises(
        ValueError, match=r"row 2: field 'constraints': constraint 0: unknown type 'no_such_check'"
    ):
        ifeval_accuracy(["x", "y"], rows)


# --------------------------------------------------------------------------------------------------------------
# Code: pass@1, and problems the sandbox could not run left out, not failed
# --------------------------------------------------------------------------------------------------------------


class FixedScores:
    name = "fixed_scores"

    def __init__(self, scores, reasons=None):
        self.scores, self.reasons, self.seen = scores, reasons, []

    def __call__(self, prompts, completions, **columns):
        self.seen.append((list(completions), columns))
        return RewardOutput(list(self.scores), list(self.reasons or [None] * len(self.scores)))


def test_code_pass_at_1_needs_every_test_and_leaves_unrunnable_problems_out():
    rows = [ex("p", tests="t", entry_point="f")] * 4
    reward = FixedScores(
        [1.0, 0.5, None, 0.0], [None, None, "the sandbox could not run the program: x", None]
    )
    rate, unjudged = code_pass_at_1(["a", "b", "c", "d"], rows, reward)
    assert rate == pytest.approx(1 / 3)  # 1.0 passes; 0.5 (half the tests) does not; None is not judged
    assert unjudged == ["the sandbox could not run the program: x"]
    assert reward.seen[0][1]["entry_point"] == ["f"] * 4  # the row's columns reach the reward
    rate, unjudged = code_pass_at_1(["a"], rows[:1], FixedScores([None], ["no sandbox"]))
    assert math.isnan(rate) and unjudged == ["no sandbox"]


def test_code_pass_at_1_in_the_real_sandbox_on_humaneval():
    from alignment.evaluation import load_prompts
    from reward.code_reward import CodeReward

    rows = load_prompts(REPO / "data/eval/code.jsonl", 2)
    right = f"```python\n{rows[0].columns['code_prefix']}{rows[0].columns['canonical_solution']}```"
    wrong = f"```python\n{rows[1].columns['code_prefix']}    return []\n```"
    rate, unjudged = code_pass_at_1([right, wrong], rows, CodeReward(timeout_s=10.0, max_workers=2))
    assert rate == 0.5 and unjudged == []


def test_a_sandbox_that_cannot_run_makes_code_missing_with_the_reason_not_zero(monkeypatch):
    import reward.code_reward
    from alignment.eval import code_reward, score_code

    def refuses(**kwargs):
        raise RuntimeError("sandbox isolation layer(s) pid_namespace required but not active here")

    monkeypatch.setattr(reward.code_reward, "CodeReward", refuses)
    report = Report()
    assert code_reward(EvalConfig(), report) is None
    assert "pid_namespace required" in report.missing["eval/code_pass@1"]
    assert "eval/code_pass@1" not in report.metrics
    # A sandbox that starts but runs no program at all: missing too.
    report = Report()
    score_code(["a"], [ex("p", tests="t", entry_point="f")], FixedScores([None], ["launcher failed"]), report)
    assert report.missing == {"eval/code_pass@1": "the sandbox ran no program: launcher failed"}
    assert report.metrics == {}


# --------------------------------------------------------------------------------------------------------------
# Fresh samples and the comparison of two evaluations, prompt by prompt
# --------------------------------------------------------------------------------------------------------------


def test_mean_reward_gives_each_prompts_own_mean_and_leaves_unscored_samples_out(qwen_tokenizer):
    from alignment.generation import SamplingConfig

    # 3 prompts x 2 samples, scored in order: prompt 1 (1, 3), prompt 2 (None, 4), prompt 3 (None, None).
    reward = FixedScores([1.0, 3.0, None, 4.0, None, None])
    mean, answers, _, per_prompt = mean_reward(
        FixedAnswers(["a", "b", "c"]),
        qwen_tokenizer,
        [ex("p1"), ex("p2"), ex("p3")],
        reward,
        SamplingConfig(),
        2,
    )
    assert per_prompt == {"reward": [2.0, 4.0, None]}  # a reward with no components gives only its own
    assert mean == pytest.approx((1 + 3 + 4) / 3)  # over the scored samples, not the prompts
    assert [len(a) for a in answers] == [2, 2, 2]


def test_mean_reward_gives_each_components_per_prompt_mean_too(qwen_tokenizer):
    from alignment.generation import SamplingConfig
    from reward import RewardSpec, build_reward

    # 2 prompts x 2 answers: the math reward against golds 4 and 5 (weight 2), the arithmetic check beside it
    # (weight 0: a component the rows carry, no part of the sum).
    reward = build_reward([RewardSpec("math", weight=2.0), RewardSpec("arithmetic", weight=0.0)])
    answers = FixedAnswers(["2 + 2 = 4. The answer is 4.", "2 + 2 = 6. The answer is 6."])
    _, _, components, per_prompt = mean_reward(
        answers, qwen_tokenizer, [ex("p1", answer="4"), ex("p2", answer="5")], reward, SamplingConfig(), 2
    )
    assert per_prompt == {"reward": [2.0, 0.0], "reward/math": [1.0, 0.0], "reward/arithmetic": [1.0, 0.0]}
    assert components == {"math": 0.5, "arithmetic": 0.5}


# --------------------------------------------------------------------------------------------------------------
# Win rate
# --------------------------------------------------------------------------------------------------------------


def test_win_rate_counts_ties_as_half_and_leaves_unscored_prompts_out():
    rate, n = win_rate([2.0, 0.5, None, 2.0, 1.0], [1.0, 0.5, 1.0, 3.0, 0.0])
    assert n == 4 and rate == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    rate, n = win_rate([None], [1.0])
    assert n == 0 and math.isnan(rate)


class LengthJudge:
    """Scores an answer by its length plus a tiny amount that depends on its place in the batch, as a real
    reward model's last bits do; counts how often each text was scored."""

    name = "length_judge"

    def __init__(self):
        self.scored: list[str] = []

    def __call__(self, prompts, completions, **columns):
        self.scored += completions
        return RewardOutput([len(c) + 1e-9 * i for i, c in enumerate(completions)])


def test_judged_scores_identical_answers_tie_exactly_and_the_baseline_is_not_rescored():
    judge = LengthJudge()
    answers, baseline = ["aaa", "b", "same", "same"], ["a", "bbb", "same", "other!"]
    baseline_scores = judge(["p1", "p2", "p3", "p4"], baseline).scores  # as cached by an earlier evaluation
    judge.scored = []
    scores = judged_scores(judge, ["p1", "p2", "p3", "p4"], answers, baseline, baseline_scores)
    assert judge.scored == ["aaa", "b", "same"]  # the answer identical to the baseline's takes its score
    assert scores[2] == baseline_scores[2]
    assert win_outcomes(scores, baseline_scores) == [1.0, 0.0, 0.5, 0.0]
    rate, n = win_rate(scores, baseline_scores)
    assert n == 4 and rate == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    # A baseline answer the judge could not score leaves its prompt out: no verdict there.
    scores = judged_scores(judge, ["p1", "p2"], ["aaa", "b"], ["a", "b"], [1.0, None])
    assert win_outcomes(scores, [1.0, None]) == [1.0, None]
    assert win_rate(scores, [1.0, None]) == (1.0, 1)


def test_a_judge_that_cannot_score_the_start_answers_makes_the_win_rate_missing_and_caches_nothing(
    tmp_path, monkeypatch, tiny_qwen2
):
    import reward.model
    from alignment.eval import judge_against_start

    class Fails:
        def __init__(self, *a, **k):
            pass

        def __call__(self, prompts, completions, **columns):
            return RewardOutput(
                [None] * len(completions), ["reward model failed: OutOfMemoryError: x"] * len(completions)
            )

    monkeypatch.setattr(reward.model, "RewardModelScorer", Fails)
    cfg = EvalConfig(model="tiny-qwen2", start_model="tiny-qwen2", reward_model="rm", cache_dir=str(tmp_path))
    rows = [ex("What is 1 + 1?", answer="2"), ex("What is 2 + 2?", answer="4")]
    answers = [Completion("2", [1], True), Completion("4", [1], True)]
    report = Report()
    judge_against_start(cfg, tiny_qwen2, tiny_qwen2, "rm", load_tokenizer(tiny_qwen2), rows, answers, report)
    assert report.missing == {
        "eval/win_rate": "the reward model could not score the start model's answers: reward model failed: "
        "OutOfMemoryError: x"
    }
    assert "eval/win_rate" not in report.metrics
    assert len(list(tmp_path.glob("*.json"))) == 1  # the start model's answers (its own here), no scores


# --------------------------------------------------------------------------------------------------------------
# The start model's answer cache
# --------------------------------------------------------------------------------------------------------------


def test_answer_cache_hits_on_the_same_key_and_misses_on_another(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return ["x", None]

    key = cache_key("answers", "weights", [[1, 2], [3]], {"max_new_tokens": 8})
    f = tmp_path / f"{key}.json"
    assert cached_values(f, key, 2, compute) == (["x", None], False)
    assert cached_values(f, key, 2, compute) == (["x", None], True) and len(calls) == 1
    assert cached_values(f, key, 3, compute) == (["x", None], False) and len(calls) == 2  # another count
    assert cached_values(f, "another", 2, compute) == (["x", None], False) and len(calls) == 3
    f.write_text('{"key": "trunc')  # a damaged file is computed again, never trusted
    assert cached_values(f, key, 2, compute) == (["x", None], False) and len(calls) == 4
    # Every input of the key changes it.
    keys = {
        key,
        cache_key("scores", "weights", [[1, 2], [3]], {"max_new_tokens": 8}),
        cache_key("answers", "weights2", [[1, 2], [3]], {"max_new_tokens": 8}),
        cache_key("answers", "weights", [[1, 2], [4]], {"max_new_tokens": 8}),
        cache_key("answers", "weights", [[1], [2, 3]], {"max_new_tokens": 8}),
        cache_key("answers", "weights", [[1, 2], [3]], {"max_new_tokens": 9}),
    }
    assert len(keys) == 6


def test_weight_fingerprint_follows_the_weights_not_the_eval_output(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    fp = fingerprint_weights(str(folder))
    (folder / "eval.json").write_text("{}")
    (folder / "recipe.yaml").write_text("a: 1")
    assert fingerprint_weights(str(folder)) == fp
    (folder / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert fingerprint_weights(str(folder)) != fp


# --------------------------------------------------------------------------------------------------------------
# Config and data errors, before any model loads
# --------------------------------------------------------------------------------------------------------------


def test_every_metric_key_is_a_typed_config_key():
    with pytest.raises(
        ConfigError,
        match=r"recipes/eval.yaml: math\.pathh: unknown key \(allowed under math: max_prompts, path\)",
    ):
        load_config(EvalConfig, REPO / "recipes/eval.yaml", ["math.pathh=x"])
    with pytest.raises(ConfigError, match=r"kl_promts: unknown key"):
        load_config(EvalConfig, REPO / "recipes/eval.yaml", ["kl_promts=3"])
    with pytest.raises(ConfigError, match=r"prompt_set: expected one of 'math', 'ifeval', 'code'"):
        load_config(EvalConfig, None, ["prompt_set=poems"])
    with pytest.raises(
        ConfigError, match=r"the win rate use the prompts of prompt_set \(math\), whose path is null"
    ):
        load_config(EvalConfig, None, ["start_model=a", "reward_model=b", "math.path=null"])


def test_cli_bad_key_is_one_line_with_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "-m", "alignment.eval", "recipes/eval.yaml", "ifeval.max_prompt=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: recipes/eval.yaml: ifeval.max_prompt: unknown key (allowed under ifeval: max_prompts, path)"
    ]


@pytest.fixture
def no_models(monkeypatch):
    import alignment.eval as ev

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(ev, "make_generator", refuse)


def test_bad_rows_and_missing_folders_fail_before_any_model_loads(tmp_path, no_models):
    from alignment.eval import main

    base = [str(REPO / "recipes/eval.yaml"), "model=tiny-qwen2", "start_model=null", "reward_model=null",
            "reference_model=null", "code.path=null", f"output={tmp_path / 'e.json'}"]  # fmt: skip
    bad_ifeval = write_jsonl(tmp_path / "if.jsonl", [{"prompt": "hi", "constraints": [{"type": "all_lowercase"}]},
                                                     {"prompt": "hi", "constraints": [{"type": "nope"}]}])  # fmt: skip
    with pytest.raises(
        DataError, match=r"if.jsonl: row 2: field 'constraints': constraint 0: unknown type 'nope'"
    ):
        main([*base, f"ifeval.path={bad_ifeval}"])
    no_answer = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "What is 1 + 1?"}])
    with pytest.raises(DataError, match=r"m.jsonl: row 1: field 'answer': missing"):
        main([*base, f"math.path={no_answer}"])
    with pytest.raises(ConfigError, match=r"reward_model: .*no-such-rm: no such model folder.*make reward"):
        main([*base, "start_model=tiny-qwen2", f"reward_model={tmp_path / 'no-such-rm'}"])
    with pytest.raises(
        ConfigError, match=r"reference_model: outputs/no-such-sft: no such model folder, nor a hub"
    ):
        main([*base, "reference_model=outputs/no-such-sft"])  # looks like a hub id
    with pytest.raises(ConfigError, match=r"math.path: .*nope.jsonl: no such file"):
        main([*base, f"math.path={tmp_path / 'nope.jsonl'}"])


# --------------------------------------------------------------------------------------------------------------
# End to end on tiny-qwen2
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_qwen2):
    """A perturbed copy of tiny-qwen2 (the model under evaluation) and a reward model with a seeded head."""
    from transformers import AutoModelForCausalLM

    from alignment.models import load_tokenizer
    from reward.model import load_reward_model

    root = tmp_path_factory.mktemp("eval_models")
    tok = load_tokenizer(tiny_qwen2)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    torch.manual_seed(0)
    rm, rm_tok = load_reward_model(tiny_qwen2)
    rm.save_pretrained(root / "rm")
    rm_tok.save_pretrained(root / "rm")
    return str(root / "policy"), str(root / "rm")


def eval_args(tmp_path, policy, rm, *overrides) -> list[str]:
    def first(name, n):
        rows = [json.loads(line) for line in open(REPO / f"data/eval/{name}.jsonl")][:n]
        return write_jsonl(tmp_path / f"{name}.jsonl", rows)

    return [
        "recipes/eval.yaml", f"model={policy}", "start_model=tiny-qwen2", f"reward_model={rm}",
        "reference_model=tiny-qwen2", f"math.path={first('math', 3)}", f"ifeval.path={first('ifeval', 3)}",
        f"code.path={first('code', 2)}", "max_new_tokens=8", "kl_prompts=2", "general_text_chunks=1",
        "generation.backend=transformers", "generation.max_model_len=1024", f"cache_dir={tmp_path / 'cache'}",
        *overrides,
    ]  # fmt: skip


METRICS = ("eval/math_accuracy", "eval/ifeval_strict", "eval/ifeval_constraint_accuracy", "eval/code_pass@1",
           "eval/win_rate", "eval/kl_to_reference", "eval/general_text_nll")  # fmt: skip
TIMES = ("time/greedy_answers", "time/math_accuracy", "time/ifeval", "time/code_pass@1", "time/win_rate", "time/kl_to_reference",
         "time/general_text_nll", "time/total")  # fmt: skip


def test_cli_end_to_end_then_the_start_answers_come_from_the_cache(
    tmp_path, tiny_models, capsys, monkeypatch
):
    import reward.code_reward
    from alignment.eval import main

    policy, rm = tiny_models
    proc = subprocess.run(
        [sys.executable, "-m", "alignment.eval", *eval_args(tmp_path, policy, rm)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "start model answers: cache miss" in proc.stdout
    result = json.loads(open(f"{policy}/eval.json").read())  # output: null -> <model>/eval.json
    assert result["model"] == policy and result["missing"] == {}
    assert result["prompts"] == {"math": 3, "ifeval": 3, "code": 2}
    for k in METRICS[:5]:
        assert 0.0 <= result[k] <= 1.0, k
    assert result["eval/kl_to_reference"] != 0.0  # the policy is a perturbed copy of the reference
    assert 5.0 < result["eval/general_text_nll"] < 20.0  # a random 151,646-token model: about ln(V) = 11.9
    assert all(result[t] > 0 for t in TIMES)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2  # the start model's answers and their scores
    # Every greedy answer beside the JSON, math ones with their verdict; the accuracy per task agrees with them.
    rows = [json.loads(line) for line in open(f"{policy}/eval.answers.jsonl")]
    assert result["answers"] == "eval.answers.jsonl"
    assert [(r["set"], r["row"]) for r in rows] == [("math", i) for i in range(3)] + [
        ("ifeval", i) for i in range(3)
    ] + [("code", i) for i in range(2)]
    math_rows = [r for r in rows if r["set"] == "math"]
    assert sum(r["correct"] for r in math_rows) / 3 == result["eval/math_accuracy"]
    by_task = {t: [r["correct"] for r in math_rows if r["task"] == t] for t in {r["task"] for r in math_rows}}
    assert result["math_by_task"] == {t: sum(v) / len(v) for t, v in sorted(by_task.items())}
    # The win rate's prompts (math) carry the judge's score and verdict; the mean verdict is the win rate.
    assert all(isinstance(r["judge_score"], float) and r["win"] in (0.0, 0.5, 1.0) for r in math_rows)
    assert sum(r["win"] for r in math_rows) / 3 == pytest.approx(result["eval/win_rate"])
    assert not any("win" in r for r in rows if r["set"] != "math")

    # Again, in process, with a sandbox that refuses to run and other metrics off: the start model's answers
    # come from the file (the same win rate), and code_pass@1 is missing with the sandbox's reason, not 0.
    def refuses(**kwargs):
        raise RuntimeError("sandbox isolation layer(s) pid_namespace required but not active here")

    monkeypatch.setattr(reward.code_reward, "CodeReward", refuses)
    out = tmp_path / "again.json"
    again = main(eval_args(tmp_path, policy, rm, "ifeval.path=null", "reference_model=null",
                           "general_text_chunks=0", f"output={out}"))  # fmt: skip
    log = capsys.readouterr().out
    assert "start model answers: cache hit" in log and "generating the start model's answers" not in log
    assert "the judge's scores of the start model's answers: cache hit" in log
    assert again["eval/win_rate"] == result["eval/win_rate"]
    assert "eval/code_pass@1" not in again and "time/code_pass@1" not in again  # no code answers generated
    assert (
        "eval/code_pass@1: MISSING: the sandbox cannot run here: sandbox isolation layer(s) pid_namespace"
        in log
    )
    assert json.loads(out.read_text())["missing"] == {
        "eval/code_pass@1": "the sandbox cannot run here: sandbox isolation layer(s) pid_namespace required but "
        "not active here",
        "eval/ifeval_strict": "skipped: ifeval.path is null",
        "eval/ifeval_constraint_accuracy": "skipped: ifeval.path is null",
        "eval/kl_to_reference": "skipped: reference_model is null or kl_prompts is 0",
        "eval/general_text_nll": "skipped: general_text_chunks is 0",
    }


def test_the_start_model_against_itself_reuses_its_answers_and_ties(
    tmp_path, tiny_models, capsys, tiny_qwen2
):
    from alignment.eval import main

    _, rm = tiny_models
    out = tmp_path / "self.json"
    result = main(eval_args(tmp_path, "tiny-qwen2", rm, "ifeval.path=null", "code.path=null",
                            "general_text_chunks=0", f"output={out}"))  # fmt: skip
    log = capsys.readouterr().out
    assert "the start model is the evaluated model" in log and "cache miss" in log
    assert result["eval/win_rate"] == 0.5  # every answer identical to the baseline's: all ties
    rows = [json.loads(line) for line in open(tmp_path / "self.answers.jsonl")]
    assert [r["win"] for r in rows if r["set"] == "math"] == [0.5] * 3
    assert result["eval/kl_to_reference"] == 0.0


def test_the_engine_precision_is_recorded_and_keys_the_start_models_answers(tmp_path, tiny_models, capsys):
    """bf16 answers are other answers: the start model's cached fp32 answers are not reused for a bf16 run. The
    KL's answers are sampled in the precision of its log-probs (dtype: float32) whatever the greedy ones use."""
    from alignment.eval import main

    policy, rm = tiny_models
    off = ("ifeval.path=null", "code.path=null", "general_text_chunks=0")
    for dtype, cache in (("float32", "miss"), ("bfloat16", "miss"), ("float32", "hit")):
        out = tmp_path / f"{dtype}.json"
        result = main(eval_args(tmp_path, policy, rm, *off, f"generation.dtype={dtype}", f"output={out}"))
        log = capsys.readouterr().out
        assert result["generation_dtype"] == dtype
        assert f"generating with {policy} (backend transformers, {dtype})" in log
        assert f"start model answers: cache {cache}" in log, (dtype, cache)
        assert ("sampling the KL's answers in float32" in log) == (dtype == "bfloat16")
        assert "eval/kl_to_reference" in result


def test_a_sets_answers_do_not_depend_on_which_other_sets_are_evaluated(tmp_path, tiny_models, monkeypatch):
    """In bf16 a greedy answer can change with the rest of the batch: 19 of the start model's 200 math answers
    did between one request for every set and math alone. Here an engine whose answers name the size of the
    request they came in: each set must be its own request, so math's answers are those of math alone."""
    import alignment.eval as ev
    from alignment.generation import Completion

    class BatchSensitive:
        name = "batch-sensitive"

        def generate(self, prompt_ids, n, sampling, json_schema=None):
            return [[Completion(f"The answer is {len(prompt_ids)}.", [1], True)] * n for _ in prompt_ids]

        def close(self):
            pass

    monkeypatch.setattr(ev, "make_generator", lambda *a, **k: BatchSensitive())
    policy, rm = tiny_models
    off = ("reward_model=null", "reference_model=null", "general_text_chunks=0", "code.path=null")

    def math_answers(name, *sets):
        ev.main(eval_args(tmp_path, policy, rm, *off, *sets, f"output={tmp_path / name}.json"))
        rows = [json.loads(line) for line in open(tmp_path / f"{name}.answers.jsonl")]
        return [r["answer"] for r in rows if r["set"] == "math"]

    alone = math_answers("alone", "ifeval.path=null")
    assert alone == ["The answer is 3."] * 3
    assert math_answers("with_ifeval") == alone


@pytest.mark.vllm
def test_vllm_backend_end_to_end(tmp_path, tiny_models, capsys):
    from alignment.eval import main

    policy, rm = tiny_models
    result = main(eval_args(tmp_path, policy, rm, "generation.backend=vllm", "generation.kv_cache_gib=1",
                            f"output={tmp_path / 'vllm.json'}"))  # fmt: skip
    log = capsys.readouterr().out
    assert f"generating with {policy} (backend vllm, " in log
    assert "generating the start model's answers with" in log and "(backend vllm)" in log
    assert result["missing"] == {} and all(k in result for k in METRICS + TIMES)


@pytest.mark.slow
@pytest.mark.vllm
def test_smollm2_against_itself_on_a_few_prompts_of_every_set(tmp_path, capsys):
    """The embedded SmolLM2 as its own start and reference model (no reward model needed): every metric is
    measured, the KL to itself is 0, and the general-text NLL is the one measured for it (2.5034; 2.5219 after
    `make dpo`, the same as online DPO's own held-out evaluation reports)."""
    from alignment.eval import main

    result = main(["recipes/eval.yaml", "model=smollm2-135m-instruct", "reward_model=null",
                   "reference_model=smollm2-135m-instruct", "math.max_prompts=8", "ifeval.max_prompts=8",
                   "code.max_prompts=4", "kl_prompts=4", "max_new_tokens=128", f"cache_dir={tmp_path}",
                   f"output={tmp_path / 'smollm2.json'}"])  # fmt: skip
    assert set(result["missing"]) == {"eval/win_rate"}
    assert result["eval/kl_to_reference"] == 0.0
    assert result["eval/general_text_nll"] == pytest.approx(2.5034, abs=0.002)
    assert all(0.0 <= result[k] <= 1.0 for k in METRICS[:4])


def test_long_input_settings_need_the_transformers_backend():
    from alignment.config import DCAConfig
    from alignment.eval import EvalConfig
    from alignment.generation import GenerationConfig

    with pytest.raises(ValueError, match="generation.backend: transformers"):
        EvalConfig(attn_implementation="dca", generation=GenerationConfig(backend="vllm"))
    with pytest.raises(ValueError, match="dca is set"):
        EvalConfig(dca=DCAConfig(64, 8), generation=GenerationConfig(backend="transformers"))


def test_dual_chunk_attention_runs_every_model_of_the_evaluation(tmp_path, tiny_models, monkeypatch):
    """attn_implementation: dca with 64-token chunks: the greedy answers, the KL's samples and both models'
    forwards (KL, NLL) go through Dual Chunk Attention, and every metric is still measured."""
    import alignment.dca
    from alignment.eval import main

    calls = []
    real = alignment.dca.dual_chunk_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[2])  # query length: > 1 in forwards and prefill, 1 in decoding
        return real(*args, **kwargs)

    monkeypatch.setattr(alignment.dca, "dual_chunk_attention", counting)
    policy, rm = tiny_models
    result = main(eval_args(tmp_path, policy, rm, "attn_implementation=dca", "dca={chunk_size: 64, local_size: 8}",
                            "start_model=null", "reward_model=null", f"output={tmp_path / 'dca.json'}"))  # fmt: skip
    assert result["missing"] == {"eval/win_rate": "skipped: start_model or reward_model is null"}
    assert result["config"]["attn_implementation"] == "dca"
    assert result["config"]["dca"] == {"chunk_size": 64, "local_size": 8}
    assert any(n == 1 for n in calls) and max(calls) > 64  # decoding steps, and inputs longer than a chunk
    assert 256 in calls  # the NLL's 256-token chunk of general text, alone in its forward
