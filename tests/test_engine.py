"""The DeepSpeed engine in real 2-process gloo runs, ZeRO 0-3, against plain torch.

The run is built and stepped as training builds and steps it (``build_training`` and its
train step). Independent truth: the same model trained without DeepSpeed, in one process,
with the gradients of every rank's (and micro-step's) batch averaged by hand, the warmup lr
written out by hand and a plain ``torch.optim.SGD`` step. RetinaNet is used because its loss
has no sampling randomness, so both sides see exactly the same computation.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import TINY_BACKBONE, run_distributed
from models.detector import build_detector
from pipeline.config import ModelConfig, load_config
from pipeline.distributed.ds_config import fill_ds_config, load_ds_config
from pipeline.distributed.job import init_distributed
from pipeline.errors import ConfigError
from pipeline.train.build import build_training

# MegDet's linear warmup over the 3 steps, from 0.25 x 0.02: the lr changes every step, which checks
# that the train step's lr reaches the optimizer under each stage.
LRS = tuple(0.02 * (0.25 + 0.75 * it / 3) for it in range(3))
SCHEDULE = ["optim.base_lr=0.02", "optim.lr_scaling=none", "optim.momentum=0.9", "optim.weight_decay=1e-4",
            "schedule.policy=constant", "schedule.max_iters=3", "schedule.warmup_iters=3",
            "schedule.warmup_factor=0.25"]
# ZeRO-3 builds under zero.Init (train.zero_init's default): the reference's initial weights check that
# timm's and torchvision's weight init reach the partitioned parameters.
MODEL = ["model.detector=retinanet", f"model.backbone={TINY_BACKBONE}", "model.fpn_channels=16",
         "model.anchor_scale=4", "model.norm=per_gpu", "data.min_size=64", "data.max_size=96", "train.seed=0"]


def _batch(rank: int, step: int, micro: int, size: int = 2):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    images = [torch.rand(3, 64, 80, generator=g) * 255 for _ in range(size)]
    targets = []
    for _ in range(size):
        xy = torch.rand(2, 2, generator=g) * 40
        wh = 12 + torch.rand(2, 2, generator=g) * 20
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 4, (2,), generator=g)})
    return images, targets


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(detector="retinanet", backbone=TINY_BACKBONE, fpn_channels=16, anchor_scale=4)
    return build_detector(cfg, num_classes=3, min_size=64, max_size=96)


def _reference(world: int, accum: int) -> list[torch.Tensor]:
    """Plain torch: average every rank's and micro-step's gradient, then SGD."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LRS[0], momentum=0.9, weight_decay=1e-4)
    for step, lr in enumerate(LRS):
        for group in opt.param_groups:
            group["lr"] = lr
        grads = [torch.zeros_like(p) for p in model.parameters()]
        for rank in range(world):
            for micro in range(accum):
                model.zero_grad()
                sum(model(*_batch(rank, step, micro)).values()).backward()
                for g, p in zip(grads, model.parameters()):
                    g += p.grad / (world * accum)
        for g, p in zip(grads, model.parameters()):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _train_with_deepspeed(rank: int, world: int, preset: str, accum: int, result_file: str) -> None:
    info = init_distributed()
    cfg = load_config(None, MODEL + SCHEDULE + ["train.micro_batch=2", f"train.grad_accum={accum}",
                                                f"train.ds_config=ds_configs/{preset}.json"])
    training = build_training(cfg, info, data=False, num_classes=3)
    for step in range(len(LRS)):
        training.step(iter([_batch(rank, step, micro) for micro in range(accum)]))
    assert training.step.iteration == len(LRS)
    params = list(training.engine.module.parameters())
    if training.engine.zero_optimization_stage() == 3:
        from pipeline.distributed.ds_internals import gathered

        with gathered(params):
            final = [p.detach().clone() for p in params]
    else:
        final = [p.detach().clone() for p in params]
    everyone = [None] * world
    dist.all_gather_object(everyone, final)
    if rank == 0:
        torch.save(everyone, result_file)


@pytest.mark.parametrize("preset,accum", [("zero0_fp32", 1), ("zero1_fp32", 1), ("zero2_fp32", 1), ("zero3_fp32", 1),
                                          ("zero2_fp32", 2), ("zero3_offload_fp32", 1), ("zero3_lowmem_fp32", 1)])
def test_zero_stages_match_plain_torch(tmp_path, preset, accum):
    result_file = str(tmp_path / "params.pt")
    run_distributed(_train_with_deepspeed, 2, preset, accum, result_file)
    per_rank = torch.load(result_file)
    expected = _reference(world=2, accum=accum)
    initial = list(_model().parameters())
    moved = sum((e - i).abs().sum().item() for e, i in zip(expected, initial))
    assert moved > 1e-3, "the reference did not train; the comparison would be vacuous"
    for rank_params in per_rank:
        assert len(rank_params) == len(expected)
        for got, want in zip(rank_params, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_ds_config_batch_contradiction_is_refused():
    cfg = load_config(None, ["train.micro_batch=4", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match=r"my.json sets train_micro_batch_size_per_gpu=2 .*remove"):
        fill_ds_config({"train_micro_batch_size_per_gpu": 2}, cfg, world=1, source="my.json")
    with pytest.raises(ConfigError, match="train_batch_size=8 but the experiment gives 16"):
        fill_ds_config({"train_batch_size": 8}, cfg, world=2)
    filled = fill_ds_config({"train_batch_size": 16, "zero_optimization": {"stage": 2}}, cfg, world=2)
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 2
    assert filled["gradient_clipping"] == 0.0 and filled["zero_optimization"] == {"stage": 2}


def test_ds_config_optimizer_section_is_refused(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"optimizer": {"type": "Adam"}}')
    with pytest.raises(ConfigError, match=r"ds.json has an 'optimizer' section.*remove it"):
        load_ds_config(bad)
    bad.write_text('{"zero_optimization": ')
    with pytest.raises(ConfigError, match="ds.json is not valid JSON"):
        load_ds_config(bad)


def test_reference_is_sensitive_to_averaging():
    """Guard for the truth itself: 2-rank averaging differs from one rank's gradient alone."""
    a, b = _reference(world=1, accum=1), _reference(world=2, accum=1)
    assert any(not torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b))
