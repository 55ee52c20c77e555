"""The experiment config: one typed schema, loaded from YAML with key=value overrides.

Every concern (model, data, optim, schedule, train, tracking) has its own pydantic
model; unknown keys and bad values are rejected at start-up with the dotted field
name and, where it helps, the fix. The resolved config is written into the run
directory and handed to W&B as is. Engine settings (ZeRO stage, precision,
offload) live in ``ds_configs/*.json``; batch sizes and gradient clipping live here
and are filled into the DeepSpeed dict in one place (``pipeline.distributed.ds_config.fill_ds_config``);
the optimizer is built from ``optim`` as a torch optimizer and handed to DeepSpeed as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    detector: Literal["faster_rcnn", "mask_rcnn", "retinanet", "fcos"] = "faster_rcnn"
    backbone: str = Field("resnet18", description="any timm model name with features_only support")
    pretrained: Optional[Path] = Field(None, description="local checkpoint file for the backbone")
    fpn_channels: int = Field(256, gt=0)
    # Which backbone stages feed the FPN, by timm feature index (0 = stride 2).
    # None: strides 4-32 for the R-CNNs, 8-32 (plus P6, P7) for RetinaNet/FCOS.
    out_indices: Optional[tuple[int, ...]] = None
    anchor_scale: float = Field(8.0, gt=0, description="anchor side = anchor_scale x level stride")
    detections_per_img: int = Field(100, gt=0)
    score_thresh: Optional[float] = Field(None, ge=0, lt=1, description="detections scoring below this are dropped "
                                          "at inference (None: torchvision's default per detector, 0.05; FCOS 0.2)")
    # R-CNN head sizes (torchvision's defaults); smaller values make CPU runs fast.
    rpn_pre_nms_train: int = Field(2000, gt=0, description="top-scoring anchors per level before the RPN's NMS")
    rpn_post_nms_train: int = Field(2000, gt=0, description="proposals per image kept for the RoI head")
    rpn_post_nms_test: int = Field(1000, gt=0, description="proposals per image at inference (also the per-level pre-NMS count, as in torchvision's defaults)")
    rpn_batch_per_image: int = Field(256, gt=0, description="anchors sampled per image for the RPN's loss")
    roi_batch_per_image: int = Field(512, gt=0, description="RoIs sampled per image for the box loss")
    box_head_dim: int = Field(1024, gt=0, description="width of the two-layer box head")
    roi_sampling_ratio: int = Field(2, ge=0, description="RoIAlign bilinear samples per bin side (0 = adaptive); "
                                    "1 is 4x cheaper than torchvision's 2, which matters on CPU")
    roi_canonical_scale: float = Field(
        224, gt=0, description="side of a box that RoIAlign pools from pyramid level 4 (stride 16), one level down "
                               "per halving (the FPN paper's 224, for ~800 px images; scale it with the images)")
    vit_window: int = Field(0, ge=0, description="plain ViTs: blocks attend within windows of this many tokens per "
                                                 "side (ViTDet: 14); 0: every block global (models/vit.py)")
    vit_global_blocks: Optional[tuple[int, ...]] = Field(
        None, description="with vit_window: the blocks that stay global, by index; None: ViTDet's 4 evenly spaced "
                          "(the last of each quarter of the depth)")
    activation_checkpointing: bool = Field(False, description="recompute backbone blocks in backward "
                                                               "(torch non-reentrant checkpoint) to save memory")
    # Normalization (MegDet Sec. 3.2): every BatchNorm of the model becomes this kind.
    norm: Literal["cgbn", "per_gpu", "frozen", "group_norm"] = Field(
        "cgbn", description="cgbn: cross-GPU BN over bn_group; per_gpu: torch BN; frozen: torchvision "
                            "FrozenBatchNorm2d; group_norm: GroupNorm(gn_groups)")
    bn_group: Union[Literal["node", "world", "none"], int] = Field(
        "node", description="cgbn group: node (ranks on one machine), world, none (per GPU) or ranks per group")
    bn_images: Optional[int] = Field(None, gt=0, description="BN size in images (MegDet: 32); overrides bn_group "
                                                              "with bn_images / micro_batch ranks")
    gn_groups: int = Field(32, gt=0, description="groups for norm=group_norm")
    pad_to: Literal["auto", "batch", "canvas"] = Field(
        "auto", description="batch: pad each batch to its largest image (torchvision); canvas: to one size per "
                            "orientation (bounded shapes for train.compile); auto: canvas when train.compile")
    cgbn_impl: Literal["auto", "ours", "torch"] = Field(
        "auto", description="cgbn kernels: torch (nn.SyncBatchNorm's fused CUDA kernels), ours (MegDet's two-pass "
                            "autograd function, any device), auto (torch's on CUDA, ours elsewhere)")
    heads: Literal["auto", "torchvision", "batched"] = Field(
        "auto", description="Faster R-CNN's training heads: batched (models/batched_heads.py: the same losses "
                            "without torchvision's host syncs but the NMS), torchvision, auto (batched on CUDA)")

    @model_validator(mode="after")
    def _bn_group_positive(self) -> "ModelConfig":
        if isinstance(self.bn_group, int) and self.bn_group < 1:
            raise ValueError(f"model.bn_group={self.bn_group}: use node, world, none or a rank count >= 1")
        return self

    @model_validator(mode="after")
    def _batched_heads_are_faster_rcnns(self) -> "ModelConfig":
        if self.heads == "batched" and self.detector != "faster_rcnn":
            raise ValueError(f"model.heads=batched is built for faster_rcnn, not {self.detector} (Mask R-CNN's mask "
                             "branch and the one-stage heads are torchvision's): use model.heads=auto or torchvision")
        return self


class DataConfig(_Section):
    # "synthetic" writes the embedded dataset under root (if missing) before training.
    source: Literal["synthetic", "coco"] = "synthetic"
    root: Path = Path("data/shapes")
    train_images: str = "train"
    train_ann: str = "annotations/instances_train.json"
    val_images: str = "val"
    val_ann: str = "annotations/instances_val.json"
    synthetic_train: int = Field(512, gt=0)
    synthetic_val: int = Field(128, gt=0)
    min_size: int = Field(800, gt=0, description="shorter image side after resize (evaluation; training too unless "
                                                 "train_min_sizes); a list [640, ..., 800]: train_min_sizes, and its "
                                                 "largest here")
    max_size: int = Field(1333, gt=0, description="cap on the longer side after resize")
    train_min_sizes: Optional[tuple[int, ...]] = Field(
        None, description="multi-scale training: each training image's shorter side drawn from these")
    scale_jitter: Optional[tuple[float, float]] = Field(
        None, description="large-scale jitter (ViTDet: [0.1, 2.0]): training images resized to a random factor in this "
                          "range of the fit into max_size x max_size, then cropped or padded to max_size x max_size")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    keep_empty: bool = Field(False, description="train on images without annotations")
    aspect_grouping: bool = True
    workers: int = Field(2, ge=0)
    decode: Literal["workers", "device"] = Field(
        "workers", description="where training JPEGs are decoded and resized: in the loader workers (CPU), or "
                               "batched on the training device (nvJPEG on a GPU; other formats stay in the workers)")

    @model_validator(mode="before")
    @classmethod
    def _min_size_list(cls, data):
        """``min_size: [640, 672, ..., 800]`` is multi-scale training, evaluated at the largest."""
        if isinstance(data, dict) and isinstance(data.get("min_size"), (list, tuple)):
            sizes = data["min_size"]
            if data.get("train_min_sizes") is not None:
                raise ValueError("data.min_size is a list and data.train_min_sizes is set: give the sizes once")
            if not sizes or not all(isinstance(v, int) and v > 0 for v in sizes):
                raise ValueError(f"data.min_size={sizes}: a list of positive integer sides")
            data = dict(data, min_size=max(sizes), train_min_sizes=tuple(sizes))
        return data

    @model_validator(mode="after")
    def _augmentation(self) -> "DataConfig":
        if self.scale_jitter is not None:
            lo, hi = self.scale_jitter
            if not 0 < lo <= hi:
                raise ValueError(f"data.scale_jitter={list(self.scale_jitter)}: need 0 < low <= high, e.g. [0.1, 2.0]")
            if self.train_min_sizes is not None:
                raise ValueError("data.scale_jitter and multi-scale data.train_min_sizes: choose one scale augmentation")
            if self.decode == "device":
                raise ValueError("data.scale_jitter crops and pads in the loader workers; data.decode=device resizes "
                                 "on the device and does not crop: use data.decode=workers")
        if self.train_min_sizes is not None and not all(v > 0 for v in self.train_min_sizes):
            raise ValueError(f"data.train_min_sizes={list(self.train_min_sizes)}: sides must be positive")
        return self

    def path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root / p


class OptimConfig(_Section):
    name: Literal["sgd", "adamw", "agvm_sgd", "agvm_adamw", "lars", "lamb"] = Field(
        "sgd", description="agvm_*: AGVM's per-module lr modulation on SGD / AdamW (see the agvm section); "
                           "lars / lamb: timm.optim's layer-wise baselines (ZeRO stage 0 only)")
    # MegDet linear scaling: lr = base_lr * global_batch / reference_batch.
    base_lr: float = Field(0.02, gt=0)
    reference_batch: int = Field(16, gt=0)
    lr_scaling: Literal["linear", "sqrt", "none"] = Field(
        "linear", description="lr rule in the global batch k = global_batch / reference_batch: "
                              "base_lr * k (MegDet), * sqrt(k), or base_lr as is")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    norm_weight_decay: Optional[float] = Field(
        None, ge=0, description="weight decay for norm layers and biases; None = same as weight_decay")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    clip_grad_norm: float = Field(0.0, ge=0, description="0 disables clipping")
    layer_decay: Optional[float] = Field(
        None, gt=0, le=1, description="plain-ViT backbones: block i's lr x decay^(depth - i), the embeddings' x "
                                      "decay^(depth + 1), the rest 1 (ViTDet/BEiT; ViTDet 0.7-0.9); None: off")


# MegDet's named policies (Sec. 4, COCO): epochs and (epoch, lr factor) decay steps.
MEGDET_POLICIES: dict[str, tuple[float, tuple[tuple[float, float], ...]]] = {
    "normal": (11, ((8, 0.1), (10, 0.1))),
    "long": (18, ((11, 0.1), (14, 0.1), (17, 0.5))),
}


class ScheduleConfig(_Section):
    epochs: float = Field(12, gt=0)
    max_iters: Optional[int] = Field(None, gt=0, description="overrides epochs when set")
    warmup_iters: int = Field(100, ge=0)
    warmup_epochs: Optional[float] = Field(None, ge=0, description="warmup length in epochs; overrides warmup_iters")
    warmup_factor: Union[Literal["auto"], Annotated[float, Field(gt=0, le=1)], None] = Field(
        None, description="lr multiplier at iteration 0; auto: 1/k, MegDet's rise from the reference batch's lr to "
                          "k times it; None: auto for policy normal/long, 0.001 otherwise")
    policy: Literal["multistep", "cosine", "constant", "normal", "long"] = Field(
        "multistep", description="normal / long: MegDet's policies (epochs and decay steps fixed)")
    milestones: tuple[float, ...] = Field((8, 11), description="epochs at which lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0)
    min_lr_factor: float = Field(0.0, ge=0, le=1, description="cosine floor, as a fraction of the peak lr")

    @model_validator(mode="after")
    def _preset_is_fixed(self) -> "ScheduleConfig":
        # Set to another value than the default: a resolved config (a run's config.yaml) states every
        # field, these at their defaults, which the named policies ignore.
        clash = {k for k in ("epochs", "milestones", "gamma")
                 if k in self.model_fields_set and getattr(self, k) != type(self).model_fields[k].default}
        if self.policy in MEGDET_POLICIES and clash:
            epochs, steps = MEGDET_POLICIES[self.policy]
            raise ValueError(
                f"schedule.policy={self.policy} is MegDet's policy ({epochs} epochs, decay steps (epoch, factor) "
                f"{list(steps)}); remove schedule.{'/'.join(sorted(clash))} or use policy=multistep")
        return self


START_AFTER_WARMUP = 100  # the public AGVM configs: warmup 920 -> start 1020, 460 -> 560


class AGVMConfig(_Section):
    """AGVM (Xue et al., NeurIPS 2022); defaults are the public code's (tau: its configs' 10)."""

    tau: int = Field(10, gt=0, description="iterations between gradient-variance estimates")
    alpha: float = Field(0.97, ge=0, lt=1, description="moving average of mu: mu <- alpha mu + (1 - alpha) new")
    eps: float = Field(1e-6, gt=0, description="added to Phi in the ratio Phi_backbone / Phi_i")
    ratio_min: float = Field(0.5, gt=0, description="clamp of the ratio before the square root")
    ratio_max: float = Field(10.0, gt=0)
    start_iter: Optional[int] = Field(None, ge=0, description="first modulated iteration (absolute); None: "
                                      "start_after_warmup iterations after the end of warmup")
    start_after_warmup: int = Field(START_AFTER_WARMUP, ge=0, description="with start_iter unset, modulation starts this many "
                                    "iterations after warmup ends (the public configs: warmup 920, start 1020 at "
                                    "batch 256; 460 and 560 at 512)")
    halves: Literal["auto", "ranks", "micro_batches"] = Field(
        "auto", description="what AGVM compares: auto (rank halves along BN groups; micro-batch halves when one BN "
                            "group holds every rank), ranks, or micro_batches (train.grad_accum >= 2; under ZeRO-3 "
                            "read from ZeRO's own reduced gradients: no tap, no extra communication)")
    coupled_halves: bool = Field(False, description="accept rank halves inside one cross-GPU BN group (its "
                                 "statistics couple them: Phi reads high); by default they are refused")
    stop_iter: Optional[int] = Field(None, gt=0, description="modulation ends here (mu = 1 after); None = never")
    clip_before: int = Field(200, ge=0, description="clip gradients for this many iterations before start_iter")
    clip_norm: float = Field(1.0, ge=0, description="max gradient norm in that window; 0 = no window clipping")
    anchor: str = Field("backbone", description="the module whose Phi the others are scaled to")

    @model_validator(mode="after")
    def _ordered(self) -> "AGVMConfig":
        if self.ratio_min > self.ratio_max:
            raise ValueError(f"agvm.ratio_min={self.ratio_min} > agvm.ratio_max={self.ratio_max}")
        if self.start_iter is not None and self.stop_iter is not None and self.stop_iter <= self.start_iter:
            raise ValueError(f"agvm.stop_iter={self.stop_iter} must be after agvm.start_iter={self.start_iter}")
        # A resolved config (a run's config.yaml, read back by export or evaluate) states the default
        # start_after_warmup beside start_iter (100; 0 in runs before 2026-12-05): only another value conflicts
        if self.start_iter is not None and self.start_after_warmup not in (0, START_AFTER_WARMUP):
            raise ValueError(f"agvm.start_iter={self.start_iter} and agvm.start_after_warmup="
                             f"{self.start_after_warmup} both set the start: keep one")
        return self


def resolve_repo_path(path: Path) -> Path:
    """A relative path names a file in the working directory if there is one, else in the repository
    (the ds_config presets): ``ds_configs/zero2_fp32.json`` means the same from any directory."""
    path = Path(path)
    if path.exists():
        return path.resolve()
    in_repo = REPO_ROOT / path
    return in_repo if not path.is_absolute() and in_repo.exists() else path  # else: the error names it as given


class TrainConfig(_Section):
    ds_config: Path = Field(Path("ds_configs/zero0_fp32.json"), validate_default=True,
                            description="engine settings (ZeRO stage, precision, offload); relative paths fall "
                                        "back to the repository, so the presets resolve from any directory")
    micro_batch: int = Field(2, gt=0, description="images per GPU per forward")
    zero_init: bool = Field(True, description="under ZeRO-3, build the model already partitioned (deepspeed.zero.Init)")
    grad_accum: int = Field(1, gt=0)
    seed: int = 0
    output_dir: Path = Path("runs")
    run_name: str = "default"
    resume: Union[bool, Literal["auto"]] = Field(
        False, description="true: continue from the newest complete checkpoint in the run directory (none there is an "
                           "error); auto: continue when one exists, start fresh otherwise (requeued jobs, study "
                           "retries); false: start fresh, moving an earlier run in the directory aside")
    resume_from: Optional[str] = Field(None, description="resume from this checkpoint tag (e.g. iter_00001000) "
                                       "instead of the newest; implies resume")
    collective_timeout_s: float = Field(
        1800.0, gt=0, description="how long a collective may wait for the other ranks before the job stops with an "
                                  "error (a host whose link is cut resets no socket: only this ends the wait)")
    stall_report_s: float = Field(
        300.0, ge=0, description="a rank without progress this long writes every thread's stack to <run>/stalls/ "
                                 "and logs where it is; rank 0 names the ranks behind (0 = off)")
    allow_schedule_change: bool = Field(False, description="resume from a checkpoint saved with another schedule "
                                        "(iterations, epochs, warmup, decay points): continue on this run's")
    keep_checkpoints: int = Field(3, ge=1, description="complete checkpoints kept; older ones are deleted once a "
                                  "newer one is complete (never the one 'latest' names)")
    log_every: int = Field(10, gt=0)
    coco_eval: Literal["auto", "pycocotools", "faster_coco_eval"] = Field(
        "auto", description="COCOeval implementation: pycocotools' (the reference), faster-coco-eval's C++ "
                                   "one (same numbers; BENCHMARKS.md has both times), auto (faster-coco-eval where "
                                   "installed)")
    preview_images: int = Field(4, ge=0, description="after each evaluation, this many fixed validation images with "
                                "their detections drawn, to <run>/previews/ and W&B (0 = off)")
    eval_every_epochs: float = Field(1.0, ge=0, description="0 = only at the end")
    ckpt_every_iters: int = Field(500, ge=0, description="0 = only at the end")
    evaluate: bool = Field(True, description="COCO evaluation at the end; false for memory probes and smoke runs")
    final_checkpoint: bool = Field(True, description="save a checkpoint at the end; false for memory probes")
    ema_decay: Optional[float] = Field(None, gt=0, lt=1, description="weight EMA (pipeline/optim/ema.py): evaluation and "
                                       "export use ema <- decay ema + (1 - decay) weights, e.g. 0.9999; None: off")
    progress: bool = True
    profile: Optional[tuple[int, int]] = Field(
        None, description="[first, last]: profile these iterations (numbered as logged) on every rank: a torch.profiler "
                          "trace per rank, the top 15 operators and the host syncs in <run>/profile/")
    count_comm: bool = Field(False, description="count every collective of each iteration on rank 0 into "
                                                "<run>/comm_counts.jsonl (pipeline/distributed/comm_count.py): "
                                                "what launch/plan.py --comm plans, seen in the real run")
    oom_snapshot: bool = Field(True, description="CUDA: record the allocator's history so that an out-of-memory error "
                                                 "writes a memory snapshot to <run>/oom/ (and names it)")
    peak_tflops: Optional[float] = Field(
        None, gt=0, description="the device's dense peak TFLOP/s for MFU; None: from the table in "
                                "pipeline/train/flops.py by GPU name and precision (no MFU where unknown, e.g. CPUs)")
    compile: bool = Field(False, description="torch.compile the backbone and neck (training and inference); "
                                             "ZeRO 0-2; model.pad_to=auto then pads to one canvas per orientation")
    channels_last: Optional[bool] = Field(None, description="model and input batch in channels_last memory layout "
                                          "(faster convolutions on tensor cores); None = on for CUDA, off on CPU")

    @field_validator("ds_config")
    @classmethod
    def _resolve_ds_config(cls, path: Path) -> Path:
        return resolve_repo_path(path)

    @model_validator(mode="before")
    @classmethod
    def _resume_from_implies_resume(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("resume_from") is not None:
            data = dict(data, resume=True)
        return data

    @field_validator("profile")
    @classmethod
    def _profile_window(cls, window: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
        if window is not None and not 1 <= window[0] <= window[1]:
            raise ValueError(f"train.profile={list(window)}: need [first, last] iterations with 1 <= first <= last, "
                             "e.g. [20, 24]")
        return window

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.run_name


class TrackingConfig(_Section):
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "megdet-agvm"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: tuple[str, ...] = ()


class ExperimentConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    agvm: AGVMConfig = AGVMConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        if self.data.max_size < self.data.min_size:
            raise ValueError("data.max_size must be >= data.min_size")
        return self


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.micro_batch=4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
    return key.strip().split("."), value


def _apply_override(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k!r} is not a section")
    node[keys[-1]] = value


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid experiment config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key; check the spelling (see README 'Config reference')")
        else:
            lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> ExperimentConfig:
    """Load a YAML experiment config, apply ``a.b=value`` overrides, validate.

    Raises ConfigError with the file, line or dotted field name on any problem.
    """
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = resolve_repo_path(Path(path))  # configs/... means the repository's from any directory
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        _apply_override(tree, *_parse_override(item))
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def dump_config(cfg: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
