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
  all-gathered (persistent parameters after the step, one call each; the others for forward, a prefetch bucket
  per call), one float64 all-reduce per parameter group; counted while the model fits
  ``stage3_max_live_parameters``.

Gradient accumulation: ZeRO 0/1 reduce once per optimizer step, ZeRO-2 in every backward; ZeRO-3's
gathered copy serves every micro-batch; cross-GPU BN reduces in every micro-step; AGVM's halves are then
the micro-batch halves where one BN group holds every rank (ZeRO-3 reads D from its partitions: no
reduce-scatter). Modelled, not counted (``counted=False``): ZeRO-3 above ``stage3_max_live_parameters``
(a copy gathered in forward and again in backward, every micro-step). Refused: bf16/fp16 parameters.

Besides the step: a log step's reductions (``log_transfers``), an evaluation's (``eval_transfers``) and a
checkpoint's (``checkpoint_transfers``), each checked iteration by iteration in a real run. Not planned:
Mask R-CNN's pickled mask RLEs at evaluation (their size depends on the masks), the trace-id broadcasts of
DeepSpeed's first ZeRO-3 steps and first evaluation, a model EMA's own gathers (``train.ema_decay``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm

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


@dataclass(frozen=True)
class ModelFacts:
    """What the communication of a model depends on, counted on the meta device."""

    groups: list[tuple[str, list[int]]]  # per optimizer parameter group: its AGVM module, its parameters' sizes
    cgbn_widths: list[int]  # channels of each cross-GPU BN layer
    running_widths: list[int]  # channels of each BN layer with running statistics (averaged before eval/save)
    holders: int  # modules that hold parameters themselves: ZeRO-3's unit of fetching

    @property
    def numels(self) -> list[int]:
        """Every trainable parameter's size, in the optimizer's order."""
        return [n for _, ns in self.groups for n in ns]


_FACTS: dict[str, ModelFacts] = {}


def _model_facts(cfg: ExperimentConfig, num_classes: int) -> ModelFacts:
    """The model's facts, built once per model and optimizer config (a step-time table asks for the same
    model once per candidate)."""
    key = f"{cfg.model.model_dump_json()} {cfg.optim.model_dump_json()} {num_classes}"
    if key not in _FACTS:
        _FACTS[key] = _count_model(cfg, num_classes)
    return _FACTS[key]


def _count_model(cfg: ExperimentConfig, num_classes: int) -> ModelFacts:
    from pipeline.optim.optimizers import build_param_groups
    from pipeline.train.build import build_model

    with torch.device("meta"):
        model = build_model(cfg, num_classes, pretrained=False)
    groups = [(g["module"], [p.numel() for p in g["params"]]) for g in build_param_groups(model, cfg.model.detector,
                                                                                           cfg.optim)]
    return ModelFacts(
        groups=groups,
        cgbn_widths=[m.num_features for m in model.modules() if isinstance(m, CrossGPUBatchNorm)],
        running_widths=[m.num_features for m in model.modules()
                        if isinstance(m, _BatchNorm) and m.track_running_stats],
        holders=sum(1 for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))))


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
               else _chunks(numels, world))
        width[module] = width.get(module, 0) + own
    return width


def step_transfers(cfg: ExperimentConfig, world: int, local_world: int, num_classes: int, *,
                   stage: Optional[int] = None, grad_accum: Optional[int] = None,
                   after_evaluation: bool = False) -> list[Transfer]:
    """What rank 0 sends in one optimizer step (an AGVM estimate step when AGVM is on: its rows say
    ``every`` = agvm.tau). ``stage`` and ``grad_accum`` replace the config's. ``after_evaluation``: the
    step right after an evaluation (and no checkpoint, which releases them again), whose forwards already
    fetched ZeRO-3's parameters. Rows of a rule not checked against a count say ``counted=False``."""
    ds = engine_config(cfg, world)
    stage = zero_stage(ds) if stage is None else stage
    accum = cfg.train.grad_accum if grad_accum is None else grad_accum
    if ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled"):
        raise NotImplementedError("communication with half-precision parameters (a bf16/fp16 section in the "
                                  "ds_config) is not modelled; this project's presets keep fp32 parameters")
    facts = _model_facts(cfg, num_classes)
    groups, widths, holders = facts.groups, facts.cgbn_widths, facts.holders
    sizes = [sum(numels) for _, numels in groups]
    everyone = list(range(world))
    scope = _scope(everyone, local_world)
    out, mine = [], [0]
    if world > 1 and stage == 3:
        out += _zero3_rows(groups, holders, ds, world, scope, accum, after_evaluation)
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


def _running_stats(facts: ModelFacts, world: int, scope: str, why: str) -> list[Transfer]:
    """``sync_running_stats``: every BN layer's running mean and variance, one float32 all-reduce."""
    if not facts.running_widths:
        return []
    return [Transfer("all_reduce", world, scope, "float32", 1, 4 * 2 * sum(facts.running_widths),
                     f"BN running statistics, mean over ranks ({why})", part=why)]


def eval_transfers(cfg: ExperimentConfig, world: int, local_world: int, num_classes: int,
                   num_images: int) -> list[Transfer]:
    """What rank 0 sends in one evaluation of ``num_images`` validation images (``pipeline.train.trainer
    .run_evaluation``, ``pipeline.evaluation.coco``): the BN running statistics' mean, the most batches
    of any rank (one int64), and the detections: one gather of a fixed block per rank, the most images a
    rank evaluates x ``model.detections_per_img`` rows of 7 float64. Mask R-CNN's RLEs go by
    ``gather_object``: a size (int64) all-gathered, then a gather of the largest rank's pickled RLEs,
    whose length depends on the masks (``bytes`` NaN: not planned). Under ZeRO-3 the forwards gather
    a copy of the non-persistent parameters, which the next step then finds gathered (``step_transfers(...,
    after_evaluation=True)``, unless a checkpoint in between released them); the first evaluation, like
    the first two steps, also broadcasts DeepSpeed's trace ids (a few KB, not planned)."""
    from pipeline.evaluation.coco import ROW, gather_capacity

    if world == 1:
        return []
    scope = _scope(list(range(world)), local_world)
    rows = gather_capacity(num_images, world, cfg.model.detections_per_img)
    facts = _model_facts(cfg, num_classes)
    out = _running_stats(facts, world, scope, "eval")
    ds = engine_config(cfg, world)
    zero = ds.get("zero_optimization", {})
    numels = facts.numels
    fetched = _zero3_persistence(numels, zero)[1]
    if zero_stage(ds) == 3 and sum(numels) > float(zero.get("stage3_max_live_parameters", 1e9)):
        out.append(Transfer("all_gather_into_tensor", world, scope, "float32", math.nan, math.nan,
                            "parameter partitions, gathered per module in every forward above "
                            "stage3_max_live_parameters (not planned)", part="eval", counted=False))
    elif zero_stage(ds) == 3 and fetched:  # the evaluation's forwards fetch what the next step then finds there
        out.append(dataclasses.replace(_zero3_fetch(fetched, zero, world, scope), part="eval"))
    out += [Transfer("all_reduce", world, scope, "int64", 1, 8, "evaluation batches, max over ranks", part="eval"),
            Transfer("gather", world, scope, "float64", 1, 8 * len(ROW) * rows,
                     f"detections to rank 0: {rows} rows of {len(ROW)} per rank", part="eval")]
    if cfg.model.detector == "mask_rcnn":
        out += [Transfer("all_gather", world, scope, "int64", 1, 8, "mask RLEs' pickled size", part="eval"),
                Transfer("gather", world, scope, "uint8", 1, float("nan"), "mask RLEs to rank 0, pickled "
                         "(bytes depend on the masks)", part="eval", counted=False)]
    return out


def checkpoint_transfers(cfg: ExperimentConfig, world: int, local_world: int, num_classes: int) -> list[Transfer]:
    """What rank 0 sends in one checkpoint (``pipeline.train.trainer.save_checkpoint``,
    ``pipeline.checkpoint.manager.save``): whether every rank's weights are finite (one float32, min), the
    BN running statistics' mean, rank 0's view of the completeness marker twice (``broadcast_object_list``:
    an int64 size, then the 4 pickled bytes of a bool), DeepSpeed's check that every rank saves the same
    tag (its sha1, 20 bytes, max and min), 3 barriers (2 in DeepSpeed's ``save_checkpoint``, then ours
    before the marker) and, under ZeRO-3, the persistent parameters all-gathered again after the save
    (DeepSpeed's ``checkpoint_event_epilogue``; the others are fetched by the next forward as in any step).
    Counted in real 2-rank runs at ZeRO-0 and ZeRO-3 (tests/test_comm_count.py); ZeRO 1 and 2 send the
    same rows (measured once with the same run, not in the suite)."""
    if world == 1:
        return []
    scope = _scope(list(range(world)), local_world)
    facts = _model_facts(cfg, num_classes)
    out = [Transfer("all_reduce", world, scope, "float32", 1, 4, "weights finite on every rank", part="checkpoint")]
    out += _running_stats(facts, world, scope, "checkpoint")
    out += [Transfer("broadcast", world, scope, "int64", 2, 2 * 8, "checkpoint complete already? (size)",
                     part="checkpoint"),
            Transfer("broadcast", world, scope, "uint8", 2, 2 * 4, "checkpoint complete already? (pickled bool)",
                     part="checkpoint"),
            Transfer("all_reduce", world, scope, "uint8", 2, 2 * 20, "DeepSpeed's tag check (sha1, max and min)",
                     part="checkpoint"),
            Transfer("barrier", world, scope, "-", 3, 0, "DeepSpeed's 2, then ours before the completeness marker",
                     part="checkpoint")]
    ds = engine_config(cfg, world)
    if zero_stage(ds) == 3:
        persistent, _ = _zero3_persistence(facts.numels, ds.get("zero_optimization", {}))
        out.append(Transfer("all_gather_into_tensor", world, scope, "float32", len(persistent),
                            4 * _chunks(persistent, world),
                            "persistent parameters gathered again after the save (ZeRO-3)", part="checkpoint"))
    return out


def _zero3_rows(groups: list[tuple[str, list[int]]], holders: int, ds: dict, world: int, scope: str,
                accum: int, after_evaluation: bool = False) -> list[Transfer]:
    """ZeRO-3: in every micro-step, one reduce-scatter of every gradient (each parameter padded to a multiple
    of ``world``: 975,632 B for the tiny model's 243,907 parameters on 2 ranks) in buckets of
    ``reduce_bucket_size``; all-gathers of every parameter's partition: one copy per optimizer step while
    the model fits ``stage3_max_live_parameters`` (DeepSpeed keeps what forward gathered for backward and the
    next micro-batches; the persistent parameters, ``_zero3_persistence``, one call each after the step, the
    others in prefetch buckets for forward), a copy in forward and another in backward
    of every micro-step above it (modelled, not counted); after backward, one float64 all-reduce per
    parameter group (the gradient norm). Counted exactly (tests/test_comm_count.py) in a step after the
    first two, with 1 and 2 micro-batches: while DeepSpeed records its parameter trace it also broadcasts
    the trace's ids to check them (``assert_ints_same_as_other_ranks``), a few KB steady state never sends."""
    numels = [n for _, ns in groups for n in ns]
    chunks = _chunks(numels, world)
    zero = ds.get("zero_optimization", {})
    live = float(zero.get("stage3_max_live_parameters", 1e9))
    bucket = float(zero.get("reduce_bucket_size", 5e8))
    persistent, fetched = _zero3_persistence(numels, zero)
    # what forward gathered stays for backward and for the next micro-batches while it fits; above that,
    # each micro-step gathers in forward and again in backward
    copies = 1 if sum(numels) <= live else 2 * accum
    counted = copies == 1  # the regime tests/test_comm_count.py measures (with and without accumulation)
    out = [Transfer("reduce_scatter_tensor", world, scope, "float32", accum * math.ceil(world * chunks / bucket),
                    accum * 4 * world * chunks, "gradients (ZeRO-3 reduce-scatter)", counted=counted)]
    if copies == 1 and persistent:
        out.append(Transfer("all_gather_into_tensor", world, scope, "float32", len(persistent),
                            4 * _chunks(persistent, world), "persistent parameters, gathered after the step"))
    if copies == 1 and fetched and not after_evaluation:
        out.append(_zero3_fetch(fetched, zero, world, scope))
    elif copies > 1:
        out.append(Transfer("all_gather_into_tensor", world, scope, "float32", copies * len(numels),
                            copies * 4 * chunks,
                            f"parameter partitions, {copies} copies per step", counted=False,
                            launches=copies * holders))
    return out + [
        Transfer("all_reduce", world, scope, "float64", len(groups), 8 * len(groups),
                 "one float64 per parameter group (gradient norm)", counted=counted)]


def _chunks(numels: list[int], world: int) -> int:
    """Elements of one rank's partitions of these parameters (each padded to a multiple of ``world``)."""
    return sum(-(-n // world) for n in numels)


def _zero3_fetch(fetched: list[int], zero: dict, world: int, scope: str) -> Transfer:
    """ZeRO-3's non-persistent parameters, gathered once after each optimizer step by the first forward that
    needs them (the next step's, or an evaluation's in between), one flat all-gather per prefetch bucket.
    The bytes are counted exactly; the calls only where every fetched tensor fits one bucket (the test
    model): DeepSpeed's grouping also depends on which module asks first and on the live-parameter cap."""
    calls = math.ceil(sum(fetched) / float(zero.get("stage3_prefetch_bucket_size", 5e7)))
    return Transfer("all_gather_into_tensor", world, scope, "float32", calls, 4 * _chunks(fetched, world),
                    "parameter partitions fetched for forward, 1 copy per step")


def _zero3_persistence(numels: list[int], zero: dict) -> tuple[list[int], list[int]]:
    """ZeRO-3's persistent parameters (at most ``stage3_param_persistence_threshold`` elements: partitioned,
    but all-gathered again after every step and after a checkpoint, one call each) and the others (fetched
    for forward, a prefetch bucket per call). ``stage3_model_persistence_threshold`` (a cap on all persistent
    elements; DeepSpeed's default: none) is not modelled."""
    threshold = float(zero.get("stage3_param_persistence_threshold", 1e5))
    return [n for n in numels if n <= threshold], [n for n in numels if n > threshold]


def totals(transfers: list[Transfer]) -> dict[tuple, tuple[float, float]]:
    """(op, group, scope, dtype) -> (calls, bytes), merging transfers of the same kind."""
    out: dict[tuple, tuple[float, float]] = {}
    for t in transfers:
        calls, size = out.get((t.op, t.group, t.scope, t.dtype), (0, 0))
        out[(t.op, t.group, t.scope, t.dtype)] = (calls + t.calls, size + t.bytes)
    return out
