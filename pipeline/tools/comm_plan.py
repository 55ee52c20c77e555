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
- AGVM, on each estimate iteration (every ``agvm.tau``): per module one reduce-scatter of its signed half-sum D,
  [world, row] fp32 with the row laid out as ZeRO 0's per-parameter chunks or ZeRO 1/2's partitions
  (S is read from DeepSpeed's own reduction), then one all-reduce of 3 float64 per module;
- ZeRO-3 (``_zero3_rows``): per step, one gradient reduce-scatter, one copy of every parameter's partition
  all-gathered, one float64 all-reduce per parameter group; counted while the model fits
  ``stage3_max_live_parameters``.

Gradient accumulation: ZeRO 0/1 reduce once per optimizer step, ZeRO-2 in every backward; ZeRO-3's
gathered copy serves every micro-batch; cross-GPU BN reduces in every micro-step; AGVM's halves are then
the micro-batch halves where one BN group holds every rank (ZeRO-3 reads D from its partitions: no
reduce-scatter). Modelled, not counted (``counted=False``): ZeRO-3 above ``stage3_max_live_parameters``
(a copy gathered in forward and again in backward, every micro-step). Refused: bf16/fp16 parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

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
    part: str = "zero"  # whose: "zero" (gradients and parameters), "bn" (cross-GPU BN) or "agvm"
    every: int = 1  # happens every this many optimizer steps (AGVM: agvm.tau)
    counted: bool = True  # its rule is checked against CommCounter in tests/test_comm_count.py
    # Collective launches that each pay the algorithm's latency, where fewer than ``calls``: ZeRO-3 fetches
    # one sub-module's parameters together (one grouped launch under NCCL; gloo issues them one by one)
    launches: Optional[float] = None


def _scope(ranks: list[int], local_world: int) -> str:
    return "intra-node" if len({r // local_world for r in ranks}) == 1 else "inter-node"


_FACTS: dict[str, tuple[list[tuple[str, list[int]]], list[int], int]] = {}


def _model_facts(cfg: ExperimentConfig, num_classes: int) -> tuple[list[tuple[str, list[int]]], list[int], int]:
    """(per optimizer parameter group: its AGVM module and its parameters' sizes, in the optimizer's order;
    cross-GPU BN layer widths; modules that hold parameters themselves, ZeRO-3's unit of fetching), from
    the model built on the meta device once per model and optimizer config (a step-time table asks for
    the same model once per candidate)."""
    key = f"{cfg.model.model_dump_json()} {cfg.optim.model_dump_json()} {num_classes}"
    if key not in _FACTS:
        _FACTS[key] = _count_model(cfg, num_classes)
    return _FACTS[key]


def _count_model(cfg: ExperimentConfig, num_classes: int) -> tuple[list[tuple[str, list[int]]], list[int], int]:
    from pipeline.optim.optimizers import build_param_groups
    from pipeline.train.build import build_model

    with torch.device("meta"):
        model = build_model(cfg, num_classes, pretrained=False)
    groups = [(g["module"], [p.numel() for p in g["params"]]) for g in build_param_groups(model, cfg.model.detector,
                                                                                           cfg.optim)]
    widths = [m.num_features for m in model.modules() if isinstance(m, CrossGPUBatchNorm)]
    holders = sum(1 for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False)))
    return groups, widths, holders


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


def step_transfers(cfg: ExperimentConfig, world: int, local_world: int, num_classes: int, *,
                   stage: Optional[int] = None, grad_accum: Optional[int] = None) -> list[Transfer]:
    """What rank 0 sends in one optimizer step (an AGVM estimate step when AGVM is on: its rows say
    ``every`` = agvm.tau). ``stage`` and ``grad_accum`` replace the config's. Rows of a rule not checked
    against a count say ``counted=False``."""
    ds = engine_config(cfg, world)
    stage = zero_stage(ds) if stage is None else stage
    accum = cfg.train.grad_accum if grad_accum is None else grad_accum
    if ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled"):
        raise NotImplementedError("communication with half-precision parameters (a bf16/fp16 section in the "
                                  "ds_config) is not modelled; this project's presets keep fp32 parameters")
    groups, widths, holders = _model_facts(cfg, num_classes)
    sizes = [sum(numels) for _, numels in groups]
    everyone = list(range(world))
    scope = _scope(everyone, local_world)
    out, mine = [], [0]
    if world > 1 and stage == 3:
        out += _zero3_rows(groups, holders, ds, world, scope, accum)
    elif world > 1:
        per_micro = accum if stage == 2 else 1  # ZeRO-2 reduces its buckets in every backward
        out.append(Transfer("all_reduce", world, scope, "float32", per_micro, 4 * sum(sizes) * per_micro, "gradients"))
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
            out.append(Transfer("all_reduce", len(mine), _scope(mine, local_world), "float32", 3 * len(widths) * accum,
                                4 * floats * accum, "cross-GPU BN statistics", part="bn"))
    if cfg.optim.name.startswith("agvm") and world > 1:
        width = _agvm_shard_width(groups, stage, world)
        micro_halves = accum >= 2 and (cfg.agvm.halves == "micro_batches" or (
            cfg.agvm.halves == "auto" and len(mine) == world))
        if not (stage == 3 and micro_halves):  # ZeRO-3's micro-batch halves read D from its partitions
            out.append(Transfer("reduce_scatter_tensor", world, scope, "float32", len(width),
                                4 * world * sum(width.values()), "AGVM's signed half-sum D, one per module",
                                part="agvm", every=cfg.agvm.tau))
        out.append(Transfer("all_reduce", world, scope, "float64", 1, 8 * 3 * len(width),
                            "AGVM's 3 numbers per module", part="agvm", every=cfg.agvm.tau))
    return out


LOSS_TERMS = {"faster_rcnn": 4, "mask_rcnn": 5, "retinanet": 2, "fcos": 3}  # torchvision's loss dicts


def log_transfers(cfg: ExperimentConfig, world: int, local_world: int) -> list[Transfer]:
    """What rank 0 sends at a log step (every ``train.log_every`` iterations, ``pipeline.train.trainer``):
    the loss window's mean over ranks (one float32 per loss term), the peak memory's maximum (one float64)
    and, with more than one rank, whether any rank was asked to stop (one float32)."""
    scope, every = _scope(list(range(world)), local_world), cfg.train.log_every
    out = [Transfer("all_reduce", world, scope, "float32", 1, 4 * LOSS_TERMS[cfg.model.detector],
                    "loss window, mean over ranks", part="log", every=every),
           Transfer("all_reduce", world, scope, "float64", 1, 8, "peak memory, max over ranks", part="log",
                    every=every)]
    if world > 1:
        out.append(Transfer("all_reduce", world, scope, "float32", 1, 4, "preemption flag", part="log", every=every))
    return out


def _zero3_rows(groups: list[tuple[str, list[int]]], holders: int, ds: dict, world: int, scope: str,
                accum: int) -> list[Transfer]:
    """ZeRO-3: in every micro-step, one reduce-scatter of every gradient (each parameter padded to a multiple
    of ``world``: 975,632 B for the tiny model's 243,907 parameters on 2 ranks) in buckets of
    ``reduce_bucket_size``; all-gathers of every parameter's partition, fetched one sub-module at a time:
    one copy per optimizer step while the model fits ``stage3_max_live_parameters`` (DeepSpeed keeps what
    forward gathered for backward and the next micro-batches), a copy in forward and another in backward
    of every micro-step above it (modelled, not counted); after backward, one float64 all-reduce per
    parameter group (the gradient norm). Counted exactly (tests/test_comm_count.py) in a step after the
    first two, with 1 and 2 micro-batches: while DeepSpeed records its parameter trace it also broadcasts
    the trace's ids to check them (``assert_ints_same_as_other_ranks``), a few KB steady state never sends."""
    numels = [n for _, ns in groups for n in ns]
    chunks = sum(-(-n // world) for n in numels)
    zero = ds.get("zero_optimization", {})
    live = float(zero.get("stage3_max_live_parameters", 1e9))
    bucket = float(zero.get("reduce_bucket_size", 5e8))
    # what forward gathered stays for backward and for the next micro-batches while it fits; above that,
    # each micro-step gathers in forward and again in backward
    copies = 1 if sum(numels) <= live else 2 * accum
    counted = copies == 1  # the regime tests/test_comm_count.py measures (with and without accumulation)
    return [Transfer("reduce_scatter_tensor", world, scope, "float32", accum * math.ceil(world * chunks / bucket),
                     accum * 4 * world * chunks, "gradients (ZeRO-3 reduce-scatter)", counted=counted),
            Transfer("all_gather_into_tensor", world, scope, "float32", copies * len(numels),
                     copies * 4 * chunks, f"parameter partitions, {copies} cop{'y' if copies == 1 else 'ies'} per step",
                     counted=counted, launches=copies * holders),
            Transfer("all_reduce", world, scope, "float64", len(groups), 8 * len(groups),
                     "one float64 per parameter group (gradient norm)", counted=counted)]


def totals(transfers: list[Transfer]) -> dict[tuple, tuple[float, float]]:
    """(op, group, scope, dtype) -> (calls, bytes), merging transfers of the same kind."""
    out: dict[tuple, tuple[float, float]] = {}
    for t in transfers:
        calls, size = out.get((t.op, t.group, t.scope, t.dtype), (0, 0))
        out[(t.op, t.group, t.scope, t.dtype)] = (calls + t.calls, size + t.bytes)
    return out
