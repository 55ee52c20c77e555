"""Normalization: MegDet's Cross-GPU Batch Normalization over BN groups, and the converter.

MegDet (Peng et al., CVPR 2018), Sec. 3.2 and Algorithm 1: each BN layer computes its
batch statistics over a *BN group* of ranks, not over one GPU's few images. Per layer:
an all-reduce of the per-channel sums (with the image count) gives the group mean;
each rank then sums its squared deviations from that mean and a second all-reduce
gives the group variance (two passes, as in the paper, rather than E[x^2] - E[x]^2,
which loses precision for large activations). Backward needs one more all-reduce of
two per-channel sums so that every rank's input gradient equals that of BN over the
group's concatenated batch. Counts travel with the sums, so uneven and empty
per-rank batches are weighted correctly.

BN groups stay inside one machine in the paper; ``build_bn_group`` gathers every rank's
machine as its launcher says (``pipeline.distributed.launcher``: CROSS_RANK from deepspeed, GROUP_RANK
from torchrun, SLURM_NODEID from srun, rank // local size under mpirun) and checks the
layout before ``bn_group_layout`` groups the ranks. ``convert_norms`` swaps every BatchNorm of a
model for the configured kind before ``deepspeed.initialize``; ``sync_running_stats``
averages running statistics over all ranks before evaluation and checkpointing, so
rank 0's checkpoint does not hold only its own group's view.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as _TorchSyncBatchNorm
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.config import ModelConfig
from pipeline.distributed.launcher import check_node_layout, joined, resolve
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class _GroupBatchNorm(torch.autograd.Function):
    """BN over the concatenated batch of a process group (MegDet Algorithm 1).

    Returns (y, mean, unbiased var, count); the statistics are for the running averages
    and carry no gradient. Statistics are computed in fp32 whatever the input dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group):
        xf = x.float()
        dims = _reduce_dims(xf)
        channels = xf.shape[1]
        count = torch.full((1,), xf.numel() // max(channels, 1), dtype=torch.float32, device=x.device)
        sums = torch.cat([xf.sum(dims), count])
        dist.all_reduce(sums, group=group)  # 1st all-reduce: group sum and image-pixel count
        n = sums[-1]
        mean = sums[:-1] / n.clamp(min=1)
        centred = xf - _per_channel(mean, xf)
        sq = centred.square().sum(dims)
        dist.all_reduce(sq, group=group)  # 2nd all-reduce: group sum of squared deviations
        var = sq / n.clamp(min=1)
        invstd = torch.rsqrt(var + eps)
        y = centred * _per_channel(invstd, xf)
        if weight is not None:
            y = y * _per_channel(weight.float(), xf) + _per_channel(bias.float(), xf)
        ctx.save_for_backward(x, weight, mean, invstd, n)
        ctx.group = group
        unbiased = var * n / (n - 1).clamp(min=1)
        ctx.mark_non_differentiable(mean, unbiased, n)
        return y.to(x.dtype), mean, unbiased, n

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_n):
        x, weight, mean, invstd, n = ctx.saved_tensors
        gy, xf = grad_y.float(), x.float()
        dims = _reduce_dims(xf)
        xhat = (xf - _per_channel(mean, xf)) * _per_channel(invstd, xf)
        sum_dy = gy.sum(dims)
        sum_dy_xhat = (gy * xhat).sum(dims)
        # Local parameter gradients: DeepSpeed's gradient reduction sums them over ranks.
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None else None
        grad_b = sum_dy.to(weight.dtype) if weight is not None else None
        reduced = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(reduced, group=ctx.group)  # the group's sums: d(sum of group losses)/dx
        channels = sum_dy.numel()
        mean_dy = reduced[:channels] / n.clamp(min=1)
        mean_dy_xhat = reduced[channels:] / n.clamp(min=1)
        scale = invstd if weight is None else invstd * weight.float()
        dx = (gy - _per_channel(mean_dy, xf) - xhat * _per_channel(mean_dy_xhat, xf)) * _per_channel(scale, xf)
        return dx.to(x.dtype), grad_w, grad_b, None, None


class CrossGPUBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span ``process_group`` (None: this rank only).

    Eval mode, and training without a group, are exactly ``torch.nn.BatchNorm*d``.
    Works for any input rank >= 2 (1d/2d/3d) on CPU (gloo) and CUDA (NCCL).

    ``impl``: "ours" is ``_GroupBatchNorm`` (MegDet's two-pass statistics, any device); "torch" is
    the fused CUDA kernels behind ``nn.SyncBatchNorm`` (one all-gather of per-rank mean, inverse std
    and count forward, one all-reduce backward; CUDA only); "auto" takes torch's on CUDA tensors.
    Both weight uneven and empty per-rank batches by their counts; ours stays the oracle in tests.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None, impl: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group
        self.impl = impl

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"CrossGPUBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.process_group is None:
            return super().forward(x)
        if self.impl == "torch" or (self.impl == "auto" and x.is_cuda):
            return self._torch_fused(x)
        y, mean, var, n = _GroupBatchNorm.apply(x, self.weight, self.bias, self.eps, self.process_group)
        if self.track_running_stats:
            self._update_running_stats(mean, var, n)
        return y

    def _torch_fused(self, x: torch.Tensor) -> torch.Tensor:
        """``nn.SyncBatchNorm``'s training path on this layer's parameters and buffers (it also
        updates the running statistics)."""
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative average, as nn.SyncBatchNorm (a host sync; presets use 0.1)
                momentum = 1.0 / float(self.num_batches_tracked)
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _TorchSyncBatchNorm.apply(x, self.weight, self.bias, *running, self.eps, momentum or 0.0,
                                         self.process_group, dist.get_world_size(self.process_group))

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / self.num_batches_tracked.float() if self.momentum is None else self.momentum
        # A group with no images this step leaves the running stats alone (a tensor gate: no host sync).
        factor = (n > 0).float() * momentum
        # Every rank of the group holds the same mean/var, so running stats agree inside a group.
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor.to(self.running_mean.dtype))
        self.running_var.lerp_(var.to(self.running_var.dtype), factor.to(self.running_var.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        return self._norm(x)


class CrossGPUBatchNormAct(CrossGPUBatchNorm):
    """Cross-GPU BN for timm's ``BatchNormAct2d`` (norm, then its dropout and activation)."""

    def __init__(self, num_features: int, drop: nn.Module, act: nn.Module, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


# --------------------------------------------------------------------------- groups

def bn_group_layout(spec: Union[str, int], node_of_rank: list[int], micro_batch: int,
                    bn_images: Optional[int] = None) -> list[list[int]]:
    """Partition ranks into BN groups.

    ``spec``: "node" (one group per machine), "world", "none" (one rank each) or an int
    (ranks per group, inside a machine). ``bn_images`` (the BN size in images, MegDet's
    term) overrides ``spec`` with ``bn_images / micro_batch`` ranks per group.
    Raises ConfigError when a size does not fit the machines.
    """
    world = len(node_of_rank)
    nodes: dict[int, list[int]] = {}
    for rank, node in enumerate(node_of_rank):
        nodes.setdefault(node, []).append(rank)
    if bn_images is not None:
        if bn_images % micro_batch:
            raise ConfigError(f"model.bn_images={bn_images} is not a multiple of train.micro_batch={micro_batch}: "
                              f"a BN group is a whole number of ranks; use a multiple of {micro_batch}")
        spec = bn_images // micro_batch
    if spec == "world":
        return [list(range(world))]
    if spec == "none" or spec == 1:
        return [[r] for r in range(world)]
    if spec == "node":
        return [ranks for _, ranks in sorted(nodes.items())]
    size = int(spec)
    what = f"model.bn_images={bn_images} ({size} ranks of {micro_batch} images)" if bn_images else \
        f"model.bn_group={size}"
    groups = []
    for node, ranks in sorted(nodes.items()):
        if len(ranks) % size:
            raise ConfigError(
                f"{what} does not divide machine {node}'s {len(ranks)} ranks: BN groups stay inside one machine "
                f"(MegDet); use a divisor of {len(ranks)}, or bn_group=world to span machines")
        groups += [ranks[i:i + size] for i in range(0, len(ranks), size)]
    return groups


def job_bn_layout(cfg: ModelConfig, micro_batch: int) -> list[list[int]]:
    """The BN groups of this job's ranks, from the machines they run on (a collective)."""
    # The job init_distributed joined; a group formed by hand (tests) is read from the environment.
    launch = joined() or resolve(os.environ)
    placements: list = [None] * dist.get_world_size()
    dist.all_gather_object(placements, (launch.node, launch.local_rank, launch.local_world))
    check_node_layout(placements, launch.launcher)  # every rank raises alike: no rank is left waiting
    return bn_group_layout(cfg.bn_group, [node for node, _, _ in placements], micro_batch, cfg.bn_images)


def build_bn_group(cfg: ModelConfig, micro_batch: int):
    """Create every BN group (all ranks must call ``new_group`` for every group) and return this rank's.

    Returns (process group or None for a one-rank group, the layout).
    """
    rank = dist.get_rank()
    layout = job_bn_layout(cfg, micro_batch)
    mine = None
    for ranks in layout:
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks:
            mine = group
    return mine, layout


# --------------------------------------------------------------------------- conversion

def _is_norm_act(bn: nn.Module) -> bool:
    """timm's BatchNormAct2d: BN with a fused dropout and activation that must survive conversion."""
    return hasattr(bn, "act") and hasattr(bn, "drop")


def _device(bn: _BatchNorm) -> torch.device:
    return bn.weight.device if bn.affine else bn.running_mean.device


def _replacement(bn: _BatchNorm, kind: str, group, gn_groups: int, cgbn_impl: str) -> nn.Module:
    c = bn.num_features
    if kind == "frozen":
        new = FrozenBatchNorm2d(c, eps=bn.eps)
        if bn.affine:
            new.weight.copy_(bn.weight.detach())
            new.bias.copy_(bn.bias.detach())
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
    elif kind == "group_norm":
        if c % gn_groups:
            raise ConfigError(f"model.gn_groups={gn_groups} does not divide a BatchNorm with {c} channels; "
                              "pick a divisor of every norm layer's width")
        new = nn.GroupNorm(gn_groups, c, eps=bn.eps, affine=bn.affine)
        if bn.affine:
            new.weight.copy_(bn.weight.detach())
            new.bias.copy_(bn.bias.detach())
    else:  # cgbn: same parameters and buffers, so the state dict carries over as is
        kwargs = dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                      track_running_stats=bn.track_running_stats, process_group=group, impl=cgbn_impl)
        new = CrossGPUBatchNormAct(c, bn.drop, bn.act, **kwargs) if _is_norm_act(bn) else \
            CrossGPUBatchNorm(c, **kwargs)
        new.load_state_dict(bn.state_dict())
        return new.to(_device(bn))
    if _is_norm_act(bn):  # keep timm's fused dropout + activation
        new = nn.Sequential(new, bn.drop, bn.act)
    return new.to(_device(bn))


@torch.no_grad()
def convert_norms(model: nn.Module, kind: str, group=None, gn_groups: int = 32, cgbn_impl: str = "auto") -> int:
    """Replace every BatchNorm in ``model`` (backbone and heads) by ``kind``; returns how many.

    ``kind``: "cgbn" (statistics over ``group``, computed by ``cgbn_impl``), "per_gpu" (leave
    torch's BN), "frozen" (torchvision's FrozenBatchNorm2d: running stats and affine as buffers),
    "group_norm".
    Weights and running statistics are copied. Call before ``deepspeed.initialize``.
    """
    if kind == "per_gpu":
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, CrossGPUBatchNorm):
                if kind == "frozen" and not isinstance(child, nn.BatchNorm2d):
                    raise ConfigError(f"model.norm=frozen: {type(child).__name__} at {name!r} is not 2d; "
                                      "FrozenBatchNorm2d only replaces BatchNorm2d")
                setattr(parent, name, _replacement(child, kind, group, gn_groups, cgbn_impl))
                count += 1
    return count


@torch.no_grad()
def sync_running_stats(model: nn.Module) -> None:
    """Average BN running mean/var over all ranks (one all-reduce), so every rank
    evaluates and checkpoints the same statistics rather than its own group's view."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return
    flat = torch.cat([torch.cat([m.running_mean.float(), m.running_var.float()]) for m in bns])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for m in bns:
        c = m.num_features
        m.running_mean.copy_(flat[offset:offset + c])
        m.running_var.copy_(flat[offset + c:offset + 2 * c])
        offset += 2 * c
