"""Online DPO on tiny-qwen2: bad input fails before any model loads, a toy verifiable task is learnt (held-out
reward rises), a failing reward is counted and never raised, LoRA is merged for the push, and a run killed
with SIGKILL resumes without repeating or skipping a prompt, with its optimizer state and the engine's weights."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from alignment.config import ConfigError
from tests.conftest import REPO, free_port, read_metrics, reset_accelerate, write_jsonl

TRAIN = [{"prompt": f"Write a short sentence about the number {i}.", "answer": str(i)} for i in range(40)]
HELD_OUT = [{"prompt": f"Describe a colour you like, number {i}.", "answer": str(i)} for i in range(12)]


def base_args(tmp_path, out, *overrides):
    train = write_jsonl(tmp_path / "prompts.jsonl", TRAIN)
    held = write_jsonl(tmp_path / "held_out.jsonl", HELD_OUT)
    return [
        str(REPO / "recipes/online_dpo.yaml"),
        "model.name_or_path=tiny-qwen2",
        "training.mixed_precision=no",  # the recipe's auto is bf16 on some CPUs
        f"data.sources=[{{path: {train}}}]",
        "data.max_length=256",
        "optimizer.name=adamw",
        "optimizer.lr=2e-3",
        "loss.beta=0.1",
        "rewards=[{name: 'tests.toy_rewards:AsciiShare'}]",
        "pairs.chosen_must_pass=[]",  # the recipe's [math, arithmetic] name rewards these runs replace
        "pairs.rejected_must_pass=[]",  # and its [arithmetic]
        "prompts_per_step=4",
        "num_samples=4",
        "sampling.max_new_tokens=16",
        "sampling.temperature=1.0",
        "sampling.top_k=10",
        "generation.max_model_len=256",
        "generation.kv_cache_gib=1",
        "training.per_device_batch_size=4",
        "training.save_steps=0",
        f"eval.prompts={held}",
        "eval.max_new_tokens=16",
        "eval.reward_samples=4",
        "eval.general_text_chunks=2",
        "sync_check_steps=1",
        "logging.report_to=[]",
        "logging.progress_bar=false",
        f"training.output_dir={out}",
        *overrides,
    ]


def run(tmp_path, name, *overrides):
    from alignment.online_dpo import main

    reset_accelerate()
    out = tmp_path / name
    main(base_args(tmp_path, out, *overrides))
    return out


@pytest.mark.parametrize(
    "rows,override,message",
    [
        ([{"question": "no prompt here"}], [], "row 1: field 'prompt': missing"),
        (TRAIN, ["rewards=[{name: not_a_reward}]"], "unknown reward 'not_a_reward'"),
        ([{"prompt": "hi"}], ["rewards=[{name: math}]"], "needs the column 'answer'"),
        (TRAIN, ["sampling.max_new_tokens=4000"], "sampling.max_new_tokens: 4000 new tokens"),
        (TRAIN, ["rewards=[{name: reward_model}]"], "params.name_or_path: required"),
        (
            TRAIN,
            ["pairs.chosen_must_pass=[maths]"],
            "pairs.chosen_must_pass: 'maths' is not the label of a reward",
        ),
        (
            TRAIN,
            ["pairs.rejected_must_pass=[arithmetics]"],
            "pairs.rejected_must_pass: 'arithmetics' is not the label of a reward",
        ),
    ],
)
def test_bad_input_fails_before_any_model_loads(tmp_path, monkeypatch, rows, override, message):
    import alignment.online_dpo as od
    from alignment.data import DataError

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(od, "load_causal_lm", no_model)
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    reset_accelerate()
    with pytest.raises((ConfigError, DataError), match=message.replace("(", r"\(").replace(")", r"\)")):
        od.main(base_args(tmp_path, tmp_path / "out", f"data.sources=[{{path: {data}}}]", *override))


def test_a_deepspeed_launch_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """ZeRO-3 processes hold shards, and online DPO pushes whole weights into its sampler: refused, named."""
    import alignment.online_dpo as od

    monkeypatch.setenv(
        "ACCELERATE_USE_DEEPSPEED", "true"
    )  # what `accelerate launch` sets for a DeepSpeed config
    monkeypatch.setattr(od, "make_accelerator", lambda *a: pytest.fail("the accelerator was made"))
    with pytest.raises(ConfigError, match="online DPO does not run under DeepSpeed"):
        od.main(base_args(tmp_path, tmp_path / "out"))


def test_lora_is_merged_into_the_pushed_weights(tiny_qwen2):
    from accelerate import Accelerator

    from alignment.config import LoraConfig, ModelConfig
    from alignment.logprobs import TokenLogProbs
    from alignment.models import load_causal_lm
    from alignment.online_dpo import push_state

    model = load_causal_lm(ModelConfig(name_or_path="tiny-qwen2", lora=LoraConfig(r=4)), 256)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B starts at zero: make the adapter matter
    reset_accelerate()
    pushed = push_state(TokenLogProbs(model), Accelerator(cpu=True))
    merged = model.merge_and_unload().state_dict()
    assert set(pushed) == set(merged)
    assert all(torch.allclose(pushed[k], merged[k], atol=1e-6) for k in merged)
    base = load_causal_lm(ModelConfig(name_or_path="tiny-qwen2"), 256).state_dict()
    assert not torch.allclose(
        pushed["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.vllm
def test_toy_task_raises_the_held_out_reward_and_logs_every_metric(tmp_path):
    out = run(tmp_path, "toy", "training.max_steps=8")
    summary = json.loads((out / "summary.json").read_text())
    start, end = summary["eval/mean_reward/start"], summary["eval/mean_reward/end"]
    assert end > start + 0.1, (start, end)  # measured: 0.62 -> 0.92
    # Prompt by prompt: every sample is scored here, so the mean of the prompts' changes is the change of the mean,
    # and the gain is beyond chance (measured: all 12 held-out prompts up, p = 2 / 2^12, the smallest there is).
    assert summary["eval/change/mean_reward_change"] == pytest.approx(end - start, abs=1e-6)
    assert summary["eval/change/mean_reward_prompts_up"] > summary["eval/change/mean_reward_prompts_down"]
    assert summary["eval/change/mean_reward_p"] < 0.01
    saved = {n: json.loads((out / f"eval_{n}.json").read_text()) for n in ("start", "end")}
    assert saved["start"]["figures"]["eval/mean_reward"] == start
    assert [r["prompt"] for r in saved["start"]["rows"]] == [r["prompt"] for r in saved["end"]["rows"]]
    m = [x for x in read_metrics(out) if x["step"] >= 1 and "loss" in x]
    for name in ("objective/scores", "objective/scores_margin", "objective/kl", "rewards/chosen", "rewards/margins",
                 "rewards/accuracies", "logps/chosen", "online/pair_fraction", "online/dropped_ties",
                 "completions/mean_length", "completions/clipped_ratio", "time/generation", "time/scoring",
                 "time/training", "time/weight_push", "sampling/tokens_per_second", "sampling/logp_difference"):  # fmt: skip
        assert name in m[-1], name
    assert max(x["sampling/logp_difference"] for x in m) < 1e-3  # the engine always held the policy's weights
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [s["step"] for s in samples] == list(range(1, 9)) and all(len(s["rows"]) == 4 for s in samples)


def test_greedy_anchor_samples_the_greedy_answer_first_and_puts_it_in_every_pair(tmp_path, tiny_qwen2):
    from alignment.config import DataConfig, DataSource
    from alignment.data import DataReport, encode_prompt, load_examples, normalize_prompt_row
    from alignment.generation import GenerationConfig, SamplingConfig, make_generator
    from alignment.models import load_tokenizer

    out = run(tmp_path, "anchor", "pairs.strategy=greedy_anchor", "training.max_steps=1", "generation.backend=transformers",
              "eval.at_start=false", "eval.at_end=false", "sync_check_steps=0")  # fmt: skip
    rows = json.loads((out / "samples.jsonl").read_text().splitlines()[0])["rows"]
    # The run's prompt order, and the start model's greedy answers to them from a fresh engine.
    data = DataConfig(sources=[DataSource(path=str(tmp_path / "prompts.jsonl"))], seed=0)
    prompts = load_examples(data, normalize_prompt_row, DataReport())
    tok = load_tokenizer(tiny_qwen2)
    gen = make_generator(GenerationConfig(backend="transformers"), tiny_qwen2, tok)
    ids = [encode_prompt(tok, prompts[r["prompt"]].prompt) for r in rows]
    greedy = gen.generate(ids, 1, SamplingConfig(temperature=0.0, max_new_tokens=16))
    assert [r["answers"][0] for r in rows] == [g[0].text for g in greedy]
    assert all(len(r["answers"]) == 4 for r in rows)  # num_samples in all: the greedy answer and 3 samples
    kept = [r for r in rows if r["dropped"] is None]
    assert kept and all(0 in (r["chosen"], r["rejected"]) for r in kept)


def test_a_chosen_answer_always_passed_the_verifier_and_prompts_without_one_are_dropped(tmp_path, tiny_qwen2):
    from alignment.config import DataConfig, DataSource
    from alignment.data import DataReport, load_examples, normalize_prompt_row
    from reward.compose import make_reward

    rewards = "rewards=[{name: math}, {name: 'tests.toy_rewards:AsciiShare'}]"
    out = run(tmp_path, "verified", rewards, "pairs.chosen_must_pass=[math]", "pairs.unverified=drop", "training.max_steps=2",
              "generation.backend=transformers", "eval.at_start=false", "eval.at_end=false", "sync_check_steps=0")  # fmt: skip
    data = DataConfig(sources=[DataSource(path=str(tmp_path / "prompts.jsonl"))], seed=0)
    prompts = load_examples(data, normalize_prompt_row, DataReport())
    math = make_reward("math")
    steps = [json.loads(line)["rows"] for line in (out / "samples.jsonl").read_text().splitlines()]
    unverified = 0
    for rows in steps:
        for r in rows:
            ex, n = prompts[r["prompt"]], len(r["answers"])
            right = [
                s == 1.0
                for s in math([ex.prompt] * n, r["answers"], answer=[ex.columns["answer"]] * n).scores
            ]
            # The log names its row of the prompt file and gives each reward's part of every answer's score.
            assert (r["source"], r["messages"], r["columns"]) == (ex.source, ex.prompt, ex.columns)
            path, line = r["source"].rsplit(": row ", 1)
            row = json.loads(open(path).read().splitlines()[int(line) - 1])
            assert row["prompt"] == r["messages"][-1]["content"] and row["answer"] == r["columns"]["answer"]
            assert [s == 1.0 for s in r["components"]["math"]] == right
            if r["dropped"] is None:
                assert right[r["chosen"]], r
            if not any(right):
                assert r["dropped"] == "unverified", r
                unverified += 1
    assert unverified  # tiny-qwen2 is untrained: most prompts have no right answer
    assert sum(m["online/dropped_unverified"] for m in read_metrics(out)) == unverified


@pytest.mark.vllm
def test_a_failing_reward_is_counted_and_the_step_skipped_not_raised(tmp_path):
    out = run(tmp_path, "fails", "rewards=[{name: 'tests.toy_rewards:Raises'}]", "training.max_steps=2",
              "eval.at_start=false", "eval.at_end=false")  # fmt: skip
    m = read_metrics(out)
    assert m[-1]["online/skipped_steps"] == 2 and m[-1]["online/dropped_unscored"] == 4
    assert m[-1]["reward/none/tests.toy_rewards:Raises"] == 32  # 2 steps x 4 prompts x 4 answers, cumulative
    assert not (out / "checkpoint-1").exists() and (out / "model.safetensors").is_file()


def _plan(n_items, per_step, steps, seed=0):
    import random

    stream = []
    epoch = 0
    while len(stream) < per_step * steps:
        order = list(range(n_items))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        stream += order
        epoch += 1
    return [stream[i * per_step : (i + 1) * per_step] for i in range(steps)]


@pytest.mark.vllm
def test_resume_after_sigkill_continues_prompts_optimizer_and_engine(tmp_path):
    out = tmp_path / "resume"
    args = base_args(tmp_path, out, "training.max_steps=4", "training.save_steps=1", "training.save_total_limit=0",
                     "optimizer.name=ondare", "optimizer.base=tiny-qwen2", "optimizer.reserve_p=0.5",
                     "eval.at_start=false", "eval.at_end=false")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "alignment/online_dpo.py"), *args]
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not (out / "checkpoint-2" / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint-2 in time"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()

    done = subprocess.run(
        [*cmd, "training.resume_from_checkpoint=latest"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr

    # Each step's prompts are the seeded plan's, whether the step ran once or was redone after the kill.
    last = {}
    for line in open(out / "samples.jsonl"):
        rec = json.loads(line)
        last[rec["step"]] = [r["prompt"] for r in rec["rows"]]
    assert sorted(last) == [1, 2, 3, 4]
    assert [last[s] for s in range(1, 5)] == _plan(len(TRAIN), 4, 4)
    # The merging optimizer's state went on from the checkpoint: 3 steps counted in checkpoint-3.
    state = torch.load(out / "checkpoint-3" / "optimizer.bin", weights_only=False)["state"]
    assert {int(s["step"]) for s in state.values()} == {3}
    # The engine got the resumed weights: the first sync check after resuming agrees with the policy.
    m = read_metrics(out)
    resumed = [x for x in m if x["step"] == 3 and "sampling/logp_difference" in x]
    assert resumed and resumed[-1]["sampling/logp_difference"] < 1e-3


@pytest.mark.vllm
@pytest.mark.slow
def test_two_steps_against_a_separate_vllm_server(tmp_path, tiny_qwen2):
    """`vllm serve` in its own process on 127.0.0.1; weights pushed through a folder and /collective_rpc."""
    from alignment.generation import wait_for_server

    port = free_port()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        # `vllm serve` itself: the `vllm` command of the vllm-cpu package fails on its own version lookup
        # (PackageNotFoundError: vllm), so the server module is started directly; on CUDA `vllm serve` works.
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_qwen2, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--seed", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"), start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout_s=300, proc=server)
        out = run(tmp_path, "server", "training.max_steps=2", "generation.backend=vllm_server",
                  f"generation.server_url=http://127.0.0.1:{port}", f"generation.weights_dir={tmp_path / 'push'}",
                  "eval.at_start=false", "eval.at_end=false")  # fmt: skip
        # A seeded call on the live server (short prompts, so nothing is prefilled in chunks: the CPU build's
        # limit): each request carries seed + i * n, so the same seed repeats the answers and another does not.
        from alignment.generation import GenerationConfig, SamplingConfig, VLLMServerGenerator
        from alignment.models import load_tokenizer

        gen = VLLMServerGenerator(
            GenerationConfig(backend="vllm_server", server_url=f"http://127.0.0.1:{port}",
                             weights_dir=str(tmp_path / "push")), load_tokenizer(tiny_qwen2),
        )  # fmt: skip
        prompts, sampling = (
            [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
            SamplingConfig(temperature=1.0, max_new_tokens=8),
        )
        seeded = [[[c.token_ids for c in a] for a in gen.generate(prompts, 2, replace(sampling, seed=s))]
                  for s in (3, 3, 4)]  # fmt: skip
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    m = [x for x in read_metrics(out) if "loss" in x]
    assert len(m) == 2 and m[0]["online/pair_fraction"] > 0
    # Step 2's sync check ran after step 1's push: the server samples from the trained weights.
    assert m[1]["sampling/logp_difference"] < 1e-3 and m[1]["time/weight_push"] > 0
    assert m[1]["logps/chosen"] != m[0]["logps/chosen"]
    assert seeded[0] == seeded[1] and seeded[0] != seeded[2]


class ScriptedSampler:
    """Stands in for the engine: every prompt gets the same written answers, one right and three with a slip."""

    name = "scripted"
    TEXTS = ["4 × 5 = 20. The answer is 20.", "4 × 5 = 21. The answer is 21.", "4 × 5 = 24. So 24 + 1 = 26.",
             "4 × 5 = 21. The answer is 21!"]  # fmt: skip

    def __init__(self, tokenizer):
        self.tok, self.pushes = tokenizer, 0

    def generate(self, prompt_ids, n, sampling, json_schema=None):
        from alignment.generation import Completion

        ids = [self.tok(t, add_special_tokens=False).input_ids for t in self.TEXTS]
        return [[Completion(t, i, True) for t, i in zip(self.TEXTS, ids)][:n] for _ in prompt_ids]

    def load_weights(self, named_tensors):
        self.pushes += 1

    def close(self):
        pass


def test_step_pairs_join_the_step_and_are_logged(tmp_path, monkeypatch):
    import alignment.online_dpo as od

    sampler = {}
    monkeypatch.setattr(
        od, "make_generator", lambda cfg, path, tok, *a, **k: sampler.setdefault("s", ScriptedSampler(tok))
    )
    args = ["rewards=[{name: arithmetic}]", "training.max_steps=2", "eval.at_start=false", "eval.at_end=false",
            "sync_check_steps=0", "pairs.step_pairs=2"]  # fmt: skip
    out = run(tmp_path, "steps", *args)
    m = [x for x in read_metrics(out) if "loss" in x]
    # 4 prompts a step: each gives its best-vs-worst pair and 2 step pairs (21 -> 20 once, the repeat dropped;
    # 24 -> 20); "24 + 1 = 26" is never reached: only the first wrong equation counts
    assert [x["online/step_pairs"] for x in m] == [8, 8] and [x["online/pair_fraction"] for x in m] == [
        1.0,
        1.0,
    ]
    rows = [r for line in open(out / "samples.jsonl") for r in json.loads(line)["rows"]]
    assert all(r["step_pairs"] == [{"answer": 1, "wrong": "21", "right": "20"},
                                   {"answer": 2, "wrong": "24", "right": "20"}] for r in rows)  # fmt: skip
    assert sampler["s"].pushes == 2
    # the step pairs are in the loss: without them the same steps give other losses
    plain = run(tmp_path, "plain", *args[:-1])
    assert [x["loss"] for x in read_metrics(plain) if "loss" in x] != [x["loss"] for x in m]
    assert "step_pairs" not in json.loads(open(plain / "samples.jsonl").readline())["rows"][0]


class LadderSampler(ScriptedSampler):
    """Every prompt gets four answers whose AsciiShare scores are 1, 0.75, 0.5 and 0.25."""

    TEXTS = ["abcd", "abc.", "ab..", "a..."]


def test_pairs_per_prompt_trains_on_a_ladder_and_counts_each_prompt_once(tmp_path, monkeypatch):
    import alignment.online_dpo as od

    monkeypatch.setattr(od, "make_generator", lambda cfg, path, tok, *a, **k: LadderSampler(tok))
    args = ["training.max_steps=2", "eval.at_start=false", "eval.at_end=false", "sync_check_steps=0",
            "pairs.length_penalty=0", "pairs.unfinished_penalty=0"]  # fmt: skip
    ladder = run(tmp_path, "ladder", *args, "pairs.per_prompt=2")
    one = run(tmp_path, "one", *args)
    m2 = [x for x in read_metrics(ladder) if "loss" in x]
    m1 = [x for x in read_metrics(one) if "loss" in x]
    # 4 prompts a step: (0, 3) with margin 0.75, then (1, 2) with margin 0.25; one pair a prompt: (0, 3) alone.
    assert [(x["online/pairs"], x["online/pair_fraction"]) for x in m2] == [(8, 1.0), (8, 1.0)]
    assert [(x["online/pairs"], x["online/pair_fraction"]) for x in m1] == [(4, 1.0), (4, 1.0)]
    assert [x["objective/scores_margin"] for x in m2] == pytest.approx([0.5, 0.5])
    assert [x["objective/scores_margin"] for x in m1] == pytest.approx([0.75, 0.75])
    rows = [r for line in open(ladder / "samples.jsonl") for r in json.loads(line)["rows"]]
    assert len(rows) == 8 and all(
        (r["chosen"], r["rejected"], r["more_pairs"]) == (0, 3, [[1, 2]]) for r in rows
    )
    assert "more_pairs" not in json.loads(open(one / "samples.jsonl").readline())["rows"][0]
    assert [x["loss"] for x in m2] != pytest.approx([x["loss"] for x in m1])  # the second rung is in the loss


def test_the_end_is_compared_with_the_saved_start_and_other_prompts_are_not(tmp_path, capsys):
    from alignment.online_dpo import compare_to_start
    from alignment.report import describe_change

    rows = [
        {"prompt": "a", "greedy_right": False, "reward": 1.0},
        {"prompt": "b", "greedy_right": True, "reward": 2.0},
    ]
    assert compare_to_start(str(tmp_path), rows) == ({}, {})  # no start saved: nothing to compare
    figures = {"eval/math_accuracy": 0.5, "eval/mean_reward": 1.5}
    (tmp_path / "eval_start.json").write_text(json.dumps({"figures": figures, "rows": rows}))
    end = [
        {"prompt": "a", "greedy_right": True, "reward": 3.0},
        {"prompt": "b", "greedy_right": True, "reward": 2.0},
    ]
    start, change = compare_to_start(str(tmp_path), end)
    assert start == figures
    assert (change["eval/change/math_turned_right"], change["eval/change/mean_reward_change"]) == (1, 1.0)
    text = describe_change(start, {"eval/math_accuracy": 1.0, "eval/mean_reward": 2.5}, change)
    assert "greedy math 0.500 -> 1.000: 1 answers turned right, 0 wrong" in text
    assert "fresh-sample reward 1.500 -> 2.500: per prompt +1.000" in text
    other = [{"prompt": "z", "greedy_right": True, "reward": 3.0}, end[1]]
    assert compare_to_start(str(tmp_path), other) == ({}, {})
    err = capsys.readouterr().err
    assert "not compared with" in err and "prompt 1 differs" in err
