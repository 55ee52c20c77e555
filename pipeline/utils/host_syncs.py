"""Count the operations that make the host wait for the GPU, and name the line that asked for each.

On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` reports real synchronisations. It needs a GPU,
and it does not say whose code asked. ``HostSyncCounter`` works on any device: a
``TorchFunctionMode`` that sees every torch call and records those that synchronise on CUDA, by
the first source line outside torch itself (ours, torchvision's, DeepSpeed's). On CPU the count
is a proxy (nothing waits there), labelled so wherever it is reported.

What counts (each waits for the device to finish, or has an output size only the device knows):
reading a value (``item``, ``tolist``, ``bool``/``int``/``float`` of a tensor, ``numpy``), a copy
to the host (``cpu``; ``to("cpu")`` of a tensor not on the host, so a CPU run misses that one), and
the data-dependent shapes (``nonzero``, one-argument
``where``, ``masked_select``, ``unique``, boolean-mask indexing, ``repeat_interleave`` with tensor
repeats and no ``output_size``, torchvision's ``nms``).

Compiled code (``torch.compile``) runs eagerly while the counter is active: a torch-function mode on
the stack fails the compiled graphs' guards, and each would be compiled again just to be counted
(on CPU that recompile took longer than the iteration being measured). Eagerly, every call the
compiled region makes is seen, including those the compiler would have turned into graph breaks.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

_ALWAYS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero",
           "argwhere", "masked_select", "unique", "unique_consecutive", "nms", "_unique2"}
_TORCH_DIR = str(Path(torch.__file__).parent) + os.sep  # with the separator: torchvision is not torch
_THIS_FILE = str(Path(__file__).resolve())


def _is_bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in items)


def is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the torch call ``name(*args, **kwargs)`` synchronises with a CUDA device."""
    if name in _ALWAYS:
        return True
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
        return len(args) > 1 and _is_bool_mask(args[1])
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return torch.is_tensor(repeats) and repeats.numel() > 1 and kwargs.get("output_size") is None
    if name == "to":  # a copy to the host; not a tensor already there (a no-op, on any device)
        target = next((a for a in list(args[1:]) + [kwargs.get("device")] if isinstance(a, (str, torch.device))), None)
        source = args[0] if args and torch.is_tensor(args[0]) else None
        return (target is not None and torch.device(target).type == "cpu"
                and (source is None or source.device.type != "cpu"))
    return False


def _caller() -> str:
    """``file:line`` of the innermost frame that is not torch's own code (nor this module)."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_TORCH_DIR) and filename != _THIS_FILE:
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<torch>"


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as syncs: ...`` then ``syncs.sites`` (``file:line`` -> count)."""

    def __init__(self):
        super().__init__()
        self.sites: Counter = Counter()
        self.ops: Counter = Counter()
        self.site_ops: dict[str, str] = {}  # the call made at each site (the last one seen)
        self._eager = torch.compiler.set_stance("force_eager")

    def __enter__(self):
        self._eager.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._eager.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if is_sync(name, args, kwargs):
            site = _caller()
            self.sites[site] += 1
            self.ops[name] += 1
            self.site_ops[site] = name
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def in_files_under(self, *roots: Path) -> Counter:
        """The sites whose file lies under one of ``roots``."""
        prefixes = tuple(str(Path(r).resolve()) for r in roots)
        return Counter({site: n for site, n in self.sites.items() if site.startswith(prefixes)})

    def by_package(self) -> Counter:
        """Counts per top-level package (torchvision, deepspeed, pipeline, models, ...)."""
        out: Counter = Counter()
        for site, n in self.sites.items():
            parts = Path(site.rsplit(":", 1)[0]).parts
            out[next((p for p in PACKAGES if p in parts), "other")] += n
        return out

    def report(self) -> list[tuple[str, int, str]]:
        """(site relative to its package, count, the call) per site, most frequent first."""
        return [(short_site(site), n, self.site_ops.get(site, "")) for site, n in self.sites.most_common()]


PACKAGES = ("torchvision", "deepspeed", "timm", "pipeline", "models")


def short_site(site: str) -> str:
    """A source line relative to its package: .../site-packages/torchvision/ops/boxes.py:54 -> torchvision/ops/boxes.py:54."""
    parts = Path(site).parts
    for root in PACKAGES:
        if root in parts:
            return str(Path(*parts[parts.index(root):]))
    return site
