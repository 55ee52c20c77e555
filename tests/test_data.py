"""Tests for pipeline.data: dataset round trip, flip, sharded sampler, eval split, bad input.

Every expectation is computed independently of pipeline.data: sizes and boxes from
the annotation JSON, masks through pycocotools + PIL, sampler properties from counting.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.transforms.v2 import functional as TF

from pipeline.data.dataset import CocoDetection, check_image_files
from pipeline.data.samplers import ShardedBatchSampler, eval_batches
from pipeline.errors import DataError

# pycocotools' decode trips a numpy-2 DeprecationWarning that is not ours.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")]

MIN, MAX = 64, 96


# ----------------------------------------------------------------------------- helpers

def _paths(root: Path) -> tuple[Path, Path]:
    return root / "train", root / "annotations" / "instances_train.json"


def _raw(root: Path) -> dict:
    return json.loads(_paths(root)[1].read_text())


def _write(tmp_path: Path, data: dict, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _expected_size(w: int, h: int, min_size: int, max_size: int) -> tuple[float, int, int]:
    scale = min_size / min(w, h)
    if max(w, h) * scale > max_size:
        scale = max_size / max(w, h)
    return scale, round(h * scale), round(w * scale)


def _xyxy(bbox: list, scale: float) -> list:
    x, y, w, h = bbox
    return [x * scale, y * scale, (x + w) * scale, (y + h) * scale]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@pytest.fixture(scope="module")
def coco(shapes_root: Path) -> COCO:
    return COCO(str(_paths(shapes_root)[1]))


# ----------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("max_size", [MAX, 80])  # 80 makes the longer-side cap bite on most images
def test_round_trip(shapes_root: Path, coco: COCO, max_size: int) -> None:
    image_dir, ann_file = _paths(shapes_root)
    ds = CocoDetection(image_dir, ann_file, min_size=MIN, max_size=max_size, flip_prob=0,
                       with_masks=True, keep_empty=True)
    img_ids = sorted(coco.getImgIds())
    assert len(ds) == len(img_ids) == 16
    cat_ids = sorted(coco.getCatIds())
    assert ds.num_classes == len(cat_ids)
    capped = 0
    for i, img_id in enumerate(img_ids):
        info = coco.loadImgs(img_id)[0]
        scale, nh, nw = _expected_size(info["width"], info["height"], MIN, max_size)
        capped += round(min(nh, nw)) < MIN
        image, target = ds[i]
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
        assert tuple(image.shape[1:]) == (nh, nw)
        assert min(nh, nw) == MIN or max(nh, nw) == max_size
        assert target["image_id"] == img_id
        assert target["scale"] == pytest.approx(scale)

        # pixels: close to an independent PIL resize of the decoded JPEG
        pil = Image.open(image_dir / info["file_name"]).convert("RGB").resize((nw, nh), Image.BILINEAR)
        ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
        assert (image.float() - ref).abs().mean() < 8

        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
        boxes = torch.tensor([_xyxy(a["bbox"], scale) for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([1 + cat_ids.index(a["category_id"]) for a in anns], dtype=torch.int64)
        # clamping to the rounded image size may shave a fraction of a pixel
        torch.testing.assert_close(target["boxes"], boxes, atol=0.5, rtol=0)
        assert torch.equal(target["labels"], labels)
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and tuple(masks.shape) == (len(anns), nh, nw)
        for ann, mask in zip(anns, masks.numpy()):
            ref_mask = np.asarray(Image.fromarray(coco.annToMask(ann) * 255).resize((nw, nh), Image.NEAREST)) > 0
            assert set(np.unique(mask)) <= {0, 1}
            assert _iou(mask, ref_mask) > 0.5  # same object; exact alignment: test_masks_aligned
            assert mask.sum() == pytest.approx(ann["area"] * scale ** 2, rel=0.15)
    if max_size < MAX:
        assert capped > 0  # the cap was actually exercised


def test_masks_aligned(shapes_root: Path, coco: COCO) -> None:
    """Resized masks match a pixel-centre-aligned nearest resize (PIL) and are not shifted."""
    ds = CocoDetection(*_paths(shapes_root), MIN, MAX, with_masks=True)
    offsets, ious = [], []
    for i, img_id in enumerate(ds.ids):
        _, target = ds[i]
        nh, nw = target["masks"].shape[-2:]
        scale = target["scale"]
        for ann, mask in zip(coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False)), target["masks"].numpy()):
            full = coco.annToMask(ann)
            ref = np.asarray(Image.fromarray(full * 255).resize((nw, nh), Image.NEAREST)) > 0
            ious.append(_iou(mask, ref))
            ys, xs = np.nonzero(full)
            want = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) * scale  # centroid, continuous coords
            ys, xs = np.nonzero(mask)
            offsets.append(np.array([xs.mean() + 0.5, ys.mean() + 0.5]) - want)
    assert min(ious) > 0.9, f"worst mask IoU vs centre-aligned nearest resize: {min(ious):.3f}"
    assert np.all(np.abs(np.mean(offsets, 0)) < 0.2), f"mean mask shift (x, y) px: {np.mean(offsets, 0)}"


def test_empty_image_has_empty_target(shapes_root: Path, coco: COCO) -> None:
    empty = [i for i in sorted(coco.getImgIds()) if not coco.getAnnIds(imgIds=i)]
    assert empty, "the tiny dataset is expected to contain an image without objects"
    ds = CocoDetection(*_paths(shapes_root), MIN, MAX, with_masks=True, keep_empty=True)
    image, target = ds[ds.ids.index(empty[0])]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert tuple(target["masks"].shape) == (0, *image.shape[1:])
    ds = CocoDetection(*_paths(shapes_root), MIN, MAX, keep_empty=False)
    assert len(ds) == 16 - len(empty) and empty[0] not in ds.ids


def test_labels_follow_sorted_category_ids(shapes_root: Path, tmp_path: Path) -> None:
    data = _raw(shapes_root)
    remap = {1: 7, 2: 3, 3: 11}  # sorted -> [3, 7, 11] -> labels 2, 1, 3
    for c in data["categories"]:
        c["id"] = remap[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    ds = CocoDetection(_paths(shapes_root)[0], _write(tmp_path, data), MIN, MAX)
    want = {7: 2, 3: 1, 11: 3}
    by_img = {}
    for a in data["annotations"]:
        by_img.setdefault(a["image_id"], []).append(want[a["category_id"]])
    for i, img_id in enumerate(ds.ids):
        assert ds[i][1]["labels"].tolist() == by_img.get(img_id, [])


def test_crowd_annotations_excluded(shapes_root: Path, tmp_path: Path) -> None:
    data = _raw(shapes_root)
    crowd = data["annotations"][5]
    crowd["iscrowd"] = 1
    ann_file = _write(tmp_path, data)
    ds = CocoDetection(_paths(shapes_root)[0], ann_file, MIN, MAX, with_masks=True)
    idx = ds.ids.index(crowd["image_id"])
    _, target = ds[idx]
    others = [a for a in data["annotations"] if a["image_id"] == crowd["image_id"] and a is not crowd]
    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) == len(others)
    crowd_box = torch.tensor(_xyxy(crowd["bbox"], target["scale"]))
    assert not any(torch.allclose(b, crowd_box, atol=0.5) for b in target["boxes"])
    want = torch.tensor([_xyxy(a["bbox"], target["scale"]) for a in others]).reshape(-1, 4)
    torch.testing.assert_close(target["boxes"], want, atol=0.5, rtol=0)


def _edge_case_file(shapes_root: Path, tmp_path: Path) -> tuple[Path, dict]:
    """The train split's JSON with what the reader must get exactly right: shuffled image and
    annotation order (targets keep the file's order per image), non-contiguous category ids,
    fractional coordinates, boxes reaching past each edge (clamped after the resize), a crowd
    annotation and one with zero width (both left out)."""
    data = _raw(shapes_root)
    rng = np.random.default_rng(3)
    rng.shuffle(data["images"])
    rng.shuffle(data["annotations"])
    remap = {1: 7, 2: 3, 3: 11}
    for c in data["categories"]:
        c["id"] = remap[c["id"]]
    size = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    for k, a in enumerate(data["annotations"]):
        a["category_id"] = remap[a["category_id"]]
        x, y, w, h = a["bbox"]
        a["bbox"] = [x + 0.3, y + 0.17, w - 0.41 + 0.01 * k, h + 0.23]
    anns = data["annotations"]
    W, H = size[anns[0]["image_id"]]
    anns[0]["bbox"] = [W - 5.25, anns[0]["bbox"][1], 20.5, anns[0]["bbox"][3]]  # past the right edge
    anns[1]["bbox"] = [-3.5, anns[1]["bbox"][1], anns[1]["bbox"][2] + 3.5, anns[1]["bbox"][3]]  # left
    W, H = size[anns[2]["image_id"]]
    anns[2]["bbox"] = [anns[2]["bbox"][0], H - 4.4, anns[2]["bbox"][2], 30.0]  # past the bottom
    anns[3]["bbox"] = [anns[3]["bbox"][0], -2.0, anns[3]["bbox"][2], anns[3]["bbox"][3] + 2.0]  # top
    anns[4]["iscrowd"] = 1
    anns[5]["bbox"][2] = 0.0
    # every segmentation form pycocotools reads: compressed RLE (the rest), polygons, uncompressed RLE
    x, y, w, h = anns[6]["bbox"]
    anns[6]["segmentation"] = [[x, y, x + w, y, x + w / 2, y + h], [x, y + h / 2, x + w / 3, y + h / 2, x, y + h]]
    rle = anns[7]["segmentation"]
    flat = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).flatten(order="F")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))  # run starts, from a 0-run
    anns[7]["segmentation"] = {"size": rle["size"], "counts": np.diff(np.concatenate([[0], edges])).tolist()}
    return _write(tmp_path, data), data


def _reference_item(coco: COCO, img_id: int, image_dir: Path, flip: bool, with_masks: bool):
    """What an item must be, computed from pycocotools' own records: the usable annotations
    of the image in its index order, their boxes in float32 xyxy scaled, clamped to the resized
    image and mirrored as the loader does; labels from the sorted category ids; masks through
    ``annToMask`` and a nearest-exact resize."""
    info = coco.imgs[img_id]
    w, h = Image.open(image_dir / info["file_name"]).size
    scale = min(MIN / min(h, w), MAX / max(h, w))
    nh, nw = round(h * scale), round(w * scale)
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
            if a["bbox"][2] > 0 and a["bbox"][3] > 0]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes = (boxes * scale).clamp(min=0)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(max=nw)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(max=nh)
    cat_ids = sorted(coco.getCatIds())
    labels = torch.tensor([cat_ids.index(a["category_id"]) + 1 for a in anns], dtype=torch.int64)
    masks = None
    if with_masks:
        full = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])) if anns \
            else torch.zeros((0, h, w), dtype=torch.uint8)
        masks = TF.resize(full, [nh, nw], interpolation=TF.InterpolationMode.NEAREST_EXACT)
    if flip:
        boxes = torch.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], 1)
        masks = masks.flip(-1) if with_masks else None
    return (nh, nw), scale, boxes, labels, masks


@pytest.mark.parametrize("flip", [False, True])
def test_items_exactly_as_pycocotools_says(shapes_root: Path, tmp_path: Path, flip: bool) -> None:
    """Bit-exact targets for every item, against pycocotools' own index of the same file."""
    ann_file, data = _edge_case_file(shapes_root, tmp_path)
    coco = COCO(str(ann_file))
    image_dir = _paths(shapes_root)[0]
    ds = CocoDetection(image_dir, ann_file, MIN, MAX, flip_prob=float(flip), with_masks=True, keep_empty=True)
    assert ds.ids == sorted(coco.getImgIds())
    assert ds.cat_ids == [3, 7, 11] and ds.num_classes == 3
    assert ds.aspect_ratios() == [coco.imgs[i]["width"] / coco.imgs[i]["height"] for i in ds.ids]
    clamped = 0
    for i, img_id in enumerate(ds.ids):
        image, target = ds[(i, 77 + i)]
        (nh, nw), scale, boxes, labels, masks = _reference_item(coco, img_id, image_dir, flip, True)
        assert tuple(image.shape) == (3, nh, nw)
        assert target["image_id"] == img_id and type(target["image_id"]) is int
        assert target["scale"] == scale
        assert target["boxes"].dtype == torch.float32 and torch.equal(target["boxes"], boxes)
        assert torch.equal(target["labels"], labels)
        assert target["masks"].dtype == torch.uint8 and torch.equal(target["masks"], masks)
        clamped += int((boxes == 0).sum() + (boxes[:, 0::2] == nw).sum() + (boxes[:, 1::2] == nh).sum())
    assert clamped >= 4  # the boxes past each edge were clamped (and kept)
    for k in (6, 7):  # the polygon and uncompressed-RLE masks are not empty
        ann = data["annotations"][k]
        assert coco.annToMask(ann).sum() > 0
    assert ds.skipped_boxes == 1  # the zero-width one


# ----------------------------------------------------------------------------- flip

def test_flip(shapes_root: Path) -> None:
    args = dict(min_size=MIN, max_size=MAX, with_masks=True, keep_empty=True)
    plain = CocoDetection(*_paths(shapes_root), flip_prob=0.0, **args)
    flipped = CocoDetection(*_paths(shapes_root), flip_prob=1.0, **args)
    for i in range(len(plain)):
        img, t = plain[(i, 1234 + i)]
        fimg, ft = flipped[(i, 1234 + i)]
        W = img.shape[-1]
        assert torch.equal(fimg, torch.flip(img, dims=[-1]))
        want = torch.stack([W - t["boxes"][:, 2], t["boxes"][:, 1], W - t["boxes"][:, 0], t["boxes"][:, 3]], 1)
        torch.testing.assert_close(ft["boxes"], want)
        assert (ft["boxes"][:, 2] >= ft["boxes"][:, 0]).all()
        assert torch.equal(ft["masks"], torch.flip(t["masks"], dims=[-1]))
        assert torch.equal(ft["labels"], t["labels"])


def test_flip_decided_by_aug_seed(shapes_root: Path) -> None:
    ds = CocoDetection(*_paths(shapes_root), MIN, MAX, flip_prob=0.5)
    img0, _ = CocoDetection(*_paths(shapes_root), MIN, MAX)[0]
    outcomes = set()
    for s in range(40):
        a, _ = ds[(0, s)]
        b, _ = ds[(0, s)]
        assert torch.equal(a, b)  # same (index, seed) -> same augmentation
        outcomes.add(torch.equal(a, img0))
    assert outcomes == {True, False}  # both flipped and unflipped occur


# ----------------------------------------------------------------------------- sampler

def _aspects(n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    ar = rng.choice([0.6, 0.75, 1.0, 1.33, 1.5], size=n).tolist()
    return ar


def _epoch(aspects, mb, world, accum, seed, group, epoch=0, start=0):
    out = []
    for rank in range(world):
        s = ShardedBatchSampler(aspects, mb, world, rank, accum, seed, group)
        s.set_position(epoch, start)
        batches = list(s)
        assert len(batches) == len(s)
        out.append(batches)
    return out


SAMPLER_CASES = [(n, world, mb, accum, group)
                 for n in (10, 16, 37) for world in (1, 2, 3, 4) for mb in (1, 2, 3)
                 for accum in (1, 2) for group in (True, False)]


@pytest.mark.parametrize("n,world,mb,accum,group", SAMPLER_CASES)
def test_sampler_epoch(n: int, world: int, mb: int, accum: int, group: bool) -> None:
    aspects = _aspects(n, seed=n)
    landscape = np.asarray(aspects) >= 1.0
    global_batch = world * mb * accum
    steps = math.ceil(n / global_batch)
    per_rank = _epoch(aspects, mb, world, accum, seed=5, group=group)

    # equal lengths and full micro-batches on every rank
    for batches in per_rank:
        assert len(batches) == steps * accum
        assert all(len(b) == mb for b in batches)

    # coverage and exactly the wrap-around padding as repeats
    idx = [i for batches in per_rank for b in batches for i, _ in b]
    counts = Counter(idx)
    assert set(counts) == set(range(n))
    pad = steps * global_batch - n
    assert sum(c - 1 for c in counts.values()) == pad
    assert max(counts.values()) - min(counts.values()) <= 1  # padding spreads evenly, no extra repeats
    if pad == 0:
        shards = [{i for b in batches for i, _ in b} for batches in per_rank]
        assert sum(map(len, shards)) == n  # disjoint

    # aspect grouping: each optimizer step's images (same positions on all ranks) are one group
    if group:
        mixed = 0
        for step in range(steps):
            chunk = [i for batches in per_rank for b in batches[step * accum:(step + 1) * accum] for i, _ in b]
            mixed += len({bool(landscape[i]) for i in chunk}) > 1
        assert mixed <= 1

    # aug seeds: a function of (seed, epoch, index), the same on every rank
    seeds = {}
    for batches in per_rank:
        for b in batches:
            for i, s in b:
                assert seeds.setdefault(i, s) == s

    # determinism and epoch-to-epoch change
    assert _epoch(aspects, mb, world, accum, seed=5, group=group) == per_rank
    other = _epoch(aspects, mb, world, accum, seed=5, group=group, epoch=1)
    assert other != per_rank
    assert [[i for b in r for i, _ in b] for r in other] != [[i for b in r for i, _ in b] for r in per_rank]
    seeds1 = {i: s for r in other for b in r for i, s in b}
    assert all(seeds1[i] != seeds[i] for i in range(n))

    # resume: set_position(epoch, k) is the tail of the epoch from micro-step k * accum
    for start in range(steps + 1):
        tail = _epoch(aspects, mb, world, accum, seed=5, group=group, start=start)
        assert tail == [batches[start * accum:] for batches in per_rank]


def _steps(aspects, mb, world, accum, seed=5, epoch=0, start=0) -> list[list[int]]:
    """Per optimizer step, the sorted indices the whole job reads (every rank, every accumulation step)."""
    per_rank = _epoch(aspects, mb, world, accum, seed, True, epoch, start)
    steps = len(per_rank[0]) // accum
    return [sorted(i for batches in per_rank for b in batches[k * accum:(k + 1) * accum] for i, _ in b)
            for k in range(steps)]


@pytest.mark.parametrize("n", [40, 1000])
def test_the_data_order_depends_on_the_global_batch_only(n: int) -> None:
    """Ranks x micro-batch x accumulation = 16 in four ways: the same images in every optimizer step, so a
    run saved as 8 x 2 x 1 and resumed as 4 x 2 x 2 mid-epoch repeats nothing and skips nothing."""
    aspects = _aspects(n, seed=1)
    splits = [(2, 8, 1), (2, 4, 2), (1, 4, 4), (4, 1, 4)]  # (micro_batch, world, accum)
    reference = _steps(aspects, *splits[0])
    for split in splits[1:]:
        assert _steps(aspects, *split) == reference, split
    half = len(reference) // 2
    resumed = reference[:half] + _steps(aspects, 2, 4, 2, start=half)
    assert Counter(i for step in resumed for i in step) == Counter(i for step in reference for i in step)


def test_sampler_seed_changes_order() -> None:
    aspects = _aspects(37)
    a = _epoch(aspects, 2, 2, 1, seed=0, group=True)
    b = _epoch(aspects, 2, 2, 1, seed=1, group=True)
    assert a != b


def test_sampler_bad_rank() -> None:
    with pytest.raises(ValueError):
        ShardedBatchSampler([1.0] * 4, 1, world=2, rank=2)


# ----------------------------------------------------------------------------- eval split

@pytest.mark.parametrize("n", [0, 1, 7, 8, 37])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_eval_batches(n: int, world: int, batch: int) -> None:
    shards = [eval_batches(n, batch, world, rank) for rank in range(world)]
    flat = [i for batches in shards for b in batches for i in b]
    assert sorted(flat) == list(range(n))  # disjoint, complete, no padding
    for batches in shards:
        assert all(1 <= len(b) <= batch for b in batches)
        assert all(len(b) == batch for b in batches[:-1])
    sizes = [sum(map(len, batches)) for batches in shards]
    assert max(sizes) - min(sizes) <= 1


# ----------------------------------------------------------------------------- bad input

@pytest.fixture()
def copied(shapes_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the train split (images + JSON) to damage."""
    image_dir, ann_file = _paths(shapes_root)
    dst_images = tmp_path / "train"
    shutil.copytree(image_dir, dst_images)
    dst_ann = tmp_path / "instances_train.json"
    shutil.copyfile(ann_file, dst_ann)
    return dst_images, dst_ann


def test_missing_image_file(copied: tuple[Path, Path]) -> None:
    image_dir, ann_file = copied
    name = json.loads(ann_file.read_text())["images"][3]["file_name"]
    (image_dir / name).unlink()
    with pytest.raises(DataError) as err:
        CocoDetection(image_dir, ann_file, MIN, MAX)
    assert name in str(err.value) and str(ann_file) in str(err.value)


def _check_files_worker(rank: int, port: int, good: tuple[Path, Path], damaged: tuple[Path, Path], out: Path) -> None:
    import torch.distributed as dist

    from pipeline.data import dataset as data
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    checked = []
    own = data.CocoDetection.missing_files

    def spy(self):
        checked.append(str(self.ann_file))
        return own(self)

    data.CocoDetection.missing_files = spy
    report = {}
    for name, (image_dir, ann_file) in (("good", good), ("damaged", damaged)):
        datasets = [data.CocoDetection(image_dir, ann_file, MIN, MAX, check_files=False)]
        try:
            data.check_image_files(datasets)
            report[name] = None
        except data.DataError as err:
            report[name] = str(err)
    report["checked"] = checked
    (out / f"{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_missing_files_checked_on_rank0_every_rank_fails_alike(shapes_root: Path, copied: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    """Two ranks: only rank 0 looks at the files; both raise the same DataError naming the file."""
    import multiprocessing

    from pipeline.distributed.launcher import free_port

    image_dir, ann_file = copied
    name = json.loads(ann_file.read_text())["images"][5]["file_name"]
    (image_dir / name).unlink()
    ctx = multiprocessing.get_context("fork")  # forked ranks: no second import of torch and the project
    port = free_port()
    procs = [ctx.Process(target=_check_files_worker, args=(r, port, _paths(shapes_root), copied, tmp_path))
             for r in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    for proc in procs:
        if proc.is_alive():  # a rank waiting for a collective the other never joined
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["good"] is None and r1["good"] is None
    assert r0["damaged"] == r1["damaged"]
    assert name in r0["damaged"] and str(ann_file) in r0["damaged"] and str(image_dir) in r0["damaged"]
    assert len(r0["checked"]) == 2 and r1["checked"] == []


def test_file_check_can_be_deferred(copied: tuple[Path, Path]) -> None:
    image_dir, ann_file = copied
    names = [im["file_name"] for im in json.loads(ann_file.read_text())["images"]]
    for name in names[2:9]:
        (image_dir / name).unlink()
    (image_dir / names[3]).mkdir()  # a directory is not an image file
    ds = CocoDetection(image_dir, ann_file, MIN, MAX, check_files=False)
    assert ds.missing_files() == names[2:9]
    with pytest.raises(DataError) as err:
        check_image_files([ds])  # no process group: this process checks and raises
    assert "7 image file(s)" in str(err.value) and names[2] in str(err.value)


def test_training_items_need_no_pycocotools_index(shapes_root: Path, monkeypatch) -> None:
    """Items come from the dataset's own arrays; COCO's index is built only when asked for
    (evaluation), and then matches the file; the pickled dataset leaves it behind."""
    import pickle

    import pipeline.data.dataset as data
    ds = CocoDetection(*_paths(shapes_root), MIN, MAX, with_masks=True)
    monkeypatch.setattr(data, "load_coco", lambda *a: pytest.fail("items must not build a COCO index"))
    for i in range(len(ds)):
        ds[i]
    monkeypatch.undo()
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker gets
    coco = ds.coco
    assert coco is ds.coco and sorted(coco.imgs) == ds.ids
    assert clone._coco is None and pickle.loads(pickle.dumps(ds))._coco is None
    for i in (0, len(ds) - 1):
        (a, ta), (b, tb) = ds[i], clone[i]
        assert torch.equal(a, b) and all(torch.equal(ta[k], tb[k]) for k in ("boxes", "labels", "masks"))


def test_unreadable_jpeg(copied: tuple[Path, Path]) -> None:
    image_dir, ann_file = copied
    name = json.loads(ann_file.read_text())["images"][2]["file_name"]
    (image_dir / name).write_bytes(b"this is not a jpeg" * 10)
    ds = CocoDetection(image_dir, ann_file, MIN, MAX)  # existence is checked up front, content lazily
    ds[0]
    with pytest.raises(DataError) as err:
        ds[2]
    assert str(image_dir / name) in str(err.value)


def test_truncated_jpeg(copied: tuple[Path, Path]) -> None:
    image_dir, ann_file = copied
    name = json.loads(ann_file.read_text())["images"][1]["file_name"]
    path = image_dir / name
    path.write_bytes(path.read_bytes()[:40])
    ds = CocoDetection(image_dir, ann_file, MIN, MAX)
    with pytest.raises(DataError) as err:
        ds[1]
    assert str(path) in str(err.value)


def test_negative_width_skipped(shapes_root: Path, tmp_path: Path, caplog) -> None:
    data = _raw(shapes_root)
    bad = data["annotations"][4]
    bad["bbox"][2] = -3.0
    ann_file = _write(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.dataset"):
        ds = CocoDetection(_paths(shapes_root)[0], ann_file, MIN, MAX, with_masks=True)
    assert ds.skipped_boxes == 1
    records = [r for r in caplog.records if r.name == "pipeline.data.dataset" and r.levelno >= logging.WARNING]
    assert len(records) == 1
    msg = records[0].getMessage()
    assert str(ann_file) in msg and " 1 " in msg
    _, target = ds[ds.ids.index(bad["image_id"])]
    others = [a for a in data["annotations"] if a["image_id"] == bad["image_id"] and a is not bad]
    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) == len(others)
    want = torch.tensor([_xyxy(a["bbox"], target["scale"]) for a in others]).reshape(-1, 4)
    torch.testing.assert_close(target["boxes"], want, atol=0.5, rtol=0)
    assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()


def _one_image(tmp_path: Path, boxes: dict, size: tuple[int, int] = (80, 60), json_size=None) -> tuple[Path, Path]:
    """One WxH JPEG and a COCO file with annotation id -> xywh box (each with a box polygon)."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(image_dir / "a.jpg")
    w, h = json_size or size
    anns = [{"id": k, "image_id": 5, "category_id": 1, "bbox": box, "area": 1.0, "iscrowd": 0,
             "segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2], box[1] + box[3],
                               box[0], box[1] + box[3]]]} for k, box in boxes.items()]
    data = {"images": [{"id": 5, "file_name": "a.jpg", "width": w, "height": h}],
            "categories": [{"id": 1, "name": "thing"}], "annotations": anns}
    return image_dir, _write(tmp_path, data, "outside.json")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.data.dataset" and r.levelno >= logging.WARNING]


def _ids_in(msg: str) -> set[int]:
    return {int(v) for v in re.findall(r"\d+", msg.split("annotation ids")[-1])}


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_box_outside_image_dropped(tmp_path: Path, caplog, flip: float) -> None:
    """A box at x == image width has no area in the image: dropped when read, reported once with the
    file and its id; the item's targets all have positive width and height."""
    image_dir, ann_file = _one_image(tmp_path, {11: [10.0, 10.0, 20.0, 15.0], 12: [80.0, 5.0, 10.0, 10.0]})
    with caplog.at_level(logging.WARNING, logger="pipeline.data.dataset"):
        ds = CocoDetection(image_dir, ann_file, MIN, MAX, flip_prob=flip, with_masks=True)
        _, target = ds[0]
        ds[0]
    assert ds.skipped_boxes == 1
    msgs = _warnings(caplog)
    assert len(msgs) == 1, msgs
    assert str(ann_file) in msgs[0] and _ids_in(msgs[0]) == {12}
    boxes = target["boxes"]
    assert boxes.shape == (1, 4) and target["labels"].tolist() == [1] and len(target["masks"]) == 1
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    scale = target["scale"]
    want = [10 * scale, 10 * scale, 30 * scale, 25 * scale]
    if flip:
        nw = round(80 * scale)
        want = [nw - want[2], want[1], nw - want[0], want[3]]
    torch.testing.assert_close(boxes[0], torch.tensor(want), atol=1e-4, rtol=0)


def test_no_area_boxes_reported_once_with_at_most_five_ids(tmp_path: Path, caplog) -> None:
    """Outside on each side, a sliver the resize rounds away, one below float32 resolution:
    all dropped, counted in one warning that names five of the ids."""
    # 80x60 at MIN=64: scale 16/15, the resized width round(85.33) = 85, so x in (79.69, 80) vanishes
    bad = {21: [80.0, 5.0, 10.0, 10.0], 22: [5.0, 60.0, 10.0, 10.0], 23: [-12.0, 5.0, 12.0, 10.0],
           24: [5.0, -30.0, 10.0, 29.5], 25: [95.0, 70.0, 4.0, 4.0], 26: [79.8, 10.0, 0.2, 10.0],
           27: [40.0, 10.0, 1e-7, 10.0]}
    image_dir, ann_file = _one_image(tmp_path, {20: [10.0, 10.0, 20.0, 15.0], **bad})
    with caplog.at_level(logging.WARNING, logger="pipeline.data.dataset"):
        ds = CocoDetection(image_dir, ann_file, MIN, MAX, flip_prob=0.5, keep_empty=False)
        targets = [ds[(0, seed)][1] for seed in range(4)]
    assert ds.skipped_boxes == 7
    msgs = _warnings(caplog)
    assert len(msgs) == 1, msgs
    assert str(ann_file) in msgs[0] and " 7 " in msgs[0]
    assert len(_ids_in(msgs[0])) == 5 and _ids_in(msgs[0]) <= set(bad)
    for target in targets:
        assert len(target["boxes"]) == 1
        assert ((target["boxes"][:, 2:] > target["boxes"][:, :2]).all())
    # an image left with no usable box at all is dropped like any empty one
    image_dir, ann_file = _one_image(tmp_path, {31: [80.0, 5.0, 10.0, 10.0]})
    with pytest.raises(DataError):
        CocoDetection(image_dir, ann_file, MIN, MAX, keep_empty=False)


def test_box_with_no_area_after_resize_never_reaches_a_target(tmp_path: Path, caplog) -> None:
    """The file's image size disagrees with the JPEG (160 wide in the JSON, 80 in fact): a box inside
    the JSON's image but outside the real one is dropped at load time's last line of defence, the
    item, with a single warning."""
    image_dir, ann_file = _one_image(tmp_path, {41: [10.0, 10.0, 20.0, 15.0], 42: [100.0, 10.0, 20.0, 10.0]},
                                     json_size=(160, 60))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.dataset"):
        ds = CocoDetection(image_dir, ann_file, MIN, MAX, with_masks=True)
        assert ds.skipped_boxes == 0
        targets = [ds[0][1] for _ in range(3)]
    for target in targets:
        assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) == 1
        assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "a.jpg" in msgs[0], msgs


def test_unknown_category(shapes_root: Path, tmp_path: Path) -> None:
    data = _raw(shapes_root)
    data["annotations"][7]["category_id"] = 99
    ann_id = data["annotations"][7]["id"]
    ann_file = _write(tmp_path, data)
    with pytest.raises(DataError) as err:
        CocoDetection(_paths(shapes_root)[0], ann_file, MIN, MAX)
    msg = str(err.value)
    assert str(ann_file) in msg and f"annotation id {ann_id}" in msg and "99" in msg


def test_unknown_image_id(shapes_root: Path, tmp_path: Path) -> None:
    data = _raw(shapes_root)
    data["annotations"][0]["image_id"] = 12345
    ann_file = _write(tmp_path, data)
    with pytest.raises(DataError) as err:
        CocoDetection(_paths(shapes_root)[0], ann_file, MIN, MAX)
    assert str(ann_file) in str(err.value) and "12345" in str(err.value)


@pytest.mark.parametrize("content", [
    "",
    json.dumps({"images": [], "annotations": [], "categories": []}),
    "{not json",
    "[]",
])
def test_empty_or_broken_annotation_file(shapes_root: Path, tmp_path: Path, content: str) -> None:
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(content)
    with pytest.raises(DataError) as err:
        CocoDetection(_paths(shapes_root)[0], ann_file, MIN, MAX)
    assert str(ann_file) in str(err.value)


def test_missing_annotation_file(shapes_root: Path, tmp_path: Path) -> None:
    ann_file = tmp_path / "nope.json"
    with pytest.raises(DataError) as err:
        CocoDetection(_paths(shapes_root)[0], ann_file, MIN, MAX)
    assert str(ann_file) in str(err.value)


def test_no_usable_annotations(shapes_root: Path, tmp_path: Path) -> None:
    data = _raw(shapes_root)
    data["annotations"] = [dict(a, iscrowd=1) for a in data["annotations"][:3]] + \
        [dict(a, bbox=[a["bbox"][0], a["bbox"][1], 0.0, a["bbox"][3]]) for a in data["annotations"][3:]]
    ann_file = _write(tmp_path, data)
    CocoDetection(_paths(shapes_root)[0], ann_file, MIN, MAX, keep_empty=True)  # fine when kept
    with pytest.raises(DataError) as err:
        CocoDetection(_paths(shapes_root)[0], ann_file, MIN, MAX, keep_empty=False)
    assert str(ann_file) in str(err.value)
    data["annotations"] = []
    with pytest.raises(DataError):
        CocoDetection(_paths(shapes_root)[0], _write(tmp_path, data, "none.json"), MIN, MAX, keep_empty=False)


# ----------------------------------------------------------------------------- decoding on the device

def _decoded_like_the_workers(image_dir: Path, ann_file: Path, device: torch.device):
    """Every item through both paths (flips included): the workers' images and the device-decoded ones."""
    from pipeline.data.dataset import decode_on_device

    workers = CocoDetection(image_dir, ann_file, MIN, MAX, flip_prob=0.5)
    device_side = CocoDetection(image_dir, ann_file, MIN, MAX, flip_prob=0.5, decode="device")
    pairs = []
    for index in range(len(workers)):
        item = (index, 1000 + index)  # the aug seed decides the flip, alike on both paths
        (image, target), (encoded, encoded_target) = workers[item], device_side[item]
        decoded = decode_on_device([encoded], [encoded_target], device)[0]
        assert "decode" not in encoded_target  # consumed on the device
        for key in ("boxes", "labels"):
            torch.testing.assert_close(encoded_target[key], target[key], rtol=0, atol=0)
        pairs.append((image.float(), decoded.cpu()))
    return pairs


def test_device_decoding_gives_exactly_the_workers_images_on_cpu(copied: tuple[Path, Path]) -> None:
    """On a CPU the device path decodes with the same libjpeg as the workers: identical pixels. One
    file is a PNG (under its .jpg name): the workers decode it, and it still arrives the same."""
    image_dir, ann_file = copied
    png = image_dir / json.loads(ann_file.read_text())["images"][2]["file_name"]
    Image.open(png).convert("RGB").save(png, format="PNG")
    pairs = _decoded_like_the_workers(image_dir, ann_file, torch.device("cpu"))
    assert len(pairs) >= 8
    for want, got in pairs:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
def test_device_decoding_on_cuda_is_within_jpeg_decoder_tolerance(shapes_root: Path) -> None:
    """nvJPEG and libjpeg-turbo round their inverse DCTs differently: a level or two per pixel."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for want, got in _decoded_like_the_workers(*_paths(shapes_root), torch.device("cuda")):
        diff = (got - want).abs()
        assert diff.mean() < 1.5 and diff.flatten().quantile(0.99) <= 8, (diff.mean(), diff.max())
