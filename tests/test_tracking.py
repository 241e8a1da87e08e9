"""Logging backends: metrics.jsonl always; wandb offline and tensorboard when asked; nothing on other ranks."""

from __future__ import annotations

import json

from alignment.config import LoggingConfig
from alignment.tracking import NullTracker, Tracker, make_tracker


def test_wandb_offline_and_tensorboard_write_their_files(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the test environment disables wandb; use the setting
    cfg = LoggingConfig(report_to=["wandb", "tensorboard"], wandb_mode="offline", run_name="t")
    tracker = make_tracker(cfg, str(tmp_path), {"a": 1}, is_main=True)
    assert isinstance(tracker, Tracker)
    tracker.log({"loss": 1.5, "learning_rate": 1e-5}, step=1)
    tracker.summary({"steps": 1})
    tracker.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 1,
        "loss": 1.5,
        "learning_rate": 1e-5,
    }
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 1}


def test_other_ranks_get_the_null_tracker(tmp_path):
    tracker = make_tracker(LoggingConfig(report_to=[]), str(tmp_path / "x"), {}, is_main=False)
    assert isinstance(tracker, NullTracker) and not isinstance(tracker, Tracker)
    tracker.log({"loss": 1.0}, 1)
    assert not (tmp_path / "x").exists()
