"""Learning-rate schedule: MegDet linear scaling + linear warmup + epoch-based policy.

MegDet (Peng et al., CVPR 2018), Sec. 3.3: lr = base_lr * global_batch / reference_batch,
reached by a linear warmup; decay points are given in epochs and turned into
iterations from the dataset size and the global batch. The lr at an iteration is
a pure function of (config, iteration), so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import MEGDET_POLICIES, OptimConfig, ScheduleConfig


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
    steps: tuple[tuple[int, float], ...]  # (iteration, lr factor from then on), cumulative
    min_lr_factor: float

    def factor(self, it: int) -> float:
        """Multiplier of ``peak_lr`` at iteration ``it`` (0-based)."""
        warm = 1.0
        if it < self.warmup_iters:
            warm = self.warmup_factor + (1.0 - self.warmup_factor) * it / self.warmup_iters
        if self.steps:
            return warm * math.prod(f for m, f in self.steps if it >= m)
        if self.policy == "cosine":
            span = max(1, self.total_iters - self.warmup_iters)
            progress = min(1.0, max(0, it - self.warmup_iters) / span)
            cos = 0.5 * (1 + math.cos(math.pi * progress))
            return warm * (self.min_lr_factor + (1 - self.min_lr_factor) * cos)
        return warm

    def lr(self, it: int) -> float:
        return self.peak_lr * self.factor(it)

    def describe(self) -> str:
        decay = ", ".join(f"x{f:g} at {m}" for m, f in self.steps) if self.steps else "none"
        return (f"global batch {self.global_batch} -> lr {self.peak_lr:.5g}; {self.total_iters} iterations "
                f"({self.steps_per_epoch}/epoch); warmup {self.warmup_iters} it from x{self.warmup_factor}; "
                f"{self.policy} decay: {decay}")

    def as_dict(self) -> dict:
        """The resolved schedule for the run directory and W&B."""
        return {"global_batch": self.global_batch, "peak_lr": self.peak_lr, "total_iters": self.total_iters,
                "steps_per_epoch": self.steps_per_epoch, "warmup_iters": self.warmup_iters,
                "warmup_factor": self.warmup_factor, "policy": self.policy,
                "decay_iters": [m for m, _ in self.steps], "decay_factors": [f for _, f in self.steps],
                "min_lr_factor": self.min_lr_factor}


def batch_scale(optim: OptimConfig, global_batch: int) -> float:
    """The lr multiplier of the configured rule (``optim.lr_scaling``) at ``global_batch``."""
    k = global_batch / optim.reference_batch
    return {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[optim.lr_scaling]


def resolve_warmup_factor(sched: ScheduleConfig, optim: OptimConfig, global_batch: int) -> float:
    """``schedule.warmup_factor``: MegDet's warmup (``auto``, the default of its policies) starts at
    the reference batch's lr r and rises to the scaled one k r, so it starts at 1/k of the peak."""
    factor = sched.warmup_factor
    if factor is None:
        factor = "auto" if sched.policy in MEGDET_POLICIES else 0.001
    return min(1.0, 1.0 / batch_scale(optim, global_batch)) if factor == "auto" else factor


def build_schedule(sched: ScheduleConfig, optim: OptimConfig, global_batch: int, steps_per_epoch: int) -> Schedule:
    """Resolve epochs to iterations and apply the linear scaling rule."""
    epochs, steps = sched.epochs, ()
    if sched.policy in MEGDET_POLICIES:
        epochs, steps = MEGDET_POLICIES[sched.policy]
    elif sched.policy == "multistep":
        steps = tuple((e, sched.gamma) for e in sched.milestones)
    total = sched.max_iters or max(1, round(epochs * steps_per_epoch))
    warmup = sched.warmup_iters if sched.warmup_epochs is None else round(sched.warmup_epochs * steps_per_epoch)
    return Schedule(global_batch=global_batch, peak_lr=optim.base_lr * batch_scale(optim, global_batch),
                    total_iters=total, steps_per_epoch=steps_per_epoch,
                    warmup_iters=min(warmup, total), warmup_factor=resolve_warmup_factor(sched, optim, global_batch), policy=sched.policy,
                    steps=tuple((round(e * steps_per_epoch), f) for e, f in steps),
                    min_lr_factor=sched.min_lr_factor)
