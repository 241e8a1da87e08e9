"""Metrics: wandb (offline unless configured), tensorboard, and a metrics.jsonl file; a null tracker elsewhere.

Only the main process tracks. Other ranks get ``NullTracker``, so training code never branches on rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from alignment.config import LoggingConfig


class NullTracker:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Tracker(NullTracker):
    def __init__(self, cfg: LoggingConfig, output_dir: str, config: dict[str, Any]):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        self.wandb = self.tb = None
        name = cfg.run_name or self.dir.name
        if "wandb" in cfg.report_to and cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            mode = os.environ.get("WANDB_MODE", cfg.wandb_mode)
            self.wandb = wandb.init(
                project=cfg.project, name=name, config=config, dir=str(self.dir), mode=mode
            )
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def summary(self, values: dict[str, Any]) -> None:
        (self.dir / "summary.json").write_text(json.dumps(values, indent=2))
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def make_tracker(cfg: LoggingConfig, output_dir: str, config: dict[str, Any], is_main: bool) -> NullTracker:
    return Tracker(cfg, output_dir, config) if is_main else NullTracker()
