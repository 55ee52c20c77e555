"""The DeepSpeed engine: the process group (from the launcher's variables, ``pipeline.launcher``)
and ``deepspeed.initialize``.

The DeepSpeed dict it is built from comes from ``pipeline.ds_config``; checkpoints on disk are
``pipeline.checkpoint``'s; what DeepSpeed does not offer publicly is in ``pipeline.ds_internals``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist

from pipeline.ds_config import zero_stage
from pipeline.ds_internals import check_version, load_checkpoints_memory_mapped
from pipeline.launcher import LaunchError, device_index, export_env, mpi4py_importable, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    node: int = 0  # this rank's machine, as its launcher says (pipeline.launcher)
    launcher: str = "plain"


def init_distributed() -> DistInfo:
    """Join the job this process's launcher started (deepspeed, torchrun, srun, mpirun; none: a job of
    one process), on the GPU the launcher meant for it. ``pipeline.launcher`` reads the launcher."""
    launch = export_env(resolve(os.environ, mpi4py=mpi4py_importable()))
    if torch.cuda.is_available():
        index = device_index(launch.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    # MASTER_ADDR is set unless export_env left it to DeepSpeed's MPI discovery (mpi4py), whose port this is.
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               distributed_port=launch.master_port)
    if (dist.get_rank(), dist.get_world_size()) != (launch.rank, launch.world):
        raise LaunchError(f"the process group made this rank {dist.get_rank()} of {dist.get_world_size()}, its "
                          f"launcher ({launch.launcher}) said {launch.rank} of {launch.world}")
    return DistInfo(launch.rank, launch.world, launch.local_rank, launch.local_world, device, launch.node,
                    launch.launcher)


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
