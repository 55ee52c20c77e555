"""Which job this process belongs to, read from whichever launcher started it.

Every launcher tells the processes it starts their place in the job through environment
variables, each launcher its own (launch/README.md lists them). ``resolve`` turns one process's
environment into a ``Launch`` (rank, world size, local rank and size, node, rendezvous address)
without side effects, and refuses a conflicting or partial set with the variables' names and
the fix: a process that guessed would form a job of its own, and N one-process runs would share
the first GPU and the run directory. ``export_env`` then writes torch's env:// variables, so
``deepspeed.init_distributed`` joins that job instead of trying its own MPI discovery.

Precedence, first match wins:

1. ``RANK`` (torch's env:// set), from DeepSpeed's per-host launcher (it also sets CROSS_RANK),
   torchrun (GROUP_RANK), DeepSpeed's mpich/impi runners or any other launcher (NODE_RANK if it
   knows the node). A per-node launcher may itself run as an srun task or an MPI process; their
   variables then describe the launcher, not the rank, and are ignored. RANK with no node index
   inside a multi-process srun step or MPI job must agree with their rank and size: otherwise it
   is stale (exported by a job script) and each task would start a job of its own.
2. MPI: Open MPI (OMPI_COMM_WORLD_*), MVAPICH (MV2_COMM_WORLD_*), MPICH / Intel MPI hydra (PMI_RANK,
   PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS); all that are present must agree. SLURM's variables
   are ignored: mpirun inside an allocation starts its daemons with srun, one task per node.
3. An srun task: SLURM_PROCID, except in the sbatch script itself (ENVIRONMENT=BATCH without
   SLURM_STEP_NUM_TASKS, which only srun sets): that is one process.
4. None of these: a job of one process, rendezvous on 127.0.0.1 at a free port.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass, replace
from typing import Mapping, MutableMapping, Optional

from pipeline.errors import LaunchError

DEFAULT_PORT = 29500  # torch's and DeepSpeed's default rendezvous port
UNSET_TORCH = "unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE"


@dataclass(frozen=True)
class Launch:
    launcher: str  # plain, deepspeed, torchrun, env, slurm, openmpi, mvapich, hydra
    rank: int
    world: int
    local_rank: int
    local_world: int
    node: int  # this rank's machine: the default BN groups follow it
    master_addr: Optional[str]  # None: DeepSpeed's MPI discovery (mpi4py) finds rank 0's address
    master_port: int  # 0: any free port (a job of one process needs no agreement)


PLAIN = Launch("plain", 0, 1, 0, 1, 0, "127.0.0.1", 0)

# rank, world, local rank, local world of each MPI's processes
MPI_FLAVOURS = {
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "mvapich": ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
                "MV2_COMM_WORLD_LOCAL_SIZE"),
    "hydra": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}
_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# The local size and node index each launcher sets, read alone: a variable of another launcher may be
# inherited from whatever started this one. Other launchers may set either local size, or both alike.
_LOCAL_SIZE_VARS = {"deepspeed": ("LOCAL_SIZE",), "torchrun": ("LOCAL_WORLD_SIZE",),
                    "env": ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")}
_NODE_VAR = {"deepspeed": "CROSS_RANK", "torchrun": "GROUP_RANK", "env": "NODE_RANK"}
# Where each launcher's rank, world, local rank, local world and node come from (for messages).
SOURCES = {
    "plain": ("-", "-", "-", "-", "-"),
    "deepspeed": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK"),
    "torchrun": (*_TORCH_VARS, "GROUP_RANK"),
    "env": (*_TORCH_VARS, "NODE_RANK (else RANK // LOCAL_WORLD_SIZE)"),
    "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE",
              "SLURM_NODEID"),
    **{name: (*v, f"{v[0]} // {v[3]}") for name, v in MPI_FLAVOURS.items()},
}


def resolve(env: Mapping[str, str], mpi4py: bool = False) -> Launch:
    """The job described by ``env`` (a process's environment); ``mpi4py``: whether it can be
    imported (DeepSpeed's MPI discovery then supplies a missing MASTER_ADDR).
    Raises LaunchError for conflicting or partial launcher variables."""
    if "RANK" in env:
        launch = _from_torch(env)
        if launch.launcher == "env" and "NODE_RANK" not in env:
            _agree_with_outer(env, launch, _mpi_ranks(env))
    elif mpi := _mpi_ranks(env):
        launch = _from_mpi(env, mpi, mpi4py)
    elif _srun_task(env):
        launch = _from_slurm(env)
    elif "WORLD_SIZE" in env:
        raise LaunchError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but RANK is not: set RANK, LOCAL_RANK, "
                          f"LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT too, or unset WORLD_SIZE for a "
                          "job of one process")
    else:
        return PLAIN
    _check_ranges(launch)
    return launch


# ------------------------------------------------------------------------- launchers

def _from_torch(env: Mapping[str, str]) -> Launch:
    name = "deepspeed" if "CROSS_RANK" in env else \
        "torchrun" if "GROUP_RANK" in env or "TORCHELASTIC_RUN_ID" in env else "env"
    _require(env, f"RANK={env['RANK']}", [("WORLD_SIZE",)], "a launcher that sets RANK sets WORLD_SIZE too",
             "launch/README.md, 'My launcher is not listed' (or unset RANK for a job of one process)")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if world > 1:  # a job of one process needs neither a local size nor a rendezvous
        _require(env, f"RANK={rank} (of WORLD_SIZE={world})",
                 [("LOCAL_RANK",), _LOCAL_SIZE_VARS[name], ("MASTER_ADDR",), ("MASTER_PORT",)],
                 "every rank of a multi-process job needs its place on its node and the rendezvous",
                 "launch/README.md, 'My launcher is not listed'")
    local_world = _local_world(env, name, world)
    node_var = _NODE_VAR[name]
    node = _int(env, node_var) if node_var in env else rank // max(local_world, 1)  # ranks fill nodes in order
    return Launch(name, rank, world, _int(env, "LOCAL_RANK", 0), local_world, node,
                  env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", 0))


def _local_world(env: Mapping[str, str], launcher: str, world: int) -> int:
    sizes = {v: _int(env, v) for v in _LOCAL_SIZE_VARS[launcher] if v in env}
    if len(set(sizes.values())) > 1:
        raise LaunchError(f"LOCAL_WORLD_SIZE={sizes['LOCAL_WORLD_SIZE']} and LOCAL_SIZE={sizes['LOCAL_SIZE']} "
                          "disagree: both are the number of ranks on this node; set one, or both alike")
    return next(iter(sizes.values()), world)


def _agree_with_outer(env: Mapping[str, str], launch: Launch, mpi: list) -> None:
    """RANK with no node index inside an srun step or an MPI job is one of its tasks: same place."""
    if mpi:
        flavour, (rank, world, *_) = mpi[0]
        rank_var, world_var = MPI_FLAVOURS[flavour][:2]
        fix = f"start the job with mpirun alone ({UNSET_TORCH} MASTER_ADDR MASTER_PORT in the job's " \
              "environment), or let your per-node launcher set NODE_RANK"
    elif _srun_task(env):
        rank, world = _int(env, "SLURM_PROCID"), _slurm_world(env)
        rank_var, world_var = "SLURM_PROCID", _pick_name(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        fix = f"srun starts one rank per task: {UNSET_TORCH} in the job script before srun " \
              "(see launch/slurm.sbatch), or let your per-node launcher set NODE_RANK"
    else:
        return
    if world > 1 and (rank, world) != (launch.rank, launch.world):
        raise LaunchError(f"RANK={launch.rank}, WORLD_SIZE={launch.world} but {rank_var}={rank}, "
                          f"{world_var}={world}: this process is task {rank} of {world}, and RANK in its "
                          f"environment belongs to another job; {fix}")


def _mpi_ranks(env: Mapping[str, str]) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(flavour, (rank, world, local rank, local world)) of every MPI whose variables are set."""
    found = []
    for flavour, names in MPI_FLAVOURS.items():
        present = [n for n in names if n in env]
        if not present:
            continue
        if flavour == "hydra" and set(present) <= {"PMI_RANK", "PMI_SIZE"} and "SLURM_STEP_NUM_TASKS" in env:
            continue  # srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE for its own tasks: SLURM describes them
        _require(env, present[0], [(n,) for n in names], f"{flavour}'s mpirun sets all of {', '.join(names)}",
                 "launch/README.md, 'My launcher is not listed'")
        found.append((flavour, tuple(_int(env, n) for n in names)))
    if len({place for _, place in found}) > 1:
        said = "; ".join(", ".join(f"{n}={env[n]}" for n in MPI_FLAVOURS[f]) for f, _ in found)
        raise LaunchError(f"MPI variables disagree on this process's place: {said}. One mpirun starts the job; "
                          "unset the other MPI's variables (nested mpirun, or a stale export?)")
    return found


def _from_mpi(env: Mapping[str, str], mpi: list, mpi4py: bool) -> Launch:
    flavour, (rank, world, local_rank, local_world) = mpi[0]
    addr = env.get("MASTER_ADDR")
    if addr is None and world == 1:
        addr = "127.0.0.1"
    elif addr is None and not mpi4py:
        raise LaunchError(
            f"{MPI_FLAVOURS[flavour][0]}={rank} (of {world}): mpirun started this process, but MASTER_ADDR is "
            "not set and mpi4py cannot be imported, so rank 0's address is unknown. Pass rank 0's host and "
            "a port to every rank (Open MPI: mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=29500; "
            "deepspeed --launcher openmpi: put both in ./.deepspeed_env), or pip install mpi4py")
    port = _int(env, "MASTER_PORT", 0 if world == 1 else DEFAULT_PORT)
    # Block mapping (ranks fill a node before the next): build_bn_group checks it holds.
    return Launch(flavour, rank, world, local_rank, local_world, rank // max(local_world, 1), addr, port)


def _srun_task(env: Mapping[str, str]) -> bool:
    """SLURM_PROCID of an srun task, not of the sbatch script (a single process, ENVIRONMENT=BATCH)."""
    if "SLURM_PROCID" not in env:
        return False
    return "SLURM_STEP_NUM_TASKS" in env or env.get("ENVIRONMENT") != "BATCH"


def _slurm_world(env: Mapping[str, str]) -> int:
    _require(env, f"SLURM_PROCID={env['SLURM_PROCID']}", [("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")],
             "srun sets both for every task", "start the ranks with srun, e.g. launch/slurm.sbatch")
    return _int(env, _pick_name(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"))


def _from_slurm(env: Mapping[str, str]) -> Launch:
    world = _slurm_world(env)
    master_vars = ("MASTER_ADDR", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    port_vars = ("MASTER_PORT", "SLURM_STEP_RESV_PORTS", "SLURM_JOB_ID")
    _require(env, f"SLURM_PROCID={env['SLURM_PROCID']}",
             [("SLURM_LOCALID",), ("SLURM_NODEID",), ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")]
             + ([master_vars, port_vars] if world > 1 else []),
             "srun sets them for every task", "start the ranks with srun, e.g. launch/slurm.sbatch")
    node = _int(env, "SLURM_NODEID")
    local_world = tasks_on_node(env[_pick_name(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")], node)
    if world == 1:  # e.g. an interactive step: no rendezvous with anyone, any free port
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", 0)
    else:
        addr = env.get("MASTER_ADDR") or first_host(env[_pick_name(env, *master_vars[1:])])
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(env)
    return Launch("slurm", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID"), local_world, node,
                  addr, port)


# ------------------------------------------------------------------------- SLURM's formats

def first_host(hostlist: str) -> str:
    """The first host of SLURM's compressed hostlist: ``gpu[001-004,010],login2`` -> ``gpu001``.
    With the default block distribution, task 0 runs there."""
    depth, end = 0, len(hostlist)
    for i, ch in enumerate(hostlist):  # the first entry ends at the first comma outside brackets
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    entry = hostlist[:end].strip()
    host = re.sub(r"\[([^\[\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0].strip(), entry)
    if not host or re.search(r"[\[\],\s]", host):
        raise LaunchError(f"cannot read a host from the SLURM hostlist {hostlist!r}: set MASTER_ADDR to rank 0's host")
    return host


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Tasks on node ``node`` from SLURM's compressed counts: ``2(x3),1`` is 2, 2, 2, 1."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise LaunchError(f"SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r} is not SLURM's N(xK),M format")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node < len(counts):
        raise LaunchError(f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r} lists "
                          f"{len(counts)} node(s): the variables come from different steps")
    return counts[node]


def slurm_port(env: Mapping[str, str]) -> int:
    """A rendezvous port every task of the step computes alike, with no communication: the step's
    first reserved port (srun --resv-ports), else one derived from the job and step ids (steps of
    one job running at once get different ports), in 10000-29999, below Linux's ephemeral range."""
    if "SLURM_STEP_RESV_PORTS" in env:
        return int(re.match(r"\d+", env["SLURM_STEP_RESV_PORTS"]).group())
    job, step = _int(env, "SLURM_JOB_ID"), _int(env, "SLURM_STEP_ID", 0)
    return 10000 + (job % 1250) * 16 + step % 16


# ------------------------------------------------------------------------- checks

def _check_ranges(launch: Launch) -> None:
    rank_v, world_v, local_v, local_world_v, _ = SOURCES[launch.launcher]
    ok = 0 <= launch.rank < launch.world and 0 <= launch.local_rank < launch.local_world <= launch.world
    if not ok:
        raise LaunchError(f"{rank_v}={launch.rank}, {world_v}={launch.world}, {local_v}={launch.local_rank}, "
                          f"{local_world_v}={launch.local_world} ({launch.launcher}): need 0 <= rank < world and "
                          "0 <= local rank < local size <= world; the variables come from different jobs")


def check_node_layout(placements: list[tuple[int, int, int]], launcher: str) -> None:
    """``placements``: every rank's (node, local rank, local size), gathered. Each node's local ranks
    must be 0..k-1 once each, with k its ranks' local size; otherwise BN groups and GPUs would not
    follow the machines."""
    nodes: dict[int, list[int]] = {}
    for rank, (node, _, _) in enumerate(placements):
        nodes.setdefault(node, []).append(rank)
    for node, ranks in sorted(nodes.items()):
        local = sorted(placements[r][1] for r in ranks)
        sizes = sorted({placements[r][2] for r in ranks})
        if local != list(range(len(ranks))) or sizes != [len(ranks)]:
            _, _, local_v, local_world_v, node_v = SOURCES[launcher]
            raise LaunchError(
                f"node {node} ({node_v}) holds ranks {ranks} with local ranks {local} ({local_v}) and local "
                f"sizes {sizes} ({local_world_v}); expected local ranks 0..{len(ranks) - 1} once each and local "
                f"size {len(ranks)}. Ranks must fill each node in order (mpirun --map-by slot, srun's default "
                "block distribution), or your launcher must set these variables per node")


def device_index(local_rank: int, visible: int) -> int:
    """The GPU, among the ``visible`` ones, for this local rank. A launcher that gives each task its
    own GPU (srun --gpus-per-task=1, a per-rank CUDA_VISIBLE_DEVICES) leaves one visible: cuda:0;
    one that shows all of a node's GPUs to every rank (deepspeed, torchrun, mpirun): cuda:local_rank."""
    if visible < 1:
        raise ValueError(f"visible={visible}: no GPU to map to")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise LaunchError(f"local rank {local_rank} but only {visible} GPUs are visible to it: start at most "
                      f"{visible} ranks per node, or give each task its own GPU (srun --gpus-per-task=1)")


# ------------------------------------------------------------------------- side effects

_joined: Optional[Launch] = None


def export_env(launch: Launch, environ: MutableMapping[str, str] = os.environ) -> Launch:
    """Write torch's env:// variables for ``launch`` (port 0: a free one) and remember it as the job
    this process joins (``joined``). Without a master address MASTER_ADDR stays unset, which makes
    ``deepspeed.init_distributed`` run its MPI discovery. Returns the launch as written."""
    global _joined
    if launch.master_port == 0:
        launch = replace(launch, master_port=free_port())
    environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world), LOCAL_RANK=str(launch.local_rank),
                   LOCAL_WORLD_SIZE=str(launch.local_world), MASTER_PORT=str(launch.master_port))
    if launch.master_addr is None:
        environ.pop("MASTER_ADDR", None)
    else:
        environ["MASTER_ADDR"] = launch.master_addr
    _joined = launch
    return launch


def joined() -> Optional[Launch]:
    """The launch ``export_env`` wrote in this process (None before)."""
    return _joined


def mpi4py_importable() -> bool:
    return importlib.util.find_spec("mpi4py") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------- helpers

def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    if name not in env and default is not None:
        return default
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None


def _pick_name(env: Mapping[str, str], *names: str) -> str:
    return next(n for n in names if n in env)


def _require(env: Mapping[str, str], what: str, groups: list[tuple[str, ...]], why: str, fix: str) -> None:
    """Raise naming every group of variables (alternatives) of which none is set."""
    missing = [" or ".join(g) for g in groups if not any(n in env for n in g)]
    if missing:
        raise LaunchError(f"{what} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                          f"{why}; see {fix}")
