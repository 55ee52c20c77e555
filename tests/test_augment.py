"""Scale augmentation (``data.min_size`` as a list / ``data.train_min_sizes``, ``data.scale_jitter``):
boxes and masks against the transform computed by hand from each sample's recorded draw, static
shapes under large-scale jitter, and randomness that is a pure function of (seed, epoch, image)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import dump_config, load_config
from pipeline.data.dataset import CocoDetection
from pipeline.data.samplers import index_seed
from pipeline.errors import ConfigError

SIDE = 96


def _dataset(root, **kwargs) -> CocoDetection:
    return CocoDetection(root / "train", root / "annotations/instances_train.json", 64, SIDE, flip_prob=0.5,
                         with_masks=True, **kwargs)


def _file_boxes(ds: CocoDetection, index: int) -> torch.Tensor:
    lo, hi = int(ds._box_off[index]), int(ds._box_off[index + 1])
    xyxy = torch.from_numpy(ds._boxes[lo:hi].copy()).double()
    xyxy[:, 2:] += xyxy[:, :2]
    return xyxy


def test_large_scale_jitter_moves_boxes_and_masks_as_computed_by_hand(shapes_root):
    ds = _dataset(shapes_root, scale_jitter=(0.1, 2.0))
    crops = shrinks = flips = 0
    for index in range(4):
        for seed in range(6):
            image, target = ds[(index, index_seed(seed, 0, index))]
            assert image.shape == (3, SIDE, SIDE)  # always the fixed square: static shapes
            draw = target["augment"]
            w, h = (float(v) for v in ds._wh[index])
            nh, nw = max(1, round(h * draw["scale"])), max(1, round(w * draw["scale"]))
            top, left = draw["crop"]
            # by hand: scale by the resized/original pixel ratio, shift by the crop, clip to the window, mirror
            boxes = _file_boxes(ds, index) * torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float64)
            boxes -= torch.tensor([left, top, left, top], dtype=torch.float64)
            ch, cw = min(nh, SIDE), min(nw, SIDE)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
            if draw["flip"]:
                boxes[:, [0, 2]] = SIDE - boxes[:, [2, 0]]
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            torch.testing.assert_close(target["boxes"].double(), boxes[keep], rtol=0, atol=1e-3)
            assert len(target["labels"]) == len(target["masks"]) == int(keep.sum())
            # each mask lies inside its box (nearest-neighbour resize: within a pixel) and outside the padding
            for box, mask in zip(target["boxes"], target["masks"]):
                ys, xs = mask.nonzero(as_tuple=True)
                if len(xs):
                    assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]
            pad_cols = slice(0, SIDE - cw) if draw["flip"] else slice(cw, SIDE)
            if cw < SIDE:  # the padding is the mean pixel
                assert (image[:, :, pad_cols] == torch.tensor([124, 116, 104], dtype=torch.uint8)[:, None, None]).all()
            crops += nh > SIDE or nw > SIDE
            shrinks += nh < SIDE and nw < SIDE
            flips += draw["flip"]
    assert crops and shrinks and flips  # every branch was taken


def test_augmentation_is_a_pure_function_of_seed_epoch_and_image(shapes_root):
    for kwargs in ({"scale_jitter": (0.1, 2.0)}, {"train_min_sizes": (48, 64, 80)}):
        ds, again = _dataset(shapes_root, **kwargs), _dataset(shapes_root, **kwargs)
        item = (2, index_seed(7, 3, 2))
        (a, ta), (b, tb) = ds[item], again[item]  # another process or a resumed run builds its own dataset
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["masks"], tb["masks"])
        shapes = {tuple(ds[(2, index_seed(7, epoch, 2))][0].shape) for epoch in range(8)}
        if "train_min_sizes" in kwargs:
            assert len(shapes) > 1  # the epoch changes the draw


def test_multi_scale_draws_every_size_and_keeps_the_flips(shapes_root):
    sizes = (48, 64, 80)
    ds, plain = _dataset(shapes_root, train_min_sizes=sizes), _dataset(shapes_root)
    seen = set()
    for seed in range(12):
        item = (0, index_seed(seed, 0, 0))
        image, target = ds[item]
        h, w = image.shape[-2:]
        assert min(h, w) in sizes or max(h, w) == SIDE
        seen.add(min(h, w))
        # the flip is the sample's first draw, as it was before multi-scale: the same images are mirrored
        plain_boxes, boxes = plain[item][1]["boxes"], target["boxes"]
        mirrored = lambda b, width: (b[:, 0] + b[:, 2]) / width  # noqa: E731  (box centre / width)
        torch.testing.assert_close(mirrored(boxes, w), mirrored(plain_boxes, plain[item][0].shape[-1]), atol=0.02,
                                   rtol=0)
    assert seen == set(sizes)


def test_scale_augmentation_config():
    cfg = load_config(None, ["data.min_size=[640, 704, 800]"])
    assert cfg.data.min_size == 800 and cfg.data.train_min_sizes == (640, 704, 800)
    with pytest.raises(ConfigError, match="data.decode=workers"):
        load_config(None, ["data.scale_jitter=[0.1, 2.0]", "data.decode=device"])
    with pytest.raises(ConfigError, match="0 < low <= high"):
        load_config(None, ["data.scale_jitter=[2.0, 0.1]"])


def test_scale_augmentation_config_round_trips(tmp_path):
    for overrides in (["data.min_size=[640, 800]"], ["data.scale_jitter=[0.1, 2.0]", "data.min_size=1024",
                                                     "data.max_size=1024"]):
        cfg = load_config(None, overrides)
        dump_config(cfg, tmp_path / "config.yaml")
        assert load_config(tmp_path / "config.yaml") == cfg
