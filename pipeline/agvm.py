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
element: under ZeRO >= 1 the optimizer holds flat partitions, so v is assembled per
parameter through DeepSpeed's fragment API on estimate iterations.
"""

from __future__ import annotations

import logging
import math
from functools import partial
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import AGVMConfig, ConfigError

log = logging.getLogger(__name__)


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
    """The modulator's state and schedule: when to estimate, the current mu, the last Phi.

    The training loop drives it once per iteration, because DeepSpeed's ZeRO optimizers call
    the client optimizer's ``step`` once per parameter (sub-)group, each time with only that
    group visible: ``before_backward`` (arms the tap), ``before_step`` after the last
    backward of the iteration (estimates Phi, updates mu, sets the clipping window) and
    ``after_step``. The optimizers only read ``lr_factor``, which is constant within an
    iteration, so any number of ``step`` calls per iteration gives the same update.
    """

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
        self.fresh = False
        self.engine = None
        self.base_clip = 0.0
        self.second_moment = None  # AGVM-AdamW: module -> exp_avg_sq in tap order

    def attach(self, engine) -> None:
        """Bind the DeepSpeed engine (for its gradient clipping); call after initialize."""
        self.engine, self.base_clip = engine, engine.gradient_clipping()

    @property
    def partitioned(self) -> bool:
        return self.engine is not None and self.engine.zero_optimization_stage() >= 1

    def active(self, it: int) -> bool:
        return it >= self.start and (self.cfg.stop_iter is None or it < self.cfg.stop_iter)

    def estimating(self, it: int) -> bool:
        return self.active(it) and (it - self.start) % self.cfg.tau == 0

    def clipping(self, it: int) -> bool:
        return self.cfg.clip_norm > 0 and self.start - self.cfg.clip_before <= it < self.start

    def before_backward(self, micro: int) -> None:
        """Before every backward; arms the tap at the first micro-batch of an estimate iteration."""
        if micro == 0 and self.estimating(self.iteration):
            self.halves.arm()
        self.halves.set_micro(micro)

    def before_step(self) -> None:
        """After the iteration's last backward, before ``engine.step()``."""
        if self.halves.armed:
            self.update(self.estimate_phi(self.halves.reduce()))
        if self.engine is not None:  # the engine's own global-norm clipping, over all partitions
            from pipeline.engine import set_gradient_clipping

            clip = self.cfg.clip_norm if self.clipping(self.iteration) else self.base_clip
            set_gradient_clipping(self.engine, clip)

    def after_step(self) -> None:
        self.iteration += 1

    def estimate_phi(self, sums: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Phi per module from the reduced (S, D); preconditioned halves for AGVM-AdamW."""
        if self.second_moment is None:
            s2, d2, sd = (torch.stack(v) for v in zip(*[(s.dot(s), d.dot(d), s.dot(d)) for s, d in sums.values()]))
            return dict(zip(sums, phi_from_sums(s2.double(), d2.double(), sd.double()).tolist()))
        phi = {}
        for name, (s, d) in sums.items():
            v, beta2, eps = self.second_moment(name)
            h1, h2 = (g / ((beta2 * v + (1 - beta2) * g.square()).sqrt() + eps) for g in self.halves.halves(s, d))
            h1, h2 = h1.double(), h2.double()
            phi[name] = float(1 - h1.dot(h2) / (h1.norm() * h2.norm()).clamp(min=1e-300))
        return phi

    def update(self, phi: dict[str, float]) -> None:
        self.phi, self.estimates, self.fresh = phi, self.estimates + 1, True
        if not all(math.isfinite(p) for p in phi.values()):
            # Non-finite gradients (a diverging run): keep mu rather than turn it into NaN;
            # the loop's loss check reports the divergence itself.
            log.warning("AGVM: non-finite Phi %s at iteration %d; mu kept at %s", phi, self.iteration, self.mu)
            return
        target = mu_target(phi, self.cfg)
        a = self.cfg.alpha
        self.mu = {m: a * self.mu[m] + (1 - a) * target[m] for m in self.mu}

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
    """Mixin for torch optimizers: step with each visible group's lr multiplied by its module's mu."""

    agvm: AGVMMonitor

    @torch.no_grad()
    def step(self, closure=None):
        saved = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * self.agvm.lr_factor(g["module"])
        try:
            return super().step(closure)
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr


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
        self.module_hparams = {g["module"]: (g["betas"][1], g["eps"]) for g in self.param_groups}
        monitor.second_moment = self._second_moment

    def _second_moment(self, module: str) -> tuple[torch.Tensor, float, float]:
        """(exp_avg_sq of the module's parameters in tap order, beta2, eps); v = 0 before the first step.

        Under ZeRO >= 1 the optimizer holds flat partitions, so each parameter's second moment
        is assembled through DeepSpeed's fragment API (a collective: every rank calls it).
        """
        params = self.agvm.halves.modules[module]
        beta2, eps = self.module_hparams[module]
        if not self.state:  # no step taken yet: v = 0, as for a fresh AdamW
            v = [torch.zeros(getattr(p, "ds_numel", p.numel()), device=p.device) for p in params]
        elif not self.agvm.partitioned:
            v = [self.state[p]["exp_avg_sq"].reshape(-1).float() for p in params]
        else:
            from deepspeed.utils import safe_get_full_optimizer_state

            from pipeline.engine import link_optimizer_state

            link_optimizer_state(self.agvm.engine)
            v = [safe_get_full_optimizer_state(p, "exp_avg_sq").reshape(-1).float() for p in params]
        return torch.cat(v), beta2, eps


def modules_of(groups: list[dict]) -> dict[str, list[nn.Parameter]]:
    """Module name -> parameters, merging a module's weight-decay sub-groups, in group order."""
    out: dict[str, list[nn.Parameter]] = {}
    for g in groups:
        out.setdefault(g["module"], []).extend(g["params"])
    return out
