"""The config system: types, unknown keys, missing values, overrides, and every recipe file loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from alignment.config import ConfigError, load_config, load_yaml, parse_cli
from alignment.sft import SFTConfig
from tests.conftest import REPO


@dataclass
class Inner:
    lr: float = 1.0
    name: str = "x"


@dataclass
class Outer:
    required: int
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_scientific_notation_without_dot_is_a_float():
    assert load_yaml("lr: 7e-6") == {"lr": 7e-6}
    assert load_yaml("a: 1E5\nb: 3\nc: .5\nd: '7e-6'") == {"a": 1e5, "b": 3, "c": 0.5, "d": "7e-6"}


def test_yaml_booleans_are_only_true_and_false():
    # YAML 1.1 reads no/yes/on/off as booleans: `training.mixed_precision=no` then failed as False.
    assert load_yaml("a: no\nb: yes\nc: off\nd: true\ne: False") == {
        "a": "no",
        "b": "yes",
        "c": "off",
        "d": True,
        "e": False,
    }
    cfg = parse_cli(SFTConfig, ["recipes/sft.yaml", "training.mixed_precision=no"])
    assert cfg.training.mixed_precision == "no"


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "required: 1\ninner:\n  lr: 1.0\n  nmae: y\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: inner\.nmae: unknown key .*lr, name"):
        load_config(Outer, p)


def test_wrong_type_names_key_expected_and_value(tmp_path):
    p = write(tmp_path, "required: 1\ninner: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: inner\.lr: expected float, got str 'fast'"):
        load_config(Outer, p)
    with pytest.raises(ConfigError, match=r"required: expected int, got bool"):
        load_config(Outer, write(tmp_path, "required: true\n"))
    with pytest.raises(ConfigError, match=r"tags\[1\]: expected str, got int"):
        load_config(Outer, write(tmp_path, "required: 1\ntags: [a, 2]\n"))


def test_missing_required_value(tmp_path):
    with pytest.raises(ConfigError, match=r"r\.yaml: required: required \(int\) but not set"):
        load_config(Outer, write(tmp_path, "inner: {lr: 2.0}\n"))


def test_overrides_are_typed_and_checked(tmp_path):
    p = write(tmp_path, "required: 1\n")
    cfg = parse_cli(Outer, [str(p), "inner.lr=7e-6", "tags=[a,b]", "required=5"])
    assert cfg.inner.lr == 7e-6 and isinstance(cfg.inner.lr, float)
    assert cfg.tags == ["a", "b"] and cfg.required == 5
    with pytest.raises(ConfigError, match=r"inner\.bogus: unknown key"):
        parse_cli(Outer, [str(p), "inner.bogus=1"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Outer, p, ["inner.lr"])


def test_an_override_reaches_into_a_list_item(tmp_path):
    # The chain points online DPO's reward model at its own run: rewards[0].params.name_or_path.
    from alignment.config import apply_override

    data = load_yaml(
        "rewards:\n  - {name: reward_model, params: {name_or_path: outputs/reward}}\n  - {name: math}\n"
    )
    apply_override(data, "rewards[0].params.name_or_path=outputs/chain/reward")
    apply_override(data, "rewards[1].weight=0.5")
    assert data["rewards"] == [
        {"name": "reward_model", "params": {"name_or_path": "outputs/chain/reward"}},
        {"name": "math", "weight": 0.5},
    ]
    with pytest.raises(ConfigError, match=r"rewards is a list of 2 items; cannot set rewards\[2\]\.weight"):
        apply_override(data, "rewards[2].weight=1")
    with pytest.raises(ConfigError, match=r"rewards is not a mapping; cannot set rewards\.weight"):
        apply_override(data, "rewards.weight=1")
    with pytest.raises(ConfigError, match=r"write list items as name\[index\]"):
        apply_override(data, "rewards[first].weight=1")


def test_literal_and_validation_errors_name_the_section(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer\.name: expected one of 'adamw', 'ondare', 'onties'"):
        load_config(SFTConfig, None, ["optimizer.name=sgd"])
    with pytest.raises(ConfigError, match=r"optimizer: optimizer\.base is required for ondare"):
        load_config(SFTConfig, None, ["optimizer.name=ondare"])
    with pytest.raises(ConfigError, match=r"recipe file not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")


def _recipe_files() -> list[Path]:
    # Recursive on purpose: a check that does not recurse misses most configs.
    return sorted(p for p in (REPO / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in _recipe_files()}
    assert {"sft.yaml", "accelerate/single.yaml", "accelerate/ddp.yaml"} <= names


@pytest.mark.parametrize("path", _recipe_files(), ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_loads(path):
    from alignment.recipes import schema_for

    text = path.read_text()
    assert text.startswith("#"), f"{path}: a recipe opens with a header comment (what, launch line, hardware)"
    schema = schema_for(path)
    if schema is None:  # accelerate configs: plain YAML read by accelerate itself
        data = load_yaml(text, str(path))
        assert isinstance(data, dict) and "distributed_type" in data
    else:
        load_config(schema, path)


def test_cli_reports_a_bad_recipe_in_one_line_with_exit_code_2():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "alignment/sft.py", "recipes/sft.yaml", "optimizer.lrr=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: recipes/sft.yaml: optimizer.lrr: unknown key (allowed under optimizer: alpha, base, betas, clip, "
        "eps, lr, merge_every, name, reference, rescale, reserve_p, tau_dtype, use_merge, weight_decay)"
    ]
