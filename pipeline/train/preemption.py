"""Preemption: a scheduler's warning signal ends the run at a step boundary with a checkpoint.

SLURM (``#SBATCH --signal=USR1@120``), Kubernetes and most batch systems send SIGTERM or a user
signal some time before they kill a job. The handler only records it; the ranks then agree at the
next log step (an all-reduce the loop already pays for its loss window, so no extra host sync), save
a complete checkpoint there, and every rank exits with ``EXIT_PREEMPTED``: "requeue me", which
``launch/slurm.sbatch`` answers with ``scontrol requeue``. The requeued job resumes from that
checkpoint exactly.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 4
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The job was asked to stop; a complete checkpoint of ``iteration`` is on disk."""

    agreed = True  # every rank raises it together (pipeline.distributed.watchdog publishes no such error)
    exit_status = EXIT_PREEMPTED

    def __init__(self, iteration: int, signum: int):
        super().__init__(f"preempted by {signal.Signals(signum).name}: checkpoint at iteration {iteration} saved; "
                         f"resume with train.resume=auto (exit status {EXIT_PREEMPTED}: requeue me)")
        self.iteration, self.signum = iteration, signum


class PreemptionWatch:
    """Records SIGTERM/SIGUSR1 while installed (``with``); ``agreed`` asks every rank."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> "PreemptionWatch":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0: none), the same on every rank (call on every rank)."""
        flag = torch.tensor([float(self.signum)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
