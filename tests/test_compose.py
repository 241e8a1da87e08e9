"""Composition: registry, specs, weighted sums, gates, missing-score policies, and failures that never raise."""

from __future__ import annotations

import logging
import math

import pytest

import reward.compose as compose
from reward import (
    RewardOutput,
    RewardSpec,
    available_rewards,
    build_reward,
    make_reward,
    register_reward,
    safe_call,
)


class Table:
    """A reward that looks its scores up in a column; records what it was called with."""

    def __init__(self, column: str = "s", label: str = "table") -> None:
        self.name, self.column, self.calls = label, column, []

    def __call__(self, prompts, completions, **columns):
        self.calls.append((list(completions), {k: list(v) for k, v in columns.items()}))
        scores = list(columns[self.column])
        return RewardOutput(scores, [None if s is not None else f"{self.name} has no score" for s in scores])


class Raises:
    name = "raises"

    def __call__(self, prompts, completions, **columns):
        raise RuntimeError("boom")


@pytest.fixture
def registry():
    """Register test rewards, and remove them afterwards so tests do not leak into each other."""
    names = []

    def add(name, factory):
        register_reward(name)(factory)
        names.append(name)

    yield add
    for name in names:
        compose._REGISTRY.pop(name, None)


def _run(reward, n=None, **columns):
    n = n or len(next(iter(columns.values())))
    return reward(["p"] * n, [f"c{i}" for i in range(n)], **columns)


# ---------------------------------------------------------------- registry


def test_builtins_are_registered():
    assert {"math", "format_boxed", "ifeval", "code", "format_code_block", "verifier"} <= set(
        available_rewards()
    )


def test_register_build_and_params(registry):
    registry("t_table", Table)
    reward = make_reward("t_table", column="x", label="mine")
    assert reward.name == "mine" and reward.column == "x"
    with pytest.raises(ValueError, match=r"unknown params \['colour'\].*accepts \['column', 'label'\]"):
        make_reward("t_table", colour="red")


def test_duplicate_names_need_replace(registry):
    registry("t_dup", Table)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("t_dup")(Raises)
    register_reward("t_dup", replace=True)(Raises)
    assert isinstance(make_reward("t_dup"), Raises)


def test_unknown_and_bad_names():
    with pytest.raises(ValueError, match="unknown reward 'nope'.*registered"):
        make_reward("nope")
    with pytest.raises(ValueError, match="cannot import"):
        make_reward("reward.nope:Thing")
    with pytest.raises(ValueError, match="without ':'"):
        register_reward("a:b")


def test_module_attribute_names_need_no_registration():
    reward = make_reward("reward.math_reward:BoxedFormatReward")
    assert reward(["p"], ["\\boxed{1}"]).scores == [1.0]


def test_reward_model_is_buildable_by_name_without_loading_it_early():
    assert "reward_model" in available_rewards()
    # The params are checked against RewardModelScorer's signature before any model is loaded.
    with pytest.raises(ValueError, match=r"unknown params \['path'\].*'name_or_path'"):
        make_reward("reward_model", path="x")


def test_factory_must_return_a_reward(registry):
    registry("t_not_reward", lambda: 42)
    with pytest.raises(TypeError, match="no name/__call__"):
        make_reward("t_not_reward")


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "name"),
        ({"name": "math", "weight": math.nan}, "finite"),
        ({"name": "math", "weight": True}, "finite"),
        ({"name": "math", "weight": "1"}, "finite"),
        ({"name": "math", "gate": "yes"}, "threshold"),
        ({"name": "math", "params": [1]}, "mapping"),
    ],
)
def test_bad_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardSpec(**kwargs)


def test_spec_from_dict_names_unknown_keys():
    assert RewardSpec.from_dict({"name": "math", "weight": 2.0}).weight == 2.0
    with pytest.raises(ValueError, match=r"rewards\[1\]: unknown keys \['wieght'\]"):
        RewardSpec.from_dict({"name": "math", "wieght": 2.0}, "rewards[1]")
    with pytest.raises(ValueError, match="expected a mapping"):
        RewardSpec.from_dict(["math"])


def test_build_needs_specs_and_unique_labels(registry):
    registry("t_table", Table)
    with pytest.raises(ValueError, match="at least one"):
        build_reward([])
    with pytest.raises(ValueError, match="labels must be unique"):
        build_reward([RewardSpec("t_table"), RewardSpec("t_table")])
    reward = build_reward(
        [RewardSpec("t_table"), RewardSpec("t_table", label="again", params={"column": "t"})]
    )
    assert _run(reward, s=[1.0], t=[0.5]).scores == [1.5]


# ---------------------------------------------------------------- the formula


def test_weighted_sum(registry):
    registry("t_table", Table)
    reward = build_reward(
        [
            {"name": "t_table", "weight": 0.5, "params": {"column": "a"}, "label": "a"},
            {"name": "t_table", "weight": -2.0, "params": {"column": "b"}, "label": "b"},
        ]
    )
    out = _run(reward, a=[1.0, 0.0], b=[0.25, 1.0])
    assert out.scores == [0.5 * 1.0 - 2.0 * 0.25, -2.0]
    assert out.details[0]["components"] == {"a": 1.0, "b": 0.25}
    assert reward.name == "a+b"


def test_gate_blocks_and_skips_later_components(registry):
    correctness = Table(column="right", label="right")
    registry("t_format", lambda: Table(column="fmt", label="fmt"))
    registry("t_right", lambda: correctness)
    reward = build_reward(
        [RewardSpec("t_format", weight=0.0, gate=1.0), RewardSpec("t_right")], gated_score=-1.0
    )
    out = _run(reward, fmt=[1.0, 0.0, 1.0], right=[1.0, 1.0, 0.0])
    assert out.scores == [1.0, -1.0, 0.0]
    assert out.details[1]["gated_by"] == "t_format"
    # The gated completion never reached the correctness reward, and the columns were cut to match.
    assert correctness.calls == [(["c0", "c2"], {"fmt": [1.0, 1.0], "right": [1.0, 0.0]})]
    assert reward.stats() == {"gated/t_format": 1}


def test_gate_that_cannot_judge(registry):
    registry("t_table", Table)
    specs = [
        RewardSpec("t_table", weight=0.0, gate=0.5, label="g"),
        RewardSpec("t_table", params={"column": "v"}, label="v"),
    ]
    strict = build_reward(specs)
    out = _run(strict, s=[None], v=[1.0])
    assert out.scores == [None] and out.reasons[0].startswith("g: ")
    lenient = build_reward(specs, missing="zero")
    assert _run(lenient, s=[None], v=[1.0]).scores == [0.0]  # gated


@pytest.mark.parametrize(
    ("missing", "expected"), [("none", None), ("zero", 1.0), ("renormalize", 1.0 * 3 / 1)]
)
def test_missing_policies(registry, missing, expected):
    registry("t_table", Table)
    specs = [
        RewardSpec("t_table", weight=1.0, params={"column": "a"}, label="a"),
        RewardSpec("t_table", weight=2.0, params={"column": "b"}, label="b"),
    ]
    out = _run(build_reward(specs, missing=missing), a=[1.0], b=[None])
    assert out.scores == [expected]
    if missing == "none":
        assert out.reasons == ["b: table has no score"]


def test_bad_missing_policy(registry):
    registry("t_table", Table)
    with pytest.raises(ValueError, match="missing"):
        build_reward(RewardSpec("t_table"), missing="ignore")


# ---------------------------------------------------------------- failures become None, counted


def test_raising_component_is_none_and_counted(registry, caplog):
    registry("t_raises", Raises)
    registry("t_table", Table)
    reward = build_reward([RewardSpec("t_raises"), RewardSpec("t_table")], missing="zero")
    with caplog.at_level(logging.WARNING, logger="reward.compose"):
        out = _run(reward, s=[1.0, 0.5])
    assert out.scores == [1.0, 0.5]
    assert out.details[0]["components"]["t_raises"] is None
    assert reward.stats() == {"none/t_raises": 2}
    # Logged, not silent: the exception with its traceback once per call, the missing score once per reason.
    raised = [r for r in caplog.records if r.getMessage() == "reward raises raised"]
    assert (
        len(raised) == 1 and raised[0].levelno == logging.ERROR and "RuntimeError: boom" in raised[0].exc_text
    )
    warned = [r for r in caplog.records if "could not judge an item" in r.getMessage()]
    assert len(warned) == 1 and "t_raises" in warned[0].getMessage()
    strict = build_reward([RewardSpec("t_raises"), RewardSpec("t_table")])
    out = _run(strict, s=[1.0])
    assert out.scores == [None] and "t_raises: raises raised RuntimeError: boom" in out.reasons[0]


@pytest.mark.parametrize(
    ("scores", "reason"),
    [
        ([float("nan")], "non-finite"),
        ([True], "non-number"),
        (["1"], "non-number"),
        ([None], "no score and no reason"),
    ],
)
def test_safe_call_rejects_bad_scores(scores, reason):
    class Bad:
        name = "bad"

        def __call__(self, prompts, completions, **columns):
            return RewardOutput(list(scores), [None])

    out = safe_call(Bad(), ["p"], ["c"], {})
    assert out.scores == [None] and reason in out.reasons[0]


def test_safe_call_rejects_wrong_lengths_and_types():
    class Short:
        name = "short"

        def __call__(self, prompts, completions, **columns):
            return RewardOutput([1.0])

    class NotOutput:
        name = "list"

        def __call__(self, prompts, completions, **columns):
            return [1.0, 1.0]

    assert "returned 1 scores for 2" in safe_call(Short(), ["p", "p"], ["a", "b"], {}).reasons[0]
    assert safe_call(NotOutput(), ["p", "p"], ["a", "b"], {}).scores == [None, None]
    assert safe_call(Short(), ["p"], ["a"], {}).scores == [1.0]


def test_mismatched_columns_are_a_caller_error(registry):
    registry("t_table", Table)
    with pytest.raises(ValueError, match="column lengths"):
        build_reward(RewardSpec("t_table"))(["p"], ["a"], s=[1.0, 2.0])


# ---------------------------------------------------------------- with the real rewards


def test_boxed_gate_then_math():
    reward = build_reward(
        [{"name": "format_boxed", "weight": 0.0, "gate": 1.0}, {"name": "math", "params": {"timeout_s": 5}}]
    )
    try:
        completions = ["\\boxed{\\frac{1}{2}}", "The answer is 0.5", "\\boxed{3}"]
        out = reward(["p"] * 3, completions, answer=["0.5", "0.5", "4"])
        assert out.scores == [1.0, 0.0, 0.0]
        assert out.details[1]["gated_by"] == "format_boxed"
    finally:
        reward.components[1][1].close()


def test_code_block_gate_then_code_and_ifeval():
    reward = build_reward(
        [
            RewardSpec("format_code_block", weight=0.0, gate=1.0),
            RewardSpec("code", weight=1.0, params={"timeout_s": 5.0, "memory_mb": 256}),
            RewardSpec("ifeval", weight=0.5),
        ]
    )
    tests = ["assert double(2) == 4", "assert double(0) == 0"]
    constraints = [{"type": "no_commas"}]
    out = reward(
        ["p"] * 2,
        ["```python\ndef double(x):\n    return 2 * x\n```", "def double(x):\n    return 2 * x"],
        tests=[tests, tests],
        constraints=[constraints, constraints],
    )
    assert out.scores == [1.5, 0.0]
