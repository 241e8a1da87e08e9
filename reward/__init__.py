"""Verifiable rewards (math, instruction following, code, generated verifiers), their composition, and the
sandbox that runs model-written code. See ``reward.compose`` for building a recipe's reward from specs."""

from reward.base import Prompt, RewardFunction, RewardOutput
from reward.code_reward import CodeReward
from reward.compose import (
    ComposedReward,
    RewardSpec,
    available_rewards,
    build_reward,
    make_reward,
    register_reward,
    safe_call,
)
from reward.ifeval import IFEvalReward
from reward.math_reward import MathReward
from reward.sandbox import Sandbox, SandboxConfig, SandboxJob, SandboxResult, Status, isolation_report
from reward.verifier import VerifierReward

__all__ = [
    "CodeReward",
    "ComposedReward",
    "IFEvalReward",
    "MathReward",
    "VerifierReward",
    "Prompt",
    "RewardFunction",
    "RewardOutput",
    "RewardSpec",
    "Sandbox",
    "SandboxConfig",
    "SandboxJob",
    "SandboxResult",
    "Status",
    "available_rewards",
    "build_reward",
    "isolation_report",
    "make_reward",
    "register_reward",
    "safe_call",
]
