"""Reward model: Bradley-Terry training reaches high held-out accuracy on a separable set; the scorer
re-renders with its own template, so a policy with another tokenizer gets the same scores; long inputs are
truncated from the left and never crash."""

from __future__ import annotations

import random

import pytest

from alignment.reward_model import main as rm_main
from reward.base import RewardFunction, RewardOutput
from tests.conftest import REPO, read_metrics, reset_accelerate, write_jsonl

WORDS = "river stone cloud apple tiger music paper green silver window garden candle".split()


def toy_pairs(n: int, seed: int) -> list[dict]:
    """Separable: the chosen answer is polite and on topic, the rejected one is a curt refusal."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = " ".join(rng.sample(WORDS, 2))
        rows.append(
            {
                "prompt": f"Tell me about {topic}.",
                "chosen": f"Sure! Here is a short note about {topic}: it is lovely.",
                "rejected": "No.",
            }
        )
    return rows


def train_rm(tmp_path, *overrides) -> str:
    reset_accelerate()
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(60, 0))
    out = tmp_path / "rm"
    rm_main(
        [
            str(REPO / "recipes/reward.yaml"),
            "model.name_or_path=tiny-qwen2",
            f"data.sources=[{{path: {data}}}]",
            "data.max_length=128",
            "eval_fraction=0.25",
            "eval_steps=0",
            "training.per_device_batch_size=5",
            "training.num_epochs=2",
            "optimizer.lr=1e-3",
            "scheduler.min_lr=1e-4",
            "logging.report_to=[]",
            "logging.progress_bar=false",
            f"training.output_dir={out}",
            *overrides,
        ]
    )
    return str(out)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    return train_rm(tmp_path_factory.mktemp("rm"))


def test_reward_model_reaches_high_held_out_accuracy(trained_rm):
    metrics = read_metrics(trained_rm)
    assert metrics[-1]["eval/accuracy"] > 0.9
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_saved_reward_model_is_a_standard_hf_classifier(trained_rm):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(trained_rm)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None


def test_scorer_implements_the_reward_interface(trained_rm):
    from reward.model import RewardModelScorer

    scorer = RewardModelScorer(trained_rm, batch_tokens=64)
    assert isinstance(scorer, RewardFunction)
    prompts = [[{"role": "user", "content": "Tell me about river stone."}]] * 2
    out = scorer(prompts, ["Sure! Here is a short note about river stone: it is lovely.", "No."])
    assert isinstance(out, RewardOutput) and out.num_failed == 0
    assert out.scores[0] > out.scores[1]
    # Batching does not change the numbers: one per row vs many per row.
    one_by_one = [scorer.score([p], [c])[0] for p, c in zip(prompts, ["x y", "No."])]
    assert one_by_one == pytest.approx(scorer.score(prompts, ["x y", "No."]), abs=1e-5)


def test_mismatched_policy_tokenizer_gives_the_same_scores(trained_rm):
    """The policy speaks SmolLM2's tokenizer and template; the reward model is Qwen2's. Completions arrive as
    the policy's decoded text and are re-rendered with the reward model's own template (TRL issue #1979)."""
    from alignment.models import load_tokenizer
    from reward.model import RewardModelScorer

    policy_tok = load_tokenizer("smollm2-135m-instruct")
    scorer = RewardModelScorer(trained_rm)
    prompts = [[{"role": "user", "content": f"Tell me about {w}."}] for w in WORDS[:4]]
    answers = [f"Sure! Here is a short note about {w}: it is lovely." for w in WORDS[:4]]
    policy_tokens = [policy_tok(a, add_special_tokens=False).input_ids for a in answers]
    decoded = [policy_tok.decode(t, skip_special_tokens=True) for t in policy_tokens]
    assert scorer.score(prompts, decoded) == pytest.approx(scorer.score(prompts, answers), abs=1e-6)
    # What the fix prevents: the policy's own rendering fed as text scores differently.
    policy_rendered = [
        policy_tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    wrong = scorer.score(policy_rendered, answers)
    assert wrong != pytest.approx(scorer.score(prompts, answers), abs=1e-3)


def test_overlong_inputs_are_truncated_from_the_left_not_crashing(trained_rm):
    from reward.model import RewardModelScorer

    scorer = RewardModelScorer(trained_rm, max_length=32)
    long_prompt = "Tell me about river stone. " + "Some padding words here. " * 200
    answer = "Sure! Here is a short note about river stone: it is lovely."
    ids = scorer.encode(long_prompt, answer)
    assert len(ids) == 32
    assert scorer.tokenizer.decode(ids).rstrip().endswith("<|im_end|>")  # the answer and its end survive
    (score,) = scorer.score([long_prompt], [answer])
    assert score == score  # a number, not NaN


def test_reward_model_composes_with_verifiable_rewards(trained_rm):
    """The recipe-level path: a spec list builds the reward model next to a verifiable reward."""
    from reward import RewardSpec, build_reward

    reward = build_reward(
        [
            RewardSpec("reward_model", weight=0.5, params={"name_or_path": trained_rm}),
            RewardSpec("math", weight=1.0),
        ]
    )
    prompts = [[{"role": "user", "content": "What is 2 plus 2?"}]] * 2
    out = reward(prompts, ["Sure! The answer is 4.", "No. The answer is 5."], answer=["4", "4"])
    assert out.num_failed == 0
    assert out.scores[0] > out.scores[1]
