"""README claims about offline DPO that a broken implementation must fail, each on tiny-qwen2 in a few steps:

- 2 processes equal 1 with the recipe's default ``reference.mode: precomputed`` (the same table, the same
  final weights), and with the online merging optimizer (every rank draws the same masks);
- processes that lose their process group are refused;
- the frozen-copy reference stays the start model (it is neither the policy itself nor a copy that follows it);
- the reference cache key covers the reference weights, the dtype and mixed precision, and a damaged cache
  file is detected (corruption, not tampering: the checksum lives in the same file);
- each loss's value at the first step equals the paper's formula computed by hand from an independent
  forward pass of the policy and the reference.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from alignment.dpo import main as dpo_main
from tests.conftest import REPO, free_port, read_metrics, reset_accelerate, write_jsonl

PAIRS = [
    {
        "prompt": f"What is {a} plus {b}?",
        "chosen": f"The answer is {a + b}.",
        "rejected": f"The answer is {a + b + 1}.",
    }
    for a, b in [(12, 30), (7, 5), (100, 23), (41, 9), (3, 3), (56, 44), (18, 2), (90, 9)]
]
BETA = 0.5


def run_dpo(tmp_path: Path, name: str, *overrides: str, data=None) -> Path:
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
            "training.per_device_batch_size=2",
            "optimizer.lr=5e-4",
            "scheduler.min_lr=5e-5",
            f"loss.beta={BETA}",
            f"reference.cache_dir={tmp_path / 'refcache'}",
            "logging.report_to=[]",
            "logging.progress_bar=false",
            f"training.output_dir={out}",
            *overrides,
        ]
    )
    return out


def launch_two(overrides: list[str], output_dir: Path) -> str:
    """``accelerate launch --multi_gpu --num_processes 2`` of alignment/dpo.py (gloo on CPU); its stdout."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", str(REPO / "alignment/dpo.py"), str(REPO / "recipes/dpo.yaml"), *overrides,
        f"training.output_dir={output_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def common_args(tmp_path: Path, data: Path, cache: Path) -> list[str]:
    return [
        "model.name_or_path=tiny-qwen2", f"data.sources=[{{path: {data}}}]", "data.max_length=64",
        "training.mixed_precision=no", "loss.nll_weight=0.0",
        "training.max_steps=3", "optimizer.lr=5e-4", "scheduler.min_lr=5e-5", f"loss.beta={BETA}",
        "logging.report_to=[]", "logging.progress_bar=false", "training.per_device_batch_size=2",
        f"reference.cache_dir={cache}",
    ]  # fmt: skip


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=k)


# ---------------------------------------------------------------- 2 processes == 1


def test_precomputed_reference_on_two_processes_equals_one(tmp_path):
    """The recipe's default reference: each rank computes its share of the table, the ranks agree on a cache
    miss, and the table and the final weights equal a single process's (accumulation 2 = 2 ranks x 1)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cache_two, cache_one = tmp_path / "cache-two", tmp_path / "cache-one"
    stdout = launch_two(
        [*common_args(tmp_path, data, cache_two), "training.gradient_accumulation_steps=1"], tmp_path / "two"
    )
    assert "computed and cached" in stdout
    one = run_dpo(
        tmp_path,
        "one",
        *common_args(tmp_path, data, cache_one),
        "training.gradient_accumulation_steps=2",
        data=data,
    )
    (file_two,), (file_one,) = list(cache_two.glob("*.pt")), list(cache_one.glob("*.pt"))
    assert file_two.name == file_one.name  # the key does not depend on the number of processes
    table_two = torch.load(file_two, weights_only=True)["logps"]
    table_one = torch.load(file_one, weights_only=True)["logps"]
    assert table_two.shape == (len(PAIRS), 2) and (table_two < 0).all()  # every row filled, by some rank
    torch.testing.assert_close(table_two, table_one, atol=1e-4, rtol=1e-5)
    a, b = read_metrics(one), read_metrics(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], rel=1e-4, abs=1e-6)
    assert_same_weights(one, tmp_path / "two")


def test_merging_optimizer_on_two_processes_equals_one(tmp_path, perturbed_qwen2):
    """OnDARE with tau = start - tiny-qwen2 != 0 and half the update kept at random: ranks that drew different
    masks would train different weights, and from step 2 on their gradients would move rank 0 off the
    single-process run."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    merging = [
        f"model.name_or_path={perturbed_qwen2}", "optimizer.name=ondare", "optimizer.base=tiny-qwen2",
        "optimizer.reserve_p=0.5", "optimizer.alpha=0.01",
    ]  # fmt: skip
    common = [*common_args(tmp_path, data, tmp_path / "cache"), *merging]
    launch_two([*common, "training.gradient_accumulation_steps=1"], tmp_path / "two")
    one = run_dpo(tmp_path, "one", *common, "training.gradient_accumulation_steps=2", data=data)
    a, b = read_metrics(one), read_metrics(tmp_path / "two")
    assert [x["loss"] for x in a] == pytest.approx([y["loss"] for y in b], rel=1e-5)
    assert_same_weights(one, tmp_path / "two")
    start = load_file(f"{perturbed_qwen2}/model.safetensors")
    trained = load_file(f"{one}/model.safetensors")
    assert any(not torch.equal(start[k], trained[k]) for k in start)


def test_processes_that_lose_their_process_group_are_refused(monkeypatch):
    """The launcher started 2 processes (WORLD_SIZE=2) but the Accelerator formed no group (as on a CPU
    machine without ``cpu=True``): training alone would silently be another run, so make_accelerator refuses."""
    import accelerate

    from alignment.config import TrainingConfig
    from alignment.training import make_accelerator

    real = accelerate.Accelerator

    def without_group(*args, **kwargs):
        launched = os.environ.pop("WORLD_SIZE")  # what the Accelerator sees: no distributed launch
        try:
            return real(*args, **kwargs)
        finally:
            os.environ["WORLD_SIZE"] = launched

    monkeypatch.setattr(accelerate, "Accelerator", without_group)
    for launched, refused in (("2", True), ("1", False)):
        monkeypatch.setenv("WORLD_SIZE", launched)
        reset_accelerate()
        try:
            if refused:
                with pytest.raises(RuntimeError, match=r"launched 2 processes but the process group has 1"):
                    make_accelerator(TrainingConfig())
            else:
                assert make_accelerator(TrainingConfig()).num_processes == 1
        finally:
            reset_accelerate()


# ---------------------------------------------------------------- the frozen-copy reference


def test_frozen_reference_stays_the_start_model(tmp_path):
    """Every step trains on the same pair, so the reference log-prob implied by the logged metrics,
    logps/chosen - rewards/chosen / beta, must stay at the start model's value (step 1's logps/chosen) while
    the policy moves. A reference that is the policy itself gives rewards 0 (implied = the moving logps);
    one that follows the policy drifts."""
    data = write_jsonl(tmp_path / "same.jsonl", [PAIRS[0]] * 4)
    out = run_dpo(tmp_path, "frozen", "reference.mode=model", "training.max_steps=4", data=data)
    m = read_metrics(out)
    assert len(m) == 4
    start_c, start_r = m[0]["logps/chosen"], m[0]["logps/rejected"]
    assert m[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    for x in m[1:]:
        assert x["logps/chosen"] - start_c > 1e-3  # the policy moved (towards the chosen answer)
        assert abs(x["rewards/margins"]) > 1e-3 and x["loss"] < math.log(2) - 1e-4
        assert x["logps/chosen"] - x["rewards/chosen"] / BETA == pytest.approx(start_c, abs=1e-3)
        assert x["logps/rejected"] - x["rewards/rejected"] / BETA == pytest.approx(start_r, abs=1e-3)


# ---------------------------------------------------------------- the reference cache


class _OneProcess:
    """The few Accelerator members cached_reference_logps uses, for one process."""

    device = torch.device("cpu")
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t


def test_reference_cache_key_covers_weights_dtype_and_precision(tiny_qwen2, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignment.reference import cache_key, cached_reference_logps, fingerprint_model

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    fp = fingerprint_model(model)
    assert fingerprint_model(model) == fp  # deterministic
    with torch.no_grad():
        param = next(p for n, p in model.named_parameters() if "layers.1" in n)
        param.view(-1)[0] += 1e-3  # one weight of one layer
    assert fingerprint_model(model) != fp
    with torch.no_grad():
        param.view(-1)[0] -= 1e-3
    assert fingerprint_model(model) == fp  # back to the same bytes
    assert fingerprint_model(model.to(torch.bfloat16)) != fp  # the dtype of the weights

    settings = {"dtype": "float32", "mixed_precision": "no"}
    key = cache_key(fp, "pairs", settings)
    variants = [
        cache_key("other-weights", "pairs", settings),
        cache_key(fp, "other-pairs", settings),
        cache_key(fp, "pairs", {**settings, "dtype": "bfloat16"}),
        cache_key(fp, "pairs", {**settings, "mixed_precision": "bf16"}),
    ]
    assert len({key, *variants}) == 5

    # A key change is a cache miss: computed again, not served from another key's file.
    calls = []

    def compute(value: float):
        def run() -> torch.Tensor:
            calls.append(value)
            return torch.full((3, 2), value, dtype=torch.float64)

        return run

    acc = _OneProcess()
    first, hit = cached_reference_logps(tmp_path / f"{key}.pt", key, 3, compute(-1.0), acc)
    assert not hit and calls == [-1.0]
    again, hit = cached_reference_logps(tmp_path / f"{key}.pt", key, 3, compute(-9.0), acc)
    assert hit and calls == [-1.0] and torch.equal(again, first)
    for i, other in enumerate(variants[2:]):  # the dtype, then mixed precision
        table, hit = cached_reference_logps(tmp_path / f"{other}.pt", other, 3, compute(-2.0 - i), acc)
        assert not hit and table[0, 0].item() == -2.0 - i
    # Even a file under the right name but written for another key is not trusted.
    shutil.copy(tmp_path / f"{key}.pt", tmp_path / "renamed.pt")
    table, hit = cached_reference_logps(tmp_path / "renamed.pt", variants[0], 3, compute(-5.0), acc)
    assert not hit and table[0, 0].item() == -5.0


def test_reference_cache_rebuilds_for_new_weights_and_precision_end_to_end(tmp_path, perturbed_qwen2, capsys):
    """The pipeline puts the reference weights and mixed precision into the key (not just the pairs)."""
    cache = tmp_path / "refcache"
    run_dpo(tmp_path, "a", "training.max_steps=1")
    assert "computed and cached" in capsys.readouterr().out
    run_dpo(tmp_path, "b", "training.max_steps=1")
    assert "reused" in capsys.readouterr().out
    run_dpo(tmp_path, "c", "training.max_steps=1", f"reference.name_or_path={perturbed_qwen2}")
    assert "computed and cached" in capsys.readouterr().out
    run_dpo(tmp_path, "d", "training.max_steps=1", "training.mixed_precision=bf16")
    assert "computed and cached" in capsys.readouterr().out
    assert len(list(cache.glob("*.pt"))) == 3


def test_reference_cache_detects_corruption(tmp_path):
    """The digest is stored in the same file, so it catches a damaged or partly written file (bit rot, a
    crash, a bad copy), not a deliberate edit that rewrites the digest too: the cache folder is trusted
    like the model folder."""
    from alignment.reference import load_cache, save_cache

    path = tmp_path / "k.pt"
    save_cache(path, "key", torch.ones(3, 2, dtype=torch.float64))
    assert load_cache(path, "key", 3) is not None
    assert load_cache(path, "other-key", 3) is None
    assert load_cache(path, "key", 4) is None
    blob = torch.load(path, weights_only=True)
    blob["logps"][0, 0] = 5.0  # the numbers changed, the stored digest did not
    torch.save(blob, path)
    assert load_cache(path, "key", 3) is None
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a partial write
    assert load_cache(path, "key", 3) is None


# ---------------------------------------------------------------- each loss's first step, by hand


def answer_logps(folder: str, prompt: str, answer: str) -> tuple[float, int]:
    """Sum of log p(answer tokens and the end-of-turn token) under the model in ``folder``, and their count:
    a plain transformers forward pass over the ChatML rendering, independent of alignment/."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    user = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
    ids = tok(full.rstrip(), add_special_tokens=False).input_ids  # ends with <|im_end|>
    n_head = len(tok(head, add_special_tokens=False).input_ids)
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logps = F.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]  # logp(ids[t+1])
    return logps[n_head - 1 :].sum().item(), len(ids) - n_head


@pytest.fixture(scope="module")
def by_hand(tiny_qwen2, perturbed_qwen2) -> dict[str, float]:
    """Policy (tiny-qwen2) and reference (the perturbed copy) log-probs of PAIRS[0], computed independently."""
    p = PAIRS[0]
    c, len_c = answer_logps(tiny_qwen2, p["prompt"], p["chosen"])
    r, len_r = answer_logps(tiny_qwen2, p["prompt"], p["rejected"])
    ref_c, _ = answer_logps(perturbed_qwen2, p["prompt"], p["chosen"])
    ref_r, _ = answer_logps(perturbed_qwen2, p["prompt"], p["rejected"])
    return {"c": c, "r": r, "ref_c": ref_c, "ref_r": ref_r, "len_c": len_c, "len_r": len_r}


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def expected_loss(name: str, v: dict[str, float], eps: float, gamma: float, nll_weight: float) -> float:
    """The papers' formulas on one pair (see alignment/losses.py), in plain Python floats."""
    h = (v["c"] - v["ref_c"]) - (v["r"] - v["ref_r"])
    if name == "sigmoid":  # DPO, with conservative DPO's eps
        loss = -(1 - eps) * logsigmoid(BETA * h) - eps * logsigmoid(-BETA * h)
    elif name == "robust":  # Chowdhury et al. 2024, eq. 10
        loss = (-(1 - eps) * logsigmoid(BETA * h) + eps * logsigmoid(-BETA * h)) / (1 - 2 * eps)
    elif name == "ipo":  # length-averaged log-probs, target margin 1 / (2 beta)
        h_avg = (v["c"] - v["ref_c"]) / v["len_c"] - (v["r"] - v["ref_r"]) / v["len_r"]
        loss = (h_avg - 1 / (2 * BETA)) ** 2
    else:  # SimPO: reference-free, length-normalised, margin gamma
        loss = -logsigmoid(BETA * v["c"] / v["len_c"] - BETA * v["r"] / v["len_r"] - gamma)
    return loss + nll_weight * (-v["c"] / v["len_c"])


@pytest.mark.parametrize(
    ("name", "eps", "nll_weight"),
    [
        ("sigmoid", 0.0, 0.0),
        ("sigmoid", 0.2, 0.0),
        ("robust", 0.2, 0.0),
        ("ipo", 0.0, 0.0),
        ("simpo", 0.0, 0.0),
        ("sigmoid", 0.0, 0.3),
    ],
    ids=["dpo", "cdpo", "robust", "ipo", "simpo", "dpo+nll"],
)
def test_first_step_loss_equals_the_formula_by_hand(
    tmp_path, perturbed_qwen2, by_hand, name, eps, nll_weight
):
    """One pair, one step, a reference that differs from the policy (so h != 0 and the losses differ from
    each other): the logged loss and log-probs equal an independent forward pass put through the formula."""
    data = write_jsonl(tmp_path / "one.jsonl", [PAIRS[0]])
    gamma = 0.3
    out = run_dpo(
        tmp_path,
        name,
        f"loss.name={name}",
        f"loss.label_smoothing={eps}",
        f"loss.simpo_gamma={gamma}",
        f"loss.nll_weight={nll_weight}",
        "reference.mode=model",
        f"reference.name_or_path={perturbed_qwen2}",
        "training.per_device_batch_size=1",
        "training.max_steps=1",
        data=data,
    )
    (m,) = read_metrics(out)
    assert m["logps/chosen"] == pytest.approx(by_hand["c"], rel=1e-4)
    assert m["logps/rejected"] == pytest.approx(by_hand["r"], rel=1e-4)
    expected = expected_loss(name, by_hand, eps, gamma, nll_weight)
    assert m["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # The losses really differ here, so a loss.name that was ignored would fail above.
    others = {n: expected_loss(n, by_hand, 0.2, gamma, 0.0) for n in ("sigmoid", "robust", "ipo", "simpo")}
    assert len({round(v, 3) for v in others.values()}) == 4


@pytest.mark.parametrize(
    ("name", "expected"),
    [("sigmoid", math.log(2)), ("robust", math.log(2)), ("ipo", (1 / (2 * BETA)) ** 2)],
)
def test_first_step_loss_when_the_reference_is_the_start_model(tmp_path, name, expected):
    """At step 1 policy == reference, so h = 0: DPO and robust DPO give log 2, IPO (1 / (2 beta))^2."""
    extra = ["loss.label_smoothing=0.2"] if name == "robust" else []
    out = run_dpo(tmp_path, name, f"loss.name={name}", "training.max_steps=1", *extra)
    (m,) = read_metrics(out)
    assert m["loss"] == pytest.approx(expected, abs=1e-5)
    assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
