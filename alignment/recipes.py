"""Which schema reads which recipe file: the test that loads every recipe asks here."""

from __future__ import annotations

from pathlib import Path


def schema_for(path: Path) -> type | None:
    """The config class of a recipe under recipes/, or None for accelerate launcher configs."""
    parts = Path(path).parts
    if "accelerate" in parts:
        return None
    text = Path(path).read_text()
    name = Path(path).stem
    if name.startswith("sft") or "alignment/sft.py" in text:
        from alignment.sft import SFTConfig

        return SFTConfig
    if name.startswith("dpo") or "alignment/dpo.py" in text:
        from alignment.dpo import DPOConfig

        return DPOConfig
    if name.startswith("reward") or "alignment/reward_model.py" in text:
        from alignment.reward_model import RewardModelConfig

        return RewardModelConfig
    raise ValueError(f"{path}: no schema knows this recipe; name it sft*/dpo*/reward* or mention its script")
