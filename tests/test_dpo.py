"""Offline DPO on tiny-qwen2: it learns the preferences, LoRA trains adapters only, the reference cache is
keyed correctly and never trusts a damaged file, and 2 processes match 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.dpo import main as dpo_main
from tests.conftest import REPO, launch_two_processes, read_metrics, reset_accelerate, write_jsonl

PAIRS = [
    {
        "prompt": f"What is {a} plus {b}?",
        "chosen": f"The answer is {a + b}.",
        "rejected": f"The answer is {a + b + 1}.",
    }
    for a, b in [(12, 30), (7, 5), (100, 23), (41, 9), (3, 3), (56, 44), (18, 2), (90, 9)]
]


def run_dpo(tmp_path, name, *overrides, data=None, cache=None):
    reset_accelerate()
    data = data or write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / name
    dpo_main(
        [
            str(REPO / "recipes/dpo.yaml"),
            "model.name_or_path=tiny-qwen2",
            "training.mixed_precision=no",  # the recipe's auto is bf16 on some CPUs
            "loss.nll_weight=0.0",  # the plain DPO loss; tests that want the NLL term set it
            f"data.sources=[{{path: {data}}}]",
            "data.max_length=64",
            "training.per_device_batch_size=4",
            "training.num_epochs=6",
            "optimizer.lr=5e-4",
            "scheduler.min_lr=5e-5",
            "loss.beta=0.5",
            f"reference.cache_dir={cache or tmp_path / 'refcache'}",
            "logging.report_to=[]",
            "logging.progress_bar=false",
            f"training.output_dir={out}",
            *overrides,
        ]
    )
    return out


def test_dpo_raises_margins_and_accuracy_and_changes_every_parameter(tmp_path, tiny_qwen2):
    out = run_dpo(tmp_path, "run")
    m = read_metrics(out)
    names = {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "learning_rate",
    }
    assert names <= set(m[0])
    assert m[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert m[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    late = m[-3:]
    assert min(x["rewards/margins"] for x in late) > 0.5
    assert min(x["rewards/accuracies"] for x in late) >= 0.75
    before, after = load_file(f"{tiny_qwen2}/model.safetensors"), load_file(f"{out}/model.safetensors")
    assert [k for k in before if torch.equal(before[k], after[k])] == []


def test_step_dpo_span_scores_only_up_to_the_step_where_the_answers_differ(tmp_path):
    # The same slip, then a conclusion: with data.span=first_differing_step the conclusion is not scored, so the
    # first step's summed log-probs (policy = reference) cover fewer tokens and are higher.
    rows = [
        {**p, "chosen": p["chosen"] + " So that is it.", "rejected": p["rejected"] + " So that is it."}
        for p in PAIRS
    ]
    data = write_jsonl(tmp_path / "steps.jsonl", rows)
    one_step = ["training.num_epochs=1", "training.per_device_batch_size=8"]
    whole = read_metrics(run_dpo(tmp_path, "whole", *one_step, data=data))[0]
    step = read_metrics(run_dpo(tmp_path, "step", *one_step, "data.span=first_differing_step", data=data))[0]
    assert step["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert step["logps/chosen"] > whole["logps/chosen"] + 1.0
    assert step["logps/rejected"] > whole["logps/rejected"] + 1.0


@pytest.mark.parametrize("loss", ["ipo", "robust", "simpo"])
def test_other_losses_train(tmp_path, loss):
    extra = ["loss.label_smoothing=0.1"] if loss == "robust" else []
    out = run_dpo(tmp_path, loss, f"loss.name={loss}", "training.num_epochs=3", "loss.nll_weight=0.1", *extra)
    m = read_metrics(out)
    assert m[-1]["loss"] < m[0]["loss"]


def test_lora_dpo_changes_only_adapter_weights(tmp_path, tiny_qwen2):
    out = run_dpo(
        tmp_path,
        "lora",
        "model.lora={r: 8, alpha: 16, dropout: 0.0}",
        "training.num_epochs=2",
        "optimizer.lr=1e-3",
    )
    m = read_metrics(out)
    assert m[-1]["rewards/margins"] > 0  # the base-with-adapters-disabled reference differs from the policy
    adapter = load_file(f"{out}/adapter/adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    base, merged = load_file(f"{tiny_qwen2}/model.safetensors"), load_file(f"{out}/model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(
        k.endswith("proj.weight") for k in changed
    )  # linear layers only, via merged adapters
    assert "model.embed_tokens.weight" not in changed and not any("norm" in k for k in changed)


def test_reference_cache_reused_rebuilt_on_new_key_and_on_damage(tmp_path, capsys):
    cache = tmp_path / "cache"
    run_dpo(tmp_path, "a", "training.max_steps=1", cache=cache)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    assert "computed and cached" in capsys.readouterr().out

    run_dpo(tmp_path, "b", "training.max_steps=1", cache=cache)  # same key: reused, file untouched
    assert "reused" in capsys.readouterr().out and files[0].stat().st_mtime_ns == stamp

    # A length that truncates every pair changes the tokens, so the key; one that truncates none would not.
    run_dpo(tmp_path, "c", "training.max_steps=1", "data.max_length=24", cache=cache)
    assert len(list(cache.glob("*.pt"))) == 2
    assert "computed and cached" in capsys.readouterr().out

    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])  # a partial write
    run_dpo(tmp_path, "d", "training.max_steps=1", cache=cache)
    out = capsys.readouterr().out
    assert "damaged" in out and "computed and cached" in out
    assert load_and_check(files[0])


def load_and_check(path: Path, filled: int = 4) -> bool:
    """A table of every pair in which ``filled`` rows hold log-probs and the others are NaN
    (``training.max_steps=1`` x 4 pairs: the run scores the 4 pairs it trains on)."""
    logps = torch.load(path, weights_only=True)["logps"]
    rows = torch.isfinite(logps).all(dim=1)
    return (
        logps.shape == (len(PAIRS), 2)
        and int(rows.sum()) == filled
        and bool((logps[rows] < 0).all())
        and bool(logps[~rows].isnan().all())
    )


def test_a_run_cut_short_precomputes_only_the_pairs_it_trains_on(tmp_path):
    """``training.max_steps=1`` trains on 4 of the 8 pairs: only those are scored, under their own cache key,
    with the same numbers as a run that scores every pair; a row the table lacks is refused, never read as 0."""
    from alignment.preference import Reference

    short = run_dpo(tmp_path, "short", "training.max_steps=1", cache=tmp_path / "short-cache")
    full = run_dpo(tmp_path, "full", "training.max_steps=2", cache=tmp_path / "full-cache")  # 8 = every pair
    (short_file,), (full_file,) = (list((tmp_path / c).glob("*.pt")) for c in ("short-cache", "full-cache"))
    assert short_file.name != full_file.name  # a subset is its own key: a longer run never reads its NaNs
    assert load_and_check(short_file, filled=4) and load_and_check(full_file, filled=8)
    short_table = torch.load(short_file, weights_only=True)["logps"]
    full_table = torch.load(full_file, weights_only=True)["logps"]
    rows = torch.isfinite(short_table).all(dim=1)
    torch.testing.assert_close(short_table[rows], full_table[rows])
    assert read_metrics(short)[0]["loss"] == pytest.approx(read_metrics(full)[0]["loss"], rel=1e-6)

    ref = Reference("precomputed", table=short_table)
    missing = int(torch.nonzero(~rows)[0])
    with pytest.raises(RuntimeError, match=rf"pairs \[{missing}\] were not precomputed"):
        ref.logps([], [missing], None, None, torch.zeros(1))


def test_reference_cache_rejects_numbers_changed_behind_its_checksum(tmp_path):
    # Corruption, not tampering: the checksum lives in the same file, so a deliberate edit that also rewrites
    # the checksum is not detected (the cache is a speed-up on a trusted disk, not a security boundary).
    from alignment.reference import load_cache, save_cache

    path = tmp_path / "k.pt"
    save_cache(path, "key", torch.ones(3, 2, dtype=torch.float64))
    assert load_cache(path, "key", 3) is not None
    assert load_cache(path, "other-key", 3) is None
    assert load_cache(path, "key", 4) is None
    blob = torch.load(path, weights_only=True)
    blob["logps"][0, 0] = 5.0  # numbers changed, checksum not updated
    torch.save(blob, path)
    assert load_cache(path, "key", 3) is None


def test_two_processes_give_the_same_loss_as_one(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    common = [
        "model.name_or_path=tiny-qwen2", f"data.sources=[{{path: {data}}}]", "data.max_length=64",
        "training.mixed_precision=no", "loss.nll_weight=0.0",
        "training.max_steps=2", "optimizer.lr=5e-4", "loss.beta=0.5", "reference.mode=model",
        "logging.report_to=[]", "logging.progress_bar=false", "training.per_device_batch_size=2",
    ]  # fmt: skip
    one = run_dpo(tmp_path, "one", *common, "training.gradient_accumulation_steps=2", data=data)
    launch_two_processes(
        "alignment/dpo.py",
        "recipes/dpo.yaml",
        [*common, "training.gradient_accumulation_steps=1"],
        tmp_path / "two",
    )
    a, b = read_metrics(one), read_metrics(tmp_path / "two")
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "rewards/margins", "logps/chosen"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_zero3_over_two_processes_gives_the_losses_of_one(tmp_path, reference):
    """recipes/accelerate/zero3.yaml with 2 processes (on CPU: DeepSpeed's CPU accelerator over gloo): the
    policy is sharded, the frozen reference is loaded whole in each process (loaded under ZeRO-3's zero.Init it
    could not run a forward), and the losses are those of 1 process with the same global batch."""

    pytest.importorskip("deepspeed")
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    common = [
        "model.name_or_path=tiny-qwen2", f"data.sources=[{{path: {data}}}]", "data.max_length=64",
        "training.mixed_precision=no", "loss.nll_weight=0.0", "training.max_steps=2", "optimizer.lr=5e-4",
        "loss.beta=0.5", f"reference.mode={reference}", f"reference.cache_dir={tmp_path / 'ref'}",
        "logging.report_to=[]", "logging.progress_bar=false", "training.per_device_batch_size=2",
    ]  # fmt: skip
    one = run_dpo(tmp_path, "one", *common, "training.gradient_accumulation_steps=2", data=data)
    two = tmp_path / "two"
    proc = launch_two_processes(
        "alignment/dpo.py",
        "recipes/dpo.yaml",
        [*common, "training.gradient_accumulation_steps=1"],
        two,
        config_file="recipes/accelerate/zero3.yaml",
    )
    assert (
        "[train] DeepSpeed ZeRO-3 on" in proc.stdout and proc.stdout.count("holds 9853376 of 19706752") == 2
    )
    a, b = read_metrics(one), read_metrics(two)
    # The second step's implicit rewards follow one Adam step (lr 5e-4; margins about 5e-3): DeepSpeed's other
    # gradient summation order moved them by up to 3e-6 here, a missed step would leave them at 0.
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), k
    assert b[-1]["rewards/margins"] != 0


def test_dpo_with_the_online_merging_optimizer_trains_and_resumes_identically(tmp_path, tiny_qwen2):
    """optimizer.name: ondare from the recipe; tau = (the start model) - (tiny-qwen2). An interrupted and
    resumed run (masks, tau and moments restored through accelerate's checkpoint) ends with the same weights."""
    from tests.test_sft import run_sft

    start = run_sft(tmp_path, "sft", "training.max_steps=2")  # theta_r differs from the base theta_b
    merging = [f"model.name_or_path={start}", "optimizer.name=ondare", "optimizer.base=tiny-qwen2",
               "optimizer.reserve_p=0.5", "optimizer.alpha=0.01", "training.max_steps=4", "training.save_steps=2"]  # fmt: skip
    full = run_dpo(tmp_path, "full", *merging)
    part = run_dpo(tmp_path, "part", *merging)
    (part / "model.safetensors").unlink()
    lines = (part / "metrics.jsonl").read_text().splitlines()[:2]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run_dpo(tmp_path, "part", *merging, "training.resume_from_checkpoint=latest")
    a, b = read_metrics(full), read_metrics(part)
    assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], rel=1e-6)
    wa, wb = load_file(f"{full}/model.safetensors"), load_file(f"{part}/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ws = load_file(f"{start}/model.safetensors")
    assert any(not torch.equal(ws[k], wa[k]) for k in ws)


def test_merging_optimizer_refuses_lora(tmp_path):
    with pytest.raises(ValueError, match="cannot drive LoRA"):
        run_dpo(
            tmp_path,
            "x",
            "model.lora={r: 4}",
            "optimizer.name=ondare",
            "optimizer.base=tiny-qwen2",
            "training.max_steps=1",
        )


def test_pairs_share_their_prompt_with_the_log_probs_and_gradients_of_whole_sequences():
    """Each rejected answer reads its chosen's prompt tokens (written once): the summed log-probs, the reward
    model's scores and the gradients equal those of the 2B whole sequences."""
    from alignment.config import ModelConfig
    from alignment.data import DataReport, normalize_preference_row, tokenize_pair
    from alignment.logprobs import TokenLogProbs
    from alignment.models import load_causal_lm, load_tokenizer
    from alignment.preference import pair_logps
    from alignment.reward_model import pair_scores
    from reward.model import SequenceScores, load_reward_model

    tok = load_tokenizer("tiny-qwen2")
    pairs = [
        tokenize_pair(tok, normalize_preference_row(row, f"row {i}"), 64, "truncate_prompt", DataReport())
        for i, row in enumerate(PAIRS[:4])
    ]
    model = load_causal_lm(ModelConfig(name_or_path="tiny-qwen2"), 64, trainable=True)
    rm, _ = load_reward_model("tiny-qwen2", trainable=True)
    results = []
    for share in (True, False):
        model.zero_grad()
        rm.zero_grad()
        lp = pair_logps(TokenLogProbs(model, share_prompt=share), pairs, "cpu")
        c, r = pair_scores(SequenceScores(rm, share_prompt=share), pairs, "cpu")
        (lp.chosen.sum() - 2 * lp.rejected.sum() + c.sum() - r.sum()).backward()
        grads = [p.grad.clone() for p in [*model.parameters(), *rm.parameters()] if p.grad is not None]
        results.append(([lp.chosen, lp.rejected, lp.chosen_len, lp.rejected_len, c, r], grads))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
