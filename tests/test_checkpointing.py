"""Activation checkpointing against the same model without it; plain-ViT backbones (ViTDet pyramid)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from models.activation_checkpointing import find_blocks
from models.detector import build_detector
from models.vit import is_plain_vit
from pipeline.config import ModelConfig


def _images_and_targets(seed=0, sizes=((64, 80), (72, 64))):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, h, w, generator=g) * 255 for h, w in sizes]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]]),
                "labels": torch.tensor([1, 2])} for _ in sizes]
    return images, targets


def _detector(backbone: str, ckpt: bool, detector: str = "retinanet"):
    torch.manual_seed(0)
    cfg = ModelConfig(detector=detector, backbone=backbone, fpn_channels=32, anchor_scale=4,
                      activation_checkpointing=ckpt, rpn_post_nms_train=100, roi_batch_per_image=32, box_head_dim=32)
    return build_detector(cfg, num_classes=3, min_size=64, max_size=96).train()


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny_patch16_224"])
def test_checkpointing_gives_the_same_loss_gradients_and_bn_stats(backbone):
    plain, ckpt = _detector(backbone, False), _detector(backbone, True)
    images, targets = _images_and_targets()
    results = []
    for model in (plain, ckpt):
        losses = model(images, targets)
        loss = sum(losses.values())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        {n: b.clone() for n, b in model.named_buffers()}))
    (loss_a, grads_a, bufs_a), (loss_b, grads_b, bufs_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)
    # BN running statistics updated exactly once (the recompute must not update them again).
    assert bufs_a.keys() == bufs_b.keys()
    for name in bufs_a:
        torch.testing.assert_close(bufs_b[name], bufs_a[name], rtol=1e-6, atol=1e-7, msg=name)
    if backbone == "resnet18":
        tracked = [m.num_batches_tracked.item() for m in ckpt.modules() if isinstance(m, _BatchNorm)]
        assert tracked and set(tracked) == {1}
        # and the statistics did move in this step, so the comparison above is not vacuous
        fresh = _detector(backbone, False)
        bn = next(n for n in bufs_a if n.endswith("running_mean"))
        assert not torch.equal(dict(fresh.named_buffers())[bn], bufs_a[bn])


def test_blocks_found_and_state_dict_unchanged():
    model = _detector("resnet18", True)
    assert len(find_blocks(model.backbone.body)) == 8  # resnet18: 4 stages x 2 BasicBlocks
    assert _detector("resnet18", False).state_dict().keys() == model.state_dict().keys()
    assert len(find_blocks(_detector("vit_tiny_patch16_224", True).backbone.body)) == 12


def test_plain_vit_detection():
    assert is_plain_vit("vit_giant_patch14_dinov2") and is_plain_vit("eva02_large_patch14_224.mim_in22k")
    assert not is_plain_vit("resnet50") and not is_plain_vit("convnext_tiny")
    # Patch-14 ViT in Faster R-CNN: levels land on the stride-4..32 grid; a train step and inference run.
    model = _detector("vit_small_patch14_dinov2", False, detector="faster_rcnn")
    images, targets = _images_and_targets(sizes=((70, 90),))
    feats = model.backbone(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    sum(model(images, targets).values()).backward()
    assert model.backbone.body.vit.pos_embed.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out[0]["boxes"].shape[1] == 4
