"""AGVM: Adaptive Gradient Variance Modulator (Xue et al., NeurIPS 2022) as DeepSpeed client optimizers.

Every ``tau`` iterations, for each detector module i (backbone, neck, rpn_head, roi_head,
mask_head; RetinaNet: cls_head, reg_head):

    Phi_i = 1 - cos(G_i1, G_i2)        G_i1, G_i2: the module's gradient averaged over
                                        two disjoint halves of the global batch
    mu_i  <- alpha mu_i + (1 - alpha) sqrt(clamp((Phi_0 + eps) / (Phi_i + eps), lo, hi))

with module 0 (the backbone) the anchor, and the module's lr for each step is the
schedule's lr times mu_i. As in the public code, mu multiplies the group's lr, so it
scales the whole update, weight decay included.

How the halves are measured, exactly under every ZeRO stage: ZeRO 2/3 reduce-scatter
gradients inside backward, so the optimizer never sees a rank's own gradient. We tap
each parameter's *local* gradient with a tensor hook (it fires before DeepSpeed's
reduction hooks) on estimate iterations only, and reduce per module the sum S of all
ranks' gradients and the signed sum D (first half minus second half). Then
G1 ~ S + D and G2 ~ S - D, and (NOTES.md) the cosine follows from |S|^2, |D|^2, <S, D>:

    cos(G1, G2) = (|S|^2 - |D|^2) / sqrt((|S|^2 + |D|^2)^2 - 4 <S, D>^2)

Halves: ranks [0, W/2) and [W/2, W) when W >= 2 (the public code's split); with one rank,
the first and second half of the gradient-accumulation micro-batches. One rank without
accumulation has no two halves: that is a start-up error. On other iterations the hooks
return at once: no extra gradient-sized communication. The estimate costs one local
gradient copy and one all-reduce of 2x each module's gradient, every ``tau`` iterations.

AdamW variant: each half's gradient is preconditioned by the second moment first,
g / (sqrt(beta2 v + (1 - beta2) g^2) + eps) (the public code), which needs v element by
element: supported on ZeRO stage 0, where the optimizer holds whole parameters.
"""

from __future__ import annotations

import math
from functools import partial
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import AGVMConfig, ConfigError


def phi_from_sums(s2: torch.Tensor, d2: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """1 - cos(S + D, S - D) from |S|^2, |D|^2 and <S, D> (elementwise over modules)."""
    denom = ((s2 + d2).square() - 4 * sd.square()).clamp(min=1e-300).sqrt()
    return 1 - (s2 - d2) / denom


def mu_target(phi: dict[str, float], cfg: AGVMConfig) -> dict[str, float]:
    """The paper's mu_i = sqrt(Phi_anchor / Phi_i), with the public code's eps and clamp."""
    anchor = phi[cfg.anchor]
    return {m: math.sqrt(min(max((anchor + cfg.eps) / (p + cfg.eps), cfg.ratio_min), cfg.ratio_max))
            for m, p in phi.items()}


class HalfGradients:
    """Taps local gradients on armed iterations; returns per module the reduced S and D.

    ``modules`` maps module name -> its parameters (the model's own Parameter objects,
    captured before DeepSpeed partitions the optimizer's view of them).
    """

    def __init__(self, modules: dict[str, list[nn.Parameter]], world: int, rank: int, accum: int):
        if world < 2 and accum < 2:
            raise ConfigError("AGVM needs two half-batch gradients: launch 2 or more ranks, or set "
                              "train.grad_accum >= 2 to split one rank's micro-batches into halves")
        self.modules = modules
        self.by_ranks = world >= 2
        self.world, self.rank, self.accum = world, rank, accum
        # Units (ranks or micro-batches) in each half: the first half is the lower-numbered one.
        units = world if self.by_ranks else accum
        self.first, self.second = units // 2, units - units // 2
        self.armed, self.micro = False, 0
        self.local: dict[nn.Parameter, torch.Tensor] = {}
        self.signed: dict[nn.Parameter, torch.Tensor] = {}
        self.handles = [p.register_hook(partial(self._on_grad, p)) for ps in modules.values() for p in ps]

    def arm(self) -> None:
        self.armed, self.local, self.signed = True, {}, {}

    def set_micro(self, micro: int) -> None:
        self.micro = micro

    def _on_grad(self, param: nn.Parameter, grad: torch.Tensor) -> None:
        if not self.armed:
            return None
        g = grad.detach().float()
        _accumulate(self.local, param, g)
        if not self.by_ranks:  # one rank: micro-batches [0, accum/2) against the rest
            _accumulate(self.signed, param, g if self.micro < self.first else -g)
        return None  # the gradient itself is left untouched

    def _flat(self, store: dict, params: list[nn.Parameter]) -> torch.Tensor:
        # A parameter without a gradient this iteration contributes zeros (its shape comes from
        # ZeRO-3's ds_shape when the parameter is partitioned).
        return torch.cat([store[p].reshape(-1) if p in store else
                          torch.zeros(getattr(p, "ds_numel", p.numel()), device=p.device) for p in params])

    def reduce(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module (S, D) over the global batch, identical on every rank; disarms the tap."""
        out = {}
        sign = 1.0 if self.rank < self.first else -1.0
        for name, params in self.modules.items():
            s = self._flat(self.local, params)
            d = s * sign if self.by_ranks else self._flat(self.signed, params)
            both = torch.stack([s, d])
            if self.by_ranks:
                dist.all_reduce(both)
            out[name] = (both[0], both[1])
        self.armed, self.local, self.signed = False, {}, {}
        return out

    def halves(self, s: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean gradient of each half, scaled like the gradient the optimizer sees.

        S + D = 2 x (sum over the first half's units). A rank's gradient is its mean over
        micro-batches; a micro-batch's tapped gradient is already divided by ``accum`` by
        DeepSpeed's loss scaling, hence the factor for micro-batch halves.
        """
        unit = 1.0 if self.by_ranks else float(self.accum)
        return (s + d) * (unit / (2 * self.first)), (s - d) * (unit / (2 * self.second))


def _accumulate(store: dict, param: nn.Parameter, g: torch.Tensor) -> None:
    if param in store:
        store[param].add_(g)
    else:
        store[param] = g.clone()


class AGVMMonitor:
    """The modulator's state and schedule: when to estimate, the current mu, the last Phi."""

    def __init__(self, cfg: AGVMConfig, modules: dict[str, list[nn.Parameter]], world: int, rank: int,
                 accum: int, start_iter: int):
        if cfg.anchor not in modules:
            raise ConfigError(f"agvm.anchor={cfg.anchor!r} is not a module of this detector: {list(modules)}")
        self.cfg = cfg
        self.start = cfg.start_iter if cfg.start_iter is not None else start_iter
        self.halves = HalfGradients(modules, world, rank, accum)
        self.iteration = 0  # optimizer steps taken
        self.mu = {m: 1.0 for m in modules}
        self.phi: dict[str, float] = {}
        self.estimates = 0
        self.partitioned = False  # set by attach(): ZeRO >= 1 hands the optimizer partitions
        self.fresh = False

    def attach(self, zero_stage: int) -> None:
        self.partitioned = zero_stage >= 1

    def active(self, it: int) -> bool:
        return it >= self.start and (self.cfg.stop_iter is None or it < self.cfg.stop_iter)

    def estimating(self, it: int) -> bool:
        return self.active(it) and (it - self.start) % self.cfg.tau == 0

    def clipping(self, it: int) -> bool:
        return self.cfg.clip_norm > 0 and self.start - self.cfg.clip_before <= it < self.start

    def before_backward(self, micro: int) -> None:
        """Called by the loop before every backward; arms the tap on estimate iterations."""
        if micro == 0 and self.estimating(self.iteration):
            self.halves.arm()
        self.halves.set_micro(micro)

    def update(self, phi: dict[str, float]) -> None:
        target = mu_target(phi, self.cfg)
        a = self.cfg.alpha
        self.mu = {m: a * self.mu[m] + (1 - a) * target[m] for m in self.mu}
        self.phi, self.estimates, self.fresh = phi, self.estimates + 1, True

    def lr_factor(self, module: str) -> float:
        return self.mu[module] if self.active(self.iteration) else 1.0

    def record(self, lrs: dict[str, float]) -> dict[str, float]:
        """Phi, mu and effective lr per module for the log (after a fresh estimate)."""
        self.fresh = False
        out = {f"agvm/phi/{m}": p for m, p in self.phi.items()}
        out.update({f"agvm/mu/{m}": v for m, v in self.mu.items()})
        out.update({f"agvm/lr/{m}": lrs[m] * self.mu[m] for m in self.mu if m in lrs})
        return out

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "mu": dict(self.mu), "phi": dict(self.phi),
                "estimates": self.estimates, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.mu = state["iteration"], dict(state["mu"])
        self.phi, self.estimates = dict(state["phi"]), state["estimates"]


class _AGVMStep:
    """Mixin for torch optimizers: estimate Phi when due, clip in the pre-start window, then
    step with each group's lr multiplied by its module's mu."""

    agvm: AGVMMonitor

    def _phi(self, sums: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        s2, d2, sd = (torch.stack(v) for v in zip(*[(s.dot(s), d.dot(d), s.dot(d)) for s, d in sums.values()]))
        return dict(zip(sums, phi_from_sums(s2.double(), d2.double(), sd.double()).tolist()))

    @torch.no_grad()
    def _clip(self, max_norm: float) -> None:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        sq = torch.stack([g.float().square().sum() for g in grads]).sum()
        if self.agvm.partitioned:  # ZeRO >= 1: each rank holds a disjoint slice of the gradient
            dist.all_reduce(sq)
        scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, scale)

    @torch.no_grad()
    def step(self, closure=None):
        monitor = self.agvm
        if monitor.halves.armed:
            monitor.update(self._phi(monitor.halves.reduce()))
        if monitor.clipping(monitor.iteration):
            self._clip(monitor.cfg.clip_norm)
        saved = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * monitor.lr_factor(g["module"])
        try:
            loss = super().step(closure)
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr
        monitor.iteration += 1
        return loss


class AGVMSGD(_AGVMStep, torch.optim.SGD):
    """SGD (momentum, weight decay, nesterov) with AGVM's per-module lr."""

    def __init__(self, groups: list[dict], monitor: AGVMMonitor, **kwargs):
        super().__init__(groups, **kwargs)
        self.agvm = monitor


class AGVMAdamW(_AGVMStep, torch.optim.AdamW):
    """AdamW with AGVM; Phi uses second-moment-preconditioned half gradients."""

    def __init__(self, groups: list[dict], monitor: AGVMMonitor, **kwargs):
        super().__init__(groups, **kwargs)
        self.agvm = monitor

    def _phi(self, sums: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        halves = self.agvm.halves
        phi = {}
        for name, (s, d) in sums.items():
            g1, g2 = halves.halves(s, d)
            v = self._second_moment(name)
            beta2, eps = self._beta2_eps(name)
            h1 = g1 / ((beta2 * v + (1 - beta2) * g1.square()).sqrt() + eps)
            h2 = g2 / ((beta2 * v + (1 - beta2) * g2.square()).sqrt() + eps)
            cos = h1.double().dot(h2.double()) / (h1.double().norm() * h2.double().norm()).clamp(min=1e-300)
            phi[name] = float(1 - cos)
        return phi

    def _second_moment(self, module: str) -> torch.Tensor:
        """exp_avg_sq of the module's parameters in tap order (zeros before the first step)."""
        params = self.agvm.halves.modules[module]
        return torch.cat([self.state[p]["exp_avg_sq"].reshape(-1).float() if "exp_avg_sq" in self.state.get(p, {})
                          else torch.zeros(p.numel(), device=p.device) for p in params])

    def _beta2_eps(self, module: str) -> tuple[float, float]:
        group = next(g for g in self.param_groups if g["module"] == module)
        return group["betas"][1], group["eps"]


def modules_of(groups: list[dict]) -> dict[str, list[nn.Parameter]]:
    """Module name -> parameters, merging a module's weight-decay sub-groups, in group order."""
    out: dict[str, list[nn.Parameter]] = {}
    for g in groups:
        out.setdefault(g["module"], []).extend(g["params"])
    return out
