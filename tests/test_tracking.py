"""Tracking: a real offline W&B run and the JSON-lines log, rank 0 only."""

from __future__ import annotations

import json

import torch
from torchvision.io import write_png

from pipeline.config import load_config
from pipeline.train.tracking import Tracker, read_metrics


def test_offline_wandb_and_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["tracking.wandb_mode=offline", "train.run_name=t"])
    tracker = Tracker(cfg, tmp_path, rank=0)
    tracker.log({"train/loss": 1.5}, step=1)
    tracker.log({"val/bbox/AP50": 0.25}, step=2)
    png = tmp_path / "grid.png"
    write_png(torch.full((3, 8, 12), 200, dtype=torch.uint8), str(png))
    tracker.image("val/predictions", png, step=2)  # the previews grid, as a wandb.Image
    tracker.finish()
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2]
    assert read_metrics(tmp_path)[1]["val/bbox/AP50"] == 0.25
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1 and any(run_dirs[0].rglob("*.wandb"))
    assert list((run_dirs[0] / "files/media/images").rglob("predictions_2_*.png")), "the image reached the W&B run"
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert run_id in run_dirs[0].name  # resume reuses this id, continuing the same W&B run


def test_other_ranks_write_nothing(tmp_path):
    cfg = load_config(None, ["tracking.wandb_mode=offline"])
    tracker = Tracker(cfg, tmp_path / "r1", rank=1)
    tracker.log({"train/loss": json.loads("1.0")}, step=1)
    tracker.finish()
    assert not (tmp_path / "r1").exists()
