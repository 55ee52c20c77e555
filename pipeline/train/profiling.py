"""A profile of a window of iterations on request, and a memory snapshot when CUDA runs out of memory.

``train.profile=[first, last]`` profiles the iterations numbered ``first``..``last`` (as the log numbers
them) on every rank: a ``torch.profiler`` trace per rank (Chrome / Perfetto JSON, open it in
ui.perfetto.dev), the top 15 operators by self time (file and log), and the host syncs of the same
iterations by source line (``pipeline.utils.host_syncs``). Both cost time (the counter sees every
torch call in Python, and compiled code runs eagerly under it): the window's iterations are slower
than the others, and the log's throughput for that window says so.

On CUDA the allocator records its history from the start (``train.oom_snapshot``); an out-of-memory
error writes a snapshot (open it in pytorch.org/memory_viz) and the error names it; the command
(``pipeline/tools/train.py``) adds the memory planner's estimate for the same config.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch

from pipeline.utils.host_syncs import HostSyncCounter

log = logging.getLogger(__name__)
TOP_ROWS = 15


class WindowProfiler:
    """``before(it)`` / ``after(it)`` around each iteration ``it`` (1-based); records iterations
    ``first``..``last`` of ``window`` (None: does nothing). ``close()`` ends a window cut short."""

    def __init__(self, window: Optional[tuple[int, int]], out_dir: Path, rank: int, device: torch.device):
        self.window, self.out_dir, self.rank, self.device = window, out_dir, rank, device
        self._stack: Optional[contextlib.ExitStack] = None

    def before(self, it: int) -> None:
        if self.window is None or it != self.window[0]:
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._stack = contextlib.ExitStack()
        self._prof = self._stack.enter_context(profile(activities=acts))
        self._syncs = self._stack.enter_context(HostSyncCounter())

    def after(self, it: int) -> None:
        if self._stack is not None and it >= self.window[1]:
            self.close()

    def close(self) -> None:
        if self._stack is None:
            return
        stack, self._stack = self._stack, None
        stack.close()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank{self.rank}.trace.json"
        self._prof.export_chrome_trace(str(trace))
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self._prof.key_averages().table(sort_by=key, row_limit=TOP_ROWS)
        syncs = "\n".join(f"{n:6d}  {site}  ({call})" for site, n, call in self._syncs.report())
        first, last = self.window
        (self.out_dir / f"rank{self.rank}_top{TOP_ROWS}.txt").write_text(table)
        (self.out_dir / f"rank{self.rank}_host_syncs.txt").write_text(syncs + "\n")
        if self.rank == 0:
            kind = "synchronisations" if self.device.type == "cuda" else "calls that would synchronise on CUDA"
            log.info("profile of iterations %d-%d: trace %s (one per rank); top %d by %s:\n%s\n%d host %s:\n%s",
                     first, last, trace, TOP_ROWS, key, table, self._syncs.total, kind, syncs or "  none")


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory in a training step; the message names the snapshot and the plan."""


def record_memory_history(device: torch.device, enabled: bool) -> None:
    """Start the CUDA allocator's history (stack traces of live blocks) for an OOM snapshot."""
    if enabled and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=100_000)


def oom_report(err: BaseException, out_dir: Path, rank: int, device: torch.device) -> OutOfMemory:
    """The error to raise for a CUDA out-of-memory ``err``: a snapshot written where the allocator
    recorded its history (``launch/train.py`` adds what the memory planner expects of the config)."""
    lines = [f"rank {rank} ran out of memory on {device}: {str(err).splitlines()[0]}"]
    if device.type == "cuda":
        out_dir.mkdir(parents=True, exist_ok=True)
        snapshot = out_dir / f"rank{rank}.pickle"
        try:
            torch.cuda.memory._dump_snapshot(str(snapshot))
            lines.append(f"memory snapshot: {snapshot} (drag it into https://pytorch.org/memory_viz)")
        except Exception as dump_err:  # the snapshot is a help, not a condition: keep the OOM the error
            lines.append(f"no memory snapshot ({dump_err})")
    lines.append("lower train.micro_batch (raise train.grad_accum to keep the global batch), enable "
                 "model.activation_checkpointing, or move to a higher ZeRO stage")
    return OutOfMemory("\n".join(lines))
