"""Which images each rank reads at each step: aspect-grouped training batches sharded over ranks,
deterministic per (seed, epoch) so a resumed run sees the batches an uninterrupted one would, and
the disjoint evaluation shares.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def index_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample occurrence: same on every rank, worker and resume."""
    return (seed << 40) + (epoch << 24) + index


class ShardedBatchSampler(Sampler):
    """Aspect-ratio-grouped batches, sharded across ranks, deterministic per (seed, epoch).

    Each optimizer step consumes one global batch of ``world * micro_batch *
    grad_accum`` images. The epoch's permutation (identical on every rank) is cut
    into chunks of one global batch each, of one aspect group, and the chunks are
    shuffled: which images an optimizer step sees depends on the global batch only,
    not on how it is split into ranks, micro-batches and accumulation steps, so a run
    resumed with another split of the same global batch sees exactly the images the
    uninterrupted run would have, step for step. Within a chunk, accumulation step a
    takes the a-th slice of ``world * micro_batch`` images and rank r the r-th
    micro-batch of that. An epoch is ``ceil(N / global)`` steps; the last one is
    completed by wrapping around the permutation, so every image is seen and no rank
    idles. Yields lists of ``(index, aug_seed)``.
    """

    def __init__(self, aspect_ratios: Sequence[float], micro_batch: int, world: int = 1, rank: int = 0,
                 grad_accum: int = 1, seed: int = 0, group_by_aspect: bool = True):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.landscape = np.asarray(aspect_ratios) >= 1.0
        self.micro_batch, self.world, self.rank, self.grad_accum = micro_batch, world, rank, grad_accum
        self.seed, self.group_by_aspect = seed, group_by_aspect
        self.epoch, self.start_step = 0, 0

    @property
    def global_batch(self) -> int:
        return self.world * self.micro_batch * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.landscape) / self.global_batch)

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """Start the next iteration at optimizer step ``start_step`` of ``epoch`` (used by resume)."""
        self.epoch, self.start_step = epoch, start_step

    def _chunks(self) -> list[np.ndarray]:
        """The epoch's optimizer steps: one global batch of indices each, of one aspect group."""
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.landscape))
        pad = self.steps_per_epoch * self.global_batch - len(perm)
        order = np.concatenate([perm, np.resize(perm, pad)])
        size = self.global_batch
        if not self.group_by_aspect:
            return list(order.reshape(-1, size))
        chunks, rest = [], []
        for group in (order[self.landscape[order]], order[~self.landscape[order]]):
            full = len(group) // size * size
            chunks += list(group[:full].reshape(-1, size))
            rest.append(group[full:])
        rest = np.concatenate(rest)  # the two remainders add up to 0 or exactly one chunk
        chunks += list(rest.reshape(-1, size))
        return [chunks[i] for i in rng.permutation(len(chunks))]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        m = self.micro_batch
        for chunk in self._chunks()[self.start_step:]:
            for accum in range(self.grad_accum):
                lo = (accum * self.world + self.rank) * m
                yield [(int(i), index_seed(self.seed, self.epoch, int(i))) for i in chunk[lo:lo + m]]


def eval_batches(num_items: int, batch: int, world: int = 1, rank: int = 0) -> list[list[int]]:
    """Rank r's share of an evaluation pass: items r, r+W, ...; disjoint and complete, no padding."""
    mine = list(range(rank, num_items, world))
    return [mine[i:i + batch] for i in range(0, len(mine), batch)]

