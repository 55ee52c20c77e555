"""LR schedule against the MegDet rule written out by hand."""

from __future__ import annotations

import math

import pytest

from pipeline.config import load_config
from pipeline.schedule import build_schedule


def _schedule(global_batch, steps_per_epoch, *overrides):
    cfg = load_config(None, list(overrides))
    return build_schedule(cfg.schedule, cfg.optim, global_batch, steps_per_epoch)


@pytest.mark.parametrize("batch", [16, 256])
def test_linear_scaling_warmup_and_steps(batch):
    s = _schedule(batch, 100, "optim.base_lr=0.02", "schedule.warmup_iters=50", "schedule.warmup_factor=0.1",
                  "schedule.epochs=11", "schedule.milestones=[8, 10]")
    peak = 0.02 * batch / 16
    assert s.peak_lr == pytest.approx(peak)
    assert s.lr(0) == pytest.approx(0.1 * peak)
    assert s.lr(25) == pytest.approx(peak * (0.1 + 0.9 * 25 / 50))
    assert s.lr(50) == pytest.approx(peak)
    assert s.total_iters == 1100
    assert s.lr(799) == pytest.approx(peak) and s.lr(800) == pytest.approx(0.1 * peak)
    assert s.lr(999) == pytest.approx(0.1 * peak) and s.lr(1000) == pytest.approx(0.01 * peak)


def test_cosine_ends_at_floor():
    s = _schedule(16, 10, "schedule.policy=cosine", "schedule.epochs=10", "schedule.warmup_iters=0",
                  "schedule.min_lr_factor=0.1")
    assert s.lr(0) == pytest.approx(s.peak_lr)
    assert s.lr(50) == pytest.approx(s.peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert s.lr(100) == pytest.approx(0.1 * s.peak_lr)


def test_max_iters_overrides_epochs():
    assert _schedule(16, 10, "schedule.max_iters=7").total_iters == 7
