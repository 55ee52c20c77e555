"""Tests for pipeline.data.synthetic: COCO round trip, determinism, reuse, masks."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.data.synthetic import make_dataset

SMALL = dict(num_train=6, num_val=4, seed=3)
# pycocotools' decode trips a numpy-2 DeprecationWarning that is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _decode(ann: dict) -> np.ndarray:
    seg = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode("ascii"))
    return mask_utils.decode(seg).astype(bool)


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    return make_dataset(tmp_path_factory.mktemp("shapes"), **SMALL)


def test_layout(small: dict) -> None:
    root = small["train_ann"].parent.parent
    assert small["train_ann"] == root / "annotations" / "instances_train.json"
    assert small["val_ann"] == root / "annotations" / "instances_val.json"
    assert small["train_images"] == root / "train" and small["val_images"] == root / "val"
    assert sorted(p.name for p in small["train_images"].iterdir())[0] == "000000.jpg"
    assert not list(root.rglob("*.tmp"))


@pytest.mark.parametrize("split,count", [("train", 6), ("val", 4)])
def test_coco_round_trip(small: dict, split: str, count: int) -> None:
    coco = COCO(str(small[f"{split}_ann"]))
    assert len(coco.getImgIds()) == count
    cats = coco.loadCats(coco.getCatIds())
    assert [c["name"] for c in cats] == ["rectangle", "ellipse", "triangle"]
    assert [c["id"] for c in cats] == [1, 2, 3]
    assert all(c["supercategory"] == "shape" for c in cats)
    for img in coco.loadImgs(coco.getImgIds()):
        with Image.open(small[f"{split}_images"] / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"])
            assert im.format == "JPEG" and im.mode == "RGB"
        assert 128 <= img["width"] <= 224 and 128 <= img["height"] <= 224
    assert coco.getAnnIds(), "expected some objects"
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.imgs[ann["image_id"]]
        m = _decode(ann)
        assert m.shape == (img["height"], img["width"])
        ys, xs = np.nonzero(m)
        assert len(xs) > 0
        expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert np.allclose(ann["bbox"], expected, atol=1.0)
        assert ann["area"] == m.sum()
        assert ann["iscrowd"] == 0 and ann["category_id"] in coco.cats
        assert np.array_equal(coco.annToMask(ann).astype(bool), m)


def test_ids_start_at_one(small: dict) -> None:
    data = json.loads(small["train_ann"].read_text())
    assert [im["id"] for im in data["images"]] == list(range(1, 7))
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    assert data["licenses"] == [] and data["info"]["params"]["seed"] == 3


def test_visible_masks_disjoint(small: dict) -> None:
    for split in ("train", "val"):
        coco = COCO(str(small[f"{split}_ann"]))
        for img_id in coco.getImgIds():
            masks = [_decode(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))]
            if masks:
                assert np.stack(masks).sum(0).max() <= 1


def test_deterministic(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", **SMALL)
    b = make_dataset(tmp_path / "b", **SMALL)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert a["train_ann"].read_bytes() != a["val_ann"].read_bytes()
    c = make_dataset(tmp_path / "c", **dict(SMALL, seed=4))
    assert c["train_ann"].read_bytes() != b["train_ann"].read_bytes()
    assert (c["train_images"] / "000000.jpg").read_bytes() != \
        (b["train_images"] / "000000.jpg").read_bytes()


def test_reuse_and_regenerate(tmp_path: Path) -> None:
    paths = make_dataset(tmp_path, **SMALL)
    watched = [paths["train_ann"], paths["val_ann"], paths["train_images"] / "000000.jpg"]
    for f in watched:  # backdate so any rewrite would show up in mtime
        os.utime(f, ns=(0, 0))
    assert make_dataset(tmp_path, **SMALL) == paths
    assert [f.stat().st_mtime_ns for f in watched] == [0, 0, 0]

    make_dataset(tmp_path, **dict(SMALL, num_train=3))  # different params -> rewrite
    data = json.loads(paths["train_ann"].read_text())
    assert len(data["images"]) == 3 and data["info"]["params"]["num_train"] == 3
    assert sorted(p.name for p in paths["train_images"].glob("*.jpg")) == \
        ["000000.jpg", "000001.jpg", "000002.jpg"]

    os.utime(paths["val_ann"], ns=(0, 0))  # backdate so a rewrite is visible
    make_dataset(tmp_path, **dict(SMALL, num_train=3), overwrite=True)
    assert paths["val_ann"].stat().st_mtime_ns != 0


def test_missing_image_triggers_regeneration(tmp_path: Path) -> None:
    paths = make_dataset(tmp_path, **SMALL)
    (paths["val_images"] / "000001.jpg").unlink()
    make_dataset(tmp_path, **SMALL)
    assert (paths["val_images"] / "000001.jpg").is_file()


def test_classes_subset_and_empty_images(tmp_path: Path) -> None:
    paths = make_dataset(tmp_path, num_train=40, num_val=0, seed=1,
                         classes=("triangle", "ellipse"), max_objects=2)
    data = json.loads(paths["train_ann"].read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "triangle"), (2, "ellipse")]
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=41)[1:]
    assert per_image.max() <= 2
    with pytest.raises(ValueError):
        make_dataset(tmp_path / "bad", num_train=1, num_val=1, classes=("star",))


def test_some_images_empty(tmp_path: Path) -> None:
    # ~3% of images have no objects; 200 images makes "none at all" very unlikely
    # (and the seed fixes the outcome anyway).
    paths = make_dataset(tmp_path, num_train=200, num_val=0, seed=0,
                         min_side=64, max_side=80, max_objects=1)
    data = json.loads(paths["train_ann"].read_text())
    with_objects = {a["image_id"] for a in data["annotations"]}
    assert 0 < len(data["images"]) - len(with_objects) < 20
