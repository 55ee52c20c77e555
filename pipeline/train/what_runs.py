"""One block at start-up that names everything that changes the maths or the speed of a run.

A config file says what was asked; this says what was resolved and built (``auto`` settings, the BN
groups and AGVM's halves of this world size, the windows of the ViT actually built). It goes to the
log on rank 0 and into W&B's config (``what_runs``), so two runs can be told apart without reading
their YAML.
"""

from __future__ import annotations

import torch

from pipeline.config import ExperimentConfig
from pipeline.distributed.ds_config import zero_stage
from pipeline.distributed.job import DistInfo
from pipeline.train.build import Training, pads_to_canvas, use_channels_last, uses_batched_heads


def _attention(engine_module) -> str:
    from models.vit import ViTBody

    body = next((m for m in engine_module.modules() if isinstance(m, ViTBody)), None)
    if body is None:
        return "n/a (no plain ViT)"
    if not body.window:
        return "global in every block"
    return f"windows of {body.window}x{body.window} tokens, global blocks {sorted(body.global_blocks)}"


def _augmentation(cfg: ExperimentConfig) -> str:
    data = cfg.data
    if data.scale_jitter is not None:
        lo, hi = data.scale_jitter
        size = f"large-scale jitter x{lo:g}-{hi:g} then a {data.max_size}x{data.max_size} crop or pad"
    elif data.train_min_sizes is not None:
        size = f"multi-scale: shorter side from {list(data.train_min_sizes)}, longer <= {data.max_size}"
    else:
        size = f"resize: shorter side {data.min_size}, longer <= {data.max_size}"
    return f"{size}; horizontal flip p={data.flip_prob:g}"


def _agvm(cfg: ExperimentConfig, training: Training) -> str:
    if training.agvm is None:
        return "off"
    a, halves = cfg.agvm, training.agvm.tap.halves_of
    first = f", first half ranks {sorted(halves.first)}" if halves.by == "ranks" else ""
    return f"{cfg.optim.name}: tau {a.tau}, from iteration {a.start_iter}, halves by {halves.by}{first}"


def _norm(cfg: ExperimentConfig, training: Training) -> str:
    norm = cfg.model.norm
    if training.bn_layout is None:
        return norm
    return f"{norm}: cross-GPU BN over {cfg.model.bn_group} groups {training.bn_layout} ({cfg.model.cgbn_impl} kernels)"


def _decoding(cfg: ExperimentConfig) -> str:
    if cfg.data.decode == "device":
        return "JPEG decoded and resized on the device"
    if cfg.data.workers == 0:
        return "JPEG decoded in the training process (data.workers=0)"
    return f"JPEG decoded in {cfg.data.workers} loader workers per rank"


EMULATED_BF16 = ("bf16 autocast on a CPU without AVX512-BF16 or AMX: bfloat16 is emulated there and slower than "
                 "fp32; use ds_configs/zero0_fp32.json (train.ds_config=...) on this machine")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX tiles), as torch's own CPU
    feature check (cpuinfo) reports it; True where this torch cannot say: nothing to warn about then."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(checks):
        return True
    return any(check() for check in checks)


def _precision(training: Training, device) -> str:
    autocast = training.ds_config.get("torch_autocast", {})
    if not autocast.get("enabled"):
        return "fp32"
    dtype = autocast.get("dtype", "bfloat16")
    if device.type == "cpu" and "bf" in str(dtype):
        return f"{dtype} autocast ({'native' if cpu_has_native_bf16() else 'EMULATED'} on this CPU)"
    return f"{dtype} autocast"


def describe_run(cfg: ExperimentConfig, info: DistInfo, training: Training) -> dict[str, str]:
    """What runs, resolved, in the order a reader checks it."""
    m, t = cfg.model, cfg.train
    precision = _precision(training, info.device)
    schedule = training.schedule
    return {
        "detector": f"{m.detector} on {m.backbone} (pretrained: {m.pretrained or 'none'}), FPN {m.fpn_channels}",
        "heads": "batched (sync-free)" if uses_batched_heads(cfg, info.device) else "torchvision's",
        "attention": _attention(training.engine.module),
        "batch": f"{t.micro_batch} images x {t.grad_accum} accumulation x {info.world} ranks = "
                 f"{schedule.global_batch}",
        "schedule": schedule.describe(),
        "optimizer": f"{cfg.optim.name}, base lr {cfg.optim.base_lr:g} per {cfg.optim.reference_batch} images "
                     f"({cfg.optim.lr_scaling} scaling), weight decay {cfg.optim.weight_decay:g}",
        "layer decay": f"{cfg.optim.layer_decay:g}" if cfg.optim.layer_decay else "off",
        "AGVM": _agvm(cfg, training),
        "EMA": f"decay {t.ema_decay:g}" if t.ema_decay else "off",
        "augmentation": _augmentation(cfg),
        "normalisation": _norm(cfg, training),
        "ZeRO": f"stage {zero_stage(training.ds_config)}" + (" (zero.Init)" if zero_stage(training.ds_config) == 3
                                                            and t.zero_init else ""),
        "precision": precision,
        "channels_last": str(use_channels_last(cfg, info.device)),
        "compile": str(t.compile),
        "padding": "one canvas per orientation" if pads_to_canvas(cfg) else "to the batch's largest image (x32)",
        "decoding": _decoding(cfg),
        "activation checkpointing": str(m.activation_checkpointing),
        "device": f"{info.device.type} x {info.world} ranks",
    }


def format_block(what: dict[str, str]) -> str:
    width = max(map(len, what))
    return "what runs:\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in what.items())
