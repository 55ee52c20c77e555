"""Every detector type builds from a timm backbone, trains a step and runs inference."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_BACKBONE
from models.detector import MODULE_PREFIXES, build_detector, module_parameters
from models.errors import ModelConfigError
from pipeline.config import ModelConfig, load_config
from pipeline.errors import ConfigError
from pipeline.train.build import build_model
from pipeline.train.validate import validate

DETECTORS = ["faster_rcnn", "mask_rcnn", "retinanet", "fcos"]


def _tiny(detector: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(detector=detector, backbone=TINY_BACKBONE, fpn_channels=32, anchor_scale=4,
                      rpn_post_nms_train=100, roi_batch_per_image=32, box_head_dim=32)
    return build_detector(cfg, num_classes=3, min_size=64, max_size=96)


def _targets(with_masks: bool):
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 70.0, 40.0]])
    t = {"boxes": boxes, "labels": torch.tensor([1, 3])}
    if with_masks:
        masks = torch.zeros(2, 64, 80, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            m[y1:y2, x1:x2] = 1
        t["masks"] = masks
    return [t, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                **({"masks": torch.zeros(0, 64, 80, dtype=torch.uint8)} if with_masks else {})}]


@pytest.mark.parametrize("detector", DETECTORS)
def test_train_step_and_inference(detector):
    model = _tiny(detector)
    images = [torch.rand(3, 64, 80) * 255, torch.rand(3, 64, 80) * 255]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = model(images, _targets(detector == "mask_rcnn"))
    if detector == "mask_rcnn":
        assert "loss_mask" in losses
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    opt.step()
    groups = module_parameters(model, detector)
    for module, named in groups.items():  # every module learned something from this one step
        assert any(not torch.equal(p, before[n]) for n, p in named), module
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])
    assert out[0]["boxes"].shape[-1] == 4
    if detector == "mask_rcnn":
        assert out[0]["masks"].shape[-2:] == (64, 80)


@pytest.mark.parametrize("detector", DETECTORS)
def test_every_parameter_in_exactly_one_module(detector):
    model = _tiny(detector)
    groups = module_parameters(model, detector)
    assert set(groups) == set(MODULE_PREFIXES[detector])
    grouped = [id(p) for named in groups.values() for _, p in named]
    assert len(grouped) == len(set(grouped)) == sum(1 for p in model.parameters() if p.requires_grad)


def test_module_map_gap_or_overlap_is_an_error():
    model = _tiny("retinanet")
    gap = {"backbone": ("backbone.body.",), "neck": ("backbone.neck.",)}
    with pytest.raises(ValueError, match=r"parameter 'head\..*belongs to no module"):
        module_parameters(model, "retinanet", gap)
    overlap = dict(MODULE_PREFIXES["retinanet"], everything=("",))
    with pytest.raises(ValueError, match="belongs to several modules"):
        module_parameters(model, "retinanet", overlap)


def test_backbone_channels_come_from_timm_feature_info():
    import timm

    model = _tiny("faster_rcnn")
    ref = timm.create_model(TINY_BACKBONE, features_only=True, out_indices=(1, 2, 3, 4))
    assert model.backbone.strides == ref.feature_info.reduction() + [64]
    inner = [m.in_channels for m in model.backbone.neck.inner_blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert inner == ref.feature_info.channels()


@pytest.mark.parametrize("backbone", ["test_convnext", "swin_tiny_patch4_window7_224"])
def test_four_level_and_nhwc_backbones_feed_the_neck(backbone):
    """ConvNeXt exposes 4 levels from stride 4 (ResNets 5 from stride 2) and Swin returns NHWC
    features at any input size: the neck must still get strides 4-32 in NCHW."""
    torch.manual_seed(0)
    cfg = ModelConfig(detector="faster_rcnn", backbone=backbone, fpn_channels=32, anchor_scale=4,
                      rpn_post_nms_train=100, roi_batch_per_image=32, box_head_dim=32)
    model = build_detector(cfg, num_classes=3, min_size=64, max_size=96)
    assert model.backbone.strides == [4, 8, 16, 32, 64]
    features = model.backbone(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert all(f.shape[1] == 32 for f in features.values())
    model.train()
    losses = model([torch.rand(3, 64, 80) * 255, torch.rand(3, 64, 96) * 255], _targets(False))
    sum(losses.values()).backward()


def test_bad_backbone_and_missing_weights_are_clear(tmp_path):
    with pytest.raises(Exception, match="no_such_net"):
        build_detector(ModelConfig(backbone="no_such_net"), 3, 64, 96)
    with pytest.raises(FileNotFoundError, match="model.pretrained.*does not exist"):
        build_detector(ModelConfig(backbone=TINY_BACKBONE, pretrained=tmp_path / "none.pth"), 3, 64, 96)


def test_unknown_backbone_names_the_key_and_close_names():
    """A typo in model.backbone names the key and timm's closest names, before and at build time (the model
    code's ModelConfigError; the pipeline's ConfigError from validate and from build_model)."""
    with pytest.raises(ModelConfigError, match=r"model.backbone='resnet_50': timm .* has no model of that name; "
                                               r"close names: resnet50"):
        build_detector(ModelConfig(backbone="resnet_50"), 3, 64, 96)
    with pytest.raises(ConfigError, match=r"model.backbone='resnet_50'"):
        validate(load_config(None, ["model.backbone=resnet_50"]), world=1, ranks_per_node=1)
    with pytest.raises(ConfigError, match=r"model.backbone='resnet_50'"):
        build_model(load_config(None, ["model.backbone=resnet_50"]), 3, pretrained=False)


@pytest.mark.parametrize("canonical", [224, 64])
def test_a_box_pools_from_the_level_the_fpn_formula_gives(canonical):
    """The FPN paper's eq. 1: a box of side s = sqrt(w h) pools from level floor(4 + log2(s / canonical)),
    clamped to the pyramid's levels (this backbone's strides 4-32: levels 2-5); ``model.roi_canonical_scale``
    sets ``canonical`` (224 in the paper, for ~800 px images)."""
    import math

    torch.manual_seed(0)
    cfg = ModelConfig(detector="faster_rcnn", backbone=TINY_BACKBONE, fpn_channels=32, anchor_scale=4,
                      roi_canonical_scale=canonical)
    pool = build_detector(cfg, num_classes=3, min_size=64, max_size=96).roi_heads.box_roi_pool
    sides = [8.0, 20.0, 40.0, 63.0, 65.0, 130.0, 300.0, 1000.0]
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in sides])
    got = (pool.map_levels([boxes]) + 2).tolist()  # map_levels counts from the finest level, 2
    assert got == [min(5, max(2, math.floor(4 + math.log2(s / canonical) + 1e-6))) for s in sides]


@pytest.mark.parametrize("detector", ["faster_rcnn", "mask_rcnn"])
def test_roi_pooling_does_not_depend_on_the_first_batch_seen(detector):
    """torchvision's MultiScaleRoIAlign infers each level's scale from the first batch it sees
    (feature size / image size, rounded to a power of two) and keeps it. A first image of 65 px,
    padded to 96, makes every level look twice as fine as it is: all later RoIs pool from the wrong
    place, and a run resumed from a checkpoint (whose first batch differs) trains differently.
    Truth: the same model fed a different first batch gives the same losses on the same batch."""
    import copy

    fresh = _tiny(detector)
    seasoned = copy.deepcopy(fresh)
    with_masks = detector == "mask_rcnn"
    odd = [torch.rand(3, 65, 65) * 255]
    odd_targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1]),
                    **({"masks": torch.ones(1, 65, 65, dtype=torch.uint8)} if with_masks else {})}]
    seasoned(odd, odd_targets)  # the first batch this copy sees
    images = [torch.rand(3, 64, 80) * 255, torch.rand(3, 64, 80) * 255]
    losses = []
    for model in (fresh, seasoned):
        torch.manual_seed(1)  # the heads' fg/bg sampling
        losses.append({k: v.item() for k, v in model(images, _targets(with_masks)).items()})
    assert losses[0] == losses[1]
