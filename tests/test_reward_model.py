"""Reward model: Bradley-Terry training reaches high held-out accuracy on a separable set; the scorer
re-renders with its own template, so a policy with another tokenizer gets the same scores; long inputs are
truncated from the left and never crash."""

from __future__ import annotations

import math
import random

import pytest
import torch

from alignment.reward_model import main as rm_main
from reward.base import RewardFunction, RewardOutput
from tests.conftest import REPO, launch_two_processes, read_metrics, reset_accelerate, write_jsonl

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
            "training.mixed_precision=no",  # the recipe's auto is bf16 on some CPUs
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


def test_answers_to_one_prompt_share_its_tokens_and_keep_their_own_scores(trained_rm):
    """Online DPO scores N answers per prompt: the prompt is written once per row, and every score equals the
    one the plain transformers forward gives the whole conversation, also when a group spans two rows."""
    from reward.model import RewardModelScorer

    answers = ["Sure! Here is a short note about it: it is lovely.", "No.", "No!", "Sure.", "x y z"]
    prompts = [p for p in MIXED_PROMPTS[:3] for _ in answers]
    completions = answers * 3
    for batch_tokens in (8192, 150):  # one row; several rows, a prompt's answers split between two
        scorer = RewardModelScorer(trained_rm, batch_tokens=batch_tokens)
        assert scorer.scores.share_prompt  # tiny-qwen2 through packed_sdpa
        seen = []
        forward = scorer.scores.forward
        scorer.scores.forward = lambda ids, pos, last, seen=seen, forward=forward: (
            seen.append(ids.shape[1]) or forward(ids, pos, last)
        )
        got = scorer.score(prompts, completions)
        whole = sum(len(scorer.encode(p, c)) for p, c in zip(prompts, completions))
        assert sum(seen) < 0.6 * whole and (len(seen) == 1) == (batch_tokens == 8192)
        want = direct_scores(
            trained_rm, [p + [{"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
        )
        assert got == pytest.approx(want, abs=1e-5)
    unshared = RewardModelScorer(trained_rm)
    unshared.scores.share_prompt = False
    assert unshared.score(prompts, completions) == pytest.approx(got, abs=1e-5)


def direct_scores(trained_rm: str, conversations: list[list[dict]]) -> list[float]:
    """The reward model's own verdict, without reward.model: its tokenizer's chat template, one plain
    transformers forward pass per conversation, the head's output at the last token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_rm)
    model = AutoModelForSequenceClassification.from_pretrained(trained_rm, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for conv in conversations:
            ids = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False).input_ids
            out.append(model(torch.tensor([ids])).logits[0, -1].item())
    return out


# No system turn, so each template adds its own default (Qwen2: "You are a helpful assistant."; SmolLM2 its
# own), and text beyond ASCII letters: accents, a multiplication sign, an emoji, runs of spaces, new lines.
MIXED_PROMPTS = [
    [{"role": "user", "content": "Tell me about the café by the river stone."}],
    [{"role": "user", "content": "What is 7 × 6?  Answer   briefly."}],
    [{"role": "user", "content": "Tell me about music 🎵 and paper."}],
    [{"role": "user", "content": "Résumé:\n- green\n- silver"}],
]
MIXED_ANSWERS = [
    "Sure! Here is a short note about the café: it is lovely.",
    "7 × 6 = 42.  Sure!",
    "No.",
    "Sure! Here is a short note about green   and silver 🎉: it is lovely.",
]


def test_mismatched_policy_tokenizer_gives_the_same_scores(trained_rm):
    """The policy speaks SmolLM2's tokenizer and template; the reward model is Qwen2's. The two templates
    render these conversations differently, completions arrive as the policy's decoded text, and the scorer
    still gives the reward model's own verdict on its own rendering (TRL issue #1979)."""
    from alignment.models import load_tokenizer
    from reward.model import RewardModelScorer

    policy_tok = load_tokenizer("smollm2-135m-instruct")
    rm_tok = load_tokenizer(trained_rm)
    convs = [[*p, {"role": "assistant", "content": a}] for p, a in zip(MIXED_PROMPTS, MIXED_ANSWERS)]
    policy_text = [policy_tok.apply_chat_template(c, tokenize=False) for c in convs]
    rm_text = [rm_tok.apply_chat_template(c, tokenize=False) for c in convs]
    # The precondition: the templates disagree (Qwen2's default system prompt is in its rendering only).
    assert all(p != r for p, r in zip(policy_text, rm_text))
    assert all("You are a helpful assistant." in r and "You are a helpful assistant." not in p
               for p, r in zip(policy_text, rm_text))  # fmt: skip

    # What the policy hands over: its own token ids, decoded to text.
    policy_ids = [policy_tok(a, add_special_tokens=False).input_ids for a in MIXED_ANSWERS]
    decoded = [policy_tok.decode(t, skip_special_tokens=True) for t in policy_ids]
    assert decoded == MIXED_ANSWERS  # byte-level BPE: the text survives the other tokenizer intact

    scorer = RewardModelScorer(trained_rm)
    expected = direct_scores(trained_rm, convs)
    assert scorer.score(MIXED_PROMPTS, decoded) == pytest.approx(expected, abs=1e-4)
    # The rendering decides the score: the policy's rendering read by the reward model gives other numbers,
    # so agreeing with `expected` is not a coincidence of templates that happen to match.
    policy_rendered = direct_rendered_scores(trained_rm, policy_text)
    assert all(abs(a - b) > 1e-3 for a, b in zip(policy_rendered, expected))
    as_prompt_text = [
        policy_tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in MIXED_PROMPTS
    ]
    assert scorer.score(as_prompt_text, decoded) != pytest.approx(expected, abs=1e-3)


def direct_rendered_scores(trained_rm: str, texts: list[str]) -> list[float]:
    """The reward model's output on already-rendered text (as a scorer that trusted the policy would see it)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_rm)
    model = AutoModelForSequenceClassification.from_pretrained(trained_rm, dtype=torch.float32).eval()
    with torch.no_grad():
        return [
            model(torch.tensor([tok(t, add_special_tokens=False).input_ids])).logits[0, -1].item()
            for t in texts
        ]


def test_overlong_inputs_are_truncated_from_the_left_not_crashing(trained_rm):
    from reward.model import RewardModelScorer

    scorer = RewardModelScorer(trained_rm, max_length=32)
    long_prompt = "Tell me about river stone. " + "Some padding words here. " * 200
    answer = "Sure! Here is a short note about river stone: it is lovely."
    ids = scorer.encode(long_prompt, answer)
    assert len(ids) == 32
    assert scorer.tokenizer.decode(ids).rstrip().endswith("<|im_end|>")  # the answer and its end survive
    (score,) = scorer.score([long_prompt], [answer])
    assert math.isfinite(score)  # a number: not NaN, not inf


def test_reward_model_composes_with_verifiable_rewards(trained_rm):
    """The recipe-level path: a spec list builds the reward model next to a verifiable reward. Both answers
    are right, so math cannot tell them apart: the reward model decides, and each total is exactly
    0.5 x its score + 1.0 x math."""
    from reward import RewardSpec, build_reward
    from reward.model import RewardModelScorer

    reward = build_reward(
        [
            RewardSpec("reward_model", weight=0.5, params={"name_or_path": trained_rm}),
            RewardSpec("math", weight=1.0),
        ]
    )
    prompts = [[{"role": "user", "content": "What is 2 plus 2?"}]] * 3
    completions = [
        "Sure! Here is a short note about it: it is lovely. The answer is 4.",
        "No. The answer is 4.",
        "Sure! Here is a short note about it: it is lovely. The answer is 5.",
    ]
    out = reward(prompts, completions, answer=["4"] * 3)
    assert out.num_failed == 0
    rm_scores = RewardModelScorer(trained_rm).score(prompts, completions)
    assert rm_scores[0] > rm_scores[1] + 0.1  # the reward model prefers the polite answer
    assert out.scores == pytest.approx([0.5 * s + m for s, m in zip(rm_scores, [1.0, 1.0, 0.0])], abs=1e-5)
    assert out.scores[0] > out.scores[1]  # same math score: decided by the reward model
    assert [d["components"]["math"] for d in out.details] == [1.0, 1.0, 0.0]


def test_zero3_over_two_processes_gives_the_losses_and_weights_of_one(tmp_path):
    """recipes/accelerate/zero3.yaml with 2 processes (on CPU: DeepSpeed's CPU accelerator over gloo), the
    classifier head sharded with the rest: the Bradley-Terry losses and the saved weights of 1 process with the
    same global batch."""

    from safetensors.torch import load_file

    pytest.importorskip("deepspeed")
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(16, 0))
    common = [
        "model.name_or_path=tiny-qwen2", "training.mixed_precision=no", f"data.sources=[{{path: {data}}}]",
        "data.max_length=64", "eval_fraction=0.25", "eval_steps=0", "training.per_device_batch_size=2",
        "training.max_steps=2", "optimizer.lr=1e-3", "scheduler.min_lr=1e-4", "logging.report_to=[]",
        "logging.progress_bar=false",
    ]  # fmt: skip
    reset_accelerate()
    rm_main([str(REPO / "recipes/reward.yaml"), *common, "training.gradient_accumulation_steps=2",
             f"training.output_dir={tmp_path / 'one'}"])  # fmt: skip
    proc = launch_two_processes(
        "alignment/reward_model.py",
        "recipes/reward.yaml",
        [*common, "training.gradient_accumulation_steps=1"],
        tmp_path / "two",
        config_file="recipes/accelerate/zero3.yaml",
    )
    assert "[train] DeepSpeed ZeRO-3 on" in proc.stdout and proc.stdout.count(" holds ") == 2
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    wa, wb = load_file(f"{tmp_path}/one/model.safetensors"), load_file(f"{tmp_path}/two/model.safetensors")
    assert wa.keys() == wb.keys() and any("score" in k for k in wa)
    for k in wa:  # 2 Adam steps at lr 1e-3; DeepSpeed sums gradients in another order (see tests/test_sft.py)
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-4)
