"""pipeline/distributed/comm_count.py: what goes over torch.distributed, counted exactly, in real 2-rank
gloo runs. Truths computed another way: the payloads of hand-made collectives, and for one training
step of the real engine under ZeRO-0 DeepSpeed's gradient all-reduce of every trainable parameter's
fp32 gradient (4 bytes x the trainable parameters) and cross-GPU BN's three all-reduces per BN layer
(MegDet's Algorithm 1: forward, the group's sums with its pixel count, then its squared deviations:
C + 1 and C floats; backward, the sums of dy and dy * x_hat: 2C)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from conftest import TINY_BACKBONE, run_distributed
from pipeline.distributed.comm_count import CommCounter


def _collectives(rank: int, world: int, out: str) -> None:
    dist.init_process_group("gloo")
    pair = dist.new_group([0, 1])
    rows = {}
    for local_world in (1, 2):  # one rank per node: the pair spans nodes; two per node: it is one node's
        with CommCounter(local_world) as counter:
            dist.all_reduce(torch.ones(1000))
            dist.all_reduce(torch.ones(10, dtype=torch.float64), group=pair)
            shard = torch.ones(5)
            dist.all_gather_into_tensor(torch.empty(10), shard)
            dist.reduce_scatter_tensor(torch.empty(3), torch.ones(6))
            dist.broadcast(torch.ones(7, dtype=torch.int64), 0)
        rows[local_world] = counter.table()
    if rank == 0:
        json.dump(rows, open(out, "w"))
    dist.destroy_process_group()


def test_payloads_groups_and_scopes_of_hand_made_collectives(tmp_path):
    run_distributed(_collectives, 2, str(tmp_path / "rows.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())
    got = {(r["op"], r["dtype"], r["scope"]): (r["calls"], r["bytes"]) for r in rows["1"]}
    assert got == {("all_reduce", "float32", "inter-node"): (1, 4000), ("all_reduce", "float64", "inter-node"): (1, 80),
                   ("all_gather_into_tensor", "float32", "inter-node"): (1, 20),
                   ("reduce_scatter_tensor", "float32", "inter-node"): (1, 24),
                   ("broadcast", "int64", "inter-node"): (1, 56)}
    assert {r["scope"] for r in rows["2"]} == {"intra-node"} and all(r["group"] == 2 for r in rows["2"])


MODEL = ["model.detector=faster_rcnn", f"model.backbone={TINY_BACKBONE}", "model.fpn_channels=16",
         "model.anchor_scale=4", "model.rpn_post_nms_train=100", "model.roi_batch_per_image=32",
         "model.box_head_dim=32", "data.min_size=64", "data.max_size=96", "train.micro_batch=2",
         "schedule.policy=constant", "schedule.max_iters=2", "train.ds_config=ds_configs/zero0_fp32.json"]


def _one_step(rank: int, world: int, norm: str, out: str) -> None:
    from test_engine import _batch

    from pipeline.config import load_config
    from pipeline.distributed.job import init_distributed
    from pipeline.distributed.norm import CrossGPUBatchNorm
    from pipeline.train.build import build_training

    info = init_distributed()
    cfg = load_config(None, MODEL + [f"model.norm={norm}", "model.bn_group=world"])
    training = build_training(cfg, info, data=False, num_classes=3)
    training.step(iter([_batch(rank, 0, 0)]))  # the first step: DeepSpeed's set-up collectives
    with CommCounter(1) as counter:
        training.step(iter([_batch(rank, 1, 0)]))
    module = training.engine.module
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    bn_channels = [m.num_features for m in module.modules() if isinstance(m, CrossGPUBatchNorm)]
    if rank == 0:
        json.dump({"table": counter.table(), "trainable": trainable, "bn_channels": bn_channels}, open(out, "w"))


@pytest.mark.parametrize("norm", ["frozen", "cgbn"])
def test_a_zero0_step_sends_each_gradient_once_and_three_bn_reductions_per_layer(tmp_path, norm):
    run_distributed(_one_step, 2, norm, str(tmp_path / "step.json"))
    got = json.loads((tmp_path / "step.json").read_text())
    table = {(r["op"], r["dtype"]): r for r in got["table"]}
    bn = got["bn_channels"]
    assert bool(bn) == (norm == "cgbn")
    bn_bytes = sum(4 * ((c + 1) + c + 2 * c) for c in bn)  # forward sums + count, squares; backward
    reduced = table.pop(("all_reduce", "float32"))
    assert reduced["bytes"] == 4 * got["trainable"] + bn_bytes, (reduced, got["trainable"], bn_bytes)
    assert not table, table  # nothing else goes over the wire in a ZeRO-0 fp32 step
