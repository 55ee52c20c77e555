"""The training and evaluation DataLoaders, built from the experiment's ``data`` section."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.dataset import CocoDetection, check_image_files
from pipeline.data.samplers import ShardedBatchSampler, eval_batches
from pipeline.errors import DataError


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def loader(dataset: Dataset, batch_sampler, workers: int, seed: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed))


def _seed_worker(worker_id: int) -> None:
    # Per-rank, per-worker seeds for any library randomness; our own augmentation uses index_seed.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_datasets(d, with_masks: bool) -> tuple[CocoDetection, CocoDetection]:
    """Train and val datasets from a ``DataConfig`` (the experiment's ``data`` section).

    Call it on every rank: the image files are checked once, by rank 0, for all of them
    (``check_image_files``), and every rank raises the same DataError if one is missing.
    """
    train = CocoDetection(d.path(d.train_images), d.path(d.train_ann), d.min_size, d.max_size,
                          flip_prob=d.flip_prob, with_masks=with_masks, keep_empty=d.keep_empty, check_files=False,
                          decode=d.decode, train_min_sizes=d.train_min_sizes, scale_jitter=d.scale_jitter)
    val = CocoDetection(d.path(d.val_images), d.path(d.val_ann), d.min_size, d.max_size,
                        flip_prob=0.0, with_masks=False, keep_empty=True, check_files=False)
    check_image_files([train, val])
    if val.cat_ids != train.cat_ids:
        raise DataError(f"{d.path(d.val_ann)} and {d.path(d.train_ann)} have different category ids "
                        f"({val.cat_ids} vs {train.cat_ids})")
    return train, val


def build_loaders(data_cfg, train_set: CocoDetection, val_set: CocoDetection, micro_batch: int,
                  grad_accum: int, world: int, rank: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """Training loader (sharded, grouped, resumable) and this rank's evaluation loader."""
    sampler = ShardedBatchSampler(train_set.aspect_ratios(), micro_batch, world, rank, grad_accum, seed,
                                  data_cfg.aspect_grouping)
    train = loader(train_set, sampler, data_cfg.workers, seed + rank)
    val = loader(val_set, eval_batches(len(val_set), micro_batch, world, rank), data_cfg.workers, seed + rank)
    return train, val
