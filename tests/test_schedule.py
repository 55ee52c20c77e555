"""LR schedule against the MegDet rule written out by hand."""

from __future__ import annotations

import math

import pytest

from pipeline.config import load_config
from pipeline.optim.schedule import build_schedule


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


# COCO 2017 train has 117,266 images with annotations (MegDet trains on those).
COCO_TRAIN = 117266


@pytest.mark.parametrize("batch", [16, 256])
def test_megdet_normal_policy_boundaries(batch):
    """normal: x0.1 at epochs 8 and 10, end at 11 (MegDet Sec. 4), at two global batches."""
    spe = COCO_TRAIN // batch  # whole batches per epoch: 7329 at 16, 458 at 256
    s = _schedule(batch, spe, "schedule.policy=normal", "schedule.warmup_iters=0")
    peak = 0.02 * batch / 16
    assert s.total_iters == 11 * spe
    e8, e10 = 8 * spe, 10 * spe
    assert s.lr(e8 - 1) == pytest.approx(peak) and s.lr(e8) == pytest.approx(0.1 * peak)
    assert s.lr(e10 - 1) == pytest.approx(0.1 * peak) and s.lr(e10) == pytest.approx(0.01 * peak)
    assert s.lr(s.total_iters - 1) == pytest.approx(0.01 * peak)


@pytest.mark.parametrize("batch", [16, 256])
def test_megdet_long_policy_boundaries(batch):
    """long: x0.1 at 11 and 14, x0.5 at 17, end at 18."""
    spe = COCO_TRAIN // batch
    s = _schedule(batch, spe, "schedule.policy=long", "schedule.warmup_iters=0")
    peak = 0.02 * batch / 16
    assert s.total_iters == 18 * spe
    for epoch, before, after in [(11, 1.0, 0.1), (14, 0.1, 0.01), (17, 0.01, 0.005)]:
        assert s.lr(epoch * spe - 1) == pytest.approx(before * peak)
        assert s.lr(epoch * spe) == pytest.approx(after * peak)


def test_warmup_in_epochs_starts_and_ends_where_configured():
    s = _schedule(256, 458, "schedule.policy=normal", "schedule.warmup_epochs=0.5", "schedule.warmup_factor=0.001")
    peak = 0.02 * 256 / 16
    assert s.warmup_iters == 229
    assert s.lr(0) == pytest.approx(0.001 * peak)
    assert s.lr(228) == pytest.approx(peak * (0.001 + 0.999 * 228 / 229))
    assert s.lr(228) < peak and s.lr(229) == pytest.approx(peak)
    # strictly increasing every iteration during warmup (MegDet: "increase every iteration")
    assert all(s.lr(i) < s.lr(i + 1) for i in range(228))


def test_named_policy_refuses_its_fixed_fields():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="policy=multistep"):
        load_config(None, ["schedule.policy=long", "schedule.milestones=[3, 4]"])


def _megdet_long_by_hand(it: int, peak: float, warmup: int, factor: float) -> float:
    """MegDet's long policy at 100 iterations per epoch, written out: linear warmup from factor x peak,
    x0.1 at epoch 11, x0.1 at 14, x0.5 at 17."""
    warm = factor + (1 - factor) * it / warmup if it < warmup else 1.0
    decay = 1.0 if it < 1100 else 0.1 if it < 1400 else 0.01 if it < 1700 else 0.005
    return peak * warm * decay


def test_resolved_schedule_is_a_pure_function_of_config_and_iteration():
    a = _schedule(64, 100, "schedule.policy=long", "schedule.warmup_iters=30")
    for i in list(range(0, 1800, 7)) + [29, 30, 1099, 1100, 1399, 1400, 1699, 1700, 1799]:
        assert a.lr(i) == pytest.approx(_megdet_long_by_hand(i, 0.08, 30, 16 / 64), rel=1e-12), i  # auto: 1/k
    assert a.lr(500) == a.lr(500) == _schedule(64, 100, "schedule.policy=long", "schedule.warmup_iters=30").lr(500)
    d = a.as_dict()
    assert d["decay_iters"] == [1100, 1400, 1700] and d["decay_factors"] == [0.1, 0.1, 0.5]
    assert d["peak_lr"] == pytest.approx(0.08) and d["warmup_iters"] == 30


@pytest.mark.parametrize("rule, expected_peak", [("linear", 0.02 * 64), ("sqrt", 0.02 * 8.0), ("none", 0.02)])
def test_lr_scaling_rules(rule, expected_peak):
    """Global batch 1024 against the reference 16 (k = 64): linear x64, square root x8, none x1."""
    cfg = load_config(None, [f"optim.lr_scaling={rule}", "optim.base_lr=0.02", "optim.reference_batch=16"])
    sched = build_schedule(cfg.schedule, cfg.optim, global_batch=1024, steps_per_epoch=100)
    assert sched.peak_lr == pytest.approx(expected_peak)


@pytest.mark.parametrize("policy", ["normal", "long"])
@pytest.mark.parametrize("batch", [16, 256])
def test_megdet_warmup_rises_from_the_reference_batch_lr(policy, batch):
    """MegDet's warmup (the default of its policies): from the lr r of the reference batch (16 images,
    base_lr 0.02) to k r at k = batch / 16, linearly."""
    s = _schedule(batch, 458, f"schedule.policy={policy}", "schedule.warmup_iters=500")
    assert s.lr(0) == pytest.approx(0.02)  # r: what one 16-image machine trains at
    assert s.lr(500) == pytest.approx(0.02 * batch / 16)
    assert s.lr(250) == pytest.approx((0.02 + 0.02 * batch / 16) / 2)
    sqrt = _schedule(batch, 458, f"schedule.policy={policy}", "optim.lr_scaling=sqrt", "schedule.warmup_iters=500")
    assert sqrt.lr(0) == pytest.approx(0.02) and sqrt.lr(500) == pytest.approx(0.02 * math.sqrt(batch / 16))


def test_warmup_factor_auto_and_explicit():
    assert _schedule(128, 10, "schedule.warmup_factor=auto").warmup_factor == pytest.approx(16 / 128)
    assert _schedule(8, 10, "schedule.warmup_factor=auto").warmup_factor == 1.0  # below the reference: no rise
    assert _schedule(128, 10).warmup_factor == 0.001  # other policies keep the explicit default
    assert _schedule(128, 10, "schedule.policy=normal", "schedule.warmup_factor=0.01").warmup_factor == 0.01
