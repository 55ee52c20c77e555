"""The DeepSpeed engine: process group, ``deepspeed.initialize``, checkpoints.

The DeepSpeed dict it is built from comes from ``pipeline.ds_config``; what DeepSpeed does
not offer publicly is in ``pipeline.ds_internals``.
"""

from __future__ import annotations

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

from pipeline.ds_config import zero_stage
from pipeline.ds_internals import check_version, load_checkpoints_memory_mapped

log = logging.getLogger(__name__)


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


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """``deepspeed.initialize`` with our client optimizer; returns the engine."""
    check_version()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    load_checkpoints_memory_mapped(engine)
    return engine


def model_init_context(ds_config: dict, enabled: bool):
    """Build the model inside this context to create it already partitioned under ZeRO-3
    (``deepspeed.zero.Init``): no rank ever holds the whole fp32 model."""
    return deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=enabled and zero_stage(ds_config) == 3)


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
