"""AGVM: Adaptive Gradient Variance Modulator (Xue et al., NeurIPS 2022), exact under ZeRO 0-3.

Every ``tau`` iterations, for each detector module i (backbone, neck, rpn_head, roi_head,
mask_head; RetinaNet: cls_head, reg_head):

    Phi_i = 1 - cos(G_i1, G_i2)        G_i1, G_i2: the module's gradient averaged over
                                        two disjoint halves of the global batch
    mu_i  <- alpha mu_i + (1 - alpha) sqrt(clamp((Phi_0 + eps) / (Phi_i + eps), lo, hi))

with module 0 (the backbone) the anchor, and the module's lr for each step is the
schedule's lr times mu_i. As in the public code, mu multiplies the group's lr, so it
scales the whole update, weight decay included. The optimizer handed to DeepSpeed is
torch's own SGD or AdamW, one param group per module (``pipeline.optim``); the train step
(``pipeline.step``) sets each group's lr to schedule x mu before every optimizer step.

How the halves are measured, exactly under every ZeRO stage: ZeRO 2/3 reduce-scatter
gradients inside backward, so the optimizer never sees a rank's own gradient. We tap
each parameter's *local* gradient with a tensor hook (it fires before DeepSpeed's
reduction hooks) on estimate iterations only, and reduce per module the sum S of all
ranks' gradients and the signed sum D (first half minus second half). Then
G1 ~ S + D and G2 ~ S - D, and the cosine follows from three scalars:

    cos(G1, G2) = <S + D, S - D> / (|S + D| |S - D|)
                = (|S|^2 - |D|^2) / sqrt((|S|^2 + |D|^2 + 2<S, D>) (|S|^2 + |D|^2 - 2<S, D>))
                = (|S|^2 - |D|^2) / sqrt((|S|^2 + |D|^2)^2 - 4 <S, D>^2)

Halves (``choose_halves``): with W >= 2 ranks, two sets of ranks, each a union of whole
cross-GPU BN groups. A BN group's batch statistics couple the gradients of its ranks (every
layer before a BN gets equal and opposite terms from them), so halves that split a group would
see a biased, higher Phi. Without BN groups that is ranks [0, W/2) and [W/2, W), the public
code's split. When one BN group holds every rank, the halves are the first and second half of
every rank's gradient-accumulation micro-batches (each micro-batch has its own statistics), or,
without accumulation, a start-up error unless ``agvm.coupled_halves`` accepts the bias. With one
rank: its micro-batch halves; one rank without accumulation has no two halves (an error). On other iterations the hooks
return at once: no extra gradient-sized communication. The estimate costs one local
gradient copy and one all-reduce of 2x each module's gradient, every ``tau`` iterations.

AdamW variant: each half's gradient is preconditioned by the second moment first,
g / (sqrt(beta2 v + (1 - beta2) g^2) + eps) (the public code), which needs v element by
element: under ZeRO >= 1 the optimizer holds flat partitions, so v is assembled per
parameter (``pipeline.ds_internals.full_optimizer_state``) on estimate iterations.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import AGVMConfig, ConfigError
from pipeline.ds_internals import full_numel

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


@dataclass(frozen=True)
class Halves:
    """AGVM's two halves of the global batch: sets of ranks (``by="ranks"``, ``first`` holds the
    first half's ranks) or of every rank's micro-batches (``by="micro"``, ``first`` holds the first
    half's micro-batch indices); ``sizes``: the units (ranks, or rank x micro-batch pairs) in each."""

    by: str
    first: frozenset
    sizes: tuple[int, int]

    def describe(self) -> str:
        if self.by == "micro":
            return f"micro-batches {sorted(self.first)} vs the rest, on every rank"
        return f"ranks {sorted(self.first)} vs the other {self.sizes[1]}"


def choose_halves(world: int, accum: int, bn_layout: Optional[list[list[int]]] = None,
                  coupled_ok: bool = False) -> tuple[Halves, Optional[str]]:
    """The halves for ``world`` ranks of ``accum`` micro-batches whose cross-GPU BN groups are
    ``bn_layout`` (None: no BN couples ranks); returns them and a warning, if any.

    Ranks split between whole BN groups when there are two or more: the most even split of the
    groups in rank order (no groups: ranks [0, W/2) and the rest). One group of every rank: the
    micro-batch halves when ``accum`` >= 2, else ConfigError, unless ``coupled_ok``."""
    check_halves(world, accum)
    micro = Halves("micro", frozenset(range(accum // 2)), (world * (accum // 2), world * (accum - accum // 2)))
    if world == 1:
        return micro, None
    blocks = sorted(bn_layout, key=min) if bn_layout else [[r] for r in range(world)]
    if len(blocks) >= 2:
        counts = [sum(len(b) for b in blocks[:k]) for k in range(1, len(blocks))]
        first = min(counts, key=lambda c: abs(2 * c - world))  # the earliest of the most even
        ranks = frozenset(r for b in blocks[:counts.index(first) + 1] for r in b)
        return Halves("ranks", ranks, (first, world - first)), None
    if accum >= 2:
        return micro, None
    straddling = Halves("ranks", frozenset(range(world // 2)), (world // 2, world - world // 2))
    if coupled_ok:
        return straddling, ("AGVM: agvm.coupled_halves=true: the rank halves share one cross-GPU BN group, whose "
                            "statistics couple their gradients; Phi of the layers before a BN reads high")
    raise ConfigError(
        f"optim.name=agvm_* with one cross-GPU BN group of all {world} ranks: any two halves of the ranks share "
        "its batch statistics, which couple their gradients and bias Phi upward. Use train.grad_accum >= 2 (AGVM "
        "then compares micro-batch halves, which have their own statistics), a model.bn_group that splits the "
        "ranks (e.g. a divisor of the ranks per machine), or agvm.coupled_halves=true to accept the bias")


class HalfGradients:
    """Taps local gradients on armed iterations; returns per module the reduced S and D.

    ``modules`` maps module name -> its parameters (the model's own Parameter objects,
    captured before DeepSpeed partitions the optimizer's view of them).
    """

    def __init__(self, modules: dict[str, list[nn.Parameter]], world: int, rank: int, accum: int,
                 halves: Optional[Halves] = None):
        self.modules = modules
        self.halves_of = halves or choose_halves(world, accum)[0]
        self.by_ranks = self.halves_of.by == "ranks"
        self.world, self.rank, self.accum = world, rank, accum
        self.first, self.second = self.halves_of.sizes
        self.armed, self.micro = False, 0
        self.local: dict[nn.Parameter, torch.Tensor] = {}
        self.signed: dict[nn.Parameter, torch.Tensor] = {}
        self.handles = [p.register_hook(partial(self._on_grad, p)) for ps in modules.values() for p in ps]

    def arm(self) -> None:
        """Tap the gradients of the coming iteration (call before its first backward)."""
        self.armed, self.local, self.signed, self.micro = True, {}, {}, 0

    def begin_micro(self, micro: int) -> None:
        """The next backward is micro-batch ``micro`` of the iteration (which half it belongs to)."""
        self.micro = micro

    def _on_grad(self, param: nn.Parameter, grad: torch.Tensor) -> None:
        if not self.armed:
            return None
        g = grad.detach().float()
        _accumulate(self.local, param, g)
        if not self.by_ranks:  # micro-batch halves: the first half's micro-batches against the rest
            _accumulate(self.signed, param, g if self.micro in self.halves_of.first else -g)
        return None  # the gradient itself is left untouched

    def _flat(self, store: dict, params: list[nn.Parameter]) -> torch.Tensor:
        # A parameter without a gradient this iteration contributes zeros (its shape comes from
        # ZeRO-3's ds_shape when the parameter is partitioned).
        return torch.cat([store[p].reshape(-1) if p in store else torch.zeros(full_numel(p), device=p.device)
                          for p in params])

    def reduce(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module (S, D) over the global batch, identical on every rank; disarms the tap."""
        out = {}
        sign = 1.0 if self.rank in self.halves_of.first else -1.0
        for name, params in self.modules.items():
            s = self._flat(self.local, params)
            d = s * sign if self.by_ranks else self._flat(self.signed, params)
            both = torch.stack([s, d])
            if self.world >= 2:
                dist.all_reduce(both)
            out[name] = (both[0], both[1])
        self.armed, self.local, self.signed = False, {}, {}
        return out

    def halves(self, s: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean gradient of each half, scaled like the gradient the optimizer sees.

        S + D = 2 x (sum over the first half's units). A rank's gradient is its mean over
        micro-batches; a micro-batch's tapped gradient is already divided by ``accum`` by
        DeepSpeed's loss scaling, hence the factor for micro-batch halves (whose units are
        rank x micro-batch pairs).
        """
        unit = 1.0 if self.by_ranks else float(self.accum)
        return (s + d) * (unit / (2 * self.first)), (s - d) * (unit / (2 * self.second))


def _accumulate(store: dict, param: nn.Parameter, g: torch.Tensor) -> None:
    if param in store:
        store[param].add_(g)
    else:
        store[param] = g.clone()


def check_halves(world: int, accum: int) -> None:
    """AGVM compares two half-batch gradients: ranks, or one rank's accumulated micro-batches."""
    if world < 2 and accum < 2:
        raise ConfigError("optim.name=agvm_*: AGVM needs two half-batch gradients, but the run has 1 rank and "
                          "train.grad_accum=1; launch 2 or more ranks, or set train.grad_accum >= 2 to split one "
                          "rank's micro-batches into halves")


def start_iteration(cfg: AGVMConfig, warmup_iters: int) -> int:
    """The first modulated iteration: ``agvm.start_iter`` when set, else ``agvm.start_after_warmup``
    iterations after the end of warmup (so that a batch change, which moves the warmup, moves it too)."""
    return cfg.start_iter if cfg.start_iter is not None else warmup_iters + cfg.start_after_warmup


class AGVM:
    """The modulator: when to estimate, the current mu, the last Phi, and the gradient tap.

    It holds no iteration counter and knows neither the engine nor the optimizer: the train step
    (``pipeline.step.TrainStep``) asks it, for iteration ``it``, whether to arm the tap, for the
    clipping window and for each module's lr factor, and hands it the second moment when the
    optimizer is AdamW. ``estimate`` runs after the iteration's last backward, before the
    optimizer step, so the step uses the mu of its own gradients.
    """

    def __init__(self, cfg: AGVMConfig, modules: dict[str, list[nn.Parameter]], world: int, rank: int,
                 accum: int, warmup_iters: int, adamw: Optional[tuple[float, float]] = None,
                 halves: Optional[Halves] = None):
        if cfg.anchor not in modules:
            raise ConfigError(f"agvm.anchor={cfg.anchor!r} is not a module of this detector: {list(modules)}")
        check_halves(world, accum)
        self.cfg = cfg
        self.start = start_iteration(cfg, warmup_iters)
        self.tap = HalfGradients(modules, world, rank, accum, halves)
        self.adamw = adamw  # (beta2, eps): precondition the halves by the second moment (AGVM-AdamW)
        self.mu = {m: 1.0 for m in modules}
        self.phi: dict[str, float] = {}
        self.estimates = 0

    def active(self, it: int) -> bool:
        return it >= self.start and (self.cfg.stop_iter is None or it < self.cfg.stop_iter)

    def estimating(self, it: int) -> bool:
        return self.active(it) and (it - self.start) % self.cfg.tau == 0

    def clip_norm(self, it: int) -> Optional[float]:
        """The clipping window's max norm before modulation starts; None outside it."""
        in_window = self.cfg.clip_norm > 0 and self.start - self.cfg.clip_before <= it < self.start
        return self.cfg.clip_norm if in_window else None

    def lr_factor(self, module: str, it: int) -> float:
        return self.mu[module] if self.active(it) else 1.0

    def estimate(self, it: int, second_moment: Optional[Callable[[list[nn.Parameter]], list[torch.Tensor]]] = None) -> None:
        """Phi and mu from the tapped gradients of iteration ``it`` (every rank calls it: collectives).
        ``second_moment(params)``: AdamW's exp_avg_sq per parameter, for AGVM-AdamW."""
        sums = self.tap.reduce()
        if self.adamw is None:
            s2, d2, sd = (torch.stack(v) for v in zip(*[(s.dot(s), d.dot(d), s.dot(d)) for s, d in sums.values()]))
            phi = dict(zip(sums, phi_from_sums(s2.double(), d2.double(), sd.double()).tolist()))
        else:
            beta2, eps = self.adamw
            phi = {}
            for name, (s, d) in sums.items():
                v = torch.cat(second_moment(self.tap.modules[name]))
                h1, h2 = (g / ((beta2 * v + (1 - beta2) * g.square()).sqrt() + eps) for g in self.tap.halves(s, d))
                h1, h2 = h1.double(), h2.double()
                phi[name] = float(1 - h1.dot(h2) / (h1.norm() * h2.norm()).clamp(min=1e-300))
        self.update(phi, it)

    def update(self, phi: dict[str, float], it: int) -> None:
        self.phi, self.estimates = phi, self.estimates + 1
        if not all(math.isfinite(p) for p in phi.values()):
            # Non-finite gradients (a diverging run): keep mu rather than turn it into NaN;
            # the loop's loss check reports the divergence itself.
            log.warning("AGVM: non-finite Phi %s at iteration %d; mu kept at %s", phi, it, self.mu)
            return
        target = mu_target(phi, self.cfg)
        a = self.cfg.alpha
        self.mu = {m: a * self.mu[m] + (1 - a) * target[m] for m in self.mu}

    def record(self, lr: float) -> dict[str, float]:
        """Phi, mu and effective lr per module for the log, ``lr`` being the schedule's."""
        out = {f"agvm/phi/{m}": p for m, p in self.phi.items()}
        out.update({f"agvm/mu/{m}": v for m, v in self.mu.items()})
        out.update({f"agvm/lr/{m}": lr * v for m, v in self.mu.items()})
        return out

    def state_dict(self) -> dict:
        return {"mu": dict(self.mu), "phi": dict(self.phi), "estimates": self.estimates, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.mu, self.phi, self.estimates = dict(state["mu"]), dict(state["phi"]), state["estimates"]


def modules_of(groups: list[dict]) -> dict[str, list[nn.Parameter]]:
    """Module name -> parameters, merging a module's weight-decay sub-groups, in group order."""
    out: dict[str, list[nn.Parameter]] = {}
    for g in groups:
        out.setdefault(g["module"], []).extend(g["params"])
    return out
