"""Each workaround in pipeline/distributed/ds_internals.py against the behaviour it relies on, so that a DeepSpeed
that changes under us fails here, by name, rather than training silently wrong.

Truths: torch's own ``clip_grad_norm_`` and ``AdamW`` on the same gradients, and the bytes that
``torch.load`` was asked to map.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_distributed


def test_version_check_names_installed_and_tested_range():
    from importlib.metadata import version

    from pipeline.distributed.ds_internals import TESTED_RANGE, check_version

    check_version()  # the installed DeepSpeed is inside the range the requirements pin
    for outside in ("0.18.9", "0.20.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=rf"DeepSpeed {outside} is installed.*>={TESTED_RANGE[0]},<{TESTED_RANGE[1]}"):
            check_version(outside)
    assert version("deepspeed").startswith(TESTED_RANGE[0])


class _Two(nn.Module):
    """Two modules (two param groups) with a loss whose gradient norm is far above the clip."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return {"loss": 50 * self.b(torch.tanh(self.a(x))).square().mean()}


def _engine(stage: int, optimizer: str):
    from pipeline.config import load_config
    from pipeline.distributed.ds_config import fill_ds_config
    from pipeline.distributed.engine import build_engine

    torch.manual_seed(0)
    model = _Two()
    groups = [{"params": list(model.a.parameters())}, {"params": list(model.b.parameters())}]
    opt = torch.optim.SGD(groups, lr=0.1) if optimizer == "sgd" else torch.optim.AdamW(groups, lr=0.01)
    cfg = load_config(None, ["train.micro_batch=4"])
    ds = fill_ds_config({"zero_optimization": {"stage": stage}}, cfg, world=1)
    return build_engine(model, opt, ds)


def _x(step: int) -> torch.Tensor:
    return torch.randn(4, 4, generator=torch.Generator().manual_seed(step))


def _clip_worker(rank: int, world: int, stage: int, out: str) -> None:
    from pipeline.distributed.ds_internals import gathered, set_gradient_clipping
    from pipeline.distributed.job import init_distributed

    init_distributed()
    engine = _engine(stage, "sgd")
    for step, clip in enumerate((0.01, 0.0, 0.5)):  # changed between steps, after initialize
        set_gradient_clipping(engine, clip)
        engine.backward(engine(_x(step))["loss"])
        engine.step()
    params = list(engine.module.parameters())
    with gathered(params):
        torch.save([p.detach().clone() for p in params], Path(out) / f"clip_zero{stage}.pt")


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_gradient_clipping_changes_between_steps(stage, tmp_path):
    run_distributed(_clip_worker, 1, stage, str(tmp_path))
    torch.manual_seed(0)
    model = _Two()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, clip in enumerate((0.01, 0.0, 0.5)):
        opt.zero_grad()
        model(_x(step))["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
        assert norm > 1.0, "the clip must bite for the comparison to mean anything"
        opt.step()
    got = torch.load(tmp_path / f"clip_zero{stage}.pt")
    for g, w in zip(got, model.parameters()):
        torch.testing.assert_close(g, w.detach(), rtol=1e-5, atol=1e-6)


class _Unused(nn.Module):
    """A used layer and one this model never calls: its gradient stays None."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        return {"loss": self.used(x).square().mean()}


def _unused_worker(rank: int, world: int, out: str) -> None:
    from pipeline.config import load_config
    from pipeline.distributed.ds_config import fill_ds_config
    from pipeline.distributed.engine import build_engine
    from pipeline.distributed.job import init_distributed

    init_distributed()
    torch.manual_seed(0)
    model = _Unused()
    before = [p.detach().clone() for p in model.unused.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)
    ds = fill_ds_config({"zero_optimization": {"stage": 0}}, load_config(None, ["train.micro_batch=4"]), world=1)
    engine = build_engine(model, opt, ds)
    for step in range(3):
        engine.backward(engine(_x(step))["loss"])
        engine.step()
    after = [p.detach().clone() for p in engine.module.unused.parameters()]
    torch.save({"before": before, "after": after, "replaced": "allreduce_gradients" in vars(engine)},
               Path(out) / "unused.pt")


def test_one_rank_skips_the_allreduce_but_keeps_its_zero_gradients(tmp_path):
    """One rank at ZeRO-0: DeepSpeed's all-reduce over that one rank is replaced (skip_single_rank_allreduce),
    and what it did besides stays: a parameter without a gradient gets a zero one, so weight decay still
    shrinks it by (1 - lr x wd) per step, as DeepSpeed's reduction (and every multi-rank run) has it."""
    run_distributed(_unused_worker, 1, str(tmp_path))
    got = torch.load(tmp_path / "unused.pt")
    assert got["replaced"]
    for before, after in zip(got["before"], got["after"]):
        torch.testing.assert_close(after, before * (1 - 0.1 * 0.5) ** 3)


def _state_worker(rank: int, world: int, stage: int, out: str) -> None:
    from deepspeed.utils import safe_get_full_optimizer_state

    from pipeline.distributed.ds_internals import full_optimizer_state
    from pipeline.distributed.job import init_distributed

    init_distributed()
    engine = _engine(stage, "adamw")
    params = list(engine.module.parameters())
    before = full_optimizer_state(engine, params, "exp_avg_sq")  # no step yet: zeros
    for step in range(2):
        engine.backward(engine(_x(step))["loss"])
        engine.step()
    # The DeepSpeed behaviour the workaround exists for: the second group's state is not linked.
    unlinked = None
    if stage in (1, 2):
        try:
            safe_get_full_optimizer_state(params[-1], "exp_avg_sq")
        except Exception as err:  # noqa: BLE001 (whatever DeepSpeed raises)
            unlinked = type(err).__name__
    after = full_optimizer_state(engine, params, "exp_avg_sq")
    torch.save({"before": before, "after": after, "unlinked": unlinked}, Path(out) / f"state_zero{stage}.pt")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_full_optimizer_state_matches_torch_adamw(stage, tmp_path):
    run_distributed(_state_worker, 1, stage, str(tmp_path))
    got = torch.load(tmp_path / f"state_zero{stage}.pt")
    torch.manual_seed(0)
    model = _Two()
    opt = torch.optim.AdamW([{"params": list(model.a.parameters())}, {"params": list(model.b.parameters())}],
                            lr=0.01)
    for step in range(2):
        opt.zero_grad()
        model(_x(step))["loss"].backward()
        opt.step()
    assert all(not b.any() for b in got["before"])
    for g, p in zip(got["after"], model.parameters()):
        torch.testing.assert_close(g, opt.state[p]["exp_avg_sq"].reshape(-1), rtol=1e-5, atol=1e-9)
    if stage in (1, 2):
        assert got["unlinked"] is not None, (
            "DeepSpeed now links every group's optimizer state by itself: the re-link in "
            "ds_internals.full_optimizer_state can go")


def _mmap_worker(rank: int, world: int, out: str) -> None:
    from pipeline.checkpoint import manager as ckpt
    from pipeline.distributed.job import init_distributed

    init_distributed()
    engine = _engine(2, "sgd")
    engine.backward(engine(_x(0))["loss"])
    engine.step()
    saved = [p.detach().clone() for p in engine.module.parameters()]
    ckpt.save(engine, Path(out) / "ckpt", 1, {}, {}, keep=1)
    fresh = _engine(2, "sgd")
    calls = []
    real_load = torch.load

    def spy(path, *args, **kwargs):
        calls.append((str(path), kwargs.get("mmap", False)))
        return real_load(path, *args, **kwargs)

    torch.load = spy  # DeepSpeed's checkpoint engine calls torch.load by module attribute
    try:
        ckpt.load(fresh, Path(out) / "ckpt", ckpt.tag_of(1))
    finally:
        torch.load = real_load
    loaded = [p.detach().clone() for p in fresh.module.parameters()]
    torch.save({"calls": calls, "saved": saved, "loaded": loaded}, Path(out) / "mmap.pt")


def test_checkpoint_shards_load_memory_mapped(tmp_path):
    run_distributed(_mmap_worker, 1, str(tmp_path))
    got = torch.load(tmp_path / "mmap.pt")
    shards = [(path, mmap) for path, mmap in got["calls"] if path.endswith("_states.pt")]
    assert any("model_states" in p for p, _ in shards) and any("optim_states" in p for p, _ in shards), shards
    assert all(mmap for _, mmap in shards), f"DeepSpeed no longer loads through the patched engine: {shards}"
    for s, l in zip(got["saved"], got["loaded"]):
        torch.testing.assert_close(l, s, rtol=0, atol=0)


@pytest.mark.parametrize("offset, numel", [(0, 7), (5, 11), (3, 2), (14, 14), (0, 28)])
def test_zero12_segments_put_each_element_where_the_flat_partitions_have_it(offset, numel):
    """A parameter at ``offset`` of a group flattened into 4 partitions of 7, the group's block
    starting at column 3 of its module's row: its elements land where row r = partition r of the
    flat group has them (the flat buffer cut into rows, computed here without the segments)."""
    from pipeline.distributed.ds_internals import _segments

    world, size, column = 4, 7, 3
    values = torch.arange(1.0, numel + 1)
    flat = torch.zeros(world * size)
    flat[offset:offset + numel] = values
    rows = torch.zeros(world, column + size + 2)  # other groups' columns on both sides stay zero
    for row, col, start, length in _segments(offset, numel, size, column):
        rows[row, col:col + length] += values[start:start + length]
    torch.testing.assert_close(rows[:, column:column + size], flat.view(world, size))
    assert rows.sum() == values.sum()  # nothing written twice or outside the block
