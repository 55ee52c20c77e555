"""Learning-rate schedule: MegDet linear scaling + linear warmup + epoch-based policy.

MegDet (Peng et al., CVPR 2018), Sec. 3.3: lr = base_lr * global_batch / reference_batch,
reached by a linear warmup; decay points are given in epochs and turned into
iterations from the dataset size and the global batch. The lr at an iteration is
a pure function of (config, iteration), so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import OptimConfig, ScheduleConfig


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: everything in iterations (optimizer steps)."""

    global_batch: int
    peak_lr: float
    total_iters: int
    steps_per_epoch: int
    warmup_iters: int
    warmup_factor: float
    policy: str
    milestones: tuple[int, ...]
    gamma: float
    min_lr_factor: float

    def factor(self, it: int) -> float:
        """Multiplier of ``peak_lr`` at iteration ``it`` (0-based)."""
        warm = 1.0
        if it < self.warmup_iters:
            warm = self.warmup_factor + (1.0 - self.warmup_factor) * it / self.warmup_iters
        if self.policy == "multistep":
            return warm * self.gamma ** sum(it >= m for m in self.milestones)
        if self.policy == "cosine":
            span = max(1, self.total_iters - self.warmup_iters)
            progress = min(1.0, max(0, it - self.warmup_iters) / span)
            cos = 0.5 * (1 + math.cos(math.pi * progress))
            return warm * (self.min_lr_factor + (1 - self.min_lr_factor) * cos)
        return warm

    def lr(self, it: int) -> float:
        return self.peak_lr * self.factor(it)

    def describe(self) -> str:
        return (f"global batch {self.global_batch} -> lr {self.peak_lr:.5g}; {self.total_iters} iterations "
                f"({self.steps_per_epoch}/epoch); warmup {self.warmup_iters} it from x{self.warmup_factor}; "
                f"{self.policy} decay at iterations {list(self.milestones)} (x{self.gamma})")


def build_schedule(sched: ScheduleConfig, optim: OptimConfig, global_batch: int, steps_per_epoch: int) -> Schedule:
    """Resolve epochs to iterations and apply the linear scaling rule."""
    total = sched.max_iters or max(1, round(sched.epochs * steps_per_epoch))
    milestones = tuple(round(e * steps_per_epoch) for e in sched.milestones) if sched.policy == "multistep" else ()
    return Schedule(global_batch=global_batch, peak_lr=optim.base_lr * global_batch / optim.reference_batch,
                    total_iters=total, steps_per_epoch=steps_per_epoch,
                    warmup_iters=min(sched.warmup_iters, total), warmup_factor=sched.warmup_factor,
                    policy=sched.policy, milestones=milestones, gamma=sched.gamma,
                    min_lr_factor=sched.min_lr_factor)
