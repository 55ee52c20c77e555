"""Count what a process sends over ``torch.distributed``: every collective, by operation, group and scope.

A 512-GPU run cannot be tried here; what every run here can do is count exactly what goes over the
wire, and the communication of a larger run follows from the same counts (bytes per collective do not
depend on how many ranks there are, only on the group sizes and the partitioning). ``CommCounter``
wraps torch.distributed's collectives for the duration of a ``with`` block and records, per call,
the operation, the payload in bytes (the tensor this rank contributes: for an all-reduce the whole
tensor, for a reduce-scatter its input, for an all-gather its output shard), the group's size and its
scope: inside one node (every rank of the group on this rank's node) or across nodes. DeepSpeed
calls torch.distributed through ``deepspeed.comm``, which looks most functions up at call time and
binds two at start-up (its all-gather and reduce-scatter of flat tensors, wrapped here on its backend
object), so its collectives are counted too; so are ours (cross-GPU BN, AGVM, the loss and log
reductions, evaluation's gathers, the checkpoint's barrier) and torch's object collectives
(``broadcast_object_list``, ``gather_object``), at the tensors they send: the sizes, then the pickled bytes.

The payload is what the algorithm is given, not what a ring or a tree puts on each link: a ring
all-reduce of B bytes over n ranks sends 2 B (n - 1) / n per rank; the factor is the step-time
model's business, not the count's.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

# collective -> (position, keyword) of this rank's payload, and of the group (torch.distributed's signatures)
_PAYLOAD = {
    "all_reduce": ((0, "tensor"), (2, "group")),
    "reduce": ((0, "tensor"), (3, "group")),
    "broadcast": ((0, "tensor"), (2, "group")),
    "reduce_scatter_tensor": ((1, "input"), (3, "group")),
    "all_gather_into_tensor": ((1, "input_tensor"), (2, "group")),
    "all_gather": ((1, "tensor"), (2, "group")),
    "reduce_scatter": ((1, "input_list"), (3, "group")),
    "all_to_all_single": ((1, "input"), (5, "group")),
    "send": ((0, "tensor"), (2, "group")),
    "recv": ((0, "tensor"), (2, "group")),
    "isend": ((0, "tensor"), (2, "group")),
    "irecv": ((0, "tensor"), (2, "group")),
    "all_to_all": ((1, "input_tensor_list"), (2, "group")),
    "gather": ((0, "tensor"), (3, "group")),
    "scatter": ((1, "scatter_list"), (3, "group")),
    "all_reduce_coalesced": ((0, "tensors"), (2, "group")),
    "all_gather_coalesced": ((1, "input_tensor_list"), (2, "group")),
    # torch 2.14's names of the flat-tensor collectives (the old names stay as separate functions)
    "reduce_scatter_single": ((1, "input"), (3, "group")),
    "all_gather_single": ((1, "input_tensor"), (2, "group")),
    "gather_single": ((0, "tensor"), (3, "group")),
    "gather_into_tensor": ((0, "tensor"), (3, "group")),
    "barrier": ((None, None), (0, "group")),  # no payload: counted as a call of 0 bytes
}
# a renamed collective is counted under its older name, so tables (and the plan) do not depend on the torch version
_CANONICAL = {"reduce_scatter_single": "reduce_scatter_tensor", "all_gather_single": "all_gather_into_tensor",
              "gather_single": "gather", "gather_into_tensor": "gather"}


@dataclass(frozen=True)
class Key:
    op: str
    group_size: int
    scope: str  # "intra-node" or "inter-node"
    dtype: str


def _payload_bytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_payload_bytes(v) for v in value)
    return 0


def _dtype(value) -> str:
    if torch.is_tensor(value):
        return str(value.dtype).replace("torch.", "")
    if isinstance(value, (list, tuple)) and value:
        return _dtype(value[0])
    return "-"


class CommCounter:
    """``with CommCounter(local_world) as c:`` ... then ``c.calls`` and ``c.bytes`` per ``Key``.

    ``local_world``: ranks per node (a group is intra-node when all its ranks share this rank's node,
    node = rank // local_world). Nested and re-entered use is not supported."""

    def __init__(self, local_world: Optional[int] = None):
        self.local_world = local_world or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.calls: dict[Key, int] = defaultdict(int)
        self.bytes: dict[Key, int] = defaultdict(int)
        self._saved: list[tuple[object, str, object]] = []  # (owner, attribute, original)
        self._inside = threading.local()  # counting one collective: the ones it calls are part of it

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def _scope(self, group) -> tuple[int, str]:
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        nodes = {r // self.local_world for r in ranks}
        return len(ranks), "intra-node" if len(nodes) == 1 else "inter-node"

    def _wrap(self, name: str, original):
        (index, keyword), (group_index, _) = _PAYLOAD[name]

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if getattr(self._inside, "active", False):  # a collective implemented by another (torch's old names call the new)
                return original(*args, **kwargs)
            payload = None if index is None else kwargs.get(keyword, args[index] if len(args) > index else None)
            group = kwargs.get("group", args[group_index] if len(args) > group_index else None)
            size, scope = self._scope(group)
            key = Key(_CANONICAL.get(name, name), size, scope, _dtype(payload))
            self.calls[key] += 1
            self.bytes[key] += _payload_bytes(payload)
            self._inside.active = True
            try:
                return original(*args, **kwargs)
            finally:
                self._inside.active = False

        return counted

    def _patch(self, owner, attribute: str, op: str) -> None:
        original = getattr(owner, attribute, None)
        if original is not None:
            self._saved.append((owner, attribute, original))
            setattr(owner, attribute, self._wrap(op, original))

    def __enter__(self) -> "CommCounter":
        for name in _PAYLOAD:
            original = getattr(dist, name, None)
            self._patch(dist, name, name)
            # torch's object collectives (gather_object, broadcast_object_list, ...) call these through
            # distributed_c10d's own globals: wrapped there too, each call is counted once, at the tensor
            # level that goes over the wire (a size exchange, then the pickled bytes)
            if original is not None and getattr(distributed_c10d, name, None) is original:
                self._patch(distributed_c10d, name, name)
        backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)  # DeepSpeed's bound functions
        self._patch(backend, "all_gather_function", "all_gather_into_tensor")
        self._patch(backend, "reduce_scatter_function", "reduce_scatter_tensor")
        return self

    def __exit__(self, *exc) -> None:
        for owner, attribute, original in reversed(self._saved):
            setattr(owner, attribute, original)
        self._saved.clear()

    def table(self, per: int = 1) -> list[dict]:
        """One row per (operation, group size, scope, dtype): calls and bytes, divided by ``per``
        (e.g. the iterations counted)."""
        return [{"op": k.op, "group": k.group_size, "scope": k.scope, "dtype": k.dtype,
                 "calls": self.calls[k] / per, "bytes": self.bytes[k] / per}
                for k in sorted(self.calls, key=lambda k: -self.bytes[k])]
