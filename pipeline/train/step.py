"""One optimizer iteration of a DeepSpeed engine: the only place a run steps.

An iteration is ``grad_accum`` micro-batches of forward + backward, then DeepSpeed's
optimizer step. Around them it sets what changes per iteration: each param group's lr
(MegDet's schedule times AGVM's mu for the group's module), the gradient clipping (AGVM's
window before modulation starts) and AGVM's gradient tap and estimate. It holds the run's
single iteration counter; the trainer, the tests and the benchmarks all step through it.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from pipeline.distributed.ds_internals import local_optimizer_chunks, set_gradient_clipping
from pipeline.optim.agvm import AGVM
from pipeline.optim.ema import WeightEMA
from pipeline.optim.schedule import Schedule


class TrainStep:
    """``step(micro_batches)`` runs iteration ``step.iteration`` and returns its losses.

    ``micro_batches`` yields the positional arguments of the model's forward, one tuple per
    micro-batch (for a detector: ``(images, targets)`` already on the device); the step takes
    ``accum`` of them. The returned losses are the micro-batch mean of each loss term, still on
    the device: reading them is the caller's choice of when to sync with the host.
    """

    def __init__(self, engine, schedule: Schedule, accum: int, agvm: Optional[AGVM] = None, iteration: int = 0,
                 ema: Optional[WeightEMA] = None):
        self.engine, self.schedule, self.accum, self.agvm, self.ema = engine, schedule, accum, agvm, ema
        self.iteration = iteration
        self.base_clip = engine.gradient_clipping()
        self.estimated = False  # whether the last iteration estimated AGVM's Phi (its record is fresh)
        # progress marks for the job's watchdog (pipeline.distributed.watchdog.JobWatch.mark): Python only
        self.mark = lambda phase, iteration: None

    def group_lrs(self, it: int) -> list[float]:
        """Each param group's lr at iteration ``it``: the schedule's, times its layer-wise decay scale
        and its module's mu."""
        lr = self.schedule.lr(it)
        groups = self.engine.optimizer.param_groups
        scales = [g.get("lr_scale", 1.0) for g in groups]  # layer-wise decay (pipeline.optim.optimizers)
        if self.agvm is None:
            return [lr * scale for scale in scales]
        return [lr * scale * self.agvm.lr_factor(g["module"], it) for g, scale in zip(groups, scales)]

    def __call__(self, micro_batches: Iterator[tuple]) -> dict[str, torch.Tensor]:
        it, engine, agvm = self.iteration, self.engine, self.agvm
        armed = agvm is not None and agvm.estimating(it)
        if armed:  # before the first backward: the tap must see every micro-batch's gradient
            agvm.tap.arm()
        losses: dict[str, torch.Tensor] = {}
        for micro in range(self.accum):
            batch = next(micro_batches)
            self.mark("forward", it)
            out = engine(*batch)
            if armed:
                agvm.tap.begin_micro(micro)
            self.mark("backward", it)
            engine.backward(sum(out.values()))
            if armed:
                agvm.tap.after_backward(micro)
            if micro == self.accum - 1:  # DeepSpeed steps the optimizer at this engine.step()
                self.mark("optimizer step", it)
                self._before_optimizer_step(it, armed)
            engine.step()
            for k, v in out.items():
                losses[k] = losses.get(k, 0) + v.detach() / self.accum
        if self.ema is not None:  # after the optimizer step of the last micro-batch
            self.ema.update()
        self.iteration, self.estimated = it + 1, armed
        return losses

    def _before_optimizer_step(self, it: int, armed: bool) -> None:
        """AGVM's estimate (so this step uses the mu of its own gradients), then lrs and clipping."""
        agvm = self.agvm
        if armed:
            agvm.estimate(it, self._second_moment if agvm.adamw is not None else None)
        for group, lr in zip(self.engine.optimizer.param_groups, self.group_lrs(it)):
            group["lr"] = lr
        if agvm is not None:  # the engine's own global-norm clipping, over all partitions
            clip = agvm.clip_norm(it)
            set_gradient_clipping(self.engine, self.base_clip if clip is None else clip)

    def _second_moment(self, params: list) -> torch.Tensor:
        """AdamW's second moment of ``params`` in AGVM's shard layout: their
        fragments of ZeRO 1/2's own partitions, else this rank's chunk of each parameter."""
        tap = self.agvm.tap
        if tap.partitions is not None:
            return tap.partitions.state_pieces(params, "exp_avg_sq")
        return torch.cat(local_optimizer_chunks(self.engine, params, "exp_avg_sq", tap.world, tap.rank,
                                                self.engine.zero_optimization_stage()))
