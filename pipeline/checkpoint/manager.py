"""Checkpoints on disk: save, mark complete, choose one to resume, prune old ones, diagnose damage.

A checkpoint is DeepSpeed's tag directory (``iter_00001000``: model, ZeRO shards) plus each
rank's RNG state and our ``complete.json``, written by rank 0 only after every rank has
finished writing. DeepSpeed's own ``latest`` pointer is written by rank 0 *before* the other
ranks' shards are done, so a crash in that window leaves it naming a partial checkpoint:
resume therefore picks the newest checkpoint that has the marker, never ``latest`` by itself.

The marker also records the launch shape (ranks, micro-batch, accumulation, ZeRO stage): a run
resumed on another number of ranks must keep the saved global batch (so the schedule, the lr
and the data position stay the saved run's), and is refused with the fix when it cannot. ZeRO-0
checkpoints load on any number of ranks as they are; ZeRO 1-3 shards go through DeepSpeed's
universal format first (``pipeline.checkpoint.reshard``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from pipeline.checkpoint import reshard
from pipeline.config import ExperimentConfig
from pipeline.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

MARKER = "complete.json"


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes, and whether it loads through the universal format (ZeRO 1-3
    shards saved by another number of ranks; the engine is then built ``with_universal_load``)."""

    tag: str
    universal: bool = False


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:08d}"


def _iteration_of(tag: str) -> int:
    return int(tag.split("_")[-1])


def _tags(ckpt_dir: Path) -> list[str]:
    """Every checkpoint directory, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("iter_")
                   and p.name.split("_")[-1].isdigit()), key=_iteration_of)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The checkpoints every rank finished writing, oldest first."""
    return [t for t in _tags(ckpt_dir) if (ckpt_dir / t / MARKER).is_file()]


# ---------------------------------------------------------------------------- saving

def _rng_state() -> dict:
    """This process's RNG states as tensors and plain values (the file reads with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _read_rng_file(path: Path) -> dict:
    """An RNG file, read as tensors only. Files written before the states were kept as tensors hold
    numpy's key array pickled: for those, numpy's array reconstruction (and nothing else) is allowed."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct  # numpy 2 or 1
        allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct,
                   (reconstruct, "numpy.core.multiarray._reconstruct")]
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{path}: refused: it holds more than RNG states (reading it would need a full "
                                  f"unpickler: {str(err).splitlines()[-3][:200]}); delete the file to resume without "
                                  "it (the run will not be bit-identical)") from None


def launch_shape(cfg: ExperimentConfig, world: int, zero_stage: int) -> dict:
    """What a resumed run must agree with (recorded in the marker)."""
    return {"world_size": world, "micro_batch": cfg.train.micro_batch, "grad_accum": cfg.train.grad_accum,
            "global_batch": world * cfg.train.micro_batch * cfg.train.grad_accum, "zero_stage": zero_stage}


def save(engine, ckpt_dir: Path, iteration: int, client_state: dict[str, Any], shape: dict, keep: int) -> bool:
    """Engine state (ZeRO shards included) and each rank's RNG state; then, once every rank is done,
    the completeness marker, and the checkpoints beyond the newest ``keep`` complete ones are deleted.

    A checkpoint already marked complete is never written into (returns False): a rewrite cut short
    would leave damaged files under a complete marker, and a resumed run may have them memory-mapped.
    Rank 0's view of the marker decides for every rank (one filesystem, however cached)."""
    tag = tag_of(iteration)
    if is_complete(ckpt_dir, tag):
        log.info("checkpoint %s is already complete: not rewritten", ckpt_dir / tag)
        return False
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{dist.get_rank()}.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=dict(client_state, iteration=iteration))
    dist.barrier()  # every rank's files are written: only now is the checkpoint complete
    if dist.get_rank() == 0:
        mark_complete(ckpt_dir, tag, dict(shape, iteration=iteration))
        prune(ckpt_dir, keep)
    return True


def is_complete(ckpt_dir: Path, tag: str) -> bool:
    """Whether ``tag`` is marked complete, as rank 0 sees it, on every rank (call on every rank)."""
    done = [(ckpt_dir / tag / MARKER).is_file()]
    dist.broadcast_object_list(done, src=0)
    return done[0]


def mark_complete(ckpt_dir: Path, tag: str, record: dict) -> None:
    """Write the marker whole or not at all: a kill mid-write must not leave a half-written marker
    that makes the checkpoint look complete (a rename within one directory is atomic)."""
    staged = ckpt_dir / tag / (MARKER + ".tmp")
    staged.write_text(json.dumps(record, indent=2))
    os.replace(staged, ckpt_dir / tag / MARKER)


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete complete checkpoints older than the newest ``keep`` complete ones (rank 0).

    Never the one ``latest`` names, never an incomplete one (it may be another run's write in
    progress, or the evidence of a crash). Returns the deleted tags."""
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
    complete = complete_tags(ckpt_dir)
    doomed = [t for t in complete[:-keep] if t != latest]
    for tag in doomed:
        # The marker goes first: a deletion cut short leaves an incomplete checkpoint, never a complete-looking one.
        (ckpt_dir / tag / MARKER).unlink()
        shutil.rmtree(ckpt_dir / tag)
    if doomed:
        log.info("deleted %d old checkpoint(s) (train.keep_checkpoints=%d): %s", len(doomed), keep, doomed)
    return doomed


# ---------------------------------------------------------------------------- resuming

def retire_newer(ckpt_dir: Path, tag: Optional[str]) -> list[str]:
    """Move every checkpoint newer than ``tag`` (None: every one) aside (rank 0), into
    ``retired-<date-time>/``.

    A run resumed from ``tag`` abandons the trajectory those belong to: left in place, the next
    automatic resume would pick them up again, and a later save of the same iteration would write
    into them. Nothing is deleted; DeepSpeed's ``latest`` then names ``tag``. Returns the moved tags."""
    newer = [t for t in _tags(ckpt_dir) if tag is None or _iteration_of(t) > _iteration_of(tag)]
    if not newer:
        return []
    aside = ckpt_dir / f"retired-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    for t in newer:
        os.replace(ckpt_dir / t, aside / t)
    if tag is None:
        (ckpt_dir / "latest").unlink(missing_ok=True)
    else:
        (ckpt_dir / "latest").write_text(tag)
    if tag is None:
        log.warning("starting afresh: the incomplete checkpoint(s) %s moved to %s", newer, aside)
    else:
        log.warning("resuming from %s abandons the newer checkpoint(s) %s: moved to %s", tag, newer, aside)
    return newer


def choose(ckpt_dir: Path, requested: Optional[str] = None) -> Optional[str]:
    """The checkpoint to resume: ``requested`` (``train.resume_from``) or the newest complete one;
    None when the directory holds no checkpoint at all."""
    complete = complete_tags(ckpt_dir)
    if requested is not None:
        if not (ckpt_dir / requested).is_dir():
            raise CheckpointError(f"train.resume_from={requested}: no such checkpoint in {ckpt_dir}; "
                                  f"complete ones: {complete or 'none'}")
        if requested not in complete:
            log.warning("%s has no %s: it may be incomplete (a save cut short); loading it as asked",
                        ckpt_dir / requested, MARKER)
        return requested
    if complete:
        latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
        if latest is not None and latest != complete[-1] and latest not in complete:
            log.warning("%s names %s, which was never completed (a save cut short): resuming from %s",
                        ckpt_dir / "latest", latest, complete[-1])
        return complete[-1]
    found = _tags(ckpt_dir)
    if found:  # e.g. an attempt killed during its first save: a retry starts afresh (retire_newer moves them)
        log.warning("%s holds checkpoints %s, none of them marked complete (%s; each was cut short): starting "
                    "afresh. train.resume_from=%s loads one anyway", ckpt_dir, found, MARKER, found[-1])
    return None


def saved_shape(ckpt_dir: Path, tag: str) -> Optional[dict]:
    marker = ckpt_dir / tag / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def check_resume_shape(saved: Optional[dict], cfg: ExperimentConfig, world: int, zero_stage: int, tag: str) -> None:
    """Refuse a resume that would change the global batch (and with it the lr and the data position)
    or the ZeRO stage; the message gives the fix."""
    if saved is None:
        return
    now = launch_shape(cfg, world, zero_stage)
    if now["global_batch"] != saved["global_batch"]:
        per_rank = cfg.train.micro_batch * world
        fix = (f"set train.grad_accum={saved['global_batch'] // per_rank}" if saved["global_batch"] % per_rank == 0
               else f"choose train.micro_batch x train.grad_accum = {saved['global_batch'] / world:g} per rank")
        raise ConfigError(
            f"checkpoint {tag} was trained at global batch {saved['global_batch']} ({saved['world_size']} ranks x "
            f"micro-batch {saved['micro_batch']} x accumulation {saved['grad_accum']}); resuming on {world} ranks "
            f"gives {now['global_batch']}, which would change the lr schedule and the data position: {fix}")
    if saved["zero_stage"] != zero_stage:
        raise ConfigError(f"checkpoint {tag} was saved under ZeRO stage {saved['zero_stage']}, this run uses "
                          f"stage {zero_stage}: resume with the saved stage (train.ds_config)")


def resume_point(ckpt_dir: Path, tag: str, cfg: ExperimentConfig, world: int, zero_stage: int) -> ResumePoint:
    """Check checkpoint ``tag`` against this launch and, when its ZeRO shards were saved by another
    number of ranks, convert it to the universal format (rank 0; a collective)."""
    saved = saved_shape(ckpt_dir, tag)
    check_resume_shape(saved, cfg, world, zero_stage, tag)
    if not reshard.needed(saved, world, zero_stage):
        return ResumePoint(tag)
    if dist.get_rank() == 0:
        log.info("checkpoint %s holds ZeRO-%d shards of %d ranks, this run has %d: resharding through "
                 "DeepSpeed's universal format", tag, zero_stage, saved["world_size"], world)
    reshard.prepare(ckpt_dir, tag)
    return ResumePoint(tag, universal=True)


def load(engine, ckpt_dir: Path, tag: str, universal: bool = False) -> dict:
    """Load checkpoint ``tag`` into ``engine`` and this rank's RNG state; returns the client state.
    ``universal``: from its universal copy (``resume_point`` made it; the engine was built for it).

    A damaged file (cut short by a crash or a full disk) is named, with the checkpoint to go back to."""
    try:
        client_state = (reshard.load(engine, ckpt_dir, tag, engine.zero_optimization_stage()) if universal
                        else engine.load_checkpoint(str(ckpt_dir), tag=tag)[1])
    except Exception as err:  # a damaged file (torch's zip reader, pickle, EOF errors), or not the files' fault
        damaged = _damaged(ckpt_dir, tag, err)
        if damaged is None:
            raise  # out of memory, an I/O error, a bug: its own error, which a retry may get past
        raise damaged from None
    if client_state is None:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} could not be loaded (see DeepSpeed's message above)")
    rng_file = ckpt_dir / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(_read_rng_file(rng_file))
    else:
        log.warning("%s has no RNG state for this rank: the resumed run will not be bit-identical", rng_file)
    return client_state


def _damaged(ckpt_dir: Path, tag: str, err: Exception) -> Optional[CheckpointError]:
    """The error for a failed load, naming the first file whose zip archive fails its CRC check;
    None when every file is intact (the failure is not the checkpoint's)."""
    bad = next((f for f in sorted((ckpt_dir / tag).glob("*.pt")) if not _intact(f)), None)
    before = [t for t in complete_tags(ckpt_dir) if _iteration_of(t) < _iteration_of(tag)]
    way_out = (f"resume from the one before with train.resume_from={before[-1]}" if before
               else "no earlier complete checkpoint exists: start afresh with train.resume=false")
    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if bad is None:
        return None
    return CheckpointError(f"checkpoint file {bad} is damaged ({reason}); it was probably cut short by a crash "
                           f"or a full disk. Delete it or {way_out}")


def _intact(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False
