"""AGVM: Adaptive Gradient Variance Modulator (Xue et al., NeurIPS 2022), exact under ZeRO 0-3.

Every ``tau`` iterations, for each detector module i (backbone, neck, rpn_head, roi_head,
mask_head; RetinaNet: cls_head, reg_head):

    Phi_i = 1 - cos(G_i1, G_i2)        G_i1, G_i2: the module's gradient averaged over
                                        two disjoint halves of the global batch
    mu_i  <- alpha mu_i + (1 - alpha) sqrt(clamp((Phi_0 + eps) / (Phi_i + eps), lo, hi))

with module 0 (the backbone) the anchor, and the module's lr for each step is the
schedule's lr times mu_i. As in the public code, mu multiplies the group's lr, so it
scales the whole update, weight decay included. The optimizer handed to DeepSpeed is
torch's own SGD or AdamW, one param group per module (``pipeline.optim.optimizers``); the train step
(``pipeline.train.step``) sets each group's lr to schedule x mu before every optimizer step.

How the halves are measured, exactly under every ZeRO stage: ZeRO 2/3 reduce-scatter
gradients inside backward, so the optimizer never sees a rank's own gradient. We tap
each parameter's *local* gradient with a tensor hook (it fires before DeepSpeed's
reduction hooks) on estimate iterations only, and reduce per module the sum S of all
ranks' gradients and the signed sum D (first half minus second half), sharded the way
ZeRO-3 partitions parameters: each rank ends with its chunk of S and D, computes its part
of three sums, and one all-reduce of three numbers per module finishes them. Then
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
rank: its micro-batch halves; one rank without accumulation has no two halves (an error). On
other iterations the hooks return at once: no extra gradient-sized communication.

AdamW variant: each half's gradient is preconditioned by the second moment first,
g / (sqrt(beta2 v + (1 - beta2) g^2) + eps) (the public code), which needs v element by
element on the rank's shard: under ZeRO-3 that is v's own local partition, at ZeRO-0 a slice
of the local state, under ZeRO 1/2 the state of the rank's flat fp32 partitions themselves (the
shards are laid out as those partitions, ``pipeline.distributed.ds_internals.Zero12Partitions``). Never a
full tensor, never a collective.

Cost of an estimate iteration, per rank (the others cost nothing): the local gradient tap, one
fp32 copy of every parameter's gradient (two at one rank with micro-batch halves, or where S is
not read from DeepSpeed), unavoidable because ZeRO 2/3 reduce and free local gradients
inside backward and a collective in a gradient hook would hang whenever a parameter has no
gradient on some rank; while a module is reduced, its S and D chunks (2/W of the module).
Communication: one gradient-sized reduce-scatter (D) and one small all-reduce: S is DeepSpeed's
own reduced gradient, read in the layout the stage keeps it in (ZeRO-3: each parameter's
partition, ``HalfGradients.reduced_gradient``; fp32 ZeRO-0: the whole gradient; ZeRO 1/2: the
flat partitions of whole param groups, ``HalfGradients.partitions``), and the tap's shards are
laid out the same way. Where none is readable (bf16 ZeRO-0's BF16 optimizer, CPU offload) a
second reduce-scatter computes S. Micro-batch halves under ZeRO-3 (``agvm.halves=micro_batches``, or auto with one BN
group of every rank; not with the optimizer offloaded, whose host gradient is written only at the accumulation
boundary) need neither: no tap, no collective beyond the all-reduce, one partition-sized
copy of the first half's reduced gradient (``HalfGradients.after_backward``); the estimate for
billion-parameter models.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.config import AGVMConfig
from pipeline.distributed.ds_internals import Zero12Partitions, full_numel
from pipeline.errors import ConfigError

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
                  coupled_ok: bool = False, prefer: str = "auto") -> tuple[Halves, Optional[str]]:
    """The halves for ``world`` ranks of ``accum`` micro-batches whose cross-GPU BN groups are
    ``bn_layout`` (None: no BN couples ranks); returns them and a warning, if any.

    ``prefer`` (``agvm.halves``): micro_batches, ranks, or auto: ranks split between whole BN groups
    when there are two or more, the most even split of the groups in rank order (no groups: ranks
    [0, W/2) and the rest); one group of every rank: the micro-batch halves when ``accum`` >= 2,
    else ConfigError, unless ``coupled_ok``."""
    check_halves(world, accum)
    micro = Halves("micro", frozenset(range(accum // 2)), (world * (accum // 2), world * (accum - accum // 2)))
    if prefer == "micro_batches":
        if accum < 2:
            raise ConfigError("agvm.halves=micro_batches needs train.grad_accum >= 2 (two micro-batches per rank "
                              "to compare); raise it, or use agvm.halves=auto")
        return micro, None
    if world == 1:
        if prefer == "ranks":
            raise ConfigError("agvm.halves=ranks needs 2 or more ranks; use agvm.halves=auto on one rank")
        return micro, None
    blocks = sorted(bn_layout, key=min) if bn_layout else [[r] for r in range(world)]
    if len(blocks) >= 2:
        counts = [sum(len(b) for b in blocks[:k]) for k in range(1, len(blocks))]
        first = min(counts, key=lambda c: abs(2 * c - world))  # the earliest of the most even
        ranks = frozenset(r for b in blocks[:counts.index(first) + 1] for r in b)
        return Halves("ranks", ranks, (first, world - first)), None
    if accum >= 2 and prefer == "auto":
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


def chunk_of(numel: int, world: int) -> int:
    """Elements of one rank's chunk of a parameter: ZeRO-3's partition size, ceil(numel / world)."""
    return -(-numel // world)


def _reduce_scatter(buffer: torch.Tensor) -> torch.Tensor:
    """Sum ``buffer`` ([W, L]) over the ranks; this rank gets its row."""
    out = buffer.new_empty(buffer.shape[1])
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.14
    scatter(out, buffer.reshape(-1))
    return out


class HalfGradients:
    """Taps local gradients on armed iterations; returns per module this rank's shard of the reduced
    S and D.

    ``modules`` maps module name -> its parameters (the model's own Parameter objects, captured
    before DeepSpeed partitions the optimizer's view of them). Shards: each parameter's flat
    gradient is padded to a multiple of W and cut into W chunks, ZeRO-3's partition of that
    parameter; rank r's shard of a module is chunk r of each of its parameters, in order (so
    AGVM-AdamW's second moment, partitioned so under ZeRO-3, is aligned with it). Under ZeRO 1/2
    the shards are those stages' own flat group partitions instead (``use_zero12_partitions``). The hook writes
    each local gradient straight into a [W, L] fp32 buffer of its module, row r holding what rank r
    will own; after backward, the buffer multiplied by this rank's half sign (or, with micro-batch
    halves, filled with the signed micro-batch gradients) is reduce-scattered: each rank gets its
    row of D. S is the sum of the same gradients, which DeepSpeed has just reduced itself: with
    ``reduced_gradient`` (``pipeline.distributed.ds_internals.reduced_gradient_reader``: ZeRO-3, fp32 ZeRO-0)
    or ``partitions`` (ZeRO 1/2) it is read from DeepSpeed's result; otherwise a second
    reduce-scatter of the unsigned buffer gives it.

    Micro-batch halves under ZeRO-3 need no tap at all: ZeRO-3 reduces after every backward, so
    after the first half's last micro-batch its partition holds the first half's sum (copied then,
    ``after_backward``), and at the end S; D = 2 x first - S. Cost: one partition-sized copy, no
    collective. (Not with the optimizer offloaded: the partition it reads is then the host copy,
    written at the accumulation boundary only; the tap runs as for the other stages.)
    """

    def __init__(self, modules: dict[str, list[nn.Parameter]], world: int, rank: int, accum: int,
                 halves: Optional[Halves] = None):
        self.modules = modules
        self.halves_of = halves or choose_halves(world, accum)[0]
        self.by_ranks = self.halves_of.by == "ranks"
        self.world, self.rank, self.accum = world, rank, accum
        self.first, self.second = self.halves_of.sizes
        self.module_of = {p: name for name, params in modules.items() for p in params}
        self.columns: dict[nn.Parameter, int] = {}  # where each parameter's chunk starts in its module's row
        self.width: dict[str, int] = {}  # L: the length of a module's shard
        for name, params in modules.items():
            self.width[name] = 0
            for p in params:
                self.columns[p] = self.width[name]
                self.width[name] += chunk_of(full_numel(p), world)
        self.armed, self.micro = False, 0
        self.first_sums: dict[str, list[torch.Tensor]] = {}  # tap-free micro-batch halves: first half, per parameter
        self.sums: dict[str, torch.Tensor] = {}  # [W, L] per module: this rank's local gradient
        self.signed: dict[str, torch.Tensor] = {}  # micro-batch halves: first half minus second
        # reads this rank's chunk of DeepSpeed's reduced (mean) gradient; set once the engine exists
        self.reduced_gradient: Optional[Callable[[list[nn.Parameter]], Iterator[torch.Tensor]]] = None
        # ZeRO 1/2: their partitions as the shard layout, S read from them (``use_zero12_partitions``)
        self.partitions: Optional[Zero12Partitions] = None
        self.handles = [p.register_hook(partial(self._on_grad, p)) for ps in modules.values() for p in ps]

    def use_zero12_partitions(self, partitions: Zero12Partitions) -> None:
        """Lay the shards out as ZeRO 1/2's partitions and read S from them (set once the engine
        exists, before the first estimate)."""
        self.partitions, self.width = partitions, dict(partitions.width)

    @property
    def reads_s(self) -> bool:
        """Whether S comes from DeepSpeed's own reduction (then only D is reduce-scattered)."""
        return self.reduced_gradient is not None or self.partitions is not None

    @property
    def from_partitions(self) -> bool:
        """Micro-batch halves read from ZeRO-3's partitions after each half (no tap; class docstring)."""
        return (not self.by_ranks and self.world >= 2
                and getattr(self.reduced_gradient, "each_backward", False))

    def arm(self) -> None:
        """Tap the gradients of the coming iteration (call before its first backward)."""
        self.armed, self.sums, self.signed, self.first_sums, self.micro = True, {}, {}, {}, 0

    def after_backward(self, micro: int) -> None:
        """Micro-batch ``micro``'s backward is done (ZeRO has reduced it where it reduces every
        backward): after the first half's last one, keep the first half's sum, parameter by parameter."""
        if self.armed and self.from_partitions and micro == max(self.halves_of.first):
            self.first_sums = {name: [c.clone() for c in self.reduced_gradient(params)]
                               for name, params in self.modules.items()}

    def begin_micro(self, micro: int) -> None:
        """The next backward is micro-batch ``micro`` of the iteration (which half it belongs to)."""
        self.micro = micro

    def _on_grad(self, param: nn.Parameter, grad: torch.Tensor) -> None:
        if not self.armed or self.from_partitions:
            return None
        name, g = self.module_of[param], grad.detach().reshape(-1).float()
        if self.partitions is None:  # ZeRO-3's layout: chunk r of every parameter in row r
            chunk = chunk_of(grad.numel(), self.world)
            g = F.pad(g, (0, chunk * self.world - grad.numel())).view(self.world, chunk)
        if self.by_ranks or not self.reads_s:  # rank halves: D is this, signed, reduced
            self._add(self.sums, name, param, g)
        if not self.by_ranks:  # micro-batch halves: the first half's micro-batches against the rest
            self._add(self.signed, name, param, g if self.micro in self.halves_of.first else -g)
        return None  # the gradient itself is left untouched

    def _add(self, store: dict, name: str, param: nn.Parameter, g: torch.Tensor) -> None:
        if name not in store:  # a parameter without a gradient this iteration keeps its zeros
            store[name] = g.new_zeros(self.world, self.width[name])
        if self.partitions is None:  # g: [W, chunk], one column block
            start = self.columns[param]
            store[name][:, start:start + g.shape[1]].add_(g)
            return
        for row, column, start, length in self.partitions.segments[param]:  # g flat: its rows' pieces
            store[name][row, column:column + length].add_(g[start:start + length])

    def reduced(self) -> Iterator[tuple[str, list[nn.Parameter], torch.Tensor, torch.Tensor]]:
        """Module by module, this rank's shard of S and D over the global batch (the whole vectors
        with one rank) for the parameters ``params`` of module ``name``: the whole module, or,
        where S is DeepSpeed's own reduced gradient, one parameter's piece at a time, S's piece
        read in place. Each buffer is freed once reduced, so the caller holds one module's D at a
        time. Every rank must consume it whole (collectives); then the tap is disarmed."""
        sign = 1.0 if self.rank in self.halves_of.first else -1.0
        self.armed = False
        for name, params in self.modules.items():
            local, signed = self.sums.pop(name, None), self.signed.pop(name, None)
            if self.world == 1:  # micro-batch halves; nothing to reduce
                yield name, params, self._or_zeros(local, name)[0], self._or_zeros(signed, name)[0]
                continue
            if self.from_partitions:  # S and the first half's sum from ZeRO-3 (means over the ranks)
                firsts = self.first_sums.pop(name)[::-1]  # popped from the end: each freed once used
                for param, chunk in zip(params, self.reduced_gradient(params)):
                    s = chunk.mul(self.world)
                    yield name, [param], s, firsts.pop().mul_(2 * self.world).sub_(s)
                continue
            if not self.reads_s:  # S reduced here too: two reduce-scatters, whole rows
                yield name, params, _reduce_scatter(self._or_zeros(local, name)), _reduce_scatter(
                    self._or_zeros(local, name).mul_(sign) if self.by_ranks else self._or_zeros(signed, name))
                continue
            d = _reduce_scatter(self._or_zeros(local, name).mul_(sign) if self.by_ranks
                                else self._or_zeros(signed, name))
            del local, signed
            yield from self._beside_s(name, params, d)
        self.sums, self.signed, self.first_sums = {}, {}, {}

    def _beside_s(self, name: str, params: list[nn.Parameter], d: torch.Tensor):
        """D's row cut into the pieces that DeepSpeed's reduced gradient (S, a mean over the ranks)
        holds for this rank, each next to S's piece, read where DeepSpeed keeps it: no copy of a
        module's S is ever assembled (the estimate only needs sums over pieces)."""
        if self.partitions is not None:  # ZeRO 1/2: each parameter's fragment of the flat partitions
            for param, grad, column in self.partitions.reduced_pieces(name):
                yield name, [param], grad.float() * self.world, d[column:column + grad.numel()]
            return
        for param, chunk in zip(params, self.reduced_gradient(params)):  # chunk r of each parameter
            start = self.columns[param]
            yield name, [param], chunk * self.world, d[start:start + chunk.numel()]

    def _or_zeros(self, buffer: Optional[torch.Tensor], name: str) -> torch.Tensor:
        """A module's buffer, or zeros where none of its parameters had a gradient on this rank."""
        if buffer is not None:
            return buffer
        return torch.zeros(self.world, self.width[name], device=self.modules[name][0].device)

    def halves(self, s: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean gradient of each half, scaled like the gradient the optimizer sees.

        S + D = 2 x (sum over the first half's units). A rank's gradient is its mean over
        micro-batches; a micro-batch's tapped gradient is already divided by ``accum`` by
        DeepSpeed's loss scaling, hence the factor for micro-batch halves (whose units are
        rank x micro-batch pairs).
        """
        unit = 1.0 if self.by_ranks else float(self.accum)
        return (s + d) * (unit / (2 * self.first)), (s - d) * (unit / (2 * self.second))


def check_loss_scaling(optimizer: str, ds_config: dict, source: str = "train.ds_config") -> None:
    """AGVM-AdamW preconditions the half gradients with the second moment, which holds unscaled
    gradients; fp16's loss scaling would leave the halves scaled by it (SGD's cosine does not care)."""
    if optimizer == "agvm_adamw" and ds_config.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"optim.name=agvm_adamw cannot run with fp16 loss scaling ({source} enables fp16): its "
                          "half gradients would carry the loss scale that its second moment does not; use bf16 "
                          "(a *_bf16.json preset) or fp32")


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
    (``pipeline.train.step.TrainStep``) asks it, for iteration ``it``, whether to arm the tap, for the
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

    def estimate(self, it: int,
                 second_moment: Optional[Callable[[list[nn.Parameter]], torch.Tensor]] = None) -> None:
        """Phi and mu from the tapped gradients of iteration ``it`` (every rank calls it: collectives).
        ``second_moment(params)``: AdamW's exp_avg_sq of ``params`` in the layout of the shards
        ``HalfGradients.reduced`` yields for them (this rank's part, flat), for AGVM-AdamW.

        Each rank reduces its shards to three numbers per module, summed over the ranks in one
        all-reduce: |S|^2, |D|^2, <S, D> (SGD), or <H1, H2>, |H1|^2, |H2|^2 of the preconditioned
        halves (AdamW)."""
        partial_sums: dict[str, torch.Tensor] = {}
        for name, params, s, d in self.tap.reduced():
            if self.adamw is None:
                s, d = s.double(), d.double()
                sums = torch.stack([s.dot(s), d.dot(d), s.dot(d)])
            else:
                beta2, eps = self.adamw
                v = second_moment(params)
                h1, h2 = (g / ((beta2 * v + (1 - beta2) * g.square()).sqrt() + eps) for g in self.tap.halves(s, d))
                h1, h2 = h1.double(), h2.double()
                sums = torch.stack([h1.dot(h2), h1.dot(h1), h2.dot(h2)])
            partial_sums[name] = partial_sums[name] + sums if name in partial_sums else sums
        # Every module, in the same order on every rank, even one with no piece on this rank (ZeRO 1/2
        # can leave a small module's groups wholly on other ranks): the all-reduce must match.
        names = list(self.tap.modules)
        like = next(iter(partial_sums.values()), None)  # where the sums live (a parameter's device otherwise)
        zeros = torch.zeros(3, dtype=torch.float64,
                            device=like.device if like is not None else self.tap.modules[names[0]][0].device)
        totals = torch.stack([partial_sums.get(n, zeros) for n in names])
        if self.tap.world >= 2:
            dist.all_reduce(totals)
        if self.adamw is None:
            values = phi_from_sums(totals[:, 0], totals[:, 1], totals[:, 2])
        else:
            values = 1 - totals[:, 0] / (totals[:, 1] * totals[:, 2]).sqrt().clamp(min=1e-300)
        self.update(dict(zip(names, values.tolist())), it)

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
