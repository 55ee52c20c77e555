"""One job per run directory: an exclusive lock file beside it.

A scheduler that requeues a job while the old one still runs, or a stray second launch, would give
two writers of the same checkpoints (a mixed checkpoint marked complete) and could move a live run
aside (``archive_previous_run``). Rank 0 takes ``<output_dir>/.<run_name>.lock`` with ``O_EXCL``
before anything is written and records its owner (host, pid, scheduler job id, start time). A lock
left by a process that is gone on this host is taken over, with a warning; one held by a live
process, or by any process on another host (whose liveness this host cannot see), is refused
with its owner named. The lock sits beside the run directory, not in it, so that moving an
earlier run aside does not move the lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch.distributed as dist

log = logging.getLogger(__name__)

JOB_ID_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")


class RunLocked(RuntimeError):
    """Another process holds the run directory (exit status 1: a retry after it ends can succeed)."""


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


def _owner() -> dict:
    job = next((os.environ[v] for v in JOB_ID_VARS if os.environ.get(v)), None)
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _describe(owner: dict) -> str:
    job = f", job {owner['job_id']}" if owner.get("job_id") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}, since {owner.get('started')}"


def acquire(run_dir: Path) -> Path:
    """Take the lock of ``run_dir`` for this process; RunLocked naming the owner when it is held."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _owner()
    for _ in range(2):  # a second try after taking over a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner is None or owner.get("host") != me["host"] or _alive(int(owner.get("pid", -1))):
                what = _describe(owner) if owner else "an unreadable lock"
                raise RunLocked(f"{run_dir} is in use by {what} ({path}). Wait for that job to end; if it is gone "
                                "(a host that died), delete the lock file and relaunch") from None
            log.warning("%s was left by %s, which is gone: taking it over", path, _describe(owner))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise RunLocked(f"{path}: another process took the lock while a stale one was replaced; relaunch")


def release(run_dir: Path) -> None:
    """Drop the lock if this process holds it."""
    path = lock_path(run_dir)
    owner = _read(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def held(run_dir: Path, rank: int) -> Iterator[None]:
    """The lock of ``run_dir`` for the job: rank 0 takes it, and every rank raises RunLocked together
    when it is held elsewhere (no rank is left waiting in a collective); released on the way out."""
    error = [None]
    if rank == 0:
        try:
            acquire(run_dir)
        except RunLocked as err:
            error = [str(err)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RunLocked(error[0])
    try:
        yield
    finally:
        if rank == 0:
            release(run_dir)
