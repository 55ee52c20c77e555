"""Activation checkpointing of backbone blocks (our stand-in for MegDet's sublinear memory).

Each residual / transformer block's forward is wrapped in torch's non-reentrant
``torch.utils.checkpoint``: its activations are dropped after forward and recomputed in
backward. We use torch's checkpoint rather than DeepSpeed's ``checkpointing`` API because it
needs no global configuration, composes with ZeRO-3's parameter gathering and autocast, and
keeps parameter names unchanged (the block's ``forward`` is wrapped in place, so state dicts
and checkpoints are the same with and without it). It is switched on by one field,
``model.activation_checkpointing``.

BatchNorm: the recompute runs the block's forward a second time in training mode, which
would update BN running statistics twice. During recompute we set every BN's momentum to
0 (no update) and restore ``num_batches_tracked`` afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

# timm's block classes end in one of these (ResNet BasicBlock/Bottleneck, ConvNeXtBlock, ViT
# Block, EVA's EvaBlock, Swin's SwinTransformerBlock, byobnet's BottleneckBlock, ...).
_BLOCK_SUFFIXES = ("Block", "Bottleneck")


@contextmanager
def _frozen_bn_stats(block: nn.Module):
    bns = [m for m in block.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def _contexts(block: nn.Module):
    return nullcontext(), _frozen_bn_stats(block)


def _checkpointed(forward, block: nn.Module, *args, **kwargs):
    if not block.training:  # inference keeps no activations for backward anyway
        return forward(*args, **kwargs)
    if torch.compiler.is_compiling():  # the compiler plans the recompute; it takes no context_fn
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=partial(_contexts, block), **kwargs)


def has_running_stats(root: nn.Module) -> bool:
    """Whether a checkpointed block holds BatchNorm running statistics, which a compiled recompute
    would update a second time (``train.compile`` refuses that combination)."""
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for block in find_blocks(root)
               for m in block.modules())


def find_blocks(root: nn.Module) -> list[nn.Module]:
    """The outermost modules whose class name marks them as a residual / transformer block."""
    blocks, inside = [], set()
    for name, module in root.named_modules():
        if any(name.startswith(b + ".") for b in inside):
            continue
        if type(module).__name__.endswith(_BLOCK_SUFFIXES):
            blocks.append(module)
            inside.add(name)
    return blocks


def enable_activation_checkpointing(root: nn.Module) -> int:
    """Checkpoint every block of ``root``; returns how many. Raises if there are none."""
    blocks = find_blocks(root)
    if not blocks:
        raise ValueError(f"model.activation_checkpointing: found no blocks (classes ending in {_BLOCK_SUFFIXES}) "
                         f"in {type(root).__name__}; this backbone cannot be checkpointed by block")
    for block in blocks:
        block.forward = partial(_checkpointed, block.forward, block)
    return len(blocks)
