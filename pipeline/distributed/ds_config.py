"""The DeepSpeed dict of a run: a ``ds_configs/*.json`` preset filled from the experiment config.

``ds_configs/*.json`` hold engine settings only (ZeRO stage, precision, offload). Batch sizes,
gradient clipping and the optimizer come from the experiment config and are filled in by
``fill_ds_config``, the one place where the two meet: a ds_config that states a different
batch is refused rather than silently overridden. No DeepSpeed import: a config check reads
these files before any process starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import REPO_ROOT, ExperimentConfig
from pipeline.errors import ConfigError

_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
_EXPERIMENT_OWNED = ("optimizer", "scheduler")


def load_ds_config(path: Path) -> dict:
    """Read a ds_config JSON, refusing sections that belong to the experiment config."""
    if not path.is_file():
        raise ConfigError(f"train.ds_config: {path} does not exist (the presets are in {REPO_ROOT / 'ds_configs'})")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"ds_config {path} is not valid JSON: {err}") from None
    for key in _EXPERIMENT_OWNED:
        if key in ds:
            raise ConfigError(f"ds_config {path} has an {key!r} section; the {key} comes from the experiment "
                              f"config (optim.* / schedule.*): remove it from {path}")
    if ds.get("bf16", {}).get("enabled", False):
        raise ConfigError(f"ds_config {path} enables the 'bf16' section, which casts parameters but not buffers: "
                          "BatchNorm then fails, and torchvision's NMS has no bf16 kernel; use "
                          '"torch_autocast": {"enabled": true, "dtype": "bfloat16"} instead (see ds_configs/*_bf16.json)')
    return ds


def fill_ds_config(ds: dict, cfg: ExperimentConfig, world: int, source: str = "ds_config") -> dict:
    """Fill batch sizes and clipping from the experiment; refuse contradictions."""
    want = {"train_micro_batch_size_per_gpu": cfg.train.micro_batch,
            "gradient_accumulation_steps": cfg.train.grad_accum,
            "train_batch_size": cfg.train.micro_batch * cfg.train.grad_accum * world}
    for key in _BATCH_KEYS:
        if key in ds and ds[key] != want[key]:
            raise ConfigError(
                f"{source} sets {key}={ds[key]} but the experiment gives {want[key]} (train.micro_batch="
                f"{cfg.train.micro_batch}, train.grad_accum={cfg.train.grad_accum}, world size {world}); "
                f"remove {key} from {source}: batch sizes come from the experiment config")
    out = dict(ds, **want)
    out["gradient_clipping"] = cfg.optim.clip_grad_norm  # DeepSpeed >= 0.19.3 defaults to 1.0
    out["zero_allow_untested_optimizer"] = True  # our client optimizers are plain torch ones
    out.setdefault("steps_per_print", 10**9)  # we log ourselves
    return out


def engine_config(cfg: ExperimentConfig, world: int) -> dict:
    """The run's DeepSpeed dict: the preset of ``train.ds_config`` filled from the experiment."""
    return fill_ds_config(load_ds_config(cfg.train.ds_config), cfg, world, str(cfg.train.ds_config))


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)
