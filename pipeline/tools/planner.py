"""Memory planner: per-rank memory of a run before it is launched, and the largest micro-batch that fits.

    python launch/plan.py --config configs/coco_r50_fpn.yaml --world-size 64 --gpu-memory 80
    python launch/plan.py --config ... train.ds_config=ds_configs/zero3_bf16.json --measure

Model state follows ZeRO's partitioning (Rajbhandari et al., 2020), in DeepSpeed 0.19's layout,
with Psi parameters, N data-parallel ranks and K bytes of optimizer state per parameter:

    stage | parameters        | gradients         | optimizer (fp32 master + state)
    0     | 4 Psi             | 4 Psi             | K Psi
    1     | 4 Psi             | 4 Psi             | (4 + K) Psi / N
    2     | 4 Psi             | 4 Psi / N         | (4 + K) Psi / N
    3     | 4 Psi / N (+small)| 4 Psi / N         | (4 + K) Psi / N

(our presets keep fp32 parameters and get bf16 from ``torch_autocast``; ``bf16``/``fp16``
sections make parameters and gradients 2 bytes). ZeRO's communication buffers are sized from
the ds_config's bucket settings, capped by the model size. Under ZeRO-3, parameters below
``stage3_param_persistence_threshold`` stay whole on every rank; the model is built on the
meta device to count them. Offloaded state moves from the device column to the host column.

Activations are measured, not modelled: a probe runs forward and backward of the real model
(single process, no DeepSpeed) at micro-batches 1 and 2 on the largest image of the dataset,
and the difference is the cost of one more image. ``--probe-size`` probes smaller images and
scales by pixel count (exact for convolutions; attention's quadratic part is underestimated).

``--measure`` then runs a few real training steps through ``launch/train.py`` with the same
config and world size and prints the measured peak beside the estimate.

``--comm``: the bytes each rank sends per optimizer step (``pipeline.tools.comm_plan``). ``--nodes``: the
step time of each candidate on a cluster (``pipeline.tools.step_time``), memory from this planner.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from pipeline.config import REPO_ROOT, ExperimentConfig, load_config
from pipeline.distributed.ds_config import engine_config
from pipeline.distributed.launcher import free_port
from pipeline.errors import ConfigError
from pipeline.utils.memory import CPU_MMAP_THRESHOLD, current_memory, peak_memory, pin_mmap_threshold, reset_peak_memory

log = logging.getLogger(__name__)
GIB = 2**30
# DeepSpeed 0.19's defaults for the settings that size its buffers (elements).
_DS_DEFAULTS = {"allgather_bucket_size": 5e8, "reduce_bucket_size": 5e8, "stage3_max_live_parameters": 1e9,
                "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5,
                "sub_group_size": 1e9}
# Optimizer state bytes per parameter (fp32), besides the master copy.
_STATE_BYTES = {"sgd": 4, "agvm_sgd": 4, "lars": 4, "adamw": 8, "agvm_adamw": 8, "lamb": 8}


@dataclass
class ModelFacts:
    """What the planner needs to know about the model, counted on the meta device (no memory)."""

    parameters: int
    trainable: int
    small_trainable: int  # trainable parameters in tensors below ZeRO-3's persistence threshold
    largest_module: int = 0  # trainable parameters of the largest detector module (AGVM's unit)


@dataclass
class ActivationProbe:
    """Activation bytes of one forward+backward: ``fixed + per_image * micro_batch``."""

    fixed: float
    per_image: float
    image_size: tuple[int, int]
    probe_size: tuple[int, int]
    runtime: float  # bytes held before the model exists (CPU: the Python + torch process)
    device: str


@dataclass
class MemoryPlan:
    """Per-rank bytes by component, split between the device and the host."""

    facts: ModelFacts
    world: int
    stage: int
    micro_batch: int
    device: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)
    per_image: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.device.values())

    def max_micro_batch(self, budget_bytes: float) -> int:
        """Largest micro-batch whose device total fits ``budget_bytes`` (0 when none does)."""
        fixed = self.total - self.per_image * self.micro_batch
        return max(0, math.floor((budget_bytes - fixed) / self.per_image)) if self.per_image > 0 else 0


def ds_settings(ds_config: dict) -> dict:
    """The ds_config facts that size memory: stage, precision, offload, buckets."""
    zero = ds_config.get("zero_optimization", {})
    half = any(ds_config.get(k, {}).get("enabled", False) for k in ("bf16", "fp16"))
    out = {k: float(zero.get(k, v)) for k, v in _DS_DEFAULTS.items()}
    out.update(stage=int(zero.get("stage", 0)), param_bytes=2 if half else 4,
               offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme"),
               offload_param=zero.get("offload_param", {}).get("device", "none") in ("cpu", "nvme"))
    return out


def model_facts(cfg: ExperimentConfig, num_classes: int, persistence_threshold: float = 1e5) -> ModelFacts:
    """Count the configured detector's parameters on the meta device (instant, no memory)."""
    from pipeline.train.build import build_model

    with torch.device("meta"):
        model = build_model(cfg, num_classes, pretrained=False)
    from models.detector import module_parameters

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    modules = module_parameters(model, cfg.model.detector)
    return ModelFacts(parameters=sum(p.numel() for p in params), trainable=sum(p.numel() for p in trainable),
                      small_trainable=sum(p.numel() for p in trainable if p.numel() < persistence_threshold),
                      largest_module=max(sum(p.numel() for _, p in ps) for ps in modules.values()))


def plan_memory(facts: ModelFacts, ds: dict, world: int, optimizer: str, momentum: float, micro_batch: int,
                probe: ActivationProbe, ema: bool = False, agvm_halves: str = "auto") -> MemoryPlan:
    """Per-rank memory of the configured run from the ZeRO formulas and the activation probe;
    ``ema``: the weight EMA (``train.ema_decay``), fp32, of what the rank holds."""
    psi, n, stage, pb = facts.trainable, world, ds["stage"], ds["param_bytes"]
    state = _STATE_BYTES[optimizer] if not (optimizer in ("sgd", "agvm_sgd", "lars") and momentum == 0) else 0
    master = 4 if pb == 2 else 0  # fp32 master weights only when parameters are half precision
    if stage == 3:  # persistent (small) tensors stay whole on every rank
        params = pb * ((psi - facts.small_trainable) / n + facts.small_trainable)
        fp32_partition = 4 * psi / n  # ZeRO-3 keeps its own fp32 partition copy, even for fp32 parameters
    else:
        params = pb * psi
        fp32_partition = 4 * psi / n if stage in (1, 2) else master * psi
    grads = pb * psi / n if stage >= 2 else pb * psi
    optim = state * psi / (n if stage >= 1 else 1)
    frozen = pb * (facts.parameters - facts.trainable) / (n if stage == 3 else 1)
    plan = MemoryPlan(facts, world, stage, micro_batch, per_image=probe.per_image)
    opt_where = plan.host if ds["offload_optimizer"] else plan.device
    plan.device["parameters"] = params + frozen
    if ds["offload_param"]:
        plan.host["parameters (offloaded)"] = plan.device.pop("parameters")
    plan.device["gradients"] = grads
    opt_where["fp32 master / partition"] = fp32_partition
    opt_where["optimizer state"] = optim
    plan.device["ZeRO buffers"] = _buffers(facts, ds, world)
    plan.device["activations"] = probe.fixed + probe.per_image * micro_batch
    plan.device["runtime"] = probe.runtime
    if optimizer.startswith("agvm"):
        plan.device["AGVM estimate (every tau)"] = agvm_estimate_bytes(facts, world, stage, agvm_halves)
    if ema:  # pipeline/optim/ema.py: the partitions under ZeRO-3, whole parameters otherwise
        plan.device["weight EMA"] = 4 * (psi / n if stage == 3 else psi)
    return plan


def agvm_estimate_bytes(facts: ModelFacts, world: int, stage: int = 0, halves: str = "auto") -> float:
    """What an AGVM estimate iteration adds (``pipeline/optim/agvm.py``): the fp32 tap of the local
    gradients, twice with micro-batch halves (assumed for one rank; with ranks, micro-batch halves
    arise only when one BN group holds every rank), and the S and D chunks of the module being
    reduced (fp32, 1/world of it each). An upper bound: the tap fills while backward frees
    activations. Micro-batch halves on several ranks under ZeRO-3 (``agvm.halves=micro_batches``)
    tap nothing: the first half's chunk of every parameter (1/world of the model, fp32)."""
    if halves == "micro_batches" and stage == 3 and world >= 2:
        return 4 * facts.trainable / world
    copies = 2 if world == 1 else 1
    return 4 * facts.trainable * copies + 2 * 4 * facts.largest_module / world


def _buffers(facts: ModelFacts, ds: dict, world: int) -> float:
    """Communication buffers: one bucket of gradients (and, under ZeRO-3, the gathered parameters)."""
    if world == 1 and ds["stage"] == 0:
        return 0.0
    psi, pb = facts.trainable, ds["param_bytes"]
    if ds["stage"] == 3:
        # Gathered parameters up to the live + prefetch limits, and the gradient bucket twice:
        # DeepSpeed flattens the bucket's gradients again for the reduce-scatter.
        live = min(psi, ds["stage3_max_live_parameters"] + ds["stage3_prefetch_bucket_size"])
        return pb * (live + 2 * min(psi, ds["reduce_bucket_size"]))
    bucket = ds["allgather_bucket_size" if ds["stage"] == 0 else "reduce_bucket_size"]
    return pb * min(psi, bucket)


# ---- the activation probe ----

def largest_image(cfg: ExperimentConfig) -> tuple[int, int]:
    """The largest (padded) training image after the loader's resize; (min_size, max_size) when the
    annotations are not there yet (the worst case the resize rule allows); with large-scale jitter,
    its max_size square. Multi-scale training's largest side is min_size (the list's largest)."""
    if cfg.data.scale_jitter is not None:  # every training image is cropped or padded to this square
        return 32 * math.ceil(cfg.data.max_size / 32), 32 * math.ceil(cfg.data.max_size / 32)
    ann = cfg.data.path(cfg.data.train_ann)
    if not ann.is_file():
        log.warning("%s not found: planning for the largest size the resize allows", ann)
        sizes = [(cfg.data.min_size, cfg.data.max_size)]
    else:
        images = json.loads(ann.read_text())["images"]
        sizes = []
        for im in images:
            h, w = im["height"], im["width"]
            s = min(cfg.data.min_size / min(h, w), cfg.data.max_size / max(h, w))
            sizes.append((round(h * s), round(w * s)))
    h, w = max(sizes, key=lambda hw: hw[0] * hw[1])
    return 32 * math.ceil(h / 32), 32 * math.ceil(w / 32)  # torchvision pads batches to multiples of 32


def _probe_batch(b: int, size: tuple[int, int], num_classes: int, masks: bool, device: torch.device):
    gen = torch.Generator().manual_seed(b)
    h, w = size
    images = [torch.rand(3, h, w, generator=gen).mul(255).to(device) for _ in range(b)]
    targets = []
    for _ in range(b):
        xy = torch.rand(4, 2, generator=gen) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, xy + torch.tensor([w / 4, h / 4])], 1)
        t = {"boxes": boxes.to(device), "labels": torch.randint(1, num_classes + 1, (4,), generator=gen).to(device)}
        if masks:
            t["masks"] = torch.zeros(4, h, w, dtype=torch.uint8, device=device)
        targets.append(t)
    return images, targets


PROBE_BATCHES = (1, 1, 2)  # micro-batches of probe_activations' steps: the first allocates the gradients
_SLOW_PROBE_S = 60.0  # above this, say so up front and name --probe-size


def backbone_forward_flops(cfg: ExperimentConfig, size: tuple[int, int]) -> Optional[float]:
    """FLOPs of one image's forward through the backbone and neck at ``size``, counted on the meta
    device (no memory, no compute); None where the model does not run there."""
    from models.detector import build_backbone
    from pipeline.train.flops import count_flops

    try:
        with torch.device("meta"):
            backbone = build_backbone(cfg.model.model_copy(update={"pretrained": None}))
            image = torch.empty(1, 3, *size)
        with torch.no_grad():
            return float(count_flops(lambda: backbone(image))[1])
    except Exception as err:  # an estimate only: the probe itself will say what is wrong
        log.debug("no FLOP count on the meta device: %s", err)
        return None


def matmul_flops_per_s(device: torch.device, seconds: float = 0.3) -> float:
    """This machine's fp32 matmul rate (FLOP/s), timed for about ``seconds``."""
    a = torch.rand(512, 512, device=device)
    a @ a  # warm-up (thread pool, kernels)
    done, tic = 0, time.perf_counter()
    while time.perf_counter() - tic < seconds:
        a @ a
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done * 2 * 512**3 / (time.perf_counter() - tic)


def probe_estimate(cfg: ExperimentConfig, size: tuple[int, int], device: torch.device) -> Optional[float]:
    """Seconds the activation probe will take at ``size``: its images' forward and backward (3x the
    forward) of the backbone and neck, at this machine's matmul rate. A lower bound (the heads, the
    build and convolutions' lower efficiency are not in it), good to the order of magnitude."""
    forward = backbone_forward_flops(cfg, size)
    if forward is None:
        return None
    return 3 * forward * sum(PROBE_BATCHES) / matmul_flops_per_s(device)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def announce_probe(cfg: ExperimentConfig, size: tuple[int, int], explicit_probe_size: bool) -> None:
    """Say what the probe runs and, from counted FLOPs, about how long it will take; on a CPU, when that
    is minutes, name --probe-size with its own estimate (printed before the probe starts)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    estimate = probe_estimate(cfg, size, device)
    about = "" if estimate is None else f"; at least ~{_minutes(estimate)} on this {device.type}"
    print(f"activation probe: {cfg.model.detector} {cfg.model.backbone} at {size[0]}x{size[1]}, forward + backward "
          f"at micro-batches {', '.join(map(str, PROBE_BATCHES))} on {device.type}, in a child process{about}",
          file=sys.stderr, flush=True)
    if estimate is not None and estimate > _SLOW_PROBE_S and device.type == "cpu" and not explicit_probe_size:
        small = (min(size[0], 256), min(size[1], 256))
        quick = probe_estimate(cfg, small, device)
        print(f"  that is slow on a CPU: --probe-size {small[0]}x{small[1]} probes smaller images and scales by "
              f"pixel count (exact for convolutions, low for attention)"
              + ("" if quick is None else f", ~{_minutes(quick)}"), file=sys.stderr, flush=True)


def run_probe(cfg: ExperimentConfig, num_classes: int, autocast: bool, image_size: tuple[int, int],
              probe_size: Optional[tuple[int, int]] = None) -> ActivationProbe:
    """``probe_activations`` in a fresh process: like a training rank, it starts from a clean heap
    (a long-lived caller's resident set would inflate the runtime term), and the probe's model
    is gone with it."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="memprobe-") as tmp:
        # Only the keys the user set: a resolved MegDet policy would now also "set" its fixed epochs.
        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
        out = Path(tmp) / "probe.json"
        cmd = [sys.executable, "-m", "pipeline.tools.planner", "--config", str(Path(tmp) / "config.yaml"),
               "--probe-child", str(out), "--num-classes", str(num_classes), "--image-size", _hw(image_size),
               "--probe-size", _hw(probe_size or image_size)] + (["--autocast"] if autocast else [])
        announce_probe(cfg, probe_size or image_size, probe_size is not None)
        # the child's stderr is the terminal's: its progress per step shows as it goes
        done = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"activation probe failed (exit {done.returncode}, its error above): {' '.join(cmd)}")
        fields = json.loads(out.read_text())
    fields["image_size"], fields["probe_size"] = tuple(fields["image_size"]), tuple(fields["probe_size"])
    return ActivationProbe(**fields)


def probe_activations(cfg: ExperimentConfig, num_classes: int, autocast: bool, image_size: tuple[int, int],
                      probe_size: Optional[tuple[int, int]] = None) -> ActivationProbe:
    """Forward + backward of the real model at micro-batches 1 and 2; returns the activation cost.
    Run it in a fresh process (``run_probe``): the runtime term is this process's resident set."""
    from pipeline.train.build import build_model  # imports DeepSpeed, as a training rank has: counted in runtime

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        pin_mmap_threshold()
    probe_size = probe_size or image_size
    runtime = current_memory(device) if device.type == "cpu" else 0.0
    # The probe's images may be larger than data.max_size: the model must not shrink them.
    sized = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_size": max(cfg.data.max_size, *probe_size)})})
    # cgbn without a group is torch's BN; the heads are those training on this device would use
    model = build_model(sized, num_classes, pretrained=False, device=device).to(device)
    model.train()
    masks = cfg.model.detector == "mask_rcnn"

    def step(b: int) -> float:
        images, targets = _probe_batch(b, probe_size, num_classes, masks, device)
        reset_peak_memory(device)
        base = current_memory(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = sum(model(images, targets).values())
        loss.backward()
        peak = peak_memory(device) - base
        del loss
        return peak

    peaks = []
    for i, b in enumerate(PROBE_BATCHES):  # the first allocates .grad: later steps reuse it (activations only)
        tic = time.monotonic()
        peaks.append(step(b))
        print(f"  probe step {i + 1}/{len(PROBE_BATCHES)} (micro-batch {b}): {time.monotonic() - tic:.1f} s",
              file=sys.stderr, flush=True)
    one, two = peaks[1], peaks[2]
    per_image = max(two - one, 0.0)
    scale = (image_size[0] * image_size[1]) / (probe_size[0] * probe_size[1])
    return ActivationProbe(fixed=max(one - per_image, 0.0) * scale, per_image=per_image * scale,
                           image_size=image_size, probe_size=probe_size, runtime=runtime, device=device.type)


# ---- measuring a real run ----

def measure_peak(config: Optional[Path], overrides: list[str], world: int, iters: int = 3) -> dict:
    """Run ``iters`` real training steps with ``world`` ranks through the deepspeed launcher and
    return the run summary (``peak_mem_gib`` is the largest rank's peak)."""
    with tempfile.TemporaryDirectory(prefix="memprobe-") as out:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
               "--master_port", str(free_port()), str(REPO_ROOT / "launch/train.py")]
        if config is not None:
            cmd += ["--config", str(config)]
        cmd += list(overrides) + [
            f"schedule.max_iters={iters}", "train.log_every=1", "train.evaluate=false", "train.progress=false",
            "train.final_checkpoint=false", "train.ckpt_every_iters=0", "tracking.wandb_mode=disabled",
            f"train.output_dir={out}", "train.run_name=measure"]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   MALLOC_MMAP_THRESHOLD_=str(CPU_MMAP_THRESHOLD))  # CPU: live memory, not glibc's cache
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        summary = Path(out) / "measure/run_summary.json"
        if done.returncode != 0 or not summary.is_file():
            raise RuntimeError(f"measure run failed (exit {done.returncode}): {' '.join(cmd)}\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return json.loads(summary.read_text())


# ---- the command line ----

def _hw(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def build_plan(cfg: ExperimentConfig, world: int, image_size: Optional[tuple[int, int]] = None,
               probe_size: Optional[tuple[int, int]] = None, num_classes: Optional[int] = None) -> tuple[MemoryPlan, ActivationProbe]:
    """Facts, probe and plan for an experiment config at ``world`` ranks."""
    from pipeline.distributed.ds_config import load_ds_config

    raw = load_ds_config(cfg.train.ds_config)
    ds = ds_settings(raw)
    autocast = raw.get("torch_autocast", {})
    ds["torch_autocast_bf16"] = autocast.get("enabled", False) and autocast.get("dtype", "bfloat16") == "bfloat16"
    num_classes = num_classes or _num_classes(cfg)
    facts = model_facts(cfg, num_classes, ds["stage3_param_persistence_threshold"])
    probe = run_probe(cfg, num_classes, ds["torch_autocast_bf16"], image_size or largest_image(cfg), probe_size)
    plan = plan_memory(facts, ds, world, cfg.optim.name, cfg.optim.momentum, cfg.train.micro_batch, probe,
                       ema=cfg.train.ema_decay is not None, agvm_halves=cfg.agvm.halves)
    return plan, probe


def _num_classes(cfg: ExperimentConfig) -> int:
    ann = cfg.data.path(cfg.data.train_ann)
    if ann.is_file():
        return len(json.loads(ann.read_text())["categories"])
    return 80 if cfg.data.source == "coco" else 3


_CUDA_CONTEXT_GIB = 0.75


def _budget_bytes(gpu_memory: float, probe: ActivationProbe) -> float:
    """90% of the device, less the CUDA context (CPU plans already count the process as runtime)."""
    context = 0.0 if probe.device == "cpu" else _CUDA_CONTEXT_GIB
    return (gpu_memory * 0.9 - context) * GIB


def format_plan(plan: MemoryPlan, probe: ActivationProbe, cfg: ExperimentConfig, gpu_memory: Optional[float],
                measured: Optional[dict] = None) -> str:
    f = plan.facts
    lines = [f"memory plan: {cfg.model.detector} {cfg.model.backbone}, {f.parameters:,} parameters "
             f"({f.trainable:,} trainable); {plan.world} rank(s), ZeRO-{plan.stage}, micro-batch "
             f"{plan.micro_batch}, images {probe.image_size[0]}x{probe.image_size[1]}"
             + (f" (probed at {probe.probe_size[0]}x{probe.probe_size[1]}, scaled by pixels)"
                if probe.probe_size != probe.image_size else "")
             + f", checkpointing {'on' if cfg.model.activation_checkpointing else 'off'}",
             f"{'component':<26}{'device GiB':>12}{'host GiB':>10}"]
    for name in list(plan.device) + [k for k in plan.host if k not in plan.device]:
        dev, host = plan.device.get(name), plan.host.get(name)
        lines.append(f"{name:<26}{'' if dev is None else f'{dev / GIB:.2f}':>12}{'' if host is None else f'{host / GIB:.2f}':>10}")
    lines.append(f"{'total per rank':<26}{plan.total / GIB:>12.2f}{sum(plan.host.values()) / GIB:>10.2f}")
    lines.append(f"activations: {probe.fixed / GIB:.3f} GiB fixed + {probe.per_image / GIB:.3f} GiB per image "
                 f"(probed on {probe.device})")
    if gpu_memory:
        context = _CUDA_CONTEXT_GIB if probe.device != "cpu" else 0.0
        budget = _budget_bytes(gpu_memory, probe)
        lines.append(f"largest micro-batch for {gpu_memory:g} GiB per device (90% of it"
                     + (f", less {context} GiB of CUDA context" if context else "") + f"): {plan.max_micro_batch(budget)}")
    if measured is not None:
        got = measured["peak_mem_gib"]
        lines.append(f"measured peak ({measured['world_size']} rank(s), {measured['iterations']} steps, "
                     f"{measured['device']}): {got:.2f} GiB; estimate {plan.total / GIB:.2f} GiB "
                     f"({100 * (plan.total / GIB - got) / got:+.1f}%)")
    return "\n".join(lines)


def model_states_summary(cfg: ExperimentConfig, world: int) -> str:
    """One line for an out-of-memory report: the planner's per-GPU model states (parameters, gradients,
    optimizer state, buffers) for this config and world size, and the command that adds activations."""
    try:
        facts = model_facts(cfg, _num_classes(cfg))
        none = ActivationProbe(0.0, 0.0, (0, 0), (0, 0), 0.0, "none")
        plan = plan_memory(facts, ds_settings(engine_config(cfg, world)), world, cfg.optim.name, cfg.optim.momentum,
                           cfg.train.micro_batch, none, ema=cfg.train.ema_decay is not None,
                           agvm_halves=cfg.agvm.halves)
        states = f"{plan.total / GIB:.2f} GiB per GPU"
    except Exception as err:  # a report must not fail for want of an estimate
        states = f"(no estimate: {err})"
    return (f"the memory planner's model states for this config at world size {world}: {states}, activations not "
            f"included; with them: python launch/plan.py --config {cfg.train.run_dir / 'config.yaml'} "
            f"--world-size {world}")


COCO_VAL_IMAGES = 5000  # val2017


def _val_images(cfg: ExperimentConfig) -> tuple[int, str]:
    """Images of one evaluation, and where the number comes from."""
    if cfg.data.source == "synthetic":
        return cfg.data.synthetic_val, "data.synthetic_val"
    ann = cfg.data.path(cfg.data.val_ann)
    if ann.is_file():
        return len(json.loads(ann.read_text())["images"]), str(ann)
    return COCO_VAL_IMAGES, f"COCO val2017's ({ann} not found)"


def print_comm_plan(cfg: ExperimentConfig, world: int, local_world: int) -> int:
    from pipeline.tools.comm_plan import checkpoint_transfers, eval_transfers, log_transfers, step_transfers

    num_classes, (images, source) = _num_classes(cfg), _val_images(cfg)
    try:
        transfers = step_transfers(cfg, world, local_world, num_classes) + log_transfers(cfg, world, local_world)
    except NotImplementedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"communication per optimizer step of one rank: {cfg.model.detector} {cfg.model.backbone}, {world} rank(s), "
          f"{local_world} per node, {cfg.train.ds_config.name}, norm {cfg.model.norm}, {cfg.optim.name} "
          "(payloads handed to each collective; an AGVM row is per estimate step, a log row per log step)")
    header = f"{'collective':<24}{'group':>6}  {'scope':<11}{'dtype':<9}{'calls':>7}{'MiB':>11}{'every':>7}  what"
    print(header)
    _print_transfers(transfers)
    print(f"{'total per step (rows every k steps count 1/k)':<57}{sum(t.bytes / t.every for t in transfers) / 2**20:>11.3f}")
    for what, rows in ((f"each evaluation ({images} images: {source})",
                        eval_transfers(cfg, world, local_world, num_classes, images)),
                       ("each checkpoint", checkpoint_transfers(cfg, world, local_world, num_classes))):
        print(f"\nat {what}:" + ("" if rows else " nothing (one rank)"))
        if rows:
            print(header)
            _print_transfers(rows)
    return 0


def _print_transfers(transfers) -> None:
    for t in transfers:
        size = "-" if math.isnan(t.bytes) else f"{t.bytes / 2**20:.3f}"  # not planned: the row says why
        calls = "-" if math.isnan(t.calls) else f"{t.calls:g}"
        print(f"{t.op:<24}{t.group:>6}  {t.scope:<11}{t.dtype:<9}{calls:>7}{size:>11}{t.every:>7}  "
              f"{t.what}" + ("" if t.counted or math.isnan(t.bytes) else " (modelled, not counted)"))


def print_step_plan(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    """The step-time table (``--nodes``): inputs from the command line, FLOPs counted, memory probed."""
    from pipeline.distributed.ds_config import load_ds_config
    from pipeline.tools import step_time as st

    try:
        cluster = st.Cluster(args.nodes, args.gpus_per_node, args.gpu.lower(), st.intra_link(args.intra_node),
                             st.network_link(args.inter_node), args.efficiency, args.algorithm, args.overlap)
        if cluster.gpu not in st.GPUS:
            raise ValueError(f"--gpu {args.gpu}: one of {', '.join(st.GPUS)}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    num_classes = _num_classes(cfg)
    size = args.image_size or largest_image(cfg)
    if args.flops_per_image:
        flops, source = args.flops_per_image * 1e9, "given with --flops-per-image"
    else:
        at = args.probe_size or size
        flops = st.count_training_flops(cfg, num_classes, at) * (size[0] * size[1]) / (at[0] * at[1])
        source = (f"counted at {_hw(at)}" + (f", scaled by pixels to {_hw(size)}" if at != size else "")
                  + ": forward + backward, matmuls and convolutions")
    mfu, mfu_source = (args.mfu, "given with --mfu") if args.mfu else st.default_mfu(cfg)
    autocast = load_ds_config(cfg.train.ds_config).get("torch_autocast", {})
    inputs = st.Inputs(cluster, args.batch or cfg.train.micro_batch * cfg.train.grad_accum * cluster.world, flops,
                       source, mfu, mfu_source, bool(autocast.get("enabled")),
                       args.epoch_images or st.COCO_TRAIN_IMAGES, st.run_epochs(cfg))
    probe = None if args.no_memory else run_probe(cfg, num_classes, inputs.half, size, args.probe_size)
    micro = [int(m) for m in args.micro_batches.split(",")] if args.micro_batches else None
    try:
        rows = st.plan_cluster(cfg, inputs, num_classes, [int(k) for k in args.stages.split(",")], micro, probe)
    except (ValueError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(st.format_step_plan(cfg, inputs, rows))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks to plan for")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU: report the largest micro-batch")
    parser.add_argument("--image-size", type=_size, default=None, help="HxW; default: the dataset's largest image")
    parser.add_argument("--probe-size", type=_size, default=None, help="HxW to probe at, scaled by pixel count")
    parser.add_argument("--measure", action="store_true", help="also run 3 real steps and report the peak")
    parser.add_argument("--json", type=Path, default=None, help="write the plan (and measurement) here")
    parser.add_argument("--comm", action="store_true", help="instead of memory: the bytes each rank sends per "
                        "optimizer step, by collective and scope (pipeline/tools/comm_plan.py)")
    parser.add_argument("--ranks-per-node", type=int, default=None, help="with --comm: ranks per node (default: all)")
    cluster = parser.add_argument_group("step time on a cluster (pipeline/tools/step_time.py): given --nodes")
    cluster.add_argument("--nodes", type=int, default=None, help="nodes: print the step-time table per candidate")
    cluster.add_argument("--gpus-per-node", type=int, default=8)
    cluster.add_argument("--gpu", default="h100", help="one of h100, h200, a100, l40s, titanxp")
    cluster.add_argument("--inter-node", default="400Gb", help="network rate per GPU, e.g. 400Gb or 50GB")
    cluster.add_argument("--intra-node", default="nvlink4", help="nvlink4, nvlink3, pcie5/4/3, or a rate such as 300GB")
    cluster.add_argument("--batch", type=int, default=None, help="global batch (default: the config's micro-batch x "
                         "accumulation x the cluster's GPUs)")
    cluster.add_argument("--stages", default="0,1,2,3", help="ZeRO stages to compare")
    cluster.add_argument("--micro-batches", default=None, help="micro-batches to compare (default: the 3 largest "
                         "divisors of the per-GPU batch; the rest is accumulation)")
    cluster.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation, 0-1 (default: by backbone "
                         "family, anchored to one-GPU H100 figures)")
    cluster.add_argument("--flops-per-image", type=float, default=None, help="training GFLOP per image (default: "
                         "counted on the real model at --probe-size or the image size)")
    cluster.add_argument("--efficiency", type=float, default=0.8, help="achieved bus bandwidth / line rate")
    cluster.add_argument("--algorithm", choices=("ring", "tree"), default="ring", help="all-reduce algorithm")
    cluster.add_argument("--overlap", type=float, default=0.0, help="fraction of ZeRO's traffic hidden behind backward")
    cluster.add_argument("--epoch-images", type=int, default=None, help="images per epoch (default: COCO train2017's)")
    cluster.add_argument("--no-memory", action="store_true", help="skip the activation probe (no memory column)")
    parser.add_argument("--probe-child", type=Path, default=None, help=argparse.SUPPRESS)  # run_probe's process
    parser.add_argument("--num-classes", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--autocast", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the experiment config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.probe_child is not None:
        probe = probe_activations(load_config(args.config, args.overrides), args.num_classes, args.autocast,
                                  args.image_size, args.probe_size)
        args.probe_child.write_text(json.dumps(asdict(probe)))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        if args.comm:
            return print_comm_plan(cfg, args.world_size, args.ranks_per_node or args.world_size)
        if args.nodes:
            return print_step_plan(cfg, args)
        plan, probe = build_plan(cfg, args.world_size, args.image_size, args.probe_size)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    measured = measure_peak(args.config, args.overrides, args.world_size) if args.measure else None
    print(format_plan(plan, probe, cfg, args.gpu_memory, measured))
    if args.json:
        largest = plan.max_micro_batch(_budget_bytes(args.gpu_memory, probe)) if args.gpu_memory else None
        args.json.write_text(json.dumps({"plan": asdict(plan), "total_gib": plan.total / GIB, "probe": asdict(probe),
                                         "max_micro_batch": largest, "measured": measured}, indent=2, default=str))
    return 0


def cli() -> None:
    """The command (``launch/plan.py``): ``main`` with its exit status."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
