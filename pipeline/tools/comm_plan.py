"""Bytes each rank sends per optimizer step, by collective and scope, computed from the config alone.

The rules are DeepSpeed 0.19's and ours, each checked exactly against ``CommCounter`` in real 2- and
4-rank runs (tests/test_comm_count.py; the raw measurements: ``benchmarks/comm_bytes.py``). Payload =
what this rank hands the collective (``pipeline.distributed.comm_count``); per optimizer step, fp32:

- gradients, ZeRO 0: one all-reduce of every trainable parameter's gradient (4 Psi bytes);
  ZeRO 1 and 2 (these presets: no reduce-scatter, no overlap): the same all-reduce, one single-float
  all-reduce per optimizer parameter group, and after the step one all-gather per group of this rank's
  partition of the updated parameters, the group's flat size padded to a multiple of 2 x world
  (DeepSpeed's ``nccl_start_alignment_factor``), over the world;
- cross-GPU BN, per BN layer of C channels, within its BN group (MegDet's
  Algorithm 1): forward, the group's sums with the pixel count (C + 1 floats) then its squared
  deviations (C); backward, the sums of dy and dy x_hat (2C); none for a group of one rank;
- AGVM, on each estimate iteration (every ``agvm.tau``; with more than one rank the halves are rank halves,
  since gradient accumulation is not modelled): per module one reduce-scatter of its signed half-sum D,
  [world, row] fp32 with the row laid out as ZeRO 0's per-parameter chunks or ZeRO 1/2's partitions
  (S is read from DeepSpeed's own reduction), then one all-reduce of 3 float64 per module.

Not modelled yet (an error says so): ZeRO-3 (parameter all-gathers in forward and backward, with the
persistence threshold and recomputation), gradient accumulation (not measured yet), bf16 and fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import ExperimentConfig
from pipeline.distributed.ds_config import engine_config, zero_stage
from pipeline.distributed.norm import CrossGPUBatchNorm, bn_group_layout


@dataclass(frozen=True)
class Transfer:
    """One kind of collective in a step on one rank: ``calls`` of it, ``bytes`` in all (payloads)."""

    op: str
    group: int  # ranks in the group
    scope: str  # "intra-node" or "inter-node"
    dtype: str
    calls: float
    bytes: float
    what: str


def _scope(ranks: list[int], local_world: int) -> str:
    return "intra-node" if len({r // local_world for r in ranks}) == 1 else "inter-node"


def _model_facts(cfg: ExperimentConfig, num_classes: int) -> tuple[list[tuple[str, list[int]]], list[int]]:
    """(per optimizer parameter group: its AGVM module and its parameters' sizes, in the optimizer's order;
    cross-GPU BN layer widths), from the model built on the meta device."""
    from pipeline.optim.optimizers import build_param_groups
    from pipeline.train.build import build_model

    with torch.device("meta"):
        model = build_model(cfg, num_classes, pretrained=False)
    groups = [(g["module"], [p.numel() for p in g["params"]]) for g in build_param_groups(model, cfg.model.detector,
                                                                                           cfg.optim)]
    widths = [m.num_features for m in model.modules() if isinstance(m, CrossGPUBatchNorm)]
    return groups, widths


def _zero12_partition(group_size: int, world: int) -> int:
    """Elements of one rank's partition of a flat parameter group under ZeRO 1/2: the group padded to a
    multiple of 2 x world (DeepSpeed's ``nccl_start_alignment_factor`` 2), cut in ``world``."""
    align = 2 * world
    return -(-group_size // align) * align // world


def _agvm_shard_width(groups: list[tuple[str, list[int]]], stage: int, world: int) -> dict[str, int]:
    """Per AGVM module, the length of one rank's row of its estimate buffer (``HalfGradients``): ZeRO 0,
    each parameter's ceil(numel / world) chunk; ZeRO 1/2, its groups' partitions (``Zero12Partitions``)."""
    width: dict[str, int] = {}
    for module, numels in groups:
        own = (_zero12_partition(sum(numels), world) if stage in (1, 2)
               else sum(-(-n // world) for n in numels))
        width[module] = width.get(module, 0) + own
    return width


def step_transfers(cfg: ExperimentConfig, world: int, local_world: int, num_classes: int) -> list[Transfer]:
    """What rank 0 sends in one optimizer step (an AGVM estimate step when AGVM is on)."""
    ds = engine_config(cfg, world)
    stage = zero_stage(ds)
    half = ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")
    if stage == 3 or half or cfg.train.grad_accum > 1:
        raise NotImplementedError(f"communication of ZeRO-{stage}{' with half-precision parameters' if half else ''}"
                                  f"{' with grad_accum > 1' if cfg.train.grad_accum > 1 else ''} is not modelled yet "
                                  "(pipeline/tools/comm_plan.py says what is)")
    groups, widths = _model_facts(cfg, num_classes)
    sizes = [sum(numels) for _, numels in groups]
    everyone = list(range(world))
    scope = _scope(everyone, local_world)
    out = []
    if world > 1:
        out.append(Transfer("all_reduce", world, scope, "float32", 1, 4 * sum(sizes), "gradients"))
        if stage in (1, 2):
            shards = [_zero12_partition(s, world) for s in sizes]
            out.append(Transfer("all_reduce", world, scope, "float32", len(sizes), 4 * len(sizes),
                                "one float per parameter group"))
            out.append(Transfer("all_gather_into_tensor", world, scope, "float32", len(sizes), 4 * sum(shards),
                                "updated parameter partitions"))
    if cfg.model.norm == "cgbn" and widths:
        nodes = [r // local_world for r in everyone]
        mine = next(g for g in bn_group_layout(cfg.model.bn_group, nodes, cfg.train.micro_batch, cfg.model.bn_images)
                    if 0 in g)
        if len(mine) > 1:
            floats = sum((c + 1) + c + 2 * c for c in widths)
            out.append(Transfer("all_reduce", len(mine), _scope(mine, local_world), "float32", 3 * len(widths),
                                4 * floats, "cross-GPU BN statistics"))
    if cfg.optim.name.startswith("agvm") and world > 1:
        width = _agvm_shard_width(groups, stage, world)
        out.append(Transfer("reduce_scatter_tensor", world, scope, "float32", len(width),
                            4 * world * sum(width.values()), "AGVM's signed half-sum D, one per module"))
        out.append(Transfer("all_reduce", world, scope, "float64", 1, 8 * 3 * len(width),
                            "AGVM's 3 numbers per module"))
    return out


def totals(transfers: list[Transfer]) -> dict[tuple, tuple[float, float]]:
    """(op, group, scope, dtype) -> (calls, bytes), merging transfers of the same kind."""
    out: dict[tuple, tuple[float, float]] = {}
    for t in transfers:
        calls, size = out.get((t.op, t.group, t.scope, t.dtype), (0, 0))
        out[(t.op, t.group, t.scope, t.dtype)] = (calls + t.calls, size + t.bytes)
    return out
