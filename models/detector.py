"""Detectors: a timm backbone + torchvision FPN + torchvision's detection heads.

The backbone is any timm model: CNNs through ``features_only=True`` (channels and strides
from ``feature_info``, so no table of backbones is kept here) + FPN; plain ViTs through
ViTDet's simple feature pyramid (``models/vit.py``). ``model.activation_checkpointing``
checkpoints every backbone block (``models/activation_checkpointing.py``).
Heads are torchvision's own (Faster/Mask R-CNN, RetinaNet, FCOS): we do not
re-implement what torchvision does well.

AGVM (Xue et al., 2022) modulates the learning rate per detector module, so
every trainable parameter must belong to exactly one named module. The names
(``backbone``, ``neck``, ``rpn_head``, ``roi_head``, ``mask_head``, ``cls_head``,
``reg_head``) map to parameter-name prefixes in ``MODULE_PREFIXES``;
``module_parameters`` applies the map and refuses any gap or overlap.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.poolers import initLevelMapper

from models.activation_checkpointing import enable_activation_checkpointing
from models.batched_heads import BatchedFasterRCNN
from models.errors import ModelConfigError
from models.vit import SimpleFeaturePyramid, ViTBody, create_vit_body, is_plain_vit

# ImageNet statistics, in the 0-255 range because images reach the model as uint8-valued floats.
IMAGE_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGE_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]

_BACKBONE = {"backbone": ("backbone.body.",), "neck": ("backbone.neck.",)}
MODULE_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "faster_rcnn": {**_BACKBONE, "rpn_head": ("rpn.",), "roi_head": ("roi_heads.box_",)},
    "mask_rcnn": {**_BACKBONE, "rpn_head": ("rpn.",), "roi_head": ("roi_heads.box_",),
                  "mask_head": ("roi_heads.mask_",)},
    "retinanet": {**_BACKBONE, "cls_head": ("head.classification_head.",),
                  "reg_head": ("head.regression_head.",)},
    "fcos": {**_BACKBONE, "cls_head": ("head.classification_head.",),
             "reg_head": ("head.regression_head.",)},
}
# Feature strides feeding the neck when model.out_indices is not given: timm backbones differ in
# how many levels they expose (ResNet 5 from stride 2, ConvNeXt/Swin 4 from stride 4).
_DEFAULT_STRIDES = {"faster_rcnn": (4, 8, 16, 32), "mask_rcnn": (4, 8, 16, 32),
                    "retinanet": (8, 16, 32), "fcos": (8, 16, 32)}


class BackboneWithNeck(nn.Module):
    """timm feature extractor (``body``) followed by an FPN (``neck``).

    Returns an ordered dict of feature maps with ``out_channels`` channels each,
    the interface torchvision's detection heads expect. ``strides`` lists the
    stride of every output level, extra (pooled / P6-P7) levels included.
    """

    def __init__(self, body: nn.Module, neck: FeaturePyramidNetwork, out_channels: int, strides: list[int],
                 levels: Optional[tuple[int, ...]] = None):
        super().__init__()
        self.body = body
        self.neck = neck
        self.out_channels = out_channels
        self.strides = strides
        self.levels = levels  # which of the body's outputs feed the neck (None: all)
        self.nhwc = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")  # timm's Swin features
        self.channels_last = False  # set by pipeline.train.build.feed_channels_last

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        if self.channels_last:  # torchvision's transform batches (and pads) into a new NCHW tensor
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.body(images)
        if self.levels is not None:
            features = [features[i] for i in self.levels]
        if self.nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return self.neck(OrderedDict((str(i), f) for i, f in enumerate(features)))


class CanvasTransform(GeneralizedRCNNTransform):
    """torchvision's transform, padding every batch to one canvas per orientation instead of to its
    largest image: a compiled backbone then sees three input shapes per batch size (landscape,
    portrait, mixed), not one per combination of image sizes (about 36 at 800x1333).

    The canvas is (min_size, max_size) rounded up to the size divisor, turned for portrait batches;
    a mixed batch (aspect grouping off) gets the square of the long side. The padding is zeros,
    as torchvision's; what changes is how much of it a batch carries (batch-norm statistics and
    the anchors over the padding see more of it)."""

    def __init__(self, transform: GeneralizedRCNNTransform, min_size: int, max_size: int):
        super().__init__(transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
                         transform.size_divisible, transform.fixed_size, _skip_resize=transform._skip_resize)
        d = transform.size_divisible
        self.short, self.long = -(-min_size // d) * d, -(-max_size // d) * d

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        wide = [img.shape[-1] >= img.shape[-2] for img in images]
        h, w = (self.short, self.long) if all(wide) else (self.long, self.short) if not any(wide) else (self.long,) * 2
        if any(img.shape[-2] > h or img.shape[-1] > w for img in images):  # larger than the loader makes
            return super().batch_images(images, size_divisible)
        batched = images[0].new_zeros(len(images), images[0].shape[0], h, w)
        for canvas, img in zip(batched, images):
            canvas[:, :img.shape[-2], :img.shape[-1]].copy_(img)
        return batched


def check_backbone_name(name: str) -> None:
    """Raise ModelConfigError when timm has no model ``name``, suggesting the closest names it has."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"close names: {', '.join(close)}" if close else "timm.list_models('*pattern*') lists them"
    raise ModelConfigError(f"model.backbone={name!r}: timm {timm.__version__} has no model of that name; {hint}")


def _pretrained_kwargs(cfg) -> dict:
    if cfg.pretrained is None:
        return {}
    if not Path(cfg.pretrained).is_file():
        raise FileNotFoundError(
            f"model.pretrained: {cfg.pretrained} does not exist (weights load only from a local file)")
    check_weights_only(Path(cfg.pretrained))
    return dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(cfg.pretrained)))


def check_weights_only(path: Path) -> None:
    """Raise ModelConfigError unless ``path`` reads as tensors and plain containers only.

    A pretrained file often comes from elsewhere, and a pickled one can run code when it is read.
    timm's loader reads with ``weights_only=True`` in recent releases, not in every release the
    pipeline supports, so the file is read that way here first (memory-mapped where its format
    allows: nothing is copied). safetensors files hold no code and pass as they are.
    """
    if path.suffix == ".safetensors":
        return
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # not a zip archive (the legacy format): mmap does not apply
            if "mmap" not in str(err):
                raise
            torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelConfigError(f"model.pretrained={path}: refused: reading it would need a full unpickler, which can "
                               f"run code from the file ({str(err).splitlines()[0][:200]}). Save the weights as a "
                               "plain state dict (torch.save(model.state_dict(), ...)) or as safetensors") from None


class _MissingKeys(logging.Handler):
    """Collects the keys timm reports missing from a pretrained file.

    timm loads a backbone for features (or without its classifier) non-strictly and reports missing
    keys only as an INFO log line, so a file of another architecture would load nothing, silently."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.match(r"Missing keys \((.*)\) discovered", record.getMessage())
        if found:
            self.keys += found.group(1).split(", ")


@contextlib.contextmanager
def _strict_pretrained_load(cfg):
    """Raise when the pretrained file leaves backbone parameters (other than the classifier) unloaded."""
    if cfg.pretrained is None:
        yield
        return
    logger, handler = logging.getLogger("timm.models._builder"), _MissingKeys()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.backbone.split(".")[0])
    classifier = getattr(pretrained_cfg, "classifier", None) or "head"
    prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    missing = [k for k in handler.keys if not k.startswith(prefixes)]
    if missing:
        raise RuntimeError(f"{len(missing)} backbone tensor(s) are not in the file, e.g. {missing[:5]}; it was "
                           "saved from another architecture or with other key names")


def _family_kwargs(name: str) -> dict:
    """Swin (v1) checks the input against its ImageNet size unless told not to; detection images vary."""
    try:
        module = timm.models.model_entrypoint(name.split(".")[0]).__module__
    except (RuntimeError, KeyError):
        return {}
    return {"strict_img_size": False} if module.endswith(".swin_transformer") else {}


def _create_body(cfg, out_indices: Optional[tuple[int, ...]]) -> nn.Module:
    """The timm body; all its feature levels when ``out_indices`` is None (selected by stride later)."""
    check_backbone_name(cfg.backbone)
    try:
        with _strict_pretrained_load(cfg):
            if is_plain_vit(cfg.backbone):
                return create_vit_body(cfg.backbone, _pretrained_kwargs(cfg), cfg.vit_window, cfg.vit_global_blocks)
            if cfg.vit_window:
                raise ModelConfigError(f"model.vit_window={cfg.vit_window}: windowed attention is for plain ViT backbones, "
                                 f"not {cfg.backbone!r}; set model.vit_window=0")
            chosen = {} if out_indices is None else {"out_indices": out_indices}
            return timm.create_model(cfg.backbone, features_only=True, **chosen, **_family_kwargs(cfg.backbone),
                                     **_pretrained_kwargs(cfg))
    except ModelConfigError:
        raise
    except RuntimeError as err:  # timm's strict load names the missing/unexpected keys
        raise RuntimeError(f"model.pretrained={cfg.pretrained} does not fit backbone "
                           f"{cfg.backbone!r}: {err}") from None
    except (ValueError, KeyError, IndexError) as err:
        raise ValueError(f"model.backbone={cfg.backbone!r} with out_indices={out_indices}: {err} "
                         "(use a timm name that supports features_only, or a plain ViT)") from None


def build_backbone(cfg) -> BackboneWithNeck:
    """timm body + FPN (CNNs) or simple feature pyramid (plain ViTs); P6/P7 extra levels for the
    one-stage detectors, max-pool level for R-CNNs."""
    one_stage = cfg.detector in ("retinanet", "fcos")
    out_indices = cfg.out_indices
    body = _create_body(cfg, out_indices)
    levels, channels = None, []
    if isinstance(body, ViTBody):
        strides = [8, 16, 32] if one_stage else [4, 8, 16, 32]
    else:
        strides, channels = body.feature_info.reduction(), body.feature_info.channels()
        if out_indices is None:  # the levels at the detector's strides
            levels = tuple(i for i, s in enumerate(strides) if s in _DEFAULT_STRIDES[cfg.detector])
            if len(levels) != len(_DEFAULT_STRIDES[cfg.detector]):
                raise ValueError(f"model.backbone={cfg.backbone!r} has feature strides {strides}, not "
                                 f"{list(_DEFAULT_STRIDES[cfg.detector])}: set model.out_indices")
            strides, channels = [strides[i] for i in levels], [channels[i] for i in levels]
    if one_stage:
        extra, all_strides = LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels), strides + [strides[-1] * 2, strides[-1] * 4]
    else:
        extra, all_strides = LastLevelMaxPool(), strides + [strides[-1] * 2]
    if isinstance(body, ViTBody):
        neck = SimpleFeaturePyramid(body.channels, cfg.fpn_channels, strides, extra)
    else:
        neck = FeaturePyramidNetwork(channels, cfg.fpn_channels, extra_blocks=extra)
    backbone = BackboneWithNeck(body, neck, cfg.fpn_channels, all_strides, levels)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(body)
    return backbone


def _anchors(cfg, strides: list[int]) -> AnchorGenerator:
    if cfg.detector == "retinanet":  # three octave scales per level, as in the RetinaNet paper
        sizes = tuple(tuple(cfg.anchor_scale * s * 2 ** (k / 3) for k in range(3)) for s in strides)
        return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))
    if cfg.detector == "fcos":  # anchor-free: one point per location, the size only sets the box scale
        return AnchorGenerator(tuple((cfg.anchor_scale * s,) for s in strides), ((1.0,),) * len(strides))
    return AnchorGenerator(tuple((cfg.anchor_scale * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))


def _score_thresh(cfg, key: str) -> dict:
    return {} if cfg.score_thresh is None else {key: cfg.score_thresh}


def _roi_pool(levels: list[str], strides: list[int], output_size: int, sampling_ratio: int,
              canonical_scale: float = 224) -> MultiScaleRoIAlign:
    """torchvision's RoIAlign over the pyramid ``levels``, with each level's scale set from the
    backbone's ``strides``. Left alone, MultiScaleRoIAlign infers the scales from the first batch it
    sees (feature size / unpadded image size, rounded to a power of two) and keeps them: a small
    first image padded up (65 px -> 96) halves every scale for the rest of the run, and a resumed
    run, whose first batch differs, pools from other places than the run it continues. A box of side
    ``canonical_scale`` pools from level 4 (stride 16), each halving or doubling one level down or up."""
    pool = MultiScaleRoIAlign(levels, output_size=output_size, sampling_ratio=sampling_ratio)
    pool.scales = [1.0 / s for s in strides[:len(levels)]]
    pool.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[len(levels) - 1])),
                                      canonical_scale=int(canonical_scale), canonical_level=pool.canonical_level)
    return pool


def build_detector(cfg, num_classes: int, min_size: int, max_size: int,
                   batched_heads: bool = False) -> nn.Module:
    """Build the configured detector for ``num_classes`` foreground classes (labels 1..num_classes).

    ``batched_heads``: a Faster R-CNN trains with ``models.batched_heads`` (same parameters and
    inference; ``pipeline.train.build.uses_batched_heads`` reads ``model.heads``)."""
    if cfg.detector == "fcos" and cfg.fpn_channels % 32:
        raise ValueError(f"model.fpn_channels={cfg.fpn_channels}: FCOS's head uses GroupNorm(32), "
                         "so use a multiple of 32")
    backbone = build_backbone(cfg)
    # The loader workers resize already; skip the model's second resize in training.
    # (At inference the model's resize to the same sizes is an identity up to rounding.)
    common = dict(min_size=min_size, max_size=max_size, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
                  _skip_resize=True)
    anchors = _anchors(cfg, backbone.strides)
    if cfg.detector in ("retinanet", "fcos"):
        cls = RetinaNet if cfg.detector == "retinanet" else FCOS
        return cls(backbone, num_classes + 1, anchor_generator=anchors,
                   detections_per_img=cfg.detections_per_img, **_score_thresh(cfg, "score_thresh"), **common)
    levels = [str(i) for i in range(len(backbone.strides) - 1)]  # the max-pool level feeds the RPN only
    box_pool = _roi_pool(levels, backbone.strides, 7, cfg.roi_sampling_ratio, cfg.roi_canonical_scale)
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, cfg.box_head_dim)
    kwargs = dict(rpn_anchor_generator=anchors, box_roi_pool=box_pool, box_head=box_head,
                  box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes + 1),
                  rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_train,
                  rpn_post_nms_top_n_train=cfg.rpn_post_nms_train,
                  rpn_pre_nms_top_n_test=cfg.rpn_post_nms_test,
                  rpn_post_nms_top_n_test=cfg.rpn_post_nms_test,
                  rpn_batch_size_per_image=cfg.rpn_batch_per_image, box_batch_size_per_image=cfg.roi_batch_per_image,
                  box_detections_per_img=cfg.detections_per_img, **_score_thresh(cfg, "box_score_thresh"), **common)
    if cfg.detector == "mask_rcnn":
        mask_pool = _roi_pool(levels, backbone.strides, 14, cfg.roi_sampling_ratio, cfg.roi_canonical_scale)
        mask_predictor = MaskRCNNPredictor(256, 256, num_classes + 1)  # torchvision's mask head is 256 wide
        return MaskRCNN(backbone, None, mask_roi_pool=mask_pool, mask_predictor=mask_predictor, **kwargs)
    return (BatchedFasterRCNN if batched_heads else FasterRCNN)(backbone, None, **kwargs)


def module_parameters(model: nn.Module, detector: str,
                      prefixes: Optional[dict[str, tuple[str, ...]]] = None) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Assign every trainable parameter to exactly one detector module by name prefix.

    Raises ValueError naming the parameter when one matches no module or several.
    """
    prefixes = prefixes or MODULE_PREFIXES[detector]
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {m: [] for m in prefixes}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owners = [m for m, pre in prefixes.items() if name.startswith(pre)]
        if len(owners) != 1:
            what = "no module" if not owners else f"several modules {owners}"
            raise ValueError(f"parameter {name!r} belongs to {what}; fix the module prefixes "
                             f"({prefixes}) so that each trainable parameter has exactly one")
        groups[owners[0]].append((name, param))
    return {m: ps for m, ps in groups.items() if ps}
