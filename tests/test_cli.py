"""What a user sees: ``--help`` prints each entry point's schema, and the progress bar shows up (with
tokens/s for SFT) unless ``logging.progress_bar: false``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignment.config import parse_cli
from tests.conftest import REPO, reset_accelerate, write_jsonl


@pytest.mark.parametrize(
    ("module", "schema", "keys"),
    [
        ("alignment.sft", "SFTConfig", ["lr: float", "packing: bool", "max_grad_norm: float"]),
        ("alignment.dpo", "DPOConfig", ["beta: float", "label_smoothing: float", "cache_dir: str | null"]),
        ("alignment.reward_model", "RewardModelConfig", ["eval_fraction: float", "eval_steps: int"]),
    ],
)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_schema(module, schema, keys, flag, capsys):
    import importlib

    cls = getattr(importlib.import_module(module), schema)
    with pytest.raises(SystemExit) as done:
        parse_cli(cls, [flag])
    assert done.value.code == 0  # asking for help is not an error
    text = capsys.readouterr().out
    assert text.startswith("usage: ") and f"schema: {schema}" in text
    for key in keys:
        assert key in text
    assert "optimizer: OptimizerConfig" in text and "name: 'adamw' | 'ondare' | 'onties'" in text


def test_help_from_the_command_line():
    done = subprocess.run(
        [sys.executable, str(REPO / "alignment/sft.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "schema: SFTConfig" in done.stdout
    assert "lr: float (default" in done.stdout
    assert "Traceback" not in done.stderr


def run_sft_two_steps(tmp_path, progress_bar: bool) -> None:
    from alignment.sft import main as sft_main

    rows = [
        {"messages": [{"role": "user", "content": f"What is {a} plus 1?"},
                      {"role": "assistant", "content": f"The answer is {a + 1}."}]}
        for a in range(4)
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    reset_accelerate()
    sft_main(
        [
            str(REPO / "recipes/sft.yaml"),
            "model.name_or_path=tiny-qwen2",
            "model.rope_scaling=null",
            "model.gradient_checkpointing=false",
            f"data.sources=[{{path: {data}}}]",
            "data.max_length=64",
            "data.packing=false",
            "training.per_device_batch_size=2",
            "training.max_steps=2",
            "logging.report_to=[]",
            f"logging.progress_bar={str(progress_bar).lower()}",
            f"training.output_dir={tmp_path / ('bar' if progress_bar else 'quiet')}",
        ]
    )


def test_progress_bar_shows_steps_loss_and_tokens_per_second(tmp_path, capfd):
    run_sft_two_steps(tmp_path, progress_bar=True)
    err = capfd.readouterr().err
    assert "2/2" in err  # steps done / total
    assert "loss=" in err and "tok_s=" in err  # the postfix: loss, learning rate, tokens/s

    run_sft_two_steps(tmp_path, progress_bar=False)
    err = capfd.readouterr().err
    assert "tok_s=" not in err and "2/2" not in err
