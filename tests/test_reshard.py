"""ZeRO 1-3 checkpoints resumed on another number of ranks (``pipeline.checkpoint.reshard``), against the saved run.

The truth is an uninterrupted run: 2 ranks train a two-group model (different lr and weight decay
per group, odd sizes so ZeRO pads its partitions) for 7 steps under each ZeRO stage, with SGD
(momentum) and with AdamW, saving at step 3. One rank with accumulation 2 (the same global batch)
resumes each step-3 checkpoint through the universal format: its weights, every parameter's
optimizer state, the optimizers' step counts and every group's hyper-parameters must equal the
saved run's, exactly, and its losses at steps 4-7 the uninterrupted run's; it saves at step 5 (one
rank's shards), and 2 ranks resume that, checked the same way (1 -> 2 ranks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_distributed

STAGES = (1, 2, 3)
OPTIMIZERS = ("sgd", "adamw")
GLOBAL_BATCH, MICRO = 4, 2
CASES = [(stage, optimizer) for stage in STAGES for optimizer in OPTIMIZERS]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)  # 35 and 18 elements: padded over 2 ranks

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _cfg(world: int):
    from pipeline.config import load_config

    return load_config(None, [f"train.micro_batch={MICRO}", f"train.grad_accum={GLOBAL_BATCH // (MICRO * world)}"])


def _engine(stage: int, optimizer: str, world: int, universal: bool = False):
    from pipeline.checkpoint.reshard import with_universal_load
    from pipeline.distributed.ds_config import fill_ds_config
    from pipeline.distributed.engine import build_engine

    torch.manual_seed(1234 if universal else 0)  # a resumed engine starts from other weights
    model = _Net()
    if optimizer == "sgd":
        groups = [{"params": list(model.a.parameters()), "lr": 0.05, "weight_decay": 1e-2},
                  {"params": list(model.b.parameters()), "lr": 0.02, "weight_decay": 0.0}]
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    else:
        groups = [{"params": list(model.a.parameters()), "lr": 1e-2, "weight_decay": 1e-1},
                  {"params": list(model.b.parameters()), "lr": 5e-3, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=0.1)
    ds = fill_ds_config({"zero_optimization": {"stage": stage}}, _cfg(world), world)
    return build_engine(model, opt, with_universal_load(ds) if universal else ds)


def _step(engine, step: int) -> float:
    """One global batch of 4, split over ranks and micro-batches the way the data sampler does."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)
    total = torch.zeros(1)
    for micro in range(GLOBAL_BATCH // (MICRO * world)):
        first = (micro * world + rank) * MICRO
        loss = nn.functional.mse_loss(engine(x[first:first + MICRO]), y[first:first + MICRO])
        engine.backward(loss)
        engine.step()
        total += loss.detach()
    dist.all_reduce(total)
    return total.item() * MICRO / GLOBAL_BATCH


def _snapshot(engine) -> dict:
    """Full fp32 weights, full optimizer state per parameter, step counts, group hyper-parameters
    (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from pipeline.distributed.ds_internals import client_optimizer, full_optimizer_state

    params = list(engine.module.parameters())
    client = client_optimizer(engine)
    keys = ("momentum_buffer",) if isinstance(client, torch.optim.SGD) else ("exp_avg", "exp_avg_sq")
    snap = {"weights": [safe_get_full_fp32_param(p).detach().clone() for p in params],
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in client.param_groups],
            "steps": sorted(float(s["step"]) for s in client.state.values() if "step" in s),
            "shared_step": len({id(s["step"]) for s in client.state.values() if "step" in s})
            < sum("step" in s for s in client.state.values())}
    for key in keys:
        snap[key] = [t.clone() for t in full_optimizer_state(engine, params, key)]
    return snap


def _save_worker(rank: int, world: int, out: str) -> None:
    """The uninterrupted 2-rank runs (the truth), each saving at step 3."""
    from pipeline.checkpoint import manager as ckpt
    from pipeline.distributed.job import init_distributed

    init_distributed()
    results = {}
    for stage, optimizer in CASES:
        engine = _engine(stage, optimizer, world)
        losses = {s: _step(engine, s) for s in (1, 2, 3)}
        ckpt_dir = Path(out) / f"s{stage}_{optimizer}" / "saved_by_2"
        ckpt.save(engine, ckpt_dir, 3, {"iteration": 3}, ckpt.launch_shape(_cfg(world), world, stage), keep=1)
        at_save = _snapshot(engine)
        losses.update({s: _step(engine, s) for s in (4, 5, 6, 7)})
        results[(stage, optimizer)] = {"losses": losses, "at_3": at_save}
    if rank == 0:
        torch.save(results, Path(out) / "truth.pt")


def _resume_worker(rank: int, world: int, out: str, saved_by: int, iteration: int) -> None:
    """Resume every case's checkpoint (saved by ``saved_by`` ranks) on ``world`` ranks; one rank
    also saves at step 5, for the way back to 2 ranks."""
    from pipeline.checkpoint import manager as ckpt
    from pipeline.distributed.job import init_distributed

    init_distributed()
    results = {}
    for stage, optimizer in CASES:
        ckpt_dir = Path(out) / f"s{stage}_{optimizer}" / f"saved_by_{saved_by}"
        tag = ckpt.tag_of(iteration)
        point = ckpt.resume_point(ckpt_dir, tag, _cfg(world), world, stage)
        engine = _engine(stage, optimizer, world, universal=point.universal)
        client_state = ckpt.load(engine, ckpt_dir, tag, point.universal)
        got = {"universal": point.universal, "iteration": client_state["iteration"], "losses": {},
               f"at_{iteration}": _snapshot(engine)}
        for s in range(iteration + 1, 8):
            got["losses"][s] = _step(engine, s)
            if s == 5 and world == 1:
                mine = Path(out) / f"s{stage}_{optimizer}" / "saved_by_1"
                ckpt.save(engine, mine, 5, {"iteration": 5}, ckpt.launch_shape(_cfg(world), world, stage), keep=1)
                got["at_5"] = _snapshot(engine)
        results[(stage, optimizer)] = got
    if rank == 0:
        torch.save(results, Path(out) / f"resumed_on_{world}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard")
    run_distributed(_save_worker, 2, str(out))
    run_distributed(_resume_worker, 1, str(out), 2, 3)
    run_distributed(_resume_worker, 2, str(out), 1, 5)
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in ("truth", "resumed_on_1", "resumed_on_2")}


def _assert_same_state(got: dict, want: dict) -> None:
    assert got["groups"] == want["groups"]
    assert got["steps"] == want["steps"] and not got["shared_step"]
    for key in want:
        if isinstance(want[key], list) and want[key] and torch.is_tensor(want[key][0]):
            for g, w in zip(got[key], want[key]):
                torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{key} differs")


@pytest.mark.parametrize("stage,optimizer", CASES)
def test_two_ranks_to_one_continues_the_saved_run(runs, stage, optimizer):
    truth, got = runs["truth"][(stage, optimizer)], runs["resumed_on_1"][(stage, optimizer)]
    assert got["universal"] and got["iteration"] == 3
    _assert_same_state(got["at_3"], truth["at_3"])
    for s in (4, 5, 6, 7):
        assert got["losses"][s] == pytest.approx(truth["losses"][s], rel=1e-6, abs=1e-9), (s, got["losses"], truth)


@pytest.mark.parametrize("stage,optimizer", CASES)
def test_one_rank_to_two_continues_the_saved_run(runs, stage, optimizer):
    truth, one = runs["truth"][(stage, optimizer)], runs["resumed_on_1"][(stage, optimizer)]
    got = runs["resumed_on_2"][(stage, optimizer)]
    assert got["universal"] and got["iteration"] == 5
    _assert_same_state(got["at_5"], one["at_5"])
    for s in (6, 7):
        assert got["losses"][s] == pytest.approx(truth["losses"][s], rel=1e-6, abs=1e-9), (s, got["losses"], truth)
