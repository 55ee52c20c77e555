"""The GPU speed levers compute what the plain path computes (on CPU; the CUDA-only kernels in ``-m gpu``).

- ``train.channels_last``: every norm kind and the FPN keep the layout (so no hidden copies back to
  NCHW), and whole training runs (a CNN and a ViT backbone, ZeRO 0 and 3, SGD and AGVM-SGD, in a
  pairwise design) give the plain run's losses and weights. Tolerances: convolutions in another
  layout sum in another order, so losses to 1e-4 relative and weights to 1e-5 absolute after
  three steps; a wrong layout (transposed channels) would be off by whole units.
- ``train.compile`` with ``model.pad_to=canvas``: the canvas keeps every pixel of torchvision's
  padding and bounds the shapes to three; a compiled backbone trains like the eager one (same
  tolerances; a CNN with AGVM, a ViT with activation checkpointing); what it cannot do (ZeRO-3,
  checkpointed blocks with BatchNorm statistics) is refused at start-up.
- ``model.cgbn_impl=torch``: nn.SyncBatchNorm's fused CUDA kernels against our MegDet function
  (the oracle) on 2 ranks with uneven and empty batches, forward, input gradient, parameter
  gradients and running statistics (``-m gpu``).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import run_distributed
from pipeline.distributed.norm import CrossGPUBatchNorm

CNN, VIT = "test_byobnet", "test_vit"
CHANNELS_LAST = torch.channels_last


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(8), CrossGPUBatchNorm(8), FrozenBatchNorm2d(8), nn.GroupNorm(4, 8)],
                         ids=["per_gpu", "cgbn", "frozen", "group_norm"])
def test_every_norm_keeps_channels_last(norm):
    x = torch.randn(2, 3, 16, 20).contiguous(memory_format=CHANNELS_LAST)
    conv = nn.Conv2d(3, 8, 3, padding=1).to(memory_format=CHANNELS_LAST)
    y = norm.train()(conv(x))
    assert y.is_contiguous(memory_format=CHANNELS_LAST) and not y.is_contiguous()


def test_fpn_keeps_channels_last():
    fpn = FeaturePyramidNetwork([8, 16], 8).to(memory_format=CHANNELS_LAST)
    feats = {"0": torch.randn(2, 8, 16, 16), "1": torch.randn(2, 16, 8, 8)}
    out = fpn({k: v.contiguous(memory_format=CHANNELS_LAST) for k, v in feats.items()})
    assert all(o.is_contiguous(memory_format=CHANNELS_LAST) for o in out.values())


# ---------------------------------------------------------------------------- whole runs

CASES = [(CNN, 0, "sgd"), (CNN, 3, "agvm_sgd"), (VIT, 0, "agvm_sgd"), (VIT, 3, "sgd")]  # pairwise


def _run(backbone: str, stage: int, optimizer: str, overrides: list[str]) -> dict:
    """Three training steps of a tiny detector on fixed synthetic batches: losses and full weights."""
    import itertools

    from deepspeed.utils import safe_get_full_fp32_param

    from pipeline.config import load_config
    from pipeline.data.synthetic import synthetic_batch
    from pipeline.distributed.job import init_distributed
    from pipeline.train.build import build_training

    info = init_distributed()
    size = 64 if backbone == CNN else 32  # a 2 x 2 token grid for timm's test_vit (patch 16)
    cfg = load_config(None, [
        "model.detector=faster_rcnn", f"model.backbone={backbone}", "model.fpn_channels=16", "model.anchor_scale=4",
        "model.rpn_post_nms_train=100", "model.roi_batch_per_image=32", "model.box_head_dim=32",
        f"data.min_size={size}", f"data.max_size={size}", "train.micro_batch=2", "train.grad_accum=2",
        f"train.ds_config=ds_configs/zero{stage}_fp32.json", f"optim.name={optimizer}", "agvm.tau=1",
        "agvm.start_iter=0", "agvm.clip_norm=0", "schedule.max_iters=10", "schedule.warmup_iters=0", *overrides])
    training = build_training(cfg, info, data=False, num_classes=3)
    batches = itertools.cycle([synthetic_batch(2, size, size, info.device, seed=s, num_classes=3) for s in (1, 2)])
    losses = [float(sum(training.step(batches).values())) for _ in range(3)]
    weights = {n: (p if stage == 0 else safe_get_full_fp32_param(p)).detach().clone()
               for n, p in training.engine.module.named_parameters()}
    module = training.engine.module
    conv = next(p for p in module.parameters() if p.dim() == 4)
    return {"losses": losses, "weights": weights, "fed_channels_last": module.backbone.channels_last,
            "conv_weight_channels_last": conv.is_contiguous(memory_format=CHANNELS_LAST) and not conv.is_contiguous()}


def _lever_worker(rank: int, world: int, case: tuple, off: list[str], on: list[str], out: str) -> None:
    torch.save({"plain": _run(*case, off), "lever": _run(*case, on)}, out)


def _plain_and_lever(tmp_path, case: tuple, off: list[str], on: list[str]) -> tuple[dict, dict]:
    out = tmp_path / "runs.pt"
    run_distributed(_lever_worker, 1, case, off, on, str(out))
    got = torch.load(out, weights_only=False)
    return got["plain"], got["lever"]


def _assert_same_training(plain: dict, lever: dict) -> None:
    assert lever["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    assert plain["losses"][0] != plain["losses"][2]  # the runs trained
    for name, w in plain["weights"].items():
        torch.testing.assert_close(lever["weights"][name], w, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("backbone,stage,optimizer", CASES)
def test_channels_last_trains_like_the_plain_layout(tmp_path, backbone, stage, optimizer):
    plain, lever = _plain_and_lever(tmp_path, (backbone, stage, optimizer), ["train.channels_last=false"],
                                    ["train.channels_last=true"])
    assert lever["fed_channels_last"] and not plain["fed_channels_last"]
    assert lever["conv_weight_channels_last"] == (stage == 0)  # ZeRO 1-3 keep weights in flat NCHW buffers
    _assert_same_training(plain, lever)


# ---------------------------------------------------------------------------- compile

def test_canvas_padding_bounds_the_shapes_and_keeps_every_pixel():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from models.detector import CanvasTransform

    plain = GeneralizedRCNNTransform(100, 160, [0.0] * 3, [1.0] * 3)
    canvas = CanvasTransform(plain, 100, 160)
    g = torch.Generator().manual_seed(0)
    shapes = set()
    for sizes in ([(100, 150), (90, 160)], [(150, 100), (160, 70)], [(100, 130), (130, 100)], [(64, 64)]):
        images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
        got, ref = canvas.batch_images(images), plain.batch_images(images)
        shapes.add(tuple(got.shape[-2:]))
        torch.testing.assert_close(got[..., :ref.shape[-2], :ref.shape[-1]], ref, rtol=0, atol=0)
        assert got.sum() == ref.sum()  # the rest is zeros
    assert shapes == {(128, 160), (160, 128), (160, 160)}  # (min, max) rounded up to 32, turned, or square


COMPILE_CASES = [(CNN, 0, "agvm_sgd", []), (VIT, 2, "sgd", ["model.activation_checkpointing=true"])]


@pytest.mark.parametrize("backbone,stage,optimizer,extra", COMPILE_CASES, ids=["cnn-zero0-agvm", "vit-zero2-ckpt"])
def test_compiled_backbone_trains_like_the_eager_one(tmp_path, backbone, stage, optimizer, extra):
    """Same canvas padding on both sides: the compiled run differs only by the compiler."""
    plain, lever = _plain_and_lever(tmp_path, (backbone, stage, optimizer), ["model.pad_to=canvas", *extra],
                                    ["model.pad_to=canvas", "train.compile=true", *extra])
    _assert_same_training(plain, lever)


def _refused_worker(rank: int, world: int, overrides: list[str], out: str) -> None:
    from pipeline.config import load_config
    from pipeline.distributed.job import init_distributed
    from pipeline.errors import ConfigError
    from pipeline.train.build import build_training

    info = init_distributed()
    try:
        build_training(load_config(None, ["train.compile=true", f"model.backbone={CNN}", *overrides]), info,
                       data=False, num_classes=3)
        message = None
    except ConfigError as err:
        message = str(err)
    torch.save(message, out)


@pytest.mark.parametrize("overrides,match", [
    (["train.ds_config=ds_configs/zero3_fp32.json"], r"train.compile=true with ZeRO-3 .* use a ZeRO 0-2 ds_config"),
    (["model.activation_checkpointing=true"], r"BatchNorm running statistics a second time; use model.norm=frozen"),
], ids=["zero3", "checkpointed-batchnorm"])
def test_compile_refuses_what_it_cannot_do_at_start_up(tmp_path, overrides, match):
    run_distributed(_refused_worker, 1, overrides, str(tmp_path / "msg.pt"))
    message = torch.load(tmp_path / "msg.pt")
    assert message is not None and re.search(match, message), message


# ---------------------------------------------------------------------------- CUDA only

def _fused_worker(rank: int, world: int, out: str) -> None:
    """2 ranks on one GPU over gloo (NCCL refuses two ranks on one device): images 3 and 0 (empty)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    full = torch.randn(3, 6, 5, 7, device=device, dtype=torch.float32) * 3 + 1
    mine = full[:3] if rank == 0 else full[3:]
    results = {}
    for impl in ("ours", "torch"):
        bn = CrossGPUBatchNorm(6, process_group=dist.group.WORLD, impl=impl).to(device)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        x = mine.clone().contiguous(memory_format=CHANNELS_LAST).requires_grad_()
        y = bn(x)
        (y * torch.arange(y.numel(), device=device).view_as(y).float().sin()).sum().backward()
        results[impl] = {"y": y.detach().cpu(), "dx": x.grad.cpu(), "dw": bn.weight.grad.cpu(),
                         "db": bn.bias.grad.cpu(), "mean": bn.running_mean.cpu(), "var": bn.running_var.cpu()}
    torch.save(results, f"{out}.{rank}")


@pytest.mark.gpu
def test_fused_cuda_cgbn_matches_ours(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    run_distributed(_fused_worker, 2, str(tmp_path / "bn"))
    for rank in range(2):
        got = torch.load(tmp_path / f"bn.{rank}", weights_only=False)
        for key, want in got["ours"].items():
            torch.testing.assert_close(got["torch"][key], want, rtol=1e-5, atol=1e-5, msg=f"rank {rank}: {key}")
