"""Building things one way for every caller: the model, the data, and a whole training run.

``build_model`` is the only place that turns the experiment's ``model`` section into a module
(backbone, BatchNorm replacement, pretrained weights, activation checkpointing, ZeRO-3
partitioning at construction): the trainer, the export, the planner's probe and the benchmarks
all call it. ``build_training`` assembles a run (data, schedule, param groups, optimizer, AGVM,
DeepSpeed engine) and returns a ``Training``, what the loop needs; the trainer, the tests and
the benchmarks all step through its ``step``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from models.activation_checkpointing import has_running_stats
from models.detector import CanvasTransform, build_detector
from pipeline.checkpoint.reshard import with_universal_load
from pipeline.config import ExperimentConfig
from pipeline.data.dataset import CocoDetection
from pipeline.data.loaders import build_datasets, build_loaders
from pipeline.data.synthetic import make_dataset
from pipeline.distributed.ds_config import engine_config, zero_stage
from pipeline.distributed.ds_internals import (count_parameters, full_numel, gathered, reduced_gradient_reader,
                                               zero12_partitions)
from pipeline.distributed.engine import build_engine, model_init_context
from pipeline.distributed.job import DistInfo
from pipeline.distributed.norm import CrossGPUBatchNorm, build_bn_group, convert_norms, job_bn_layout
from pipeline.errors import ConfigError, ModelConfigError, as_config_error
from pipeline.optim.agvm import AGVM, choose_halves, modules_of
from pipeline.optim.ema import WeightEMA
from pipeline.optim.optimizers import build_optimizer, build_param_groups, check_zero_support
from pipeline.optim.schedule import Schedule, build_schedule
from pipeline.train.step import TrainStep
from pipeline.utils.logger import log_dist
from pipeline.utils.memory import current_memory, release_free_heap

log = logging.getLogger(__name__)


def build_model(cfg: ExperimentConfig, num_classes: int, *, pretrained: bool = True, bn_group=None,
                ds_config: Optional[dict] = None, device: Optional[torch.device] = None) -> nn.Module:
    """The configured detector, for any purpose.

    Every BatchNorm becomes ``cfg.model.norm``; cross-GPU BN computes its statistics over
    ``bn_group`` (None: this process's batch only, which is torch's BN: inference, probes).
    ``pretrained`` loads ``model.pretrained`` (training); export and probes pass False, since
    their weights come from elsewhere or do not matter. With ``ds_config`` at ZeRO-3 and
    ``train.zero_init``, the model is built already partitioned (``deepspeed.zero.Init``), with
    the values of an unpartitioned build (``_partitioned_detector``).
    Activation checkpointing follows ``model.activation_checkpointing``; the training heads follow
    ``model.heads`` for ``device`` (the one the model will train on; None: not for training).
    """
    model_cfg = cfg.model if pretrained else cfg.model.model_copy(update={"pretrained": None})
    batched = uses_batched_heads(cfg, device)
    try:
        if ds_config and cfg.train.zero_init and zero_stage(ds_config) == 3:
            model = _partitioned_detector(model_cfg, num_classes, cfg, ds_config, batched)
        else:
            model = build_detector(model_cfg, num_classes, cfg.data.min_size, cfg.data.max_size, batched)
    except ModelConfigError as err:
        raise as_config_error(err) from None
    bn_params = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters(recurse=False)]
    with gathered(bn_params):  # built under zero.Init: the converter copies the full values
        count = convert_norms(model, cfg.model.norm, bn_group, cfg.model.gn_groups, cfg.model.cgbn_impl)
    log_dist(log, "norm: %s in place of %d BatchNorm layers", cfg.model.norm, count)
    if pads_to_canvas(cfg):
        model.transform = CanvasTransform(model.transform, cfg.data.min_size, cfg.data.max_size)
    return model


def uses_batched_heads(cfg: ExperimentConfig, device: Optional[torch.device]) -> bool:
    """``model.heads``: auto trains a Faster R-CNN with the sync-free heads on CUDA, where a host sync
    idles the GPU; on a CPU torchvision's heads cost the same and stay the reference."""
    if cfg.model.heads == "auto":
        return cfg.model.detector == "faster_rcnn" and device is not None and device.type == "cuda"
    return cfg.model.heads == "batched"


def pads_to_canvas(cfg: ExperimentConfig) -> bool:
    """``model.pad_to``: one canvas per orientation, by default when the backbone is compiled."""
    return cfg.model.pad_to == "canvas" or (cfg.model.pad_to == "auto" and cfg.train.compile)


def _partitioned_detector(model_cfg, num_classes: int, cfg: ExperimentConfig, ds_config: dict,
                          batched_heads: bool) -> nn.Module:
    """The detector built under ``zero.Init``, holding the values of an ordinary build.

    Under ``zero.Init`` each submodule's parameters are partitioned as soon as that submodule is
    constructed, so whatever a parent writes into them afterwards is lost: timm's and
    torchvision's weight init (RetinaNet's prior bias, zero-init residual BN) and any pretrained
    load (timm's checkpoint filters, e.g. a ViT's ``pos_embed`` resampling, read the full shapes).
    So rank 0 also builds the model ordinarily, on the CPU (its host memory holds one fp32 copy for
    the time of the build; no GPU ever holds the whole model), and its values are scattered into
    the partitioned one, a bounded chunk of parameters at a time.
    """
    size = (cfg.data.min_size, cfg.data.max_size)
    source, error = None, [None]
    if dist.get_rank() == 0:
        state = torch.random.get_rng_state()
        try:
            source = build_detector(model_cfg, num_classes, *size, batched_heads)
        except (RuntimeError, ValueError, OSError) as err:  # a ModelConfigError, or a file that does not fit
            error = [err]
        torch.random.set_rng_state(state)  # the partitioned build sees the RNG an ordinary build would
    dist.broadcast_object_list(error, src=0)  # every rank stops with rank 0's message, none waits forever
    if error[0] is not None:
        raise error[0]
    with model_init_context(ds_config, True):
        model = build_detector(model_cfg.model_copy(update={"pretrained": None}), num_classes, *size, batched_heads)
    scatter_from_rank0(model, source)
    return model


def scatter_from_rank0(model: nn.Module, source: Optional[nn.Module], chunk_elements: int = 2**27) -> None:
    """Copy rank 0's ``source`` (same architecture, not partitioned) into ``model`` on every rank.

    Parameters go through ``GatheredParameters(modifier_rank=0)``, which re-partitions rank 0's
    values on exit; buffers (never partitioned) are broadcast. A collective: every rank calls it
    (``source`` is None except on rank 0).
    """
    import deepspeed

    values = dict(source.named_parameters()) if source is not None else {}
    chunk, elements = [], 0
    params = list(model.named_parameters())
    for i, (name, param) in enumerate(params):
        chunk.append((name, param))
        elements += full_numel(param)
        if elements >= chunk_elements or i == len(params) - 1:
            with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=0):
                if source is not None:
                    with torch.no_grad():
                        for n, p in chunk:
                            p.copy_(values[n])
            chunk, elements = [], 0
    buffers = dict(source.named_buffers()) if source is not None else {}
    for name, buf in model.named_buffers():
        if source is not None:
            buf.copy_(buffers[name])
        dist.broadcast(buf, src=0)


@dataclass
class TrainData:
    """The datasets and this rank's loaders."""

    train_set: CocoDetection
    val_set: CocoDetection
    train_loader: DataLoader
    val_loader: DataLoader

    @property
    def num_classes(self) -> int:
        return self.train_set.num_classes

    @property
    def steps_per_epoch(self) -> int:
        return self.train_loader.batch_sampler.steps_per_epoch


def build_data(cfg: ExperimentConfig, info: DistInfo) -> TrainData:
    """Write the embedded dataset if the config asks for it (rank 0), then datasets and loaders."""
    d = cfg.data
    if d.source == "synthetic" and info.rank == 0:
        make_dataset(d.root, num_train=d.synthetic_train, num_val=d.synthetic_val, seed=0)
    dist.barrier()
    train_set, val_set = build_datasets(d, cfg.model.detector == "mask_rcnn")
    train_loader, val_loader = build_loaders(d, train_set, val_set, cfg.train.micro_batch, cfg.train.grad_accum,
                                             info.world, info.rank, cfg.train.seed)
    return TrainData(train_set, val_set, train_loader, val_loader)


@dataclass
class Training:
    """What the training loop needs, built once by ``build_training``."""

    engine: object  # deepspeed.DeepSpeedEngine
    step: TrainStep
    schedule: Schedule
    ds_config: dict
    data: Optional[TrainData]
    agvm: Optional[AGVM]
    ema: Optional[WeightEMA] = None
    bn_layout: Optional[list[list[int]]] = None  # cross-GPU BN groups, by rank (None: no cross-GPU BN)


def build_training(cfg: ExperimentConfig, info: DistInfo, *, data: bool = True, model: Optional[nn.Module] = None,
                   num_classes: Optional[int] = None, load_universal: bool = False) -> Training:
    """Assemble a run: data, model, schedule, param groups, optimizer, AGVM, engine, train step.

    ``data=False`` is for callers that feed their own batches (tests, benchmarks): no loaders, and
    the schedule counts one iteration per epoch (give ``schedule.max_iters``). The model is built
    from the config (``num_classes`` from the data, or given), or passed in as ``model``.
    ``load_universal``: the engine will load a universal checkpoint (``pipeline.checkpoint.reshard``).
    """
    if cfg.model.norm == "cgbn" and cfg.model.cgbn_impl == "torch" and info.device.type != "cuda":
        raise ConfigError("model.cgbn_impl=torch runs nn.SyncBatchNorm's CUDA kernels, and this run is on "
                          f"{info.device}: use cgbn_impl=auto or ours")
    train_data = build_data(cfg, info) if data else None
    ds_config = engine_config(cfg, info.world)
    check_zero_support(cfg.optim.name, zero_stage(ds_config), str(cfg.train.ds_config))
    if cfg.train.compile and zero_stage(ds_config) == 3:
        raise ConfigError(f"train.compile=true with ZeRO-3 ({cfg.train.ds_config}): ZeRO-3 gathers each layer's "
                          "parameters in hooks around its forward, which torch.compile would trace through; use "
                          "a ZeRO 0-2 ds_config, or train.compile=false")
    if model is not None:  # brings its own norms (tests, benchmarks); any cross-GPU BN follows the config's groups
        bn_layout = job_bn_layout(cfg.model, cfg.train.micro_batch) if cfg.model.norm == "cgbn" else None
    else:
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        bn_group, bn_layout = _bn_groups(cfg)
        model = build_model(cfg, train_data.num_classes if train_data else num_classes,
                            bn_group=bn_group, ds_config=ds_config, device=info.device).to(info.device)
        release_free_heap()  # zero.Init's construction buffers
        log_dist(log, "model: %s %s, %s parameters; rank 0 holds %.2f GiB", cfg.model.detector, cfg.model.backbone,
                 f"{count_parameters(model):,}", current_memory(info.device) / 2**30)
    channels_last = use_channels_last(cfg, info.device)
    if channels_last:
        feed_channels_last(model)
    if cfg.train.compile:
        if cfg.model.activation_checkpointing and has_running_stats(model):
            raise ConfigError(
                f"train.compile=true with model.activation_checkpointing=true and model.norm={cfg.model.norm}: the "
                "compiled recompute of a checkpointed block would update its BatchNorm running statistics a second "
                "time; use model.norm=frozen or group_norm, a backbone without BatchNorm (ViT), or one of the two")
        compile_backbone(model)
    torch.manual_seed(cfg.train.seed + info.rank)  # RoI/anchor sampling differs per rank
    global_batch = cfg.train.micro_batch * cfg.train.grad_accum * info.world
    schedule = build_schedule(cfg.schedule, cfg.optim, global_batch, train_data.steps_per_epoch if data else 1)
    groups = build_param_groups(model, cfg.model.detector, cfg.optim)
    agvm = None
    if cfg.optim.name.startswith("agvm"):  # before initialize: its gradient tap must run before ZeRO's hooks
        adamw = (cfg.optim.betas[1], cfg.optim.eps) if cfg.optim.name == "agvm_adamw" else None
        halves, warning = choose_halves(info.world, cfg.train.grad_accum, _coupling_bn_groups(model, bn_layout),
                                        cfg.agvm.coupled_halves, cfg.agvm.halves)
        if warning:
            log_dist(log, warning)
        agvm = AGVM(cfg.agvm, modules_of(groups), info.world, info.rank, cfg.train.grad_accum,
                    schedule.warmup_iters, adamw, halves)
        log_dist(log, "AGVM: modules %s, halves: %s, tau %d, modulation from iteration %d%s", list(agvm.mu),
                 halves.describe(), cfg.agvm.tau, agvm.start, f" to {cfg.agvm.stop_iter}" if cfg.agvm.stop_iter else "")
        if agvm.start >= schedule.total_iters and (not dist.is_initialized() or dist.get_rank() == 0):
            log.warning("AGVM never modulates this run: it starts at iteration %d (warmup %d + agvm.start_after_warmup "
                        "%d, or agvm.start_iter) but the run has %d iterations; set agvm.start_after_warmup lower "
                        "(0: right after warmup) or agvm.start_iter", agvm.start, schedule.warmup_iters,
                        cfg.agvm.start_after_warmup, schedule.total_iters)
    engine = build_engine(model, build_optimizer(groups, cfg.optim, schedule.lr(0)),
                              with_universal_load(ds_config) if load_universal else ds_config)
    release_free_heap()  # ZeRO's flattening copies are freed: give them back before training
    if agvm is not None and info.world >= 2:  # S from DeepSpeed's own reduction where its layout allows
        agvm.tap.reduced_gradient = reduced_gradient_reader(engine, info.world, info.rank)
        partitions = zero12_partitions(engine, agvm.tap.modules, info.world)
        if partitions is not None:
            agvm.tap.use_zero12_partitions(partitions)
        log_dist(log, "AGVM estimate: S %s", "read from DeepSpeed's reduced gradient" if agvm.tap.reads_s
                 else "reduced by the tap (DeepSpeed's reduced gradient is not readable in this layout)")
    if channels_last and zero_stage(ds_config) == 0:
        weights_to_channels_last(engine)
    log_dist(log, "engine: ZeRO stage %d; rank 0 holds %.2f GiB", zero_stage(ds_config),
             current_memory(info.device) / 2**30)
    ema = WeightEMA(engine, cfg.train.ema_decay) if cfg.train.ema_decay else None
    step = TrainStep(engine, schedule, cfg.train.grad_accum, agvm, ema=ema)
    return Training(engine, step, schedule, ds_config, train_data, agvm, ema, bn_layout)


def _coupling_bn_groups(model: nn.Module, bn_layout: Optional[list[list[int]]]) -> Optional[list[list[int]]]:
    """The BN groups that couple ranks' gradients: the layout, when the model has cross-GPU BN layers
    (a model without BatchNorm, e.g. a ViT with LayerNorm, has none to couple them)."""
    has_cgbn = any(isinstance(m, CrossGPUBatchNorm) for m in model.modules())
    return bn_layout if has_cgbn else None


def use_channels_last(cfg: ExperimentConfig, device: torch.device) -> bool:
    """``train.channels_last``, whose default (None) means: on CUDA, where convolutions on tensor
    cores want it; not on CPU, where it buys little."""
    return device.type == "cuda" if cfg.train.channels_last is None else cfg.train.channels_last


def feed_channels_last(model: nn.Module) -> None:
    """The image batch enters the backbone in channels_last; convolutions, every norm and the FPN's
    additions keep the layout of their input (tests/test_levers.py); RoIAlign reads its own
    contiguous copy."""
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "channels_last"):
        backbone.channels_last = True


def weights_to_channels_last(engine) -> None:
    """Convolution weights in channels_last too (ZeRO-0 only, after ``deepspeed.initialize``).

    DeepSpeed's initial broadcast views each parameter as bytes, which a channels_last tensor
    refuses; ZeRO 1-3 keep parameters as views into flat buffers, which a layout change would
    detach from the optimizer. There the input alone sets the layout, and cuDNN follows it."""
    engine.module.to(memory_format=torch.channels_last)  # in place: the optimizer keeps the same Parameters


def compile_backbone(model: nn.Module) -> None:
    """``torch.compile`` the backbone and neck in place (``nn.Module.compile``: parameter names, and
    with them checkpoints, AGVM's modules and exports, are unchanged). Their input shapes are
    bounded by the canvas padding (``pads_to_canvas``); the heads stay eager (data-dependent
    shapes: proposals, sampled RoIs)."""
    model.backbone.compile(dynamic=False)
    log_dist(log, "train.compile: backbone and neck compiled (inputs padded to %s)",
             "one canvas per orientation" if isinstance(getattr(model, "transform", None), CanvasTransform)
             else "each batch's largest image: expect a recompilation per new shape")


def _bn_groups(cfg: ExperimentConfig):
    """This rank's cross-GPU BN group (every rank creates every group) and the layout of all of them
    (None, None without cross-GPU BN), logged once."""
    if cfg.model.norm != "cgbn":
        return None, None
    group, layout = build_bn_group(cfg.model, cfg.train.micro_batch)
    sizes = sorted({len(g) for g in layout})
    log_dist(log, "norm: cgbn; %d BN group(s) of %s rank(s) = %s images each: %s", len(layout),
             "/".join(map(str, sizes)), "/".join(str(n * cfg.train.micro_batch) for n in sizes),
             layout if len(layout) <= 16 else f"{layout[:4]} ...")
    return group, layout
