"""Which schema reads which recipe: one explicit table, no guessing from file names.

Every recipe file under recipes/ (except accelerate's launcher configs) has a row here; a test loads each
file with its schema, and a recipe missing from the table fails that test. A row names the entry script's
module and its config class; the class is imported only when asked for (the script's ``main`` never runs).
"""

from __future__ import annotations

import importlib
from pathlib import Path


def _synthesis_pipelines() -> dict[str, str]:
    from data_synthesis.runner import PIPELINES

    return PIPELINES


SCHEMAS: dict[str, tuple[str, str]] = {
    "sft.yaml": ("alignment.sft", "SFTConfig"),
    "sft_qwen2.yaml": ("alignment.sft", "SFTConfig"),
    "dpo.yaml": ("alignment.dpo", "DPOConfig"),
    "reward.yaml": ("alignment.reward_model", "RewardModelConfig"),
    "online_dpo.yaml": ("alignment.online_dpo", "OnlineDPOConfig"),
    "chain.yaml": ("alignment.chain", "ChainConfig"),
    # Overlays: another chain recipe plus overrides; tests/test_chain.py loads each with its base, whole.
    "chain_adamw.yaml": ("alignment.chain", "ChainOverlayConfig"),
    "chain_rs.yaml": ("alignment.chain", "ChainOverlayConfig"),
    "chain_smoke.yaml": ("alignment.chain", "ChainOverlayConfig"),
    "eval.yaml": ("alignment.eval", "EvalConfig"),
    "upcycle.yaml": ("alignment.upcycle", "UpcycleConfig"),
    # Synthesis pipelines (python -m data_synthesis RECIPE): recipes/data/<pipeline>.yaml, each its module's Config.
    **{f"data/{name}.yaml": (module, "Config") for name, module in _synthesis_pipelines().items()},
}


def schema_for(path: Path) -> type | None:
    """The config class of a recipe under recipes/, or None for accelerate launcher configs."""
    parts = Path(path).resolve().parts
    if "accelerate" in parts:
        return None
    rel = Path(*parts[parts.index("recipes") + 1 :]).as_posix() if "recipes" in parts else Path(path).name
    if rel not in SCHEMAS:
        raise ValueError(f"{path}: no row for {rel!r} in alignment/recipes.py SCHEMAS; add one")
    module, cls = SCHEMAS[rel]
    return getattr(importlib.import_module(module), cls)
