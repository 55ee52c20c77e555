"""Plain ViT backbones (ViT, DINOv2, EVA-02, DeiT, BEiT from timm) for detection, ViTDet style.

A plain ViT has a single stride-16 feature map (stride 14 for the patch-14 models). ViTDet
(Li et al., ECCV 2022) builds the pyramid from that one map: deconvolutions up to strides 8
and 4, a max-pool down to 32, each followed by a 1x1 and a 3x3 convolution with
LayerNorm-style channel norms. Position embeddings are interpolated to the input size on the
fly (timm's ``dynamic_img_size``); inputs are padded to the patch size (``dynamic_img_pad``).
Patch-14 maps are resampled onto the stride-16 grid so that every level has a power-of-two
stride, which torchvision's RoIAlign and anchor generator assume.

Windowed attention (ViTDet, ``model.vit_window``): most blocks attend within non-overlapping
windows of ``window`` x ``window`` tokens, a few (``model.vit_global_blocks``; ViTDet: 4, evenly
spaced) over the whole image. It is built around timm's own blocks: a windowed block is the same
module applied to the window-partitioned token sequences (batch x windows of them), so every
timm checkpoint loads unchanged and activation checkpointing and ZeRO-3 see ordinary block calls.
The token grid is padded to a multiple of the window; padded tokens are masked out as keys
(ViTDet attends to its zero padding; masking makes a window that covers the whole grid exactly
the global block). Prefix tokens (class, registers) join every window, as in pretraining, where
every token could attend to them; their outputs are averaged over the windows. So a patch token
of a windowed block depends on its own window and on the prefix tokens only (exactly its window
for a model without prefix tokens). Cost: attention over N tokens drops from N^2 to N x window^2
in the windowed blocks (at 1024 px, patch 14: 5,476 tokens, windows of 196).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import timm
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ModelConfigError

# timm modules whose models are plain (single-scale) ViTs.
PLAIN_VIT_MODULES = ("vision_transformer", "eva", "deit", "beit")


def is_plain_vit(name: str) -> bool:
    try:
        module = timm.models.model_entrypoint(name.split(".")[0]).__module__
    except (RuntimeError, KeyError):
        return False
    return module.rsplit(".", 1)[-1] in PLAIN_VIT_MODULES


def vitdet_global_blocks(depth: int, count: int = 4) -> tuple[int, ...]:
    """ViTDet's global blocks: the last block of each of ``count`` equal stages (depth 12:
    2, 5, 8, 11; depth 24: 5, 11, 17, 23; ViT-g's 40: 9, 19, 29, 39)."""
    return tuple(depth * (k + 1) // count - 1 for k in range(count))


class ViTBody(nn.Module):
    """A timm ViT returning its last token map as one (B, C, H/16, W/16) feature map; with
    ``window`` > 0, the blocks not in ``global_blocks`` attend within windows (module docstring)."""

    def __init__(self, vit: nn.Module, window: int = 0, global_blocks: tuple[int, ...] = ()):
        super().__init__()
        self.vit = vit
        self.channels = vit.embed_dim
        self.patch = vit.patch_embed.patch_size[0]
        self.window = window
        self.global_blocks = frozenset(global_blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        features = self._windowed_features(x) if self.window else self.vit.forward_features(x)
        tokens = features[:, self.vit.num_prefix_tokens:]
        gh, gw = math.ceil(h / self.patch), math.ceil(w / self.patch)
        fmap = tokens.transpose(1, 2).reshape(x.shape[0], self.channels, gh, gw)
        if self.patch != 16:  # onto the stride-16 grid the heads expect
            fmap = F.interpolate(fmap, size=(math.ceil(h / 16), math.ceil(w / 16)), mode="bilinear",
                                 align_corners=False)
        return [fmap]


    def _windowed_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` (vision_transformer.py), the blocks windowed but the global ones."""
        vit = self.vit
        tokens = vit.patch_embed(x)  # (B, gh, gw, C): dynamic_img_size keeps the grid
        grid = tokens.shape[1:3]
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(tokens)))
        windows = WindowPartition(grid, self.window, vit.num_prefix_tokens, tokens)
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens) if i in self.global_blocks else windows.apply(block, tokens)
        return vit.norm(tokens)


class WindowPartition:
    """Token sequences (B, prefix + gh * gw, C) <-> windows (B * n, prefix + window^2, C) for one
    grid; the padding mask is built once and shared by every windowed block of the forward."""

    def __init__(self, grid: tuple[int, int], window: int, prefix: int, like: torch.Tensor):
        self.gh, self.gw = grid
        self.window, self.prefix = window, prefix
        self.nh, self.nw = -(-self.gh // window), -(-self.gw // window)
        self.mask = None
        if (self.nh * window, self.nw * window) != grid:  # padded keys take no part in attention
            valid = like.new_ones(1, self.gh, self.gw, 1, dtype=torch.bool)
            valid = self._to_windows(self._pad(valid))[..., 0]  # (n, window^2)
            valid = F.pad(valid, (prefix, 0), value=True)
            dtype = torch.get_autocast_dtype(like.device.type) if torch.is_autocast_enabled(like.device.type) \
                else like.dtype  # the dtype attention computes in: SDPA takes a float mask only in that one
            mask = torch.zeros(valid.shape, dtype=dtype, device=like.device).masked_fill_(~valid, torch.finfo(dtype).min)
            self.mask = mask.repeat(like.shape[0], 1)[:, None, None, :]  # (B * n, 1, 1, keys)

    def _pad(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, gh, gw, C) -> (B, nh * window, nw * window, C), zeros after the last row and column."""
        return F.pad(grid, (0, 0, 0, self.nw * self.window - self.gw, 0, self.nh * self.window - self.gh))

    def _to_windows(self, grid: torch.Tensor) -> torch.Tensor:
        b, c, k = grid.shape[0], grid.shape[-1], self.window
        return grid.view(b, self.nh, k, self.nw, k, c).transpose(2, 3).reshape(b * self.nh * self.nw, k * k, c)

    def _from_windows(self, windows: torch.Tensor, batch: int) -> torch.Tensor:
        k, c = self.window, windows.shape[-1]
        grid = windows.view(batch, self.nh, self.nw, k, k, c).transpose(2, 3).reshape(batch, self.nh * k, self.nw * k, c)
        return grid[:, :self.gh, :self.gw].reshape(batch, self.gh * self.gw, c)

    def apply(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape[0], self.nh * self.nw, tokens.shape[-1]
        prefix, grid = tokens[:, :self.prefix], tokens[:, self.prefix:].view(b, self.gh, self.gw, c)
        windows = self._to_windows(self._pad(grid))
        if self.prefix:  # every window sees the prefix tokens
            windows = torch.cat([prefix.repeat_interleave(n, dim=0), windows], dim=1)
        out = block(windows) if self.mask is None else block(windows, attn_mask=self.mask)
        grid = self._from_windows(out[:, self.prefix:], b)
        if not self.prefix:
            return grid
        return torch.cat([out[:, :self.prefix].view(b, n, self.prefix, c).mean(1), grid], dim=1)


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


# Windowed attention needs blocks that take only (tokens, attn_mask): timm's vision_transformer
# (ViT, DeiT, DINOv2). EVA's rotary embedding and BEiT's relative position bias are laid out for the
# whole grid, so a window would need its own slice of them (not built).
WINDOWED_VIT_MODULES = ("vision_transformer", "deit")


def create_vit_body(name: str, pretrained_kwargs: dict, window: int = 0,
                    global_blocks: tuple[int, ...] | None = None) -> ViTBody:
    vit = timm.create_model(name, num_classes=0, global_pool="", dynamic_img_size=True, dynamic_img_pad=True,
                            **pretrained_kwargs)
    if not window:
        return ViTBody(vit)
    module = type(vit).__module__.rsplit(".", 1)[-1]
    if module not in WINDOWED_VIT_MODULES:
        raise ModelConfigError(f"model.vit_window={window}: windowed attention is built for timm's "
                         f"{'/'.join(WINDOWED_VIT_MODULES)} ViTs, not {name!r} ({module}: its position encoding "
                         "covers the whole grid); set model.vit_window=0")
    depth = len(vit.blocks)
    global_blocks = vitdet_global_blocks(depth) if global_blocks is None else tuple(global_blocks)
    if any(not 0 <= i < depth for i in global_blocks):
        raise ModelConfigError(f"model.vit_global_blocks={list(global_blocks)}: {name!r} has blocks 0..{depth - 1}")
    return ViTBody(vit, window, global_blocks)
