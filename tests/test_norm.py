"""Cross-GPU BN against torch's BatchNorm2d over each group's concatenated batch; BN group layout;
the norm converter; running-statistics sync. Multi-rank tests use real gloo processes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.distributed as dist
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import REPO, TINY_BACKBONE, run_distributed
from pipeline.config import ModelConfig
from pipeline.distributed.launcher import resolve
from pipeline.distributed.norm import (CrossGPUBatchNorm, bn_group_layout, build_bn_group, convert_norms,
                                       sync_running_stats)
from pipeline.errors import ConfigError

CHANNELS = 3
# Per-rank batch sizes: uneven, and rank 2 has no images at all. Groups: {0, 1} and {2, 3}.
BATCHES = [3, 1, 0, 2]
GROUPS = [[0, 1], [2, 3]]


def _rank_data(rank: int, step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(BATCHES[rank], CHANNELS, 5, 4, generator=g) * (1 + rank) + rank  # groups differ in scale
    up = torch.randn(BATCHES[rank], CHANNELS, 5, 4, generator=g)  # upstream gradient dL/dy
    return x.to(dtype), up


def _affine(group_index: int):
    g = torch.Generator().manual_seed(7 + group_index)
    return torch.rand(CHANNELS, generator=g) + 0.5, torch.randn(CHANNELS, generator=g)


def _cgbn_worker(rank: int, world: int) -> None:
    dist.init_process_group("gloo")
    os.environ.update(LOCAL_SIZE=str(world))  # one machine of 4 ranks
    group, layout = build_bn_group(ModelConfig(bn_group=2), micro_batch=1)
    assert layout == GROUPS
    gi = rank // 2
    members = GROUPS[gi]
    weight, bias = _affine(gi)
    bn = CrossGPUBatchNorm(CHANNELS, process_group=group)
    ref = nn.BatchNorm2d(CHANNELS)
    with torch.no_grad():
        for m in (bn, ref):
            m.weight.copy_(weight)
            m.bias.copy_(bias)
    for step in range(2):  # two steps: the running stats' momentum update is checked twice
        x, up = _rank_data(rank, step)
        x.requires_grad_(True)
        bn.zero_grad()
        y = bn(x)
        (y * up).sum().backward()

        # Independent truth: one BatchNorm2d over the group's concatenated batch.
        xs, ups = zip(*(_rank_data(r, step) for r in members))
        x_all = torch.cat(xs).requires_grad_(True)
        ref.zero_grad()
        y_all = ref(x_all)
        (y_all * torch.cat(ups)).sum().backward()
        start = sum(BATCHES[r] for r in members[:members.index(rank)])
        mine = slice(start, start + BATCHES[rank])
        torch.testing.assert_close(y, y_all[mine].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, x_all.grad[mine], atol=1e-5, rtol=1e-5)
        # Parameter gradients are per-rank partial sums; the engine's reduction sums them over the group.
        grads = torch.cat([bn.weight.grad, bn.bias.grad])
        dist.all_reduce(grads, group=group)
        torch.testing.assert_close(grads, torch.cat([ref.weight.grad, ref.bias.grad]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.running_mean, ref.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.running_var, ref.running_var, atol=1e-5, rtol=1e-5)

    # Eval mode uses the running statistics, like torch's BN.
    bn.eval(), ref.eval()
    x, _ = _rank_data(1, 5)
    torch.testing.assert_close(bn(x), ref(x), atol=1e-5, rtol=1e-5)

    # bf16 under autocast: output keeps the input dtype, statistics in fp32.
    bn.train()
    xb, _ = _rank_data(rank, 9, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = bn(xb)
    assert yb.dtype == torch.bfloat16
    ref.train()
    xs = torch.cat([_rank_data(r, 9, torch.bfloat16)[0] for r in members]).float()
    start = sum(BATCHES[r] for r in members[:members.index(rank)])
    torch.testing.assert_close(yb.float(), ref(xs)[start:start + BATCHES[rank]].detach(), atol=5e-2, rtol=5e-2)


def test_cgbn_equals_batchnorm_over_each_groups_concatenated_batch():
    run_distributed(_cgbn_worker, 4)


def _sync_worker(rank: int, world: int) -> None:
    dist.init_process_group("gloo")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    for i, bn in enumerate(model[1:]):
        bn.running_mean.fill_(rank + i)
        bn.running_var.fill_(2.0 * rank + 1)
    sync_running_stats(model)
    for i, bn in enumerate(model[1:]):
        expected_mean = sum(r + i for r in range(world)) / world
        expected_var = sum(2.0 * r + 1 for r in range(world)) / world
        assert torch.allclose(bn.running_mean, torch.full((4,), float(expected_mean)))
        assert torch.allclose(bn.running_var, torch.full((4,), expected_var))


def test_sync_running_stats_averages_over_all_ranks():
    run_distributed(_sync_worker, 2)


# ---------------------------------------------------------------- group layout

_ENV_DUMP = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[-2] + '/env' + os.environ['RANK'], 'w'))"


def test_node_groups_from_the_deepspeed_launchers_environment(tmp_path):
    """Run DeepSpeed's own per-node launcher for 2 hosts x 4 slots (node_rank 0 and 1), read the
    environment it gives each rank, and derive the node BN groups from it."""
    script = tmp_path / "dump_env.py"
    script.write_text(_ENV_DUMP)
    world_info = base64.urlsafe_b64encode(json.dumps({"hostA": list(range(4)), "hostB": list(range(4))}).encode())
    for node_rank in (0, 1):
        subprocess.run([sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={world_info.decode()}",
                        f"--node_rank={node_rank}", "--master_addr=127.0.0.1", "--master_port=29999",
                        "--no_local_rank", str(script), str(tmp_path), "x"],
                       check=True, cwd=REPO, capture_output=True, timeout=120)
    envs = [json.loads((tmp_path / f"env{r}").read_text()) for r in range(8)]
    launches = [resolve(env) for env in envs]
    assert [(x.launcher, x.rank, x.world, x.local_rank, x.local_world) for x in launches] == \
        [("deepspeed", r, 8, r % 4, 4) for r in range(8)]
    nodes = [x.node for x in launches]
    assert bn_group_layout("node", nodes, micro_batch=8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert bn_group_layout("world", nodes, micro_batch=8) == [list(range(8))]
    assert bn_group_layout("none", nodes, micro_batch=8) == [[r] for r in range(8)]
    # MegDet's BN size in images: 32 images at 8 per rank = 4 ranks; 16 images = 2 ranks.
    assert bn_group_layout("node", nodes, micro_batch=8, bn_images=32) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert bn_group_layout("node", nodes, micro_batch=8, bn_images=16) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert bn_group_layout(2, nodes, micro_batch=4) == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("spec, micro, images, fix", [
    (3, 8, None, "divisor of 4"),          # 3 ranks do not divide a 4-rank machine
    (8, 8, None, "bn_group=world"),        # 8 ranks would cross machines
    ("node", 8, 12, "multiple of 8"),      # 12 images is not a whole number of 8-image ranks
    ("node", 8, 64, "bn_group=world"),     # 64 images = 8 ranks: crosses machines
])
def test_misfitting_bn_groups_are_config_errors(spec, micro, images, fix):
    with pytest.raises(ConfigError, match=fix):
        bn_group_layout(spec, [0, 0, 0, 0, 1, 1, 1, 1], micro_batch=micro, bn_images=images)


# ---------------------------------------------------------------- converter

def _body(name: str):
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True)
    with torch.no_grad():  # non-trivial running statistics, so copying them is checked
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("name", [TINY_BACKBONE, "resnet18"])  # timm BatchNormAct2d and plain BatchNorm2d
def test_converted_cgbn_without_group_is_torch_bn(name):
    model = _body(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    want_eval = [f.clone() for f in model(x)]
    model.train()
    want_train = [f.clone() for f in model(x)]
    model.load_state_dict(before)
    n = convert_norms(model, "cgbn", group=None)
    assert n == sum(isinstance(m, CrossGPUBatchNorm) for m in model.modules()) > 0
    assert not any(type(m) in (nn.BatchNorm2d,) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    model.eval()
    for got, want in zip(model(x), want_eval):
        torch.testing.assert_close(got, want)
    model.train()
    for got, want in zip(model(x), want_train):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", [TINY_BACKBONE, "resnet18"])
def test_frozen_bn_keeps_the_eval_function_and_has_no_trainable_norm(name):
    model = _body(name).eval()
    x = torch.randn(2, 3, 64, 64)
    want = [f.clone() for f in model(x)]
    n_params = sum(p.numel() for p in model.parameters())
    bn_params = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    convert_norms(model, "frozen")
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) > 0
    assert sum(p.numel() for p in model.parameters()) == n_params - bn_params
    model.train()  # frozen: train mode changes nothing
    for got, w in zip(model(x), want):
        torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-5)


def test_group_norm_and_per_gpu():
    model = _body("resnet18")
    assert convert_norms(model, "per_gpu") == 0
    assert convert_norms(model, "group_norm", gn_groups=16) == 20
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 20
    model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="gn_groups"):
        convert_norms(_body("resnet18"), "group_norm", gn_groups=48)
