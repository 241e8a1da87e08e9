"""Rewards for tests, importable by name ("tests.toy_rewards:AsciiShare") from a recipe's rewards list."""

from __future__ import annotations

from reward.base import RewardOutput


class AsciiShare:
    """The share of an answer's characters that are ASCII lowercase letters or spaces: a verifiable toy task
    a random tiny model scores about 0.1-0.3 on, with room to learn."""

    name = "ascii_share"

    def __call__(self, prompts, completions, **columns):
        return RewardOutput(
            [sum(c.islower() and c.isascii() or c == " " for c in t) / max(1, len(t)) for t in completions]
        )


class Raises:
    name = "raises"

    def __call__(self, prompts, completions, **columns):
        raise RuntimeError("this reward always fails")
