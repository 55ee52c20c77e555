"""Every read and write of a private DeepSpeed attribute, in one place.

DeepSpeed has no public API for a few things this pipeline needs: changing gradient clipping
between steps (AGVM's clipping window), reading one parameter's optimizer state out of ZeRO's
flat partitions (AGVM-AdamW), a partitioned parameter's full size, and loading checkpoint
shards memory-mapped. Each function below names the DeepSpeed behaviour it relies on;
``tests/test_ds_internals.py`` fails when one of them stops working, and ``check_version``
refuses a DeepSpeed outside the range they were written and tested against. DeepSpeed
itself is imported only where it is used, so the config checks stay free of it.
"""

from __future__ import annotations

import os
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Iterator

import torch
from packaging.version import Version

# The DeepSpeed releases this module was written and tested against: [low, high).
TESTED_RANGE = ("0.19", "0.20")


def check_version(version: str | None = None) -> None:
    """Raise when the installed DeepSpeed is outside ``TESTED_RANGE``: the private attributes
    below may have moved, and a silently wrong clip or optimizer state is worse than a stop."""
    version = version or installed_version("deepspeed")
    low, high = TESTED_RANGE
    if not Version(low) <= Version(version) < Version(high):
        raise RuntimeError(
            f"DeepSpeed {version} is installed, but pipeline/distributed/ds_internals.py was written and tested against "
            f"DeepSpeed >={low},<{high}: install that range (pip install 'deepspeed>={low},<{high}'), or re-check "
            f"each function of pipeline/distributed/ds_internals.py against {version}, run tests/test_ds_internals.py and "
            "widen TESTED_RANGE")


# ---- ZeRO-3 partitioned parameters ----

def full_numel(param: torch.nn.Parameter) -> int:
    """Elements of the whole parameter; ZeRO-3 keeps the full size in ``ds_numel`` once
    ``zero.Init`` has partitioned it (``numel()`` is then 0 or the local shard)."""
    return getattr(param, "ds_numel", param.numel())


def count_parameters(model: torch.nn.Module) -> int:
    """All parameters, trainable or not, counting ZeRO-3-partitioned ones at their full size."""
    return sum(full_numel(p) for p in model.parameters())


@torch.no_grad()
def weights_finite(engine) -> torch.Tensor:
    """Whether every weight this rank holds is finite, as a bool tensor on the weights' device (no
    host sync). Under ZeRO-3 a rank holds its partitions (``ds_tensor``), the parameters are empty."""
    pieces = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    return torch.stack([t.isfinite().all() for t in pieces if t.numel()]).all()


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """True for a ZeRO-3 parameter (``zero.Init`` gives each one a ``ds_id``)."""
    return hasattr(param, "ds_id")


def gathered(params: list[torch.nn.Parameter]):
    """Full values of (possibly ZeRO-3-partitioned) parameters inside the context, read-only."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, enabled=any(is_partitioned(p) for p in params))


# ---- the client optimizer behind the engine ----

def client_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer handed to ``deepspeed.initialize``: ``engine.optimizer`` at fp32 ZeRO-0,
    otherwise the ``optimizer`` attribute of DeepSpeed's wrapper (ZeRO 1-3, BF16_Optimizer)."""
    wrapper = engine.optimizer
    return wrapper.optimizer if hasattr(wrapper, "optimizer") else wrapper


def skip_single_rank_allreduce(engine) -> bool:
    """Replace ZeRO-0's gradient all-reduce where the data-parallel group is this one rank; True if done.

    DeepSpeed still flattens every gradient into a bucket, "averages" it over the one rank and copies it
    back: on the embedded default's bf16 CPU step that was 10% of the time (``aten::cat`` in
    ``flatten_dense_tensors`` plus the copies back, ``train.profile``), for a mean that is the gradient
    itself. What the reduction does besides: it gives a trainable parameter without a gradient (unused in
    this step) a zero one, so momentum and weight decay still move it as they do on many ranks; the
    replacement keeps exactly that. Only with the torch optimizer itself (fp32 parameters, gradients in
    ``.grad``) and no MoE layers: DeepSpeed's bf16/fp16 wrappers keep their own gradient buffers. Relies on:
    the engine calls ``self.allreduce_gradients()`` after every backward (``_backward_epilogue``)."""
    if not (engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1 and not engine.has_moe_layers
            and engine.optimizer is client_optimizer(engine)):
        return False
    params = [p for p in engine.module.parameters() if p.requires_grad and p.numel()]

    def zero_fill_missing_gradients(*_args, **_kwargs) -> None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    engine.allreduce_gradients = zero_fill_missing_gradients
    return True


def set_gradient_clipping(engine, max_norm: float) -> None:
    """Change the engine's global-norm gradient clipping between steps (0 = off).

    Relies on: ZeRO-0 reads ``engine._config.gradient_clipping`` (through
    ``engine.gradient_clipping()``) at every step; the ZeRO 1-3 optimizers copy it once, at
    initialize, into their own ``clip_grad`` and read that at every step. Both are set, so the
    norm stays the engine's own, over all partitions.
    """
    engine._config.gradient_clipping = max_norm
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = max_norm


def full_optimizer_state(engine, params: list[torch.nn.Parameter], key: str) -> list[torch.Tensor]:
    """Each parameter's whole optimizer state ``key`` (e.g. AdamW's ``exp_avg_sq``), flat fp32, in
    ``params`` order; zeros before the first step. A collective under ZeRO >= 1: every rank calls it.

    Relies on: ZeRO 1/2 link their per-parameter views of the client optimizer's state lazily, once,
    right after the first parameter group's first step, when the other groups have no state yet
    (``_hp_optimizer_states_linked``); ``safe_get_full_optimizer_state`` then raises for every
    parameter outside group 0. Re-linking once every group has stepped fixes it.
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    client = client_optimizer(engine)
    if not client.state:  # no step taken yet: the state is zero, as for a fresh optimizer
        return [torch.zeros(full_numel(p), device=p.device) for p in params]
    if client is engine.optimizer:  # plain torch: the state is keyed by the parameters themselves
        return [client.state[p][key].reshape(-1).float() for p in params]
    wrapper = engine.optimizer
    if getattr(wrapper, "_hp_optimizer_states_linked", None) is not None:
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()
    return [safe_get_full_optimizer_state(p, key).reshape(-1).float() for p in params]


def local_optimizer_chunks(engine, params: list[torch.nn.Parameter], key: str, world: int, rank: int,
                           stage: int) -> list[torch.Tensor]:
    """This rank's chunk of each parameter's optimizer state ``key``: the flat state padded to a
    multiple of ``world``, elements [rank * c, (rank + 1) * c), c = ceil(numel / world), which is
    ZeRO-3's own partition; zeros before the first step. AGVM's sharded estimate reads AdamW's
    second moment so.

    ZeRO-3 and ZeRO-0 read it in place (the local partition; the whole local state). ZeRO 1/2
    partition the flat buffer of a whole parameter group, so another layout: each parameter's
    state is assembled there (``full_optimizer_state``, a collective), one parameter at a time.
    AGVM does not come here under ZeRO 1/2 when it can lay its shards out as their partitions
    (``Zero12Partitions.state_pieces``); this is the fallback (e.g. CPU offload).
    """
    from deepspeed.utils import safe_get_local_optimizer_state

    client = client_optimizer(engine)
    if not client.state:  # no step taken yet
        return [torch.zeros(-(-full_numel(p) // world), device=p.device) for p in params]
    if stage == 3:
        return [safe_get_local_optimizer_state(p, key).reshape(-1).float() for p in params]
    if client is engine.optimizer:
        return [_chunk(client.state[p][key].reshape(-1).float(), p.numel(), world, rank) for p in params]
    return [_chunk(full_optimizer_state(engine, [p], key)[0], full_numel(p), world, rank) for p in params]


def reduced_gradient_reader(engine, world: int, rank: int):
    """A function ``read(params)`` -> (an iterator of) this rank's chunk (AGVM's shard layout: the flat parameter
    padded to a multiple of ``world``, chunk ``rank``) of each parameter's gradient as DeepSpeed
    has already reduced it, the mean over the ranks; call it after the iteration's last backward,
    before ``engine.step()``. AGVM's estimate takes its S from it instead of reducing the tapped
    gradients a second time. None where DeepSpeed's reduced gradient is not laid out so:

    - ZeRO-3 (one partition group of every rank, no MiCS/hpZ): ``safe_get_local_grad`` is the rank's
      own partition of the parameter, exactly that chunk.
    - ZeRO-0 with the torch optimizer itself (fp32 parameters): every rank holds the whole mean
      gradient in ``.grad``.
    - ZeRO 1/2 partition the flat buffer of a whole parameter group (another layout: AGVM reads
      them through ``Zero12Partitions`` instead), and bf16 parameters at ZeRO-0 reduce through
      DeepSpeed's BF16_Optimizer: None.
    """
    stage = engine.zero_optimization_stage()
    zero = engine._config.zero_config
    if stage == 3 and getattr(zero, "mics_shard_size", -1) <= 0 and getattr(zero, "zero_hpz_partition_size", 1) <= 1:
        from deepspeed.utils import safe_get_local_grad

        def local(p):
            return safe_get_local_grad(p)
    elif stage == 0 and engine.optimizer is client_optimizer(engine):
        def local(p):
            return None if p.grad is None else _chunk(p.grad.reshape(-1), full_numel(p), world, rank)
    else:
        return None

    def read(params: list[torch.nn.Parameter]) -> Iterator[torch.Tensor]:
        for p in params:  # one parameter's chunk at a time: the caller decides what to keep
            size = -(-full_numel(p) // world)
            g = local(p)
            g = torch.zeros(size, device=p.device) if g is None else g.reshape(-1).float()
            yield g if g.numel() == size else torch.nn.functional.pad(g, (0, size - g.numel()))

    # ZeRO-3 reduces (and accumulates) after every backward, so mid-accumulation the partition is the
    # reduced sum of the micro-batches so far; ZeRO-0 reduces only at the accumulation boundary, and
    # so does ZeRO-3 with the optimizer offloaded: ``safe_get_local_grad`` then reads the host copy,
    # written at the boundary only (stage3's ``_offload_grad_partition_at_boundary``): stale before it
    read.each_backward = stage == 3 and not engine.zero_use_cpu_optimizer()
    return read


class Zero12Partitions:
    """ZeRO 1/2's gradient partitions as AGVM's shard layout, so that S is read from DeepSpeed's
    own reduced partition and only D needs a reduce-scatter (use ``zero12_partitions`` to build it).

    ZeRO 1/2 flatten each optimizer param group (``round_robin_bit16_groups[i]``, each parameter
    at ``round_robin_bit16_offsets[i]``, padded to W x ``partition_size[i]``) and give rank r
    elements [r P_i, (r + 1) P_i) of it. A module's shard row is the concatenation of its
    groups' partitions (AGVM's modules are unions of whole groups, ``pipeline.optim.optimizers``), so a
    parameter's flat gradient lands in one or more (row, column) segments of the module's
    [W, L] buffer. This rank's reduced gradient in that layout is what DeepSpeed's
    ``_hp_mapping`` fragments hold between the last backward and the step
    (``get_lp_grad_fragment``, the mean over the ranks, as ``safe_get_full_grad`` reads it before
    all-reducing), and the client optimizer's state of ``single_partition_of_fp32_groups[i]`` is
    aligned with it element for element (AGVM-AdamW's second moment, local, no collective).
    """

    def __init__(self, optimizer, groups: dict[str, list[int]]):
        self.optimizer, self.groups = optimizer, groups
        self.width: dict[str, int] = {}
        # parameter -> [(row, column, start in the parameter's flat gradient, length)]
        self.segments: dict[torch.nn.Parameter, list[tuple[int, int, int, int]]] = {}
        for name, indices in groups.items():
            column = 0
            for i in indices:
                size = int(optimizer.partition_size[i])
                for p, offset in zip(optimizer.round_robin_bit16_groups[i], optimizer.round_robin_bit16_offsets[i]):
                    self.segments[p] = _segments(offset, p.numel(), size, column)
                column += size
            self.width[name] = column

    def reduced_pieces(self, name: str) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor, int]]:
        """(parameter, its fragment of the mean gradient as DeepSpeed reduced it, the fragment's
        column in the module's row) for each parameter of module ``name`` with elements in this
        rank's partitions; the fragment is DeepSpeed's own tensor, not a copy."""
        opt, column = self.optimizer, 0
        for i in self.groups[name]:
            for p in opt.bit16_groups[i]:
                frag = p._hp_mapping
                if frag is None:  # no element of this parameter in this rank's partition
                    continue
                lp = frag.lp_fragment_address
                grad = frag.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
                if grad.numel() != lp.numel:  # a whole-parameter buffer: this rank's fragment of it
                    grad = grad.narrow(0, lp.start, lp.numel)
                yield p, grad, column + frag.get_hp_fragment_address().start
            column += int(opt.partition_size[i])

    def state_pieces(self, params: list[torch.nn.Parameter], key: str) -> torch.Tensor:
        """The client optimizer's state ``key`` on the fragments of ``params`` in this rank's
        partitions (``reduced_pieces``' order), flat; zeros before the first step."""
        opt, pieces = self.optimizer, []
        for p in params:
            frag = p._hp_mapping
            if frag is None:
                continue
            partition = opt.single_partition_of_fp32_groups[frag.param_group_index]
            state = opt.optimizer.state.get(partition, {}).get(key)
            hp = frag.get_hp_fragment_address()
            pieces.append(torch.zeros(hp.numel, device=partition.device) if state is None
                          else state.reshape(-1).narrow(0, hp.start, hp.numel).float())
        return torch.cat(pieces)


def _segments(offset: int, numel: int, size: int, column: int) -> list[tuple[int, int, int, int]]:
    """Where elements [0, numel) of a parameter at ``offset`` in a group flattened into rows of
    ``size`` go: (row, column + position in the row, start in the parameter, length) per row."""
    out, start = [], 0
    while start < numel:
        row, col = divmod(offset + start, size)
        length = min(numel - start, size - col)
        out.append((row, column + col, start, length))
        start += length
    return out


def zero12_partitions(engine, modules: dict[str, list[torch.nn.Parameter]], world: int) -> "Zero12Partitions | None":
    """``Zero12Partitions`` for a ZeRO 1/2 engine whose partitions AGVM can read; None otherwise
    (another stage, the BF16 optimizer of ZeRO-0, CPU offload, a data-parallel group other than
    the world, or a module that is not a union of whole param groups)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer) or opt.cpu_offload:
        return None
    if any(torch.distributed.get_world_size(group=g) != world for g in opt.real_dp_process_group):
        return None
    group_of = {id(p): i for i, ps in enumerate(opt.round_robin_bit16_groups) for p in ps}
    groups = {}
    for name, params in modules.items():
        indices = sorted({group_of[id(p)] for p in params if id(p) in group_of})
        if {id(p) for i in indices for p in opt.round_robin_bit16_groups[i]} != {id(p) for p in params}:
            return None
        groups[name] = indices
    return Zero12Partitions(opt, groups)


def _chunk(flat: torch.Tensor, numel: int, world: int, rank: int) -> torch.Tensor:
    """Elements [rank * c, (rank + 1) * c) of ``flat`` (c = ceil(numel / world)), zero-padded to c."""
    size = -(-numel // world)
    piece = flat[rank * size:(rank + 1) * size]
    return torch.nn.functional.pad(piece, (0, size - piece.numel()))


# ---- the CPU accelerator ----

def cpu_allreduce_segment(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU all-reduce creates for ``rank`` of this job."""
    return Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_cpu_allreduce_segment(rank: int) -> None:
    """Unlink this rank's segment of DeepSpeed's CPU all-reduce; call after the last collective.

    Relies on: when every rank is on one machine (``LOCAL_SIZE`` equals the world size, as the
    deepspeed launcher sets it), the CPU accelerator's shm op (``csrc/cpu/comm/shm.cpp``) creates a
    66 MB segment per rank, named after MASTER_ADDR/PORT and the rank, maps its peers' at
    initialisation and never unlinks it: every CPU run left 66 MB per rank in RAM-backed /dev/shm
    (16 GB after a day of tests). Mappings outlive the unlink, so peers still finishing are unaffected.
    """
    cpu_allreduce_segment(rank).unlink(missing_ok=True)


# ---- checkpoints ----

def load_checkpoints_memory_mapped(engine) -> bool:
    """Read checkpoint shards memory-mapped (``torch.load(mmap=True)``) instead of into a second
    in-RAM copy beside the live engine (2.3 GB per rank for the 1.1B-parameter detector's fp32
    partition). Returns whether it applies.

    Relies on: ``engine.checkpoint_engine`` is DeepSpeed's ``TorchCheckpointEngine`` whose ``load``
    is a plain ``torch.load`` of each file, and which writes zip-format files (its
    ``zipfile_serialization``, on by default), the format mmap needs.
    """
    ce = engine.checkpoint_engine
    if type(ce).__name__ != "TorchCheckpointEngine" or not getattr(ce, "zipfile_serialization", False):
        return False

    def load(path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False, mmap=True)

    ce.load = load
    return True


def repair_zero3_universal_load(engine, saved_param_groups: list[dict], renames: dict[str, str],
                                drop: tuple[str, ...]) -> None:
    """Undo what DeepSpeed's ZeRO-3 universal loader gets wrong, right after ``load_checkpoint``.

    Relies on: ``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``
    (0.19.8) (1) stores one and the same ``step`` tensor in every flat sub-group's state, which
    AdamW increments in place once per group; (2) overwrites every param group's hyper-parameters
    with the saved group 0's; (3) loads the state files ``exp_avg``/``exp_avg_sq`` only, so any other
    state arrives under those names (``renames`` maps them back, ``drop`` removes the stand-ins).
    The client optimizer keeps one param group per saved group, each now holding flat sub-groups.
    """
    client = client_optimizer(engine)
    if len(client.param_groups) != len(saved_param_groups):
        raise RuntimeError(f"the checkpoint has {len(saved_param_groups)} optimizer param groups, this run "
                           f"{len(client.param_groups)}: the optimizer config differs from the saved run's")
    for state in client.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
        for old, new in renames.items():
            state[new] = state.pop(old)
        for key in drop:
            state.pop(key, None)
    for group, saved in zip(client.param_groups, saved_param_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
