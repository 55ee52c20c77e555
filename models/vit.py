"""Plain ViT backbones (ViT, DINOv2, EVA-02, DeiT, BEiT from timm) for detection, ViTDet style.

A plain ViT has a single stride-16 feature map (stride 14 for the patch-14 models). ViTDet
(Li et al., ECCV 2022) builds the pyramid from that one map: deconvolutions up to strides 8
and 4, a max-pool down to 32, each followed by a 1x1 and a 3x3 convolution with
LayerNorm-style channel norms. Position embeddings are interpolated to the input size on the
fly (timm's ``dynamic_img_size``); inputs are padded to the patch size (``dynamic_img_pad``).
Patch-14 maps are resampled onto the stride-16 grid so that every level has a power-of-two
stride, which torchvision's RoIAlign and anchor generator assume.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import timm
import torch
import torch.nn.functional as F
from torch import nn

# timm modules whose models are plain (single-scale) ViTs.
PLAIN_VIT_MODULES = ("vision_transformer", "eva", "deit", "beit")


def is_plain_vit(name: str) -> bool:
    try:
        module = timm.models.model_entrypoint(name.split(".")[0]).__module__
    except (RuntimeError, KeyError):
        return False
    return module.rsplit(".", 1)[-1] in PLAIN_VIT_MODULES


class ViTBody(nn.Module):
    """A timm ViT returning its last token map as one (B, C, H/16, W/16) feature map."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.channels = vit.embed_dim
        self.patch = vit.patch_embed.patch_size[0]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
        gh, gw = math.ceil(h / self.patch), math.ceil(w / self.patch)
        fmap = tokens.transpose(1, 2).reshape(x.shape[0], self.channels, gh, gw)
        if self.patch != 16:  # onto the stride-16 grid the heads expect
            fmap = F.interpolate(fmap, size=(math.ceil(h / 16), math.ceil(w / 16)), mode="bilinear",
                                 align_corners=False)
        return [fmap]


class ChannelNorm(nn.GroupNorm):
    """LayerNorm over channels of a (B, C, H, W) map (GroupNorm with one group), as in ViTDet."""

    def __init__(self, channels: int):
        super().__init__(1, channels)


def _scale_stage(channels: int, stride: int) -> nn.Sequential:
    """Resample the stride-16 map to ``stride`` (ViTDet's simple pyramid stages)."""
    if stride == 4:
        return nn.Sequential(nn.ConvTranspose2d(channels, channels // 2, 2, 2), ChannelNorm(channels // 2), nn.GELU(),
                             nn.ConvTranspose2d(channels // 2, channels // 4, 2, 2))
    if stride == 8:
        return nn.Sequential(nn.ConvTranspose2d(channels, channels // 2, 2, 2))
    if stride == 16:
        return nn.Sequential()
    if stride == 32:
        return nn.Sequential(nn.MaxPool2d(2, 2))
    raise ValueError(f"simple feature pyramid: stride {stride} is not one of 4, 8, 16, 32")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid; returns levels '0'.. at ``strides`` plus the extra levels.

    ``extra``: torchvision's LastLevelMaxPool (R-CNNs) or LastLevelP6P7 (RetinaNet/FCOS).
    """

    def __init__(self, in_channels: int, out_channels: int, strides: list[int], extra: nn.Module):
        super().__init__()
        widths = {4: in_channels // 4, 8: in_channels // 2, 16: in_channels, 32: in_channels}
        self.stages = nn.ModuleList(_scale_stage(in_channels, s) for s in strides)
        self.outputs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[s], out_channels, 1, bias=False), ChannelNorm(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), ChannelNorm(out_channels))
            for s in strides)
        self.extra = extra

    def forward(self, features: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
        x = next(iter(features.values()))
        results = [out(stage(x)) for stage, out in zip(self.stages, self.outputs)]
        names = [str(i) for i in range(len(results))]
        results, names = self.extra(results, [x], names)
        return OrderedDict(zip(names, results))


def create_vit_body(name: str, pretrained_kwargs: dict) -> ViTBody:
    vit = timm.create_model(name, num_classes=0, global_pool="", dynamic_img_size=True, dynamic_img_pad=True,
                            **pretrained_kwargs)
    return ViTBody(vit)
