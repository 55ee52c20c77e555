"""Deterministic synthetic COCO dataset of painted shapes (the embedded default).

The pipeline must train and be tested without downloading anything, so this
module paints a small detection + instance-segmentation dataset to disk in
plain COCO format: JPEG images of rectangles, ellipses and triangles on
textured backgrounds, with one annotation per object taken from its *visible*
mask (compressed RLE, bbox and area via pycocotools).  It is honest and
learnable: shape colour is random and independent of the class, so a model
has to learn geometry; images vary in size and aspect; occlusion is limited
so every label stays recognisable; a few images have no objects at all so the
"image without annotations" code path gets exercised.

Everything is seeded from (seed, split, image index), so the same arguments
give identical JSON and identical JPEG bytes.

    python launch/make_dataset.py --out data/shapes --train 512 --val 128 --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

# Bump when the rendering changes so cached datasets on disk get regenerated.
GENERATOR_VERSION = 1
SHAPES = ("rectangle", "ellipse", "triangle")
SPLIT_IDS = {"train": 0, "val": 1}
EMPTY_IMAGE_PROB = 0.03  # a few images without objects
MAX_HIDDEN_FRACTION = 0.4  # a new shape may hide at most this much of an object
MIN_VISIBLE_FRACTION = 0.3  # of the object's full area must stay visible...
MIN_VISIBLE_PIXELS = 64  # ...and never fewer pixels than this
PLACEMENT_TRIES = 20
MIN_CONTRAST = 90  # L1 distance (0..765) between shape colour and what is under it


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient + stripes or blotches, float HxWx3; varies per image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(a) + yy * np.sin(a)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    if rng.random() < 0.5:  # stripes with a random period, angle and tint
        b, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
        phase = rng.uniform(0, 2 * np.pi)
        s = np.sin(2 * np.pi * (xx * np.cos(b) + yy * np.sin(b)) / period + phase)
        img += s[..., None] * rng.uniform(-40, 40, 3).astype(np.float32)
    else:  # smooth blotches: upsampled coarse noise
        k = int(rng.integers(3, 9))
        coarse = rng.uniform(0, 255, (k, k, 3)).astype(np.uint8)
        blot = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
        img = img * (1 - 0.5 * rng.random()) + blot * (0.5 * rng.random())
    return img


def _polygon(cls: str, rng: np.random.Generator, h: int, w: int) -> list:
    """Vertices of one randomly sized, stretched and rotated shape inside the image."""
    major = rng.uniform(0.15, 0.5) * min(h, w)
    minor = major * rng.uniform(0.5, 1.0)
    if cls == "rectangle":
        unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    else:
        if cls == "ellipse":  # 32-gon so rotation is a plain matrix product
            ang = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        else:  # triangle: jittered equilateral, never degenerate
            ang = np.pi / 2 + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.35, 0.35, 3)
        unit = np.stack([np.cos(ang), np.sin(ang)], 1)
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = (unit * [major / 2, minor / 2]) @ rot.T
    lo, hi = pts.min(0), pts.max(0)  # keep the whole shape inside the image
    off = rng.uniform(-lo, [w - 1, h - 1] - hi)
    return [(float(x), float(y)) for x, y in pts + off]


def _raster(poly: list, h: int, w: int) -> np.ndarray:
    """Boolean mask of a polygon, rasterised by PIL."""
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(poly, fill=1)
    return np.asarray(canvas, dtype=bool)


def _occlusion_ok(owner: np.ndarray, m: np.ndarray, vis: np.ndarray, full: np.ndarray) -> bool:
    """Reject a placement that hides too much of any earlier object."""
    if not len(vis):
        return True
    cov = np.bincount(owner[m], minlength=len(vis) + 1)[1:]
    left = vis - cov
    floor = np.maximum(MIN_VISIBLE_FRACTION * full, MIN_VISIBLE_PIXELS)
    return bool(np.all(cov <= MAX_HIDDEN_FRACTION * vis) and np.all(left >= floor))


def _render_image(rng: np.random.Generator, p: dict) -> tuple[np.ndarray, np.ndarray, list]:
    """Paint one image; returns (uint8 HxWx3, owner map, class index per object)."""
    h, w = (int(v) for v in rng.integers(p["min_side"], p["max_side"] + 1, 2))
    img = _background(rng, h, w)
    owner = np.zeros((h, w), np.int32)  # 0 = background, k = k-th object (1-based)
    vis, full, labels = np.zeros(0), np.zeros(0), []
    n = 0 if rng.random() < EMPTY_IMAGE_PROB else int(rng.integers(1, p["max_objects"] + 1))
    shade = np.linspace(-1, 1, w, dtype=np.float32)[None, :].repeat(h, 0)
    for _ in range(n):
        ci = int(rng.integers(len(p["classes"])))
        for _try in range(PLACEMENT_TRIES):
            m = _raster(_polygon(p["classes"][ci], rng, h, w), h, w)
            if m.any() and _occlusion_ok(owner, m, vis, full):
                break
        else:
            continue  # no acceptable spot: the image simply gets fewer objects
        cov = np.bincount(owner[m], minlength=len(vis) + 1)[1:]
        under = img[m].mean(0)
        for _c in range(8):  # class-independent colour that stands out locally
            colour = rng.uniform(0, 255, 3)
            if np.abs(colour - under).sum() >= MIN_CONTRAST:
                break
        img[m] = colour + rng.uniform(0, 25) * shade[m][:, None]  # mild shading
        vis = np.append(vis - cov, m.sum())
        full = np.append(full, m.sum())
        labels.append(ci)
        owner[m] = len(labels)
    img += rng.normal(0, rng.uniform(2, 10), img.shape)  # sensor-like pixel noise
    return np.clip(img, 0, 255).astype(np.uint8), owner, labels


def _annotations(owner: np.ndarray, labels: list, image_id: int, next_id: int) -> list:
    """COCO annotations from the visible (post-occlusion) masks."""
    anns = []
    for k, ci in enumerate(labels, start=1):
        rle = mask_utils.encode(np.asfortranarray((owner == k).astype(np.uint8)))
        anns.append({
            "id": next_id + len(anns), "image_id": image_id, "category_id": ci + 1,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "area": float(mask_utils.area(rle)), "iscrowd": 0,
            "segmentation": {"size": [int(s) for s in rle["size"]],
                             "counts": rle["counts"].decode("ascii")},
        })
    return anns


def _write_split(root: Path, split: str, num: int, p: dict) -> dict:
    """Write one split's JPEGs and return its COCO dict (not yet saved)."""
    out = root / split
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("[0-9][0-9][0-9][0-9][0-9][0-9].jpg"):
        old.unlink()  # stale images of an earlier, larger run
    images, anns = [], []
    for i in range(num):
        rng = np.random.default_rng([p["seed"], SPLIT_IDS[split], i])
        img, owner, labels = _render_image(rng, p)
        name = f"{i:06d}.jpg"
        Image.fromarray(img).save(out / name, quality=90)
        images.append({"id": i + 1, "file_name": name,
                       "width": img.shape[1], "height": img.shape[0]})
        anns += _annotations(owner, labels, i + 1, len(anns) + 1)
    cats = [{"id": i + 1, "name": c, "supercategory": "shape"}
            for i, c in enumerate(p["classes"])]
    info = {"description": "Synthetic painted shapes (pipeline.data.synthetic)",
            "version": GENERATOR_VERSION, "split": split, "params": p}
    return {"info": info, "licenses": [], "images": images,
            "annotations": anns, "categories": cats}


def _is_current(paths: dict, p: dict) -> bool:
    """True when both annotation files exist, match `p` and their images exist."""
    for split in SPLIT_IDS:
        try:
            data = json.loads(paths[f"{split}_ann"].read_text())
        except (OSError, ValueError):
            return False
        info = data.get("info", {})
        if info.get("params") != p or info.get("version") != GENERATOR_VERSION:
            return False
        if not all((paths[f"{split}_images"] / im["file_name"]).is_file()
                   for im in data["images"]):
            return False
    return True


def make_dataset(root: str | os.PathLike, num_train: int = 512, num_val: int = 128,
                 seed: int = 0, min_side: int = 128, max_side: int = 224,
                 classes: Sequence[str] = SHAPES, max_objects: int = 5,
                 overwrite: bool = False) -> dict:
    """Write (or reuse) the synthetic COCO dataset under `root`.

    Returns {"train_images", "train_ann", "val_images", "val_ann"} as Paths.
    An existing dataset made with the same parameters is reused as is.
    """
    if not set(classes) <= set(SHAPES) or not classes:
        raise ValueError(f"classes must be a non-empty subset of {SHAPES}, got {classes}")
    if not 0 < min_side <= max_side or max_objects < 0 or num_train < 0 or num_val < 0:
        raise ValueError("need 0 < min_side <= max_side and non-negative counts")
    root = Path(root)
    p = {"num_train": int(num_train), "num_val": int(num_val), "seed": int(seed),
         "min_side": int(min_side), "max_side": int(max_side),
         "classes": list(classes), "max_objects": int(max_objects)}
    paths = {"train_images": root / "train", "val_images": root / "val",
             "train_ann": root / "annotations" / "instances_train.json",
             "val_ann": root / "annotations" / "instances_val.json"}
    if not overwrite and _is_current(paths, p):
        return paths
    for split in SPLIT_IDS:  # drop old JSON first: a crash must not look complete
        paths[f"{split}_ann"].unlink(missing_ok=True)
    coco = {s: _write_split(root, s, p[f"num_{s}"], p) for s in SPLIT_IDS}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, data in coco.items():  # JSON last, atomically
        dst = paths[f"{split}_ann"]
        tmp = dst.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, dst)
    return paths


def _summary(paths: dict) -> str:
    """Human-readable counts of images and annotations per split and class."""
    lines = []
    for split in SPLIT_IDS:
        data = json.loads(paths[f"{split}_ann"].read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        per = Counter(names[a["category_id"]] for a in data["annotations"])
        empty = len(data["images"]) - len({a["image_id"] for a in data["annotations"]})
        lines.append(f"{split}: {len(data['images'])} images ({empty} empty), "
                     f"{len(data['annotations'])} annotations -> {paths[f'{split}_ann']}")
        lines += [f"  {n}: {per[n]}" for n in names.values()]
    return "\n".join(lines)


def synthetic_batch(batch: int, h: int, w: int, device: torch.device, seed: int = 0, num_classes: int = 80):
    """``batch`` random images with 3-12 random boxes each (the benchmarks' and tests' fixed batches),
    labels 1..``num_classes`` (COCO's 80 by default)."""
    g = torch.Generator().manual_seed(seed)
    images = [(torch.rand(3, h, w, generator=g) * 255).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        n = int(torch.randint(3, 13, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, num_classes + 1, (n,), generator=g).to(device)})
    return images, targets


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description="Write the synthetic shapes COCO dataset.")
    ap.add_argument("--out", default="data/shapes")
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--val", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    paths = make_dataset(a.out, a.train, a.val, a.seed, overwrite=a.overwrite)
    print(_summary(paths))


def cli() -> None:
    """The command (``launch/make_dataset.py``)."""
    main()


if __name__ == "__main__":
    cli()
