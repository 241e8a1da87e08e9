"""Pick, weight and gate rewards by name, and make sure no reward failure ever reaches the trainer.

    from reward import RewardSpec, build_reward

    reward = build_reward([
        RewardSpec("format_boxed", weight=0.0, gate=1.0),      # must hold; adds nothing by itself
        RewardSpec("math", weight=1.0, params={"timeout_s": 5}),
    ])
    out = reward(prompts, completions, answer=golds)           # RewardOutput: floats, or None + reason

A composed reward, per completion (``ComposedReward``):

    gated:      some gate component g scores below its threshold t_g  ->  r = gated_score (default 0.0)
    otherwise:  r = sum_i w_i * s_i over every component, gates included (give a pure gate weight 0)

A component that cannot judge (None) makes ``r`` None with that component's reason (``missing="none"``,
the default), or counts 0 (``missing="zero"``), or is left out with the other weights scaled up to the
same total (``missing="renormalize"``: r = sum_avail w_i s_i * sum_all |w_i| / sum_avail |w_i|). A gate
that cannot judge gives None under "none" and gates the item otherwise. Components after the gates only
score the items that passed them: a sandbox run is not spent on a completion the format gate rejected.

Registry: ``register_reward("name")`` decorates a factory (a class or function taking keyword params and
returning a reward); ``RewardSpec.name`` picks it. A name "package.module:attribute" imports the factory
directly, so a new reward needs no change here. Built-in names: ``math``, ``format_boxed``, ``ifeval``,
``code``, ``format_code_block``, ``verifier``, and ``reward_model`` (``reward.model.RewardModelScorer``,
imported only when a spec names it; params ``name_or_path``, ``device``, ...).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from reward.base import Prompt, RewardFunction, RewardOutput

logger = logging.getLogger(__name__)

RewardFactory = Callable[..., RewardFunction]
_REGISTRY: dict[str, RewardFactory] = {}
# Modules whose import registers the built-in rewards; imported on first lookup (they import this module).
_BUILTIN_MODULES = (
    "reward.math_reward",
    "reward.arithmetic",
    "reward.ifeval",
    "reward.code_reward",
    "reward.verifier",
)
# Built-ins imported only when used: the reward model pulls in torch and transformers.
_LAZY = {"reward_model": "reward.model:RewardModelScorer"}
Missing = Literal["none", "zero", "renormalize"]


def register_reward(name: str, *, replace: bool = False) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: make ``factory(**params)`` buildable as ``RewardSpec(name, params=...)``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register_reward: name must be a non-empty str without ':', got {name!r}")

    def decorate(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory and not replace:
            raise ValueError(
                f"reward {name!r} is already registered ({_REGISTRY[name]!r}); pass replace=True"
            )
        _REGISTRY[name] = factory
        return factory

    return decorate


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_rewards() -> list[str]:
    _load_builtins()
    return sorted({*_REGISTRY, *_LAZY})


def _factory(name: str) -> RewardFactory:
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {name!r}: cannot import {attr!r} from {module!r} ({e})") from e
    if name not in _REGISTRY:
        _load_builtins()
    if name not in _REGISTRY and name in _LAZY:
        return _factory(_LAZY[name])
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown reward {name!r}; registered: {sorted(_REGISTRY)} (or use 'module:attribute')"
        )
    return _REGISTRY[name]


def make_reward(name: str, **params: Any) -> RewardFunction:
    """Build one registered reward, checking ``params`` against the factory's signature first."""
    factory = _factory(name)
    signature = inspect.signature(factory)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    accepted = [n for n, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(params) - set(accepted))
    if unknown and not takes_any:
        raise ValueError(f"reward {name!r} got unknown params {unknown}; it accepts {accepted}")
    reward = factory(**params)
    if not isinstance(reward, RewardFunction):
        raise TypeError(
            f"reward {name!r}: the factory returned {type(reward).__name__}, which has no name/__call__"
        )
    return reward


@dataclass
class RewardSpec:
    """One component of a composed reward, as a recipe writes it."""

    name: str  # a registered name, or "package.module:attribute"
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    gate: float | None = None  # if set: items scoring below this threshold get the gated score
    label: str | None = None  # its name in details and counts; defaults to name (needed for duplicates)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"RewardSpec.name must be a reward name, got {self.name!r}")
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, int | float)
            or not math.isfinite(self.weight)
        ):
            raise ValueError(f"RewardSpec({self.name!r}).weight must be a finite number, got {self.weight!r}")
        if self.gate is not None and (isinstance(self.gate, bool) or not isinstance(self.gate, int | float)):
            raise ValueError(
                f"RewardSpec({self.name!r}).gate must be a threshold number or None, got {self.gate!r}"
            )
        if not isinstance(self.params, Mapping):
            raise ValueError(
                f"RewardSpec({self.name!r}).params must be a mapping, got {type(self.params).__name__}"
            )
        self.params = dict(self.params)
        if self.label is None:
            self.label = self.name

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "reward spec") -> RewardSpec:
        """From a recipe's mapping; unknown keys fail with the key and what is expected."""
        if not isinstance(data, Mapping):
            raise ValueError(
                f"{where}: expected a mapping with keys {[f.name for f in fields(cls)]}, got {data!r}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; a reward spec has {sorted(known)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e


def safe_call(
    reward: RewardFunction,
    prompts: Sequence[Prompt],
    completions: Sequence[str],
    columns: Mapping[str, Sequence],
) -> RewardOutput:
    """Call a reward; an exception, a wrong-length or non-finite output becomes None + reason, never a raise."""
    n = len(completions)
    name = getattr(reward, "name", type(reward).__name__)
    try:
        out = reward(prompts, completions, **columns)
    except Exception as e:  # noqa: BLE001 - the trainer must keep going; the reason is logged and counted
        logger.exception("reward %s raised", name)
        return RewardOutput([None] * n, [f"{name} raised {type(e).__name__}: {e}"] * n)
    if not isinstance(out, RewardOutput) or len(out.scores) != n:
        got = len(out.scores) if isinstance(out, RewardOutput) else type(out).__name__
        return RewardOutput([None] * n, [f"{name} returned {got} scores for {n} completions"] * n)
    for i, score in enumerate(out.scores):
        if score is not None and (
            isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score)
        ):
            out.scores[i], out.reasons[i] = (
                None,
                f"{name} returned a non-finite or non-number score {score!r}",
            )
        elif score is not None:
            out.scores[i] = float(score)
        elif not out.reasons[i]:
            out.reasons[i] = f"{name} gave no score and no reason"
    return out


def _subset(columns: Mapping[str, Sequence], keep: list[int]) -> dict[str, list]:
    return {k: [v[i] for i in keep] for k, v in columns.items()}


class ComposedReward:
    """Weighted sum of components with gates (see the module docstring for the formula)."""

    def __init__(
        self,
        components: Sequence[tuple[RewardSpec, RewardFunction]],
        missing: Missing = "none",
        gated_score: float = 0.0,
        name: str | None = None,
    ) -> None:
        if not components:
            raise ValueError("ComposedReward needs at least one component")
        if missing not in ("none", "zero", "renormalize"):
            raise ValueError(f"missing must be 'none', 'zero' or 'renormalize', got {missing!r}")
        labels = [spec.label for spec, _ in components]
        if len(set(labels)) != len(labels):
            raise ValueError(f"component labels must be unique, got {labels}; set RewardSpec.label")
        self.components = list(components)
        self.missing = missing
        self.gated_score = float(gated_score)
        self.name = name or "+".join(labels)
        self.none_counts: Counter[str] = Counter()  # per component label: items it could not judge
        self.gated_counts: Counter[str] = Counter()  # per gate label: items it gated
        self.reason_counts: Counter[str] = Counter()

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[str], **columns: Sequence[Any]
    ) -> RewardOutput:
        n = len(completions)
        if len(prompts) != n or any(len(v) != n for v in columns.values()):
            lengths = {"prompts": len(prompts), **{k: len(v) for k, v in columns.items()}}
            raise ValueError(f"{self.name}: {n} completions but column lengths {lengths}")
        scores: list[dict[str, float | None]] = [{} for _ in range(n)]
        reasons: list[dict[str, str]] = [{} for _ in range(n)]
        details: list[dict[str, Any]] = [{"components": {}, "gated_by": None} for _ in range(n)]
        gates = [(s, r) for s, r in self.components if s.gate is not None]
        others = [(s, r) for s, r in self.components if s.gate is None]
        open_items = list(range(n))
        for group in (gates, others):
            for spec, reward in group:
                self._score(spec, reward, open_items, prompts, completions, columns, scores, reasons, details)
            if group is gates:
                open_items = [i for i in open_items if not self._gate(i, gates, scores, details)]
        out = [self._combine(i, scores[i], reasons[i], details[i]) for i in range(n)]
        return RewardOutput([s for s, _ in out], [r for _, r in out], details)

    def _score(self, spec, reward, items, prompts, completions, columns, scores, reasons, details) -> None:
        if not items:
            return
        sub = safe_call(
            reward, [prompts[i] for i in items], [completions[i] for i in items], _subset(columns, items)
        )
        for j, i in enumerate(items):
            scores[i][spec.label] = sub.scores[j]
            details[i]["components"][spec.label] = sub.scores[j]
            if sub.details[j]:
                details[i][spec.label] = sub.details[j]
            if sub.scores[j] is None:
                reasons[i][spec.label] = sub.reasons[j]
                self._count_none(spec.label, sub.reasons[j])

    def _gate(self, i: int, gates, scores, details) -> bool:
        """True when item i is gated: a gate scored below its threshold (or could not judge, unless "none")."""
        for spec, _ in gates:
            score = scores[i][spec.label]
            if score is None and self.missing == "none":
                continue  # _combine turns it into None with the gate's reason
            if score is None or score < spec.gate:
                details[i]["gated_by"] = spec.label
                self.gated_counts[spec.label] += 1
                return True
        return False

    def _combine(self, i, scores, reasons, detail) -> tuple[float | None, str | None]:
        if detail["gated_by"] is not None:
            return self.gated_score, None
        missing = [s.label for s, _ in self.components if scores.get(s.label) is None]
        if missing and self.missing == "none":
            return None, "; ".join(f"{label}: {reasons.get(label)}" for label in missing)
        total = sum(s.weight * scores[s.label] for s, _ in self.components if s.label not in missing)
        if missing and self.missing == "renormalize":
            all_w = sum(abs(s.weight) for s, _ in self.components)
            avail_w = sum(abs(s.weight) for s, _ in self.components if s.label not in missing)
            if avail_w == 0:
                return None, "no component could judge: " + "; ".join(f"{k}: {v}" for k, v in reasons.items())
            total *= all_w / avail_w
        return total, None

    def _count_none(self, label: str, reason: str | None) -> None:
        self.none_counts[label] += 1
        key = f"{label}: {reason}"
        if key not in self.reason_counts:
            logger.warning(
                "reward %s could not judge an item: %s (further ones are only counted)", label, reason
            )
        self.reason_counts[key] += 1

    def stats(self) -> dict[str, int]:
        """Counts to log, e.g. {"none/math": 3, "gated/format_boxed": 12}."""
        out = {f"none/{k}": v for k, v in self.none_counts.items()}
        out.update({f"gated/{k}": v for k, v in self.gated_counts.items()})
        return out


def build_reward(
    specs: Sequence[RewardSpec | Mapping[str, Any]] | RewardSpec,
    missing: Missing = "none",
    gated_score: float = 0.0,
    name: str | None = None,
) -> ComposedReward:
    """Build the composed reward a recipe asks for; specs may be ``RewardSpec`` or plain mappings."""
    if isinstance(specs, RewardSpec | Mapping):
        specs = [specs]
    if not specs:
        raise ValueError("build_reward needs at least one RewardSpec, e.g. RewardSpec('math')")
    parsed = [
        s if isinstance(s, RewardSpec) else RewardSpec.from_dict(s, f"reward spec {i}")
        for i, s in enumerate(specs)
    ]
    components = [(spec, make_reward(spec.name, **spec.params)) for spec in parsed]
    return ComposedReward(components, missing=missing, gated_score=gated_score, name=name)
