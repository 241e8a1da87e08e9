"""The one reward interface that online DPO, rejection sampling and data synthesis call.

A reward function scores a batch: prompts, completions, and the dataset's extra columns (the gold answer, the
unit tests, the constraint list, ...), one float per completion, or ``None`` with a reason when it cannot
judge. A reward that fails never raises into the trainer: it returns ``None`` and a reason, which the caller
logs and counts.

Prompts are either a conversation (a list of ``{"role", "content"}`` messages) or a plain string; completions
are the assistant's text. Rewards that need the rendered conversation (the reward model) render it with their
own tokenizer and chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Prompt = str | list[dict[str, str]]


@dataclass
class RewardOutput:
    """Scores for one batch: ``scores[i]`` is a float, or None with ``reasons[i]`` saying why."""

    scores: list[float | None]
    reasons: list[str | None] = field(default_factory=list)
    # Extra per-item details for logging (e.g. the extracted answer, sandbox status).
    details: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.scores)
        if not self.reasons:
            self.reasons = [None] * n
        if not self.details:
            self.details = [{} for _ in range(n)]
        if len(self.reasons) != n or len(self.details) != n:
            raise ValueError(
                f"RewardOutput: {n} scores but {len(self.reasons)} reasons and {len(self.details)} details"
            )

    @property
    def num_failed(self) -> int:
        return sum(s is None for s in self.scores)


@runtime_checkable
class RewardFunction(Protocol):
    """Anything with a ``name`` and this ``__call__`` is a reward."""

    name: str

    def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        **columns: Sequence[Any],
    ) -> RewardOutput: ...
