"""Every launcher forms one job: the resolver (pipeline.distributed.launcher) on each launcher's exact variable
set, conflicting and partial sets, the GPU mapping, and real 4-process jobs started the way srun
and mpirun start them (2 fake nodes x 2 tasks, gloo). The resolver tests import no deepspeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from pipeline.distributed import launcher
from pipeline.distributed.launcher import (PLAIN, check_node_layout, device_index, export_env, first_host, free_port,
                                           resolve, slurm_port, tasks_on_node)
from pipeline.errors import LaunchError

# --------------------------------------------------------------- each launcher's variables, as it sets them

# What `sbatch` gives the job script (and so every srun task and every launcher started from it).
SBATCH = {"SLURM_JOB_ID": "81234", "SLURM_JOBID": "81234", "SLURM_JOB_NODELIST": "gpu[001-002]",
          "SLURM_NODELIST": "gpu[001-002]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NTASKS": "8",
          "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
          "ENVIRONMENT": "BATCH"}


def srun_task(procid: int, nodes: int = 2, per_node: int = 4, step: int = 0, **extra) -> dict:
    """One task of `srun -n nodes*per_node` in that job (block distribution)."""
    n = nodes * per_node
    return {**SBATCH, "SLURM_STEP_ID": str(step), "SLURM_STEPID": str(step), "SLURM_STEP_NUM_TASKS": str(n),
            "SLURM_NTASKS": str(n), "SLURM_NPROCS": str(n), "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_STEP_NODELIST": SBATCH["SLURM_JOB_NODELIST"], "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
            "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid % per_node), "SLURM_NODEID": str(procid // per_node),
            "SLURM_STEP_LAUNCHER_PORT": "40017", "SLURM_SRUN_COMM_PORT": "40017", **extra}


def deepspeed_rank(rank: int, node: int, per_node: int = 4, nodes: int = 2) -> dict:
    """deepspeed.launcher.launch (pdsh, --no_ssh or one host): what it sets per rank."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(per_node))), "MASTER_ADDR": "gpu001",
            "MASTER_PORT": "29500", "WORLD_SIZE": str(nodes * per_node), "CROSS_RANK": str(node),
            "CROSS_SIZE": str(nodes), "LOCAL_SIZE": str(per_node), "RANK": str(rank),
            "LOCAL_RANK": str(rank % per_node)}


def torchrun_rank(rank: int, node: int, per_node: int = 4, nodes: int = 2) -> dict:
    return {"RANK": str(rank), "WORLD_SIZE": str(nodes * per_node), "LOCAL_RANK": str(rank % per_node),
            "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(node), "GROUP_WORLD_SIZE": str(nodes),
            "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(nodes * per_node), "ROLE_NAME": "default",
            "MASTER_ADDR": "gpu001", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "none",
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def openmpi_rank(rank: int, per_node: int = 4, nodes: int = 2) -> dict:
    """Open MPI's mpirun (block mapping), as Open MPI 4/5 set it, without anything exported."""
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(nodes * per_node),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % per_node), "OMPI_COMM_WORLD_LOCAL_SIZE": str(per_node),
            "OMPI_COMM_WORLD_NODE_RANK": str(rank % per_node), "OMPI_UNIVERSE_SIZE": str(nodes * per_node),
            "PMIX_RANK": str(rank), "PMIX_NAMESPACE": "prterun-gpu001-1234@1"}


def hydra_rank(rank: int, per_node: int = 4, nodes: int = 2) -> dict:
    """MPICH / Intel MPI hydra (mpiexec -ppn per_node)."""
    return {"PMI_RANK": str(rank), "PMI_SIZE": str(nodes * per_node), "MPI_LOCALRANKID": str(rank % per_node),
            "MPI_LOCALNRANKS": str(per_node), "PMI_FD": "6", "PMI_JOBID": "0"}


def mvapich_rank(rank: int, per_node: int = 4, nodes: int = 2) -> dict:
    """MVAPICH2-GDR's hydra mpirun: its own variables and hydra's."""
    return {"MV2_COMM_WORLD_RANK": str(rank), "MV2_COMM_WORLD_SIZE": str(nodes * per_node),
            "MV2_COMM_WORLD_LOCAL_RANK": str(rank % per_node), "MV2_COMM_WORLD_LOCAL_SIZE": str(per_node),
            **hydra_rank(rank, per_node, nodes)}


# What DeepSpeed 0.19.8's runner adds for --launcher openmpi|mvapich (multinode_runner.py): its own exports
# and those from .deepspeed_env; never MASTER_ADDR/MASTER_PORT/RANK, nor --local_rank on the command line.
DS_OPENMPI_EXPORTS = {"UCX_TLS": "tcp", "PYTHONPATH": "/work/repo"}
DS_MVAPICH_EXPORTS = {"MV2_SMP_USE_CMA": "0", "MV2_DEBUG_SHOW_BACKTRACE": "1", "MV2_USE_CUDA": "1",
                      "MV2_SUPPORT_DL": "1", "MV2_ENABLE_AFFINITY": "0", "MV2_INTER_ALLGATHER_TUNING": "5",
                      "MV2_CUDA_USE_NAIVE": "0", "PYTHONPATH": "/work/repo"}
DEEPSPEED_ENV_FILE = {"MASTER_ADDR": "gpu001", "MASTER_PORT": "29500"}  # ./.deepspeed_env, exported by -x


def place(launch) -> tuple:
    return launch.launcher, launch.rank, launch.world, launch.local_rank, launch.local_world, launch.node


# --------------------------------------------------------------- the resolver, launcher by launcher

def test_plain_process_and_the_sbatch_script_itself_are_one_process_jobs():
    assert resolve({}) == PLAIN
    assert resolve({"PATH": "/usr/bin", "LOCAL_RANK": "0"}) == PLAIN
    assert resolve(SBATCH) == PLAIN  # `python launch/train.py` in the job script: one process
    assert PLAIN.master_addr == "127.0.0.1" and PLAIN.master_port == 0  # port 0: a free one at export


def test_deepspeed_per_host_launcher_wins_over_the_allocations_slurm_variables():
    for rank in range(8):
        env = deepspeed_rank(rank, rank // 4)
        assert place(resolve(env)) == ("deepspeed", rank, 8, rank % 4, 4, rank // 4)
        # inside sbatch, and inside an srun step of one task per host (--no_ssh --node_rank $SLURM_NODEID)
        assert place(resolve({**SBATCH, **env})) == place(resolve(env))
        assert place(resolve({**srun_task(rank // 4, per_node=1), **env})) == place(resolve(env))
    assert (resolve(deepspeed_rank(5, 1)).master_addr, resolve(deepspeed_rank(5, 1)).master_port) == ("gpu001", 29500)
    # an MPI's variables around the launcher (here a partial set, as Cray's PALS leaves) are not read
    assert place(resolve({**deepspeed_rank(5, 1), "PMI_RANK": "0", "PMI_SIZE": "2"})) == ("deepspeed", 5, 8, 1, 4, 1)


def test_each_launcher_reads_its_own_local_size():
    """A stale LOCAL_WORLD_SIZE (e.g. written by an earlier one-process run) reaches deepspeed's ranks."""
    assert resolve({**deepspeed_rank(5, 1), "LOCAL_WORLD_SIZE": "1"}).local_world == 4
    assert resolve({**torchrun_rank(5, 1), "LOCAL_SIZE": "1"}).local_world == 4


def test_torchrun_wins_over_the_srun_task_it_runs_in():
    env = {**srun_task(1, per_node=1), **torchrun_rank(13, 3, per_node=4, nodes=4)}
    assert place(resolve(env)) == ("torchrun", 13, 16, 1, 4, 3)
    assert resolve(env).master_port == 29400


def test_srun_tasks_form_one_job_with_the_first_host_as_master():
    launches = [resolve(srun_task(i)) for i in range(8)]
    assert [place(x) for x in launches] == [("slurm", i, 8, i % 4, 4, i // 4) for i in range(8)]
    assert {(x.master_addr, x.master_port) for x in launches} == {("gpu001", slurm_port(SBATCH))}
    assert 10000 <= slurm_port(SBATCH) < 30000
    # deepspeed --launcher slurm: `srun -n 8 --export=ALL,<exports> python -u launch/train.py` -- the same
    assert place(resolve({**srun_task(6), **DS_OPENMPI_EXPORTS})) == ("slurm", 6, 8, 2, 4, 1)


def test_srun_port_and_address_overrides_and_uneven_nodes():
    assert resolve(srun_task(3, MASTER_PORT="31000", MASTER_ADDR="10.0.0.7")).master_port == 31000
    assert resolve(srun_task(3, MASTER_ADDR="10.0.0.7")).master_addr == "10.0.0.7"
    assert resolve(srun_task(3, SLURM_STEP_RESV_PORTS="12000-12004")).master_port == 12000
    # two steps of one job running at once get different ports; every task of a step the same
    assert slurm_port(srun_task(0, step=0)) != slurm_port(srun_task(0, step=1)) == slurm_port(srun_task(7, step=1))
    uneven = srun_task(4, SLURM_STEP_TASKS_PER_NODE="3,2", SLURM_STEP_NUM_TASKS="5", SLURM_NODEID="1",
                       SLURM_LOCALID="1")
    assert place(resolve(uneven)) == ("slurm", 4, 5, 1, 2, 1)
    one = srun_task(0, nodes=1, per_node=1)  # an interactive step: a job of one process, any free port
    assert (resolve(one).world, resolve(one).master_addr, resolve(one).master_port) == (1, "127.0.0.1", 0)


@pytest.mark.parametrize("hostlist, first", [
    ("gpu[001-004,010],login2", "gpu001"), ("node7", "node7"), ("a1,b[1-3]", "a1"), ("n[10-11]", "n10"),
    ("rack[2-3]-n[07,09]", "rack2-n07"), ("gpu[005]", "gpu005"), ("127.0.0.[1-2]", "127.0.0.1"),
])
def test_first_host_of_slurms_compressed_hostlist(hostlist, first):
    assert first_host(hostlist) == first


def test_slurms_tasks_per_node_format():
    assert [tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("8", 0) == 8
    with pytest.raises(LaunchError, match="SLURM_NODEID=2"):
        tasks_on_node("4(x2)", 2)


@pytest.mark.parametrize("flavour, make, exports", [
    ("openmpi", openmpi_rank, {}), ("openmpi", openmpi_rank, DS_OPENMPI_EXPORTS),
    ("mvapich", mvapich_rank, DS_MVAPICH_EXPORTS), ("hydra", hydra_rank, {}),
])
def test_mpi_ranks_with_an_exported_master(flavour, make, exports):
    for rank in range(8):
        env = {**make(rank), **exports, **DEEPSPEED_ENV_FILE}
        assert place(resolve(env)) == (flavour, rank, 8, rank % 4, 4, rank // 4)
        assert (resolve(env).master_addr, resolve(env).master_port) == ("gpu001", 29500)
    # mpirun inside an allocation: ranks inherit its daemon's srun task variables, which do not count
    daemon = srun_task(1, per_node=1)
    assert place(resolve({**daemon, **make(6), **DEEPSPEED_ENV_FILE})) == (flavour, 6, 8, 2, 4, 1)


def test_mpi_without_master_needs_mpi4py():
    with pytest.raises(LaunchError, match=r"MASTER_ADDR.*mpi4py") as err:
        resolve({**openmpi_rank(3), **DS_OPENMPI_EXPORTS})
    assert "OMPI_COMM_WORLD_RANK=3" in str(err.value) and ".deepspeed_env" in str(err.value)
    discovered = resolve(openmpi_rank(3), mpi4py=True)  # DeepSpeed's mpi_discovery finds rank 0's address
    assert place(discovered) == ("openmpi", 3, 8, 3, 4, 0) and discovered.master_addr is None
    assert discovered.master_port == 29500
    assert resolve(openmpi_rank(0, per_node=1, nodes=1)).master_addr == "127.0.0.1"  # mpirun -np 1


def test_deepspeed_impi_runner_sets_rank_that_agrees_with_hydra():
    """--launcher impi/mpich: RANK, LOCAL_RANK per rank (-env / launcher_helper), WORLD_SIZE, LOCAL_SIZE,
    MASTER_ADDR, MASTER_PORT for all (-genv), on top of hydra's own variables."""
    env = {**hydra_rank(5), "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_SIZE": "4",
           "MASTER_ADDR": "gpu001", "MASTER_PORT": "29500", "I_MPI_PIN": "0"}
    assert place(resolve(env)) == ("env", 5, 8, 1, 4, 1)


def test_srun_pmi2_variables_belong_to_the_srun_task():
    assert place(resolve(srun_task(5, PMI_RANK="5", PMI_SIZE="8", PMI_FD="7"))) == ("slurm", 5, 8, 1, 4, 1)


def test_not_listed_launcher_sets_the_torch_variables_and_a_node_index():
    env = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "3",
           "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    assert place(resolve(env)) == ("env", 6, 8, 0, 2, 3)
    assert resolve({k: v for k, v in env.items() if k != "NODE_RANK"}).node == 3  # RANK // LOCAL_WORLD_SIZE
    # its per-node process may run as an srun task: NODE_RANK says the variables are its own
    assert place(resolve({**srun_task(1, per_node=1), **env})) == ("env", 6, 8, 0, 2, 3)


# --------------------------------------------------------------- conflicting and partial sets

@pytest.mark.parametrize("env, names", [
    # a job script exported RANK/WORLD_SIZE, then srun started 8 tasks: each would be a job of its own
    ({**srun_task(3), "RANK": "0", "WORLD_SIZE": "1"}, ["RANK=0", "SLURM_PROCID=3", "unset RANK"]),
    ({**srun_task(3), "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
      "MASTER_ADDR": "a", "MASTER_PORT": "1"}, ["RANK=5", "SLURM_PROCID=3"]),
    ({**openmpi_rank(2), "RANK": "0", "WORLD_SIZE": "1"}, ["RANK=0", "OMPI_COMM_WORLD_RANK=2"]),
    ({**openmpi_rank(2), **hydra_rank(3), **DEEPSPEED_ENV_FILE}, ["OMPI_COMM_WORLD_RANK=2", "PMI_RANK=3"]),
    ({**openmpi_rank(2), **mvapich_rank(2, per_node=2), **DEEPSPEED_ENV_FILE},
     ["OMPI_COMM_WORLD_LOCAL_SIZE=4", "MV2_COMM_WORLD_LOCAL_SIZE=2"]),
    ({"RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "LOCAL_SIZE": "8",
      "MASTER_ADDR": "a", "MASTER_PORT": "1"}, ["LOCAL_WORLD_SIZE=4", "LOCAL_SIZE=8"]),
])
def test_conflicting_variables_are_refused_with_their_names(env, names):
    with pytest.raises(LaunchError) as err:
        resolve(env)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("env, names", [
    ({"RANK": "1"}, ["RANK=1", "WORLD_SIZE"]),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, ["LOCAL_WORLD_SIZE or LOCAL_SIZE", "MASTER_ADDR",
                                                          "MASTER_PORT"]),
    ({"WORLD_SIZE": "4"}, ["WORLD_SIZE=4", "RANK"]),
    ({"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"}, ["SLURM_PROCID=1", "SLURM_NTASKS"]),
    ({k: v for k, v in srun_task(2).items() if "TASKS_PER_NODE" not in k}, ["SLURM_STEP_TASKS_PER_NODE"]),
    ({k: v for k, v in srun_task(2).items() if "NODELIST" not in k}, ["SLURM_STEP_NODELIST", "MASTER_ADDR"]),
    ({k: v for k, v in openmpi_rank(2).items() if k != "OMPI_COMM_WORLD_LOCAL_SIZE"},
     ["OMPI_COMM_WORLD_LOCAL_SIZE"]),
    ({"PMI_RANK": "2", "PMI_SIZE": "4"}, ["MPI_LOCALRANKID", "MPI_LOCALNRANKS"]),
    (srun_task(3, SLURM_LOCALID="4"), ["SLURM_LOCALID=4", "SLURM_STEP_TASKS_PER_NODE=4"]),
    ({**torchrun_rank(1, 0), "RANK": "x"}, ["RANK='x'"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "0", "MASTER_ADDR": "a",
      "MASTER_PORT": "1"}, ["LOCAL_WORLD_SIZE=0"]),
])
def test_partial_variables_are_refused_with_their_names(env, names):
    with pytest.raises(LaunchError) as err:
        resolve(env)
    for name in names:
        assert name in str(err.value)


def test_node_layout_check():
    check_node_layout([(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)], "slurm")
    check_node_layout([(0, 0, 2), (1, 0, 2), (0, 1, 2), (1, 1, 2)], "slurm")  # srun -m cyclic: fine
    # mpirun --map-by node puts ranks 0 and 1 on different hosts; rank // local size says the same node
    with pytest.raises(LaunchError, match=r"OMPI_COMM_WORLD_RANK // OMPI_COMM_WORLD_LOCAL_SIZE.*--map-by slot"):
        check_node_layout([(0, 0, 2), (0, 0, 2), (1, 1, 2), (1, 1, 2)], "openmpi")
    with pytest.raises(LaunchError, match="SLURM_NODEID"):
        check_node_layout([(0, 0, 3), (0, 1, 3)], "slurm")


@pytest.mark.parametrize("local_rank, visible, index", [
    (0, 1, 0), (3, 1, 0),   # srun --gpus-per-task=1 / a per-rank CUDA_VISIBLE_DEVICES: its one GPU
    (0, 8, 0), (3, 8, 3),   # every GPU of the node visible (deepspeed, torchrun, mpirun): cuda:local_rank
    (1, 2, 1),
])
def test_device_index(local_rank, visible, index):
    assert device_index(local_rank, visible) == index


def test_device_index_refuses_more_local_ranks_than_gpus():
    with pytest.raises(LaunchError, match="local rank 4 but only 4 GPUs"):
        device_index(4, 4)
    with pytest.raises(ValueError):
        device_index(0, 0)


def test_export_env_writes_torchs_variables(monkeypatch):
    monkeypatch.setattr(launcher, "_joined", None)
    env = {"MASTER_ADDR": "stale"}
    written = export_env(resolve(srun_task(6)), env)
    assert env == {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "gpu001", "MASTER_PORT": str(slurm_port(SBATCH))}
    assert launcher.joined() == written and written.node == 1
    env = {"MASTER_ADDR": "stale"}
    export_env(resolve(openmpi_rank(1), mpi4py=True), env)  # MPI discovery fills MASTER_ADDR in
    assert "MASTER_ADDR" not in env and env["MASTER_PORT"] == "29500"
    env = {}
    assert export_env(PLAIN, env).master_port == int(env["MASTER_PORT"]) > 0


# --------------------------------------------------------------- real jobs: 4 processes, 2 fake nodes

LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_", "MPI_LOCAL", "TORCHELASTIC_", "ROLE_", "GROUP_",
                     "CROSS_")
LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "NODE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "ENVIRONMENT"}
# One interpreter, started without any launcher variable, imports torch, deepspeed and torchvision once
# (~10 s on the CI machine), then forks each job's ranks and gives each exactly its launcher's variables.
_JOBS = """
import json, multiprocessing as mp, os, sys, time
import torch.distributed as dist
from pipeline.config import ModelConfig
from pipeline.distributed.job import init_distributed
from pipeline.distributed.norm import build_bn_group

def rank(env):
    os.environ.update(env)  # on top of an environment free of launcher variables
    info = init_distributed()
    try:
        _, layout = build_bn_group(ModelConfig(bn_group="node"), micro_batch=1)
        result = [info.launcher, dist.get_rank(), dist.get_world_size(), info.local_rank, info.local_world,
                  info.node, layout]
        os.write(1, f"RESULT {json.dumps(result)}\\n".encode())  # one write: lines of ranks do not interleave
    finally:
        dist.destroy_process_group()

for job in json.loads(sys.argv[1]):
    procs = [mp.get_context("fork").Process(target=rank, args=(env,), daemon=True) for env in job]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120  # a hang fails the test instead of stalling CI
    for p in procs:
        p.join(timeout=max(deadline - time.monotonic(), 0))
        if p.exitcode != 0:
            for q in procs:
                q.kill()
            sys.exit(f"a rank failed or hung (exit code {p.exitcode})")
"""


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    # CPU and gloo even on a GPU machine: 4 ranks on one GPU would be refused by NCCL
    return dict(env, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")


def _fake_srun(task: int, port: int) -> dict:
    """srun -n 4 on two nodes (127.0.0.1 and .2, both this machine), MASTER_PORT from the job script."""
    return {**srun_task(task, nodes=2, per_node=2), "SLURM_STEP_NODELIST": "127.0.0.[1-2]",
            "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "SLURM_NODELIST": "127.0.0.[1-2]", "MASTER_PORT": str(port)}


def _fake_mpirun(rank: int, port: int) -> dict:
    """mpirun -np 4 -H a:2,b:2 -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=<port>."""
    return {**openmpi_rank(rank, per_node=2, nodes=2), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def test_srun_and_mpirun_ranks_form_one_job_with_node_bn_groups():
    jobs = [[fake(i, port) for i in range(4)] for fake, port in
            ((_fake_srun, free_port()), (_fake_mpirun, free_port()))]
    proc = subprocess.run([sys.executable, "-c", _JOBS, json.dumps(jobs)], cwd=REPO, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    expected = [[name, i, 4, i % 2, 2, i // 2, [[0, 1], [2, 3]]] for name in ("openmpi", "slurm") for i in range(4)]
    assert results == expected
