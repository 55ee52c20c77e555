"""The DeepSpeed engine: process group, ds_config filling, initialize, checkpoints.

``ds_configs/*.json`` hold engine settings only (ZeRO stage, precision, offload).
Batch sizes, gradient clipping and the optimizer come from the experiment config
and are filled in by ``fill_ds_config``, the one place where the two meet: a
ds_config that states a different batch is refused rather than silently
overridden.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
_EXPERIMENT_OWNED = ("optimizer", "scheduler")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the launcher's process group (deepspeed, torchrun) or make a 1-process one."""
    if "RANK" not in os.environ:  # plain `python launch/train.py`: no launcher environment
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    return DistInfo(dist.get_rank(), world, local_rank, local_world, device)


def load_ds_config(path: Path) -> dict:
    """Read a ds_config JSON, refusing sections that belong to the experiment config."""
    if not path.is_file():
        raise ConfigError(f"train.ds_config: {path} does not exist (presets are in ds_configs/)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"ds_config {path} is not valid JSON: {err}") from None
    for key in _EXPERIMENT_OWNED:
        if key in ds:
            raise ConfigError(f"ds_config {path} has an {key!r} section; the {key} comes from the experiment "
                              f"config (optim.* / schedule.*): remove it from {path}")
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


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """``deepspeed.initialize`` with our client optimizer; returns the engine."""
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    _load_checkpoints_memory_mapped(engine)
    return engine


def _load_checkpoints_memory_mapped(engine) -> None:
    """Read checkpoint shards memory-mapped (``torch.load(mmap=True)``) instead of into a second
    in-RAM copy beside the live engine (2.3 GB per rank for the 1.1B-parameter detector's fp32
    partition). Its resume out-of-memory turned out to be a second live engine, not this, so the
    saving here is an untested margin. DeepSpeed writes zip-format files by default, which mmap needs."""
    ce = engine.checkpoint_engine
    if type(ce).__name__ != "TorchCheckpointEngine" or not getattr(ce, "zipfile_serialization", False):
        return

    def load(path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False, mmap=True)

    ce.load = load


def model_init_context(ds_config: dict, enabled: bool):
    """Build the model inside this context to create it already partitioned under ZeRO-3
    (``deepspeed.zero.Init``): no rank ever holds the whole fp32 model."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    return deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=enabled and stage == 3)


def gathered(params: list[torch.nn.Parameter]):
    """Full values of (possibly ZeRO-3-partitioned) parameters inside the context, read-only."""
    return deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params))


def set_lr(engine, lrs: list[float]) -> None:
    """Set each param group's lr; DeepSpeed's wrappers expose the client optimizer's groups."""
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr


def set_gradient_clipping(engine, max_norm: float) -> None:
    """Change the engine's global-norm gradient clipping between steps (0 = off).

    DeepSpeed reads it from its config at ZeRO-0 and keeps a copy in the ZeRO 1-3
    optimizers; both are set, so the norm stays the engine's own (over all partitions).
    """
    engine._config.gradient_clipping = max_norm
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = max_norm


def link_optimizer_state(engine) -> None:
    """Re-link ZeRO 1/2's per-parameter views of the client optimizer's state.

    DeepSpeed 0.19 links them once, right after the *first* parameter group's first step,
    when the other groups have no state yet; ``safe_get_full_optimizer_state`` then raises
    for every parameter outside group 0. Re-linking once all groups have stepped fixes it.
    """
    opt = engine.optimizer
    if getattr(opt, "_hp_optimizer_states_linked", None) is not None:
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, ckpt_dir: Path, iteration: int, client_state: dict[str, Any]) -> None:
    """Engine state (ZeRO shards included) plus each rank's RNG state, tagged by iteration."""
    tag = f"iter_{iteration:08d}"
    # RNG first: the engine writes the 'latest' pointer last, so a crash in between is harmless.
    rank_dir = ckpt_dir / tag
    rank_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), rank_dir / f"rng_rank{dist.get_rank()}.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=dict(client_state, iteration=iteration))


def load_checkpoint(engine, ckpt_dir: Path) -> Optional[dict]:
    """Load the latest checkpoint in ``ckpt_dir``; None when there is none."""
    if not (ckpt_dir / "latest").is_file():
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        raise RuntimeError(f"checkpoint in {ckpt_dir} could not be loaded (see DeepSpeed's message above)")
    tag = (ckpt_dir / "latest").read_text().strip()
    rng_file = ckpt_dir / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s has no RNG state for this rank: the resumed run will not be bit-identical", rng_file)
    return client_state
