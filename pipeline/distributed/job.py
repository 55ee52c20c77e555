"""This process's part of a job: join the process group its launcher describes, and leave it.

``init_distributed`` forms the process group from whichever launcher started the process
(``pipeline.distributed.launcher``); ``leave_job`` and ``exit_skipping_teardown`` are every
command's last steps (train, evaluate, the benchmarks and the tests' spawned ranks).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from pipeline.distributed.ds_internals import release_cpu_allreduce_segment
from pipeline.distributed.launcher import LaunchError, device_index, export_env, mpi4py_importable, resolve
from pipeline.distributed.network import choose_gloo_interface
from pipeline.distributed.watchdog import enable_flight_recorder


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    node: int = 0  # this rank's machine, as its launcher says (pipeline.distributed.launcher)
    launcher: str = "plain"


def init_distributed(timeout_s: Optional[float] = None) -> DistInfo:
    """Join the job this process's launcher started (deepspeed, torchrun, srun, mpirun; none: a job of
    one process), on the GPU the launcher meant for it. ``pipeline.distributed.launcher`` reads the launcher.
    ``timeout_s`` (``train.collective_timeout_s``) bounds every collective: a rank whose peer is gone
    without a reset socket (a cut link) stops with an error after it instead of waiting for ever."""
    launch = export_env(resolve(os.environ, mpi4py=mpi4py_importable()))
    if torch.cuda.is_available():
        index = device_index(launch.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
        enable_flight_recorder()  # before the process group: NCCL reads it there
    else:
        device = torch.device("cpu")
    import deepspeed  # here, not at the top: the commands import this module before validating a config

    choose_gloo_interface(launch.master_addr, spans_hosts=launch.world > launch.local_world)

    # MASTER_ADDR is set unless export_env left it to DeepSpeed's MPI discovery (mpi4py), whose port this is.
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", **timeout,
                               distributed_port=launch.master_port)
    if timeout_s is not None:
        bound_later_groups(timedelta(seconds=timeout_s))
    if (dist.get_rank(), dist.get_world_size()) != (launch.rank, launch.world):
        raise LaunchError(f"the process group made this rank {dist.get_rank()} of {dist.get_world_size()}, its "
                          f"launcher ({launch.launcher}) said {launch.rank} of {launch.world}")
    return DistInfo(launch.rank, launch.world, launch.local_rank, launch.local_world, device, launch.node,
                    launch.launcher)


def bound_later_groups(timeout: timedelta) -> None:
    """Make ``timeout`` the default of every process group made from now on: the BN groups and DeepSpeed's
    own (its data-parallel clone of the world group) come from ``new_group`` without a timeout, which gives
    them torch's module default (30 minutes), not the job's: a rank waiting on a hung peer in a BN
    all-reduce would outlive ``train.collective_timeout_s`` by far. torch reads these defaults at each call."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def leave_job() -> None:
    """End this process's part of its job: unlink its segment of DeepSpeed's CPU all-reduce, then
    destroy the process group (the launch scripts' last step); nothing outside a job."""
    import torch.distributed as dist

    if dist.is_initialized():
        release_cpu_allreduce_segment(dist.get_rank())
        dist.destroy_process_group()


def exit_skipping_teardown(code: int, finished: bool) -> None:
    """Exit with ``code``; for a ``finished`` process, without the interpreter's teardown.

    After ``leave_job`` every file is written, yet freeing the process groups' C++ objects during
    finalization aborted finished 2-rank CPU jobs now and then in CI ("terminate called without an
    active exception", SIGABRT; faulthandler: the main thread with no Python frame left, i.e. at
    interpreter exit): a finished run reported failed (exit 250), which the study runner would
    retry. Unfinished ones keep the normal exit, whose atexit hooks still close W&B.
    """
    if not finished:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
