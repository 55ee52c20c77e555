"""COCO data: dataset through pycocotools, resize + flip, aspect-grouped sharded batches.

Everything an image goes through before the model happens here, in DataLoader
workers: JPEG decode, resize by shorter side with a cap on the longer side,
horizontal flip. In training the model's own transform then only normalises and pads
(its resize is switched off, ``models.detector``); at inference it resizes again to the
same sizes, an identity up to rounding, and maps boxes back to the loader's image size.

Augmentation randomness is a pure function of (seed, epoch, image index), not of
worker or rank, so a resumed run sees exactly the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as TF

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad dataset input; the message names the file, the field and the fix."""


def load_coco(ann_file: Path) -> COCO:
    """Load a COCO annotation file with errors that name the file and the problem."""
    if not ann_file.is_file():
        raise DataError(f"annotation file {ann_file} does not exist (check data.root and data.*_ann)")
    try:
        raw = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"annotation file {ann_file} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise DataError(f"annotation file {ann_file}: top level must be an object with images/annotations/categories")
    for key in ("images", "categories"):
        if not raw.get(key):
            raise DataError(f"annotation file {ann_file} has no {key!r}: a COCO file needs at least one entry there")
    raw.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = raw
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    return coco


def _check_annotations(coco: COCO, ann_file: Path) -> int:
    """Refuse unknown category ids; count boxes with non-positive size (skipped later)."""
    cat_ids = set(coco.getCatIds())
    bad = 0
    for ann in coco.dataset["annotations"]:
        if ann.get("category_id") not in cat_ids:
            raise DataError(f"annotation file {ann_file}: annotation id {ann.get('id')} has category_id "
                            f"{ann.get('category_id')!r}, not among the categories {sorted(cat_ids)}; "
                            "fix the annotation or add the category")
        if ann.get("image_id") not in coco.imgs:
            raise DataError(f"annotation file {ann_file}: annotation id {ann.get('id')} refers to image_id "
                            f"{ann.get('image_id')!r}, which is not in 'images'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4) or bbox[2] <= 0 or bbox[3] <= 0:
            bad += 1
    if bad:
        log.warning("%s: skipping %d annotation(s) with a missing bbox or non-positive width/height",
                    ann_file, bad)
    return bad


def _valid_box(ann: dict) -> bool:
    bbox = ann.get("bbox")
    return isinstance(bbox, list) and len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0


class CocoDetection(Dataset):
    """COCO images and targets for torchvision detectors.

    Items are ``(index, aug_seed)`` pairs (see ``ShardedBatchSampler``) or plain
    indices. Returns a uint8 CHW image resized so its shorter side is
    ``min_size`` (longer side at most ``max_size``) and a target with ``boxes``
    (xyxy, resized pixels), ``labels`` (1..K), ``image_id``, ``scale`` and,
    with ``with_masks``, ``masks``. Crowd annotations are left out of targets
    (COCOeval handles them at evaluation).
    """

    def __init__(self, image_dir: Path, ann_file: Path, min_size: int, max_size: int, flip_prob: float = 0.0,
                 with_masks: bool = False, keep_empty: bool = True):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.coco = load_coco(self.ann_file)
        self.skipped_boxes = _check_annotations(self.coco, self.ann_file)
        self.min_size, self.max_size, self.flip_prob, self.with_masks = min_size, max_size, flip_prob, with_masks
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.ids = [i for i in sorted(self.coco.imgs) if keep_empty or self._usable_anns(i)]
        if not self.ids:
            raise DataError(f"{self.ann_file}: no image has a usable annotation; set data.keep_empty=true "
                            "or fix the annotations")
        self._check_files()

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def _usable_anns(self, img_id: int) -> list[dict]:
        return [a for a in self.coco.imgToAnns[img_id] if not a.get("iscrowd", 0) and _valid_box(a)]

    def _check_files(self) -> None:
        # Checked once up front: a missing file found hours into a run loses those hours.
        missing = [self.coco.imgs[i]["file_name"] for i in self.ids
                   if not (self.image_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing:
            raise DataError(f"{len(missing)} image file(s) listed in {self.ann_file} are missing under "
                            f"{self.image_dir}, e.g. {missing[:3]}; check data.root / data.*_images")

    def aspect_ratios(self) -> list[float]:
        """Width / height per item, from the annotation file (no image is opened)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def _read_image(self, path: Path) -> torch.Tensor:
        try:
            return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as err:
            raise DataError(f"cannot decode image {path}: {err}; re-export or remove it from the annotations") from None

    def __getitem__(self, item: int | tuple[int, int]):
        index, aug_seed = item if isinstance(item, tuple) else (item, index_seed(0, 0, item))
        img_id = self.ids[index]
        image = self._read_image(self.image_dir / self.coco.imgs[img_id]["file_name"])
        h, w = image.shape[-2:]
        scale = min(self.min_size / min(h, w), self.max_size / max(h, w))
        nh, nw = round(h * scale), round(w * scale)
        image = TF.resize(image, [nh, nw], antialias=True)
        anns = self._usable_anns(img_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes = (boxes * scale).clamp_(min=0)
        boxes[:, 0::2].clamp_(max=nw)
        boxes[:, 1::2].clamp_(max=nh)
        target = {"boxes": boxes, "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns],
                                                          dtype=torch.int64),
                  "image_id": img_id, "scale": scale}
        if self.with_masks:
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns \
                else torch.zeros((0, h, w), dtype=torch.uint8)
            target["masks"] = TF.resize(masks, [nh, nw], interpolation=TF.InterpolationMode.NEAREST_EXACT)
        if self.flip_prob > 0 and random.Random(aug_seed).random() < self.flip_prob:
            image = image.flip(-1)
            target["boxes"][:, [0, 2]] = nw - target["boxes"][:, [2, 0]]
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def index_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample occurrence: same on every rank, worker and resume."""
    return (seed << 40) + (epoch << 24) + index


class ShardedBatchSampler(Sampler):
    """Aspect-ratio-grouped batches, sharded across ranks, deterministic per (seed, epoch).

    Each optimizer step consumes one global batch of ``world * micro_batch *
    grad_accum`` images. The epoch's permutation (identical on every rank) is cut
    into "micro-global" chunks of ``world * micro_batch`` images of one aspect
    group; rank r takes slice r of each chunk. An epoch is ``ceil(N / global)``
    steps; the last one is completed by wrapping around the permutation, so every
    image is seen and no rank idles. Yields lists of ``(index, aug_seed)``.
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
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.landscape))
        pad = self.steps_per_epoch * self.global_batch - len(perm)
        order = np.concatenate([perm, np.resize(perm, pad)])
        size = self.world * self.micro_batch
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
        lo = self.rank * self.micro_batch
        for chunk in self._chunks()[self.start_step * self.grad_accum:]:
            yield [(int(i), index_seed(self.seed, self.epoch, int(i))) for i in chunk[lo:lo + self.micro_batch]]


def eval_batches(num_items: int, batch: int, world: int = 1, rank: int = 0) -> list[list[int]]:
    """Rank r's share of an evaluation pass: items r, r+W, ...; disjoint and complete, no padding."""
    mine = list(range(rank, num_items, world))
    return [mine[i:i + batch] for i in range(0, len(mine), batch)]


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def _loader(dataset: Dataset, batch_sampler, workers: int, seed: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed))


def _seed_worker(worker_id: int) -> None:
    # Per-rank, per-worker seeds for any library randomness; our own augmentation uses index_seed.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_datasets(d, with_masks: bool) -> tuple[CocoDetection, CocoDetection]:
    """Train and val datasets from a ``DataConfig`` (the experiment's ``data`` section)."""
    train = CocoDetection(d.path(d.train_images), d.path(d.train_ann), d.min_size, d.max_size,
                          flip_prob=d.flip_prob, with_masks=with_masks, keep_empty=d.keep_empty)
    val = CocoDetection(d.path(d.val_images), d.path(d.val_ann), d.min_size, d.max_size,
                        flip_prob=0.0, with_masks=False, keep_empty=True)
    if val.cat_ids != train.cat_ids:
        raise DataError(f"{d.path(d.val_ann)} and {d.path(d.train_ann)} have different category ids "
                        f"({val.cat_ids} vs {train.cat_ids})")
    return train, val


def build_loaders(data_cfg, train_set: CocoDetection, val_set: CocoDetection, micro_batch: int,
                  grad_accum: int, world: int, rank: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """Training loader (sharded, grouped, resumable) and this rank's evaluation loader."""
    sampler = ShardedBatchSampler(train_set.aspect_ratios(), micro_batch, world, rank, grad_accum, seed,
                                  data_cfg.aspect_grouping)
    train = _loader(train_set, sampler, data_cfg.workers, seed + rank)
    val = _loader(val_set, eval_batches(len(val_set), micro_batch, world, rank), data_cfg.workers, seed + rank)
    return train, val
