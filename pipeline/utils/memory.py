"""Per-rank memory: measure it (peak since a reset, on CUDA or CPU) and plan it before a run.

Measuring: on CUDA the peak is the caching allocator's ``max_memory_allocated`` (what
tensors hold, without the CUDA context); on CPU it is the process's peak resident set
(``VmHWM``), which the kernel resets when asked (``/proc/self/clear_refs``), so a phase
of a run can be measured on its own. glibc keeps freed blocks below its mmap threshold (up
to 32 MiB) in its heap, so the resident set can sit well above live memory:
``release_free_heap`` hands what it can back, and ``pin_mmap_threshold`` (or
``MALLOC_MMAP_THRESHOLD_`` for a child process) makes freed tensors leave at once, at a
cost in speed that is fine for probes and measurements and not for training.

Planning (``python launch/plan.py``) lives in ``pipeline.tools.planner``.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
CPU_MMAP_THRESHOLD = 2**20  # 1 MiB: freed tensors of this size and above go back to the kernel
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def release_free_heap() -> None:
    """Return glibc's freed-but-kept heap to the kernel (no-op where glibc is absent)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def pin_mmap_threshold(threshold: int = CPU_MMAP_THRESHOLD) -> None:
    """A fixed glibc mmap threshold for this process (measured: the default CPU run is 40% slower)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD; a fixed value stops its drift
    except (OSError, AttributeError):
        pass


def current_memory(device: torch.device) -> int:
    """Bytes held now: allocated tensors on CUDA, the resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status_kib("VmRSS") * 1024


def peak_memory(device: torch.device) -> int:
    """Peak bytes since the last ``reset_peak_memory`` (or process start)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak from what is held now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_free_heap()
    try:
        _CLEAR_REFS.write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass  # not Linux, or not allowed: the peak then runs from process start (an overestimate)
