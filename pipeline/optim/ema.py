"""Weight EMA (``train.ema_decay``): an exponential moving average of the weights, used for
evaluation and saved in checkpoints, under every ZeRO stage.

After every optimizer step, ``ema <- decay * ema + (1 - decay) * weights``, one batched lerp over
all tensors (``torch._foreach_lerp_``), in fp32, with no host sync. Each rank averages the weights
it holds: under ZeRO 0-2 every rank holds whole parameters and keeps a whole fp32 copy; under
ZeRO-3 a rank holds its partition of each parameter (``ds_tensor``) and averages only that, so the
EMA is sharded as the model is. Parameters only: buffers (BatchNorm running statistics) are the
live model's, as the evaluation uses them (torch's ``AveragedModel`` default, ``use_buffers=False``).
Not torch's ``AveragedModel`` or timm's ``ModelEmaV3`` themselves: both keep a deep copy of the
whole module, which under ZeRO-3 would put every whole parameter on every rank.

Evaluation runs inside ``applied()``: the EMA is copied into the live tensors (under ZeRO-3 the
partitions, and the persistent small parameters re-gathered as DeepSpeed does after a step) and
the live weights are put back afterwards; it costs one more copy of what the rank holds, for the
evaluation's duration.

Checkpoints: ``ema.pt`` in the checkpoint's directory, the full EMA state dict by parameter name
(under ZeRO-3 gathered one parameter at a time), written by rank 0. A resumed run, at any world
size or ZeRO stage, takes its own share of it again; export (``pipeline.tools.export``) writes it
instead of the live weights when a checkpoint has one (``--weights live`` for the other).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.errors import CheckpointError

EMA_FILE = "ema.pt"


class WeightEMA:
    """The EMA of ``engine.module``'s trainable parameters, as this rank holds them."""

    def __init__(self, engine, decay: float):
        self.engine, self.decay = engine, decay
        self.zero3 = engine.zero_optimization_stage() == 3
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.restart()

    @torch.no_grad()
    def restart(self) -> None:
        """Start the EMA over from the weights the engine holds now (e.g. just loaded from a checkpoint
        that kept no EMA)."""
        self.shadow = [t.detach().float().clone() for t in self._live()]
        self.updates = 0

    def _live(self) -> list[torch.Tensor]:
        """The tensors this rank holds: ZeRO-3's partitions, or the whole parameters."""
        return [p.ds_tensor if self.zero3 else p.data for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step; call after each optimizer step."""
        live = [t if t.dtype == torch.float32 else t.float() for t in self._live()]
        torch._foreach_lerp_(self.shadow, live, 1.0 - self.decay)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model computes with the EMA weights inside the context, with its own ones again after."""
        live = self._live()
        with torch.no_grad():
            stash = [t.clone() for t in live]
            torch._foreach_copy_(live, self.shadow)
        self._regather()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, stash)
            del stash
            self._regather()

    def _regather(self) -> None:
        """ZeRO-3 keeps its small persistent parameters gathered; refresh them from the partitions."""
        if self.zero3:
            persistent = getattr(self.engine.optimizer, "persistent_parameters", [])
            if persistent:
                persistent[0].all_gather(persistent)

    # ---- checkpoints ----

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Every parameter's whole EMA by name, on CPU, on rank 0 (None elsewhere). A collective
        under ZeRO-3: every rank must call it."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        out = {}
        for name, p, ema in zip(self.names, self.params, self.shadow):
            if self.zero3:
                parts = [torch.empty_like(ema) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, ema)
                full = torch.cat(parts)[:p.ds_numel].view(p.ds_shape)
            else:
                full = ema.view(p.shape)
            if rank == 0:
                out[name] = full.cpu().clone()
        return out if rank == 0 else None

    def load_full_state_dict(self, state: dict[str, torch.Tensor], source: str = EMA_FILE) -> None:
        """Take this rank's share of a full EMA state dict (any world size or ZeRO stage saved it)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise CheckpointError(f"{source}: no EMA for {len(missing)} parameter(s), e.g. {missing[:3]}; was it "
                                  "saved by another model? Delete the file to start the EMA from the loaded weights")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        with torch.no_grad():
            for name, ema in zip(self.names, self.shadow):
                flat = state[name].reshape(-1).float()
                if self.zero3:  # ZeRO-3's partition: the flat tensor padded to a multiple of the world
                    size = ema.numel()
                    flat = F.pad(flat, (0, size * world - flat.numel()))[rank * size:(rank + 1) * size]
                ema.copy_(flat.view_as(ema))


def save(ema: WeightEMA, folder: Path) -> None:
    """``ema.pt`` in the checkpoint directory ``folder`` (every rank calls; rank 0 writes)."""
    state = ema.full_state_dict()
    if state is not None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"decay": ema.decay, "updates": ema.updates, "state_dict": state}, folder / EMA_FILE)


def load(ema: WeightEMA, folder: Path) -> bool:
    """Restore the EMA from ``folder``'s ``ema.pt``; False when the checkpoint has none."""
    path = folder / EMA_FILE
    if not path.is_file():
        return False
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    ema.load_full_state_dict(saved["state_dict"], str(path))
    ema.updates = saved["updates"]
    return True
