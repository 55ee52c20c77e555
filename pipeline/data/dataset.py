"""The COCO detection dataset: annotations held as compact arrays, decode, resize + flip.

Everything an image goes through before the model happens here, in DataLoader
workers: JPEG decode, resize by shorter side with a cap on the longer side,
horizontal flip. In training the model's own transform then only normalises and pads
(its resize is switched off, ``models.detector``); at inference it resizes again to the
same sizes, an identity up to rounding, and maps boxes back to the loader's image size.
With ``data.decode=device`` the workers read only each JPEG's bytes and header (the geometry,
boxes and flip are decided there as before) and ``decode_on_device`` decodes, resizes and flips
the batch on the training device (nvJPEG on a GPU), where CPU workers would fall behind.

Augmentation randomness is a pure function of (seed, epoch, image index), not of
worker or rank, so a resumed run sees exactly the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import pickle
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from pipeline.data.annotations import (ann_mask, gc_paused, load_coco, pack_strings, read_annotation_file,
                                       resized_box_has_no_area)
from pipeline.data.samplers import index_seed
from pipeline.errors import DataError
from pipeline.utils.memory import release_free_heap

log = logging.getLogger(__name__)


class CocoDetection(Dataset):
    """COCO images and targets for torchvision detectors.

    Items are ``(index, aug_seed)`` pairs (see ``ShardedBatchSampler``) or plain
    indices. Returns a uint8 CHW image resized so its shorter side is
    ``min_size`` (longer side at most ``max_size``) and a target with ``boxes``
    (xyxy, resized pixels), ``labels`` (1..K), ``image_id``, ``scale`` and,
    with ``with_masks``, ``masks``. Crowd annotations are left out of targets
    (COCOeval handles them at evaluation).

    The annotation file is read once, at construction, into a few numpy arrays: per image its
    id, file name (one UTF-8 buffer + offsets) and the file's width/height; per usable box its
    float32 xywh and label, all images' boxes in one array with per-image offsets; with
    ``with_masks`` each box's segmentation, pickled into one buffer + offsets. DataLoader
    workers forked from this process read those arrays without writing to their pages (a
    Python dict or list would be copied page by page as its reference counts change), and
    nothing of pycocotools is kept for training. ``coco`` (pycocotools' index, for COCOeval and
    the original image sizes at evaluation) is built from the file on first use.

    Boxes that cannot train are left out when the file is read and reported in one warning
    (count and a few annotation ids): a missing bbox or one with non-positive width/height,
    one with no area inside its image (clipped to the file's width/height, in the file's
    pixels), or one that the resize to ``min_size``/``max_size`` (and the flip) would round to
    no area. An image whose file disagrees with its width/height in the annotation file could
    still produce such a box: ``__getitem__`` drops it too (one warning per process and dataset).

    ``check_files`` checks at construction that every image file exists; pass False and call
    ``check_image_files`` to have rank 0 check for every rank.
    """

    def __init__(self, image_dir: Path, ann_file: Path, min_size: int, max_size: int, flip_prob: float = 0.0,
                 with_masks: bool = False, keep_empty: bool = True, check_files: bool = True,
                 decode: str = "workers", train_min_sizes: Optional[Sequence[int]] = None,
                 scale_jitter: Optional[tuple[float, float]] = None):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.min_size, self.max_size, self.flip_prob, self.with_masks = min_size, max_size, flip_prob, with_masks
        # Scale augmentation (training sets only): multi-scale shorter sides, or large-scale jitter
        self.train_min_sizes = tuple(train_min_sizes) if train_min_sizes else None
        self.scale_jitter = scale_jitter
        self.decode = decode  # "workers", or "device": JPEGs leave the workers encoded (decode_on_device)
        self._coco: COCO | None = None
        self._warned_after_resize = False
        with gc_paused():
            raw = read_annotation_file(self.ann_file, segmentation=with_masks)
            self._index(raw, keep_empty)
            del raw
        release_free_heap()  # the parsed JSON's memory goes back to the system, not to each worker's copy
        if not len(self._img_ids):
            raise DataError(f"{self.ann_file}: no image has a usable annotation; set data.keep_empty=true "
                            "or fix the annotations")
        if check_files:
            error = self.missing_files_error()
            if error:
                raise DataError(error)

    def _index(self, raw: dict, keep_empty: bool) -> None:
        """Validate the parsed file and keep what items need as numpy arrays."""
        ann_file = self.ann_file
        images = {}
        for img in raw["images"]:
            if not isinstance(img, dict) or "id" not in img:
                raise DataError(f"annotation file {ann_file}: an entry of 'images' has no 'id': {img!r:.200}")
            images[img["id"]] = img  # a repeated id: the last entry wins, as in pycocotools
        try:
            self.cat_ids = sorted(c["id"] for c in raw["categories"])
            names = {c["id"]: str(c.get("name", c["id"])) for c in raw["categories"]}
        except (TypeError, KeyError):
            raise DataError(f"annotation file {ann_file}: every entry of 'categories' needs an 'id'") from None
        self.cat_names = [names[c] for c in self.cat_ids]  # label i + 1 is category cat_ids[i], named so
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        all_ids = sorted(images)
        position = {img_id: k for k, img_id in enumerate(all_ids)}
        wh = np.zeros((len(all_ids), 2), np.float64)
        for k, img_id in enumerate(all_ids):
            img = images[img_id]
            size = img.get("width"), img.get("height")
            if not all(isinstance(v, (int, float)) and v > 0 for v in size):
                raise DataError(f"annotation file {ann_file}: image id {img_id} ({img.get('file_name')!r}) needs "
                                f"a positive 'width' and 'height', has {size}")
            wh[k] = size

        # Column by column (list comprehensions: the fastest Python loop over a million dicts).
        anns = raw["annotations"]
        labels = [self.cat_to_label.get(a.get("category_id")) for a in anns]
        img_pos = [position.get(a.get("image_id")) for a in anns]
        if None in labels or None in img_pos:
            j = min(lst.index(None) for lst in (labels, img_pos) if None in lst)
            ann = anns[j]
            if labels[j] is None:
                raise DataError(f"annotation file {ann_file}: annotation id {ann.get('id')} has category_id "
                                f"{ann.get('category_id')!r}, not among the categories {sorted(set(self.cat_ids))}; "
                                "fix the annotation or add the category")
            raise DataError(f"annotation file {ann_file}: annotation id {ann.get('id')} refers to image_id "
                            f"{ann.get('image_id')!r}, which is not in 'images'")
        bboxes = [a.get("bbox") for a in anns]
        valid = np.array([isinstance(b, list) and len(b) == 4 and not (b[2] <= 0 or b[3] <= 0) for b in bboxes], bool)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)
        invalid = [anns[j].get("id") for j in np.flatnonzero(~valid)[:5].tolist()]
        kept = np.flatnonzero(valid & ~crowd)  # index into anns, in the file's order
        kept_list = kept.tolist()
        xywh64 = np.fromiter(itertools.chain.from_iterable(bboxes[j] for j in kept_list), np.float64,
                             4 * len(kept_list)).reshape(-1, 4)
        img_pos, labels = np.array(img_pos, np.int64)[kept], np.array(labels, np.int64)[kept]
        del bboxes

        # In the file's pixels: clip to the image, no area left -> dropped (NaN too).
        box_wh = wh[img_pos]
        x1, y1 = np.maximum(xywh64[:, 0], 0), np.maximum(xywh64[:, 1], 0)
        x2 = np.minimum(xywh64[:, 0] + xywh64[:, 2], box_wh[:, 0])
        y2 = np.minimum(xywh64[:, 1] + xywh64[:, 3], box_wh[:, 1])
        outside = ~((x2 > x1) & (y2 > y1))
        xywh = xywh64.astype(np.float32)
        vanishes = ~outside & resized_box_has_no_area(xywh, box_wh, self.min_size, self.max_size,
                                                       self.flip_prob > 0)
        usable = ~(outside | vanishes)
        first_ids = [[anns[j].get("id") for j in kept[mask][:5].tolist()] for mask in (outside, vanishes)]
        self._report_skipped((int((~valid).sum()), invalid), (int(outside.sum()), first_ids[0]),
                             (int(vanishes.sum()), first_ids[1]))

        order = np.argsort(img_pos[usable], kind="stable")  # per image, in the file's order
        counts = np.bincount(img_pos[usable], minlength=len(all_ids))
        keep_img = np.ones(len(all_ids), bool) if keep_empty else counts > 0
        self._img_ids = np.array(all_ids)[keep_img]  # int64 (or str where the file's ids are strings)
        self._wh = wh[keep_img]
        self._box_off = np.zeros(len(self._img_ids) + 1, np.int64)
        np.cumsum(counts[keep_img], out=self._box_off[1:])
        self._boxes = np.ascontiguousarray(xywh[usable][order])
        self._labels = labels[usable][order]
        try:
            names = [images[i]["file_name"] for i in self._img_ids.tolist()]
        except KeyError:
            raise DataError(f"annotation file {ann_file}: every entry of 'images' needs a 'file_name'") from None
        self._names, self._name_off = pack_strings(names)
        if self.with_masks:  # each box's segmentation pickled into one buffer, in the boxes' order
            buf, offsets = io.BytesIO(), [0]
            for j in kept[usable][order].tolist():
                if "segmentation" not in anns[j]:
                    raise DataError(f"annotation file {ann_file}: annotation id {anns[j].get('id')} has no "
                                    "'segmentation', which a mask model needs")
                seg = anns[j].pop("segmentation")  # freed as it is packed: no second copy at the peak
                offsets.append(offsets[-1] + buf.write(pickle.dumps(seg, protocol=pickle.HIGHEST_PROTOCOL)))
            self._segs, self._seg_off = np.frombuffer(buf.getbuffer(), np.uint8), np.array(offsets, np.int64)

    def _report_skipped(self, invalid: tuple, outside: tuple, vanishes: tuple) -> None:
        """One warning for all boxes left out: how many, why, and a few annotation ids (each
        argument: the count and the first few ids)."""
        flipped = ", or when flipped" if self.flip_prob > 0 else ""
        reasons = [(*invalid, "with a missing bbox or non-positive width/height"),
                   (*outside, "with no area inside their image"),
                   (*vanishes, f"with no area once resized (min_size {self.min_size}, "
                               f"max_size {self.max_size}{flipped})")]
        self.skipped_boxes = sum(n for n, _, _ in reasons)
        if self.skipped_boxes:
            examples = [i for _, ids, _ in reasons for i in ids][:5]
            log.warning("%s: skipping %d annotation(s) (%s); annotation ids %s", self.ann_file, self.skipped_boxes,
                        ", ".join(f"{n} {why}" for n, _, why in reasons if n),
                        ", ".join(map(str, examples)) + (", ..." if self.skipped_boxes > len(examples) else ""))

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @property
    def ids(self) -> list[int]:
        """Image id of each item (a new list; the dataset keeps them as an array)."""
        return self._img_ids.tolist()

    @property
    def coco(self) -> COCO:
        """pycocotools' index of the annotation file (COCOeval, original sizes), built on first use."""
        if self._coco is None:
            self._coco = load_coco(self.ann_file)
        return self._coco

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_coco"] = None  # rebuilt where needed, never shipped to workers
        return state

    def image_path(self, index: int) -> Path:
        """The image file of item ``index``."""
        return self.image_dir / self._file_name(index)

    def _file_name(self, index: int) -> str:
        lo, hi = self._name_off[index], self._name_off[index + 1]
        return self._names[lo:hi].tobytes().decode("utf-8", "surrogatepass")

    def missing_files(self) -> list[str]:
        """File names, in item order, that are not files under ``image_dir``.

        One directory listing per folder instead of one ``stat`` per image; a name the listing
        does not show is then checked on its own (``os.path.isfile``), so the answer is the same.
        """
        names = [self._file_name(i) for i in range(len(self))]
        by_dir: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            by_dir.setdefault(os.path.dirname(os.path.join(self.image_dir, name)), []).append(i)
        missing = []
        for folder, items in by_dir.items():
            try:
                with os.scandir(folder or ".") as entries:
                    present = {e.name for e in entries if e.is_file()}
            except OSError:
                present = set()
            missing += [i for i in items if os.path.basename(names[i]) not in present
                        and not os.path.isfile(os.path.join(self.image_dir, names[i]))]
        return [names[i] for i in sorted(missing)]

    def missing_files_error(self) -> str | None:
        """The DataError message for missing image files, or None when all are there."""
        missing = self.missing_files()
        if not missing:
            return None
        return (f"{len(missing)} image file(s) listed in {self.ann_file} are missing under {self.image_dir}, "
                f"e.g. {missing[:10]}; check data.root / data.*_images")

    def aspect_ratios(self) -> list[float]:
        """Width / height per item, from the annotation file (no image is opened)."""
        return (self._wh[:, 0] / self._wh[:, 1]).tolist()

    def __len__(self) -> int:
        return len(self._img_ids)

    def _read_bytes(self, path: Path) -> torch.Tensor:
        """The file's bytes. An OSError (EIO, ESTALE on a network filesystem) is not the data's fault and
        may pass on a retry: it keeps its own type (exit status 1), unlike a file that does not decode."""
        return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)

    def _read_image(self, path: Path) -> torch.Tensor:
        data = self._read_bytes(path)
        try:
            return decode_image(data, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as err:
            raise DataError(f"cannot decode image {path}: {err}; re-export or remove it from the annotations") from None

    def __getitem__(self, item: int | tuple[int, int]):
        index, aug_seed = item if isinstance(item, tuple) else (item, index_seed(0, 0, item))
        rng = random.Random(aug_seed)  # every random choice below: a function of (seed, epoch, index)
        flip = rng.random() < self.flip_prob  # the first draw: flips are what they were before scale augmentation
        if self.scale_jitter is not None:
            return self._jittered(index, rng, flip)
        img_id = self._img_ids[index].item()
        path = self.image_dir / self._file_name(index)
        encoded, image = self._read_encoded(path) if self.decode == "device" else (None, self._read_image(path))
        h, w = _jpeg_size(encoded, path) if encoded is not None else image.shape[-2:]
        min_size = rng.choice(self.train_min_sizes) if self.train_min_sizes else self.min_size
        scale = min(min_size / min(h, w), self.max_size / max(h, w))
        nh, nw = round(h * scale), round(w * scale)
        if image is not None:
            image = TF.resize(image, [nh, nw], antialias=True)
        lo, hi = int(self._box_off[index]), int(self._box_off[index + 1])
        boxes = torch.from_numpy(self._boxes[lo:hi].copy())  # xywh, float32, as in the file
        boxes[:, 2:] += boxes[:, :2]
        boxes = (boxes * scale).clamp_(min=0)
        boxes[:, 0::2].clamp_(max=nw)
        boxes[:, 1::2].clamp_(max=nh)
        target = {"boxes": boxes, "labels": torch.from_numpy(self._labels[lo:hi].copy()),
                  "image_id": img_id, "scale": scale}
        if self.with_masks:
            fw, fh = (int(v) for v in self._wh[index])  # masks are drawn at the file's image size
            segs = [pickle.loads(self._segs[self._seg_off[j]:self._seg_off[j + 1]].tobytes()) for j in range(lo, hi)]
            masks = torch.from_numpy(np.stack([ann_mask(s, fh, fw) for s in segs])) if segs \
                else torch.zeros((0, h, w), dtype=torch.uint8)
            target["masks"] = TF.resize(masks, [nh, nw], interpolation=TF.InterpolationMode.NEAREST_EXACT)
        if flip:
            target["boxes"][:, [0, 2]] = nw - target["boxes"][:, [2, 0]]
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        if encoded is not None:  # the training process decodes, resizes and flips (decode_on_device)
            target["decode"] = (nh, nw, flip)
            return encoded, self._drop_boxes_without_area(target, index, path, (nh, nw))
        return image.flip(-1) if flip else image, self._drop_boxes_without_area(target, index, path, (nh, nw))

    def _jittered(self, index: int, rng: random.Random, flip: bool) -> tuple[torch.Tensor, dict]:
        """Large-scale jitter (ViTDet's LSJ): resize by ``r * min(S / h, S / w)``, r uniform in
        ``scale_jitter``, S = ``max_size``; crop a random S x S window where larger, pad to S x S at the
        bottom and right (the ImageNet mean, which normalises to about 0); flip. torchvision's
        transforms.v2 functionals move boxes and masks with the image; boxes left without area are
        dropped. ``target["augment"]`` records the draw (scale, crop offset, flip)."""
        img_id = self._img_ids[index].item()
        path = self.image_dir / self._file_name(index)
        image = self._read_image(path)
        h, w = image.shape[-2:]
        side = self.max_size
        scale = rng.uniform(*self.scale_jitter) * min(side / h, side / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        top, left = rng.randint(0, max(nh - side, 0)), rng.randint(0, max(nw - side, 0))
        ch, cw = min(nh, side), min(nw, side)
        lo, hi = int(self._box_off[index]), int(self._box_off[index + 1])
        xyxy = torch.from_numpy(self._boxes[lo:hi].copy())
        xyxy[:, 2:] += xyxy[:, :2]
        parts = {"image": TF.resize(image, [nh, nw], antialias=True),
                 "boxes": TF.resize(tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(h, w)), [nh, nw])}
        if self.with_masks:
            fw, fh = (int(v) for v in self._wh[index])
            segs = [pickle.loads(self._segs[self._seg_off[j]:self._seg_off[j + 1]].tobytes()) for j in range(lo, hi)]
            masks = torch.from_numpy(np.stack([ann_mask(s, fh, fw) for s in segs])) if segs \
                else torch.zeros((0, h, w), dtype=torch.uint8)
            parts["masks"] = TF.resize(tv_tensors.Mask(masks), [nh, nw])  # nearest, for a Mask
        for key, x in parts.items():
            x = TF.crop(x, top, left, ch, cw)  # boxes: shifted and clamped to the window
            fill = _MEAN_PIXEL if key == "image" else 0
            x = TF.pad(x, [0, 0, side - cw, side - ch], fill=fill)
            parts[key] = TF.horizontal_flip(x) if flip else x
        boxes = parts["boxes"].as_subclass(torch.Tensor)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # cropped away or rounded to nothing
        target = {"boxes": boxes[keep], "labels": torch.from_numpy(self._labels[lo:hi].copy())[keep],
                  "image_id": img_id, "scale": scale, "augment": {"scale": scale, "crop": (top, left), "flip": flip}}
        if self.with_masks:
            target["masks"] = parts["masks"].as_subclass(torch.Tensor)[keep]
        return parts["image"], target

    def _read_encoded(self, path: Path) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(the file's bytes, None) for a JPEG; (None, the decoded image) for anything else (PNG, ...),
        which the worker decodes as usual."""
        data = self._read_bytes(path)  # its own storage: shared with the main process as it is
        if data.numel() > 3 and bytes(data[:3].tolist()) == _JPEG_MAGIC:
            return data, None
        return None, self._read_image(path)

    def _drop_boxes_without_area(self, target: dict, index: int, path: Path, size: tuple[int, int]) -> dict:
        """Last line of defence: torchvision asserts positive width and height. Boxes are checked
        when the file is read; one can only get here when the image's size differs from the file's."""
        boxes = target["boxes"].numpy()  # numpy: a few microseconds where torch's small ops take tens
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if keep.all():
            return target
        keep = torch.from_numpy(keep)
        if not self._warned_after_resize and self.train_min_sizes is None:  # multi-scale: expected
            self._warned_after_resize = True
            log.warning("%s: dropped %d box(es) of %s (image id %s) with no area at the resized size %dx%d; "
                        "its size in the file is %gx%g (further ones are dropped without a message)",
                        self.ann_file, int((~keep).sum()), path, target["image_id"], size[1], size[0],
                        *self._wh[index])
        for key in ("boxes", "labels", "masks"):
            if key in target:
                target[key] = target[key][keep]
        return target



_JPEG_MAGIC = b"\xff\xd8\xff"
_MEAN_PIXEL = [124, 116, 104]  # ImageNet's mean RGB in 0-255: padding that normalises to about 0


def _jpeg_size(encoded: torch.Tensor, path: Path) -> tuple[int, int]:
    """(height, width) from a JPEG's header, without decoding it (PIL reads the header only)."""
    try:
        with Image.open(io.BytesIO(encoded.numpy().tobytes())) as im:
            w, h = im.size
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}; re-export or remove it from the annotations") from None
    return h, w


def decode_on_device(images: list[torch.Tensor], targets: list[dict], device: torch.device) -> list[torch.Tensor]:
    """``data.decode=device``: the JPEGs a batch carries encoded, decoded in one batched call on
    ``device`` (nvJPEG on CUDA), then resized (antialiased, as the workers do) and flipped there;
    images the workers decoded (non-JPEG files) are copied as usual. Float images, on ``device``."""
    encoded = [i for i, t in enumerate(targets) if "decode" in t]
    out = [im.to(device, non_blocking=True) for im in images]
    if encoded:
        decoded = decode_jpeg([images[i] for i in encoded], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(encoded, decoded):
            nh, nw, flip = targets[i].pop("decode")
            image = TF.resize(image, [nh, nw], antialias=True)
            out[i] = image.flip(-1) if flip else image
    return [im.float() for im in out]


def check_image_files(datasets: Sequence[CocoDetection]) -> None:
    """Raise the same DataError on every rank if an image file of ``datasets`` is missing.

    Rank 0 alone looks (``CocoDetection.missing_files``) and broadcasts what it found: at COCO
    scale every rank checking each of 118k files is that many metadata requests per rank on a
    shared filesystem, and a rank-0-only error would leave the other ranks waiting at their next
    collective. Without a process group (or with one rank) this process checks. Call it on
    every rank. Assumes rank 0 sees the same files as every other rank (a shared filesystem or
    identical copies).
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    errors = None
    if not distributed or dist.get_rank() == 0:
        try:
            errors = [e for e in (ds.missing_files_error() for ds in datasets) if e]
        except Exception as err:  # any failure is broadcast too: no rank may be left waiting
            errors = [f"cannot check the image files: {type(err).__name__}: {err}"]
    if distributed:
        box = [errors]
        dist.broadcast_object_list(box, src=0)
        errors = box[0]
    if errors:
        raise DataError("; ".join(errors))

