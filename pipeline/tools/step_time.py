"""Step time of a cluster run, on paper: compute, communication and memory per optimizer step.

    python launch/plan.py --config configs/coco_r50_fpn.yaml --nodes 16 --gpus-per-node 8 --gpu h100 \\
        --inter-node 400Gb --intra-node nvlink4 --batch 1024

A prediction, not a measurement: every input is printed beside the output.

- **Compute** = images per GPU per step x training FLOPs per image / (the GPU's dense peak x MFU).
  FLOPs per image are counted (``torch.utils.flop_counter`` around one forward + backward of the real
  model, ``count_training_flops``; at ``--probe-size`` scaled by pixels, or given with
  ``--flops-per-image``). The MFU is a stated input: ``--mfu``, or the default of the model's family,
  anchored to one-GPU H100 figures (``DEFAULT_MFU`` says which).
- **Communication** = for each collective of the step (``pipeline.tools.comm_plan``: counted exactly
  for ZeRO 0-3 with and without accumulation, modelled for ZeRO-3 above its live-parameter limit), the bytes over the link it crosses with
  the algorithm's factor (ring: an all-reduce moves 2 (n - 1) / n of its payload through each rank's
  link, a reduce-scatter (n - 1) / n of its input, an all-gather (n - 1) x its shard; tree all-reduce:
  2 x the payload) at the link's bandwidth x ``efficiency`` (achieved bus bandwidth over line rate),
  plus a latency per algorithm step (ring 2 (n - 1), tree 2 log2 n for an all-reduce). A group inside
  one node uses the intra-node link; a group across nodes is bound by the slower of the two links
  (one NIC per GPU, as on DGX-class nodes).
- **Overlap**: the gradient and parameter collectives of ZeRO may hide behind backward; ``overlap``
  is the fraction hidden (0 for this project's presets, which do not overlap). Cross-GPU BN's
  reductions sit inside forward and backward and AGVM's estimate after backward: never hidden.
- **AGVM** runs every ``agvm.tau`` iterations: its collectives count 1/tau per step; the log step's three
  scalar reductions 1/``train.log_every``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Optional

from pipeline.config import ExperimentConfig
from pipeline.tools.comm_plan import Transfer, log_transfers, step_transfers
from pipeline.train.flops import PEAK_TFLOPS

COCO_TRAIN_IMAGES = 118_287


@dataclass(frozen=True)
class Link:
    """One direction of one GPU's link: GB/s at line rate, and the latency of one algorithm step."""

    name: str
    gbytes_per_s: float
    latency_us: float


# Per GPU, one direction, line rate (datasheets). Latencies: NCCL's per-step costs are a few microseconds
# inside a node and ~10 over a network; stated inputs, not measured here.
INTRA_NODE = {
    "nvlink4": Link("NVLink 4 (H100 SXM, 900 GB/s both ways)", 450.0, 3.0),
    "nvlink3": Link("NVLink 3 (A100 SXM, 600 GB/s both ways)", 300.0, 3.0),
    "pcie5": Link("PCIe 5 x16", 63.0, 5.0),
    "pcie4": Link("PCIe 4 x16", 31.5, 5.0),
    "pcie3": Link("PCIe 3 x16", 15.75, 5.0),
}
NETWORK_LATENCY_US = 10.0

# GPU -> (dense peak TFLOP/s by precision, memory GiB); peaks from pipeline.train.flops plus older cards.
GPUS = {
    "h100": (PEAK_TFLOPS["H100"], 80.0),
    "h200": (PEAK_TFLOPS["H200"], 141.0),
    "a100": (PEAK_TFLOPS["A100"], 80.0),
    "l40s": (PEAK_TFLOPS["L40S"], 48.0),
    "titanxp": ({"bf16": 12.1, "fp32": 12.1}, 12.0),  # MegDet's GPU: no tensor cores, fp32 only
}

# MFU by backbone family when none is measured, anchored to one-GPU H100 figures (shared/ENVIRONMENT.md),
# FLOPs counted as ``count_training_flops`` counts them (forward + backward; a recomputed forward too):
# torchvision's Faster R-CNN R50-FPN, 800x1333, AMP bf16, batch 8: 47.4 img/s x 1249 GFLOP = 59.2 TFLOP/s
# = 6.0% of 989.4; timm's ViT-g/14 backbone at 1024x1024 (73 x 73 tokens, global attention), bf16,
# per-block checkpointing, batch 8: 4.67 img/s x 4 x 19.06 TFLOP (its forward, counted on the meta device:
# tests/test_step_time.py) = 356 TFLOP/s = 36.0%.
VIT_G_FORWARD_TFLOP_1024 = 19.063
DEFAULT_MFU = {"convnet": (47.4 * 1249e9 / 989.4e12, "torchvision Faster R-CNN R50-FPN on one H100, bf16, batch 8 "
                                                     "(ENVIRONMENT.md)"),
               "vit": (4.67 * 4 * VIT_G_FORWARD_TFLOP_1024 * 1e12 / 989.4e12,
                       "ViT-g/14 backbone at 1024x1024 on one H100, bf16, checkpointing, batch 8 (ENVIRONMENT.md)")}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: str
    intra: Link
    inter: Link
    efficiency: float = 0.8  # achieved bus bandwidth / line rate
    algorithm: str = "ring"  # of the all-reduce: ring or tree
    overlap: float = 0.0  # fraction of ZeRO's gradient/parameter traffic hidden behind backward

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def peak_tflops(self, half: bool) -> float:
        return GPUS[self.gpu][0]["bf16" if half else "fp32"]

    @property
    def memory_gib(self) -> float:
        return GPUS[self.gpu][1]


def network_link(text: str) -> Link:
    """``400Gb`` (gigabits per second per GPU) or ``50GB`` (gigabytes): a network link."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(Gb|GB)(/s|ps)?\s*", text)
    if not m:
        raise ValueError(f"--inter-node {text!r}: give a rate per GPU such as 400Gb (gigabits/s) or 50GB (gigabytes/s)")
    rate = float(m.group(1)) / (8 if m.group(2) == "Gb" else 1)
    return Link(f"network {text.strip()} per GPU", rate, NETWORK_LATENCY_US)


def intra_link(text: str) -> Link:
    if text in INTRA_NODE:
        return INTRA_NODE[text]
    try:
        return replace(network_link(text), name=f"intra-node {text.strip()}", latency_us=5.0)
    except ValueError:
        raise ValueError(f"--intra-node {text!r}: one of {', '.join(INTRA_NODE)} or a rate such as 300GB") from None


def collective_seconds(op: str, payload: float, calls: float, group: int, link: Link, efficiency: float,
                       algorithm: str = "ring") -> float:
    """Wall time of ``calls`` collective launches of ``payload`` bytes in all over ``group`` ranks on ``link``."""
    if group <= 1 or calls == 0:
        return 0.0
    n, bw, alpha = group, link.gbytes_per_s * 1e9 * efficiency, link.latency_us * 1e-6
    if op == "all_reduce":
        if algorithm == "tree":
            return 2 * payload / bw + calls * 2 * math.ceil(math.log2(n)) * alpha
        return 2 * (n - 1) / n * payload / bw + calls * 2 * (n - 1) * alpha
    if op in ("reduce_scatter_tensor", "reduce_scatter"):
        return (n - 1) / n * payload / bw + calls * (n - 1) * alpha
    if op in ("all_gather_into_tensor", "all_gather"):
        return (n - 1) * payload / bw + calls * (n - 1) * alpha
    if op == "broadcast":
        return payload / bw + calls * math.ceil(math.log2(n)) * alpha
    raise ValueError(f"no time model for collective {op!r}")


def transfer_seconds(t: Transfer, cluster: Cluster) -> float:
    link = cluster.intra if t.scope == "intra-node" else min(cluster.intra, cluster.inter,
                                                              key=lambda k: k.gbytes_per_s)
    if t.scope != "intra-node":
        link = replace(link, latency_us=max(cluster.inter.latency_us, link.latency_us))
    algorithm = cluster.algorithm if t.op == "all_reduce" else "ring"
    launches = t.calls if t.launches is None else t.launches
    return collective_seconds(t.op, t.bytes, launches, t.group, link, cluster.efficiency, algorithm) / t.every


@dataclass
class StepTime:
    """One candidate's predicted step."""

    stage: int
    micro_batch: int
    grad_accum: int
    bn: str
    compute_s: float
    hidden_comm_s: float  # ZeRO's gradient / parameter traffic (``overlap`` of it hidden)
    serial_comm_s: float  # cross-GPU BN and AGVM: on the critical path
    overlap: float
    images_per_step: int
    memory_gib: Optional[float] = None
    fits: Optional[bool] = None

    @property
    def step_s(self) -> float:
        return self.compute_s + (1 - self.overlap) * self.hidden_comm_s + self.serial_comm_s

    @property
    def images_per_s(self) -> float:
        return self.images_per_step / self.step_s

    @property
    def comm_fraction(self) -> float:
        return ((1 - self.overlap) * self.hidden_comm_s + self.serial_comm_s) / self.step_s


def predict_step(cfg: ExperimentConfig, cluster: Cluster, num_classes: int, flops_per_image: float, mfu: float,
                 half: bool, stage: int, micro_batch: int, grad_accum: int) -> tuple[StepTime, list[Transfer]]:
    """The step of ``cfg`` at ZeRO ``stage`` with ``micro_batch`` x ``grad_accum`` images per GPU on ``cluster``."""
    transfers = step_transfers(cfg, cluster.world, cluster.gpus_per_node, num_classes, stage=stage,
                               grad_accum=grad_accum) + log_transfers(cfg, cluster.world, cluster.gpus_per_node)
    images = micro_batch * grad_accum
    compute = images * flops_per_image / (cluster.peak_tflops(half) * 1e12 * mfu)
    hidden = sum(transfer_seconds(t, cluster) for t in transfers if t.part == "zero")
    serial = sum(transfer_seconds(t, cluster) for t in transfers if t.part != "zero")
    bn = cfg.model.norm if cfg.model.norm != "cgbn" else f"cgbn/{cfg.model.bn_group}"
    return StepTime(stage, micro_batch, grad_accum, bn, compute, hidden, serial, cluster.overlap,
                    images * cluster.world), transfers


def count_training_flops(cfg: ExperimentConfig, num_classes: int, size: tuple[int, int]) -> float:
    """FLOPs of one training forward + backward of one ``size`` image through the real model, on the CPU
    (``pipeline.train.flops.count_flops``: matmuls and convolutions, as the training log counts them)."""
    from pipeline.utils.memory import release_free_heap

    flops = _count_one_step(cfg, num_classes, size)
    release_free_heap()  # the model is gone: hand a billion-parameter count's gigabytes back to the system
    return flops


def _count_one_step(cfg: ExperimentConfig, num_classes: int, size: tuple[int, int]) -> float:
    import torch

    from pipeline.tools.planner import _probe_batch
    from pipeline.train.build import build_model
    from pipeline.train.flops import count_flops

    model = build_model(cfg, num_classes, pretrained=False).train()
    images, targets = _probe_batch(1, size, num_classes, cfg.model.detector == "mask_rcnn", torch.device("cpu"))

    def step() -> None:
        sum(model(images, targets).values()).backward()

    return float(count_flops(step)[1])


def default_mfu(cfg: ExperimentConfig) -> tuple[float, str]:
    family = "vit" if cfg.model.backbone.startswith(("vit", "eva", "deit", "beit")) else "convnet"
    return DEFAULT_MFU[family]


def run_epochs(cfg: ExperimentConfig) -> float:
    from pipeline.config import MEGDET_POLICIES

    return MEGDET_POLICIES[cfg.schedule.policy][0] if cfg.schedule.policy in MEGDET_POLICIES else cfg.schedule.epochs


def micro_batch_options(per_gpu: int, largest: int = 3) -> list[int]:
    """The ``largest`` micro-batches that divide the per-GPU batch (the rest is accumulation)."""
    return [m for m in range(per_gpu, 0, -1) if per_gpu % m == 0][:largest]


def bn_options(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """Cross-GPU BN over each node (MegDet) against per-GPU BN, where the model has BatchNorm to convert."""
    if cfg.model.norm not in ("cgbn", "per_gpu"):
        return [cfg]
    model = cfg.model
    return [cfg.model_copy(update={"model": model.model_copy(update={"norm": "cgbn", "bn_group": "node",
                                                                     "bn_images": None})}),
            cfg.model_copy(update={"model": model.model_copy(update={"norm": "per_gpu"})})]


@dataclass(frozen=True)
class Inputs:
    """What a step-time table is computed from (all printed with it)."""

    cluster: Cluster
    batch: int
    flops_per_image: float
    flops_source: str
    mfu: float
    mfu_source: str
    half: bool
    epoch_images: int
    epochs: float


def _with_stage(ds: dict, stage: int) -> dict:
    return {**ds, "zero_optimization": {**ds.get("zero_optimization", {}), "stage": stage}}


def plan_cluster(cfg: ExperimentConfig, inputs: Inputs, num_classes: int, stages: list[int],
                 micro_batches: Optional[list[int]] = None, probe=None) -> list[tuple[StepTime, StepTime, bool]]:
    """Per candidate (BN option x ZeRO stage x micro-batch): (the step on the cluster, the same on one
    node, whether every collective in it is counted rather than modelled). ``probe``: the planner's
    ``ActivationProbe`` for memory (None: no memory column)."""
    from pipeline.distributed.ds_config import engine_config
    from pipeline.tools.planner import GIB, ds_settings, model_facts, plan_memory

    cluster = inputs.cluster
    per_gpu, rest = divmod(inputs.batch, cluster.world)
    if rest or per_gpu < 1:
        raise ValueError(f"--batch {inputs.batch} is not a whole number of images per GPU on {cluster.world} GPUs")
    node = replace(cluster, nodes=1)
    ds = engine_config(cfg, cluster.world)
    facts = model_facts(cfg, num_classes) if probe is not None else None
    rows = []
    for option in bn_options(cfg):
        for stage in stages:
            for micro in micro_batches or micro_batch_options(per_gpu):
                accum = per_gpu // micro
                option_mb = option.model_copy(update={"train": option.train.model_copy(update={"micro_batch": micro})})
                args = (option_mb, cluster, num_classes, inputs.flops_per_image, inputs.mfu, inputs.half, stage, micro,
                        accum)
                step, transfers = predict_step(*args)
                one_node, _ = predict_step(option_mb, node, *args[2:])
                if probe is not None:
                    mem = plan_memory(facts, ds_settings(_with_stage(ds, stage)), cluster.world, cfg.optim.name,
                                      cfg.optim.momentum, micro, probe, ema=cfg.train.ema_decay is not None,
                                      agvm_halves=cfg.agvm.halves)
                    step.memory_gib = mem.total / GIB
                    step.fits = mem.total <= 0.9 * cluster.memory_gib * GIB
                rows.append((step, one_node, all(t.counted for t in transfers)))
    return rows


def format_step_plan(cfg: ExperimentConfig, inputs: Inputs, rows: list[tuple[StepTime, StepTime, bool]]) -> str:
    c = inputs.cluster
    hours_epoch = [inputs.epoch_images / s.images_per_s / 3600 for s, _, _ in rows]
    lines = [
        "step-time plan: a prediction from counted bytes and stated rates, not a measurement",
        f"  model        {cfg.model.detector} {cfg.model.backbone}; {inputs.flops_per_image / 1e9:,.1f} GFLOP per "
        f"training image ({inputs.flops_source})",
        f"  cluster      {c.nodes} node(s) x {c.gpus_per_node} {c.gpu} = {c.world} GPUs; dense peak "
        f"{c.peak_tflops(inputs.half):g} TFLOP/s ({'bf16' if inputs.half else 'fp32'}); memory {c.memory_gib:g} GiB "
        "(a candidate fits under 90% of it)",
        f"  MFU          {100 * inputs.mfu:.1f}% ({inputs.mfu_source})",
        f"  intra-node   {c.intra.name}: {c.intra.gbytes_per_s:g} GB/s per GPU, {c.intra.latency_us:g} us per step",
        f"  inter-node   {c.inter.name}: {c.inter.gbytes_per_s:g} GB/s per GPU, {c.inter.latency_us:g} us per step",
        f"  collectives  bandwidth efficiency {c.efficiency:g} of line rate; all-reduce {c.algorithm}; overlap "
        f"{c.overlap:g} of ZeRO's traffic hidden behind backward; AGVM every {cfg.agvm.tau} steps"
        if cfg.optim.name.startswith("agvm") else
        f"  collectives  bandwidth efficiency {c.efficiency:g} of line rate; all-reduce {c.algorithm}; overlap "
        f"{c.overlap:g} of ZeRO's traffic hidden behind backward",
        f"  batch        {inputs.batch} = {c.world} GPUs x {inputs.batch // c.world}; epoch {inputs.epoch_images:,} "
        f"images; {inputs.epochs:g} epochs per run",
        f"{'ZeRO':>4} {'micro x acc':>11} {'BN':<10}{'GiB/GPU':>8}{'compute':>9}{'ZeRO comm':>10}{'BN+AGVM':>9}"
        f"{'step':>9}{'img/s':>9}{'comm':>6}{'eff':>6}{'h/epoch':>8}{'h/run':>7}{'GPU-h':>8}",
    ]
    for (s, one, counted), h in zip(rows, hours_epoch):
        mem = "-" if s.memory_gib is None else f"{s.memory_gib:.1f}" + ("" if s.fits else "!")
        eff = (s.images_per_s / c.nodes) / one.images_per_s
        lines.append(
            f"{s.stage:>4} {f'{s.micro_batch} x {s.grad_accum}':>11} {s.bn:<10}{mem:>8}{1e3 * s.compute_s:>7.0f}ms"
            f"{1e3 * (1 - s.overlap) * s.hidden_comm_s:>8.1f}ms{1e3 * s.serial_comm_s:>7.1f}ms{1e3 * s.step_s:>7.0f}ms"
            f"{s.images_per_s:>9,.0f}{100 * s.comm_fraction:>5.1f}%{100 * eff:>5.0f}% {h:>7.3g}"
            f" {h * inputs.epochs:>6.3g} {h * inputs.epochs * c.world:>7.3g}" + ("" if counted else "  *"))
    lines.append("comm: share of the step spent in collectives not hidden; eff: img/s per node against the same "
                 "candidate on one node; ! : over 90% of the GPU's memory (model states + probed activations); "
                 "* : a modelled collective (ZeRO-3 above stage3_max_live_parameters) not checked against a count")
    return "\n".join(lines)


def train_images(cfg: ExperimentConfig) -> int:
    """Images in one epoch of the config's training set: its annotation file's count where it exists,
    else the synthetic set's size or COCO train2017's."""
    import json

    ann = cfg.data.path(cfg.data.train_ann)
    if ann.is_file():
        return len(json.loads(ann.read_text())["images"])
    return cfg.data.synthetic_train if cfg.data.source == "synthetic" else COCO_TRAIN_IMAGES


@dataclass(frozen=True)
class RunPrediction:
    step: StepTime
    hours: float
    gpus: int
    counted: bool

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.gpus


def predict_run(cfg: ExperimentConfig, ranks: int, gpus_per_node: int, link_args: dict, num_classes: int,
                flops_per_image: float) -> RunPrediction:
    """A whole run of ``cfg`` on ``ranks`` GPUs (nodes of ``gpus_per_node``) as configured: its ZeRO stage,
    micro-batch and accumulation; hours = the images its schedule trains on over the predicted img/s."""
    from pipeline.distributed.ds_config import load_ds_config, zero_stage

    cluster = Cluster(max(1, ranks // gpus_per_node), min(ranks, gpus_per_node), link_args["gpu"],
                      intra_link(link_args["intra_node"]), network_link(link_args["inter_node"]))
    mfu = link_args.get("mfu") or default_mfu(cfg)[0]
    ds = load_ds_config(cfg.train.ds_config)
    half = bool(ds.get("torch_autocast", {}).get("enabled"))
    step, transfers = predict_step(cfg, cluster, num_classes, flops_per_image, mfu, half, zero_stage(ds),
                                   cfg.train.micro_batch, cfg.train.grad_accum)
    images = (cfg.schedule.max_iters * step.images_per_step if cfg.schedule.max_iters
              else run_epochs(cfg) * train_images(cfg))
    return RunPrediction(step, images / step.images_per_s / 3600, cluster.world, all(t.counted for t in transfers))
