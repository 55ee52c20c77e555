"""launch/predict.py on the embedded dataset's images: COCO-format results and one drawn PNG per image,
bad inputs named and skipped while the others are processed, a file that is no export refused."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.io import ImageReadMode, decode_image

from conftest import TINY_BACKBONE
from pipeline.config import load_config

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]


def _cli():
    from pipeline.tools import predict

    return predict


def _export(path, detector="faster_rcnn", weights_of=None):
    """An export as pipeline.tools.export writes it, of a freshly initialised tiny detector."""
    from pipeline.train.build import build_model

    def config(kind):
        return load_config(None, [f"model.detector={kind}", f"model.backbone={TINY_BACKBONE}", "model.fpn_channels=16",
                                  "model.anchor_scale=4", "model.box_head_dim=32", "model.norm=frozen",
                                  "data.min_size=64", "data.max_size=96"])

    torch.manual_seed(0)
    state = build_model(config(weights_of or detector), 3, pretrained=False).state_dict()
    torch.save({"model": state, "num_classes": 3, "config": config(detector).model_dump(mode="json"),
                "categories": CATEGORIES}, path)
    return path


def test_predictions_and_drawings_for_every_readable_image(shapes_root, tmp_path, capsys):
    export = _export(tmp_path / "model_fp32.pt")
    (tmp_path / "notes.jpg").write_text("not an image")
    out = tmp_path / "pred"
    images = sorted((shapes_root / "val").glob("*.jpg"))
    code = _cli().main([str(export), str(shapes_root / "val"), str(tmp_path / "notes.jpg"),
                        str(tmp_path / "missing.jpg"), "--out", str(out), "--score-thresh", "0.0", "--max-dets", "5"])
    err = capsys.readouterr().err
    assert code == 2  # some inputs were skipped
    assert f"{tmp_path / 'notes.jpg'}: not an image" in err and f"{tmp_path / 'missing.jpg'}: no such file" in err
    results = json.loads((out / "predictions.json").read_text())
    assert results, "an untrained detector still scores every box above 0"
    per_image = {}
    for r in results:
        per_image.setdefault(r["image_id"], []).append(r)
        assert r["category_id"] in {1, 2, 3} and 0 <= r["score"] <= 1
    for image_id, dets in per_image.items():
        image = decode_image(dets[0]["file_name"], mode=ImageReadMode.RGB)
        h, w = image.shape[-2:]
        assert len(dets) <= 5
        for d in dets:  # boxes in the input image's own pixels
            x, y, bw, bh = d["bbox"]
            assert -0.01 <= x and x + bw <= w + 0.01 and -0.01 <= y and y + bh <= h + 0.01
    for path in images:  # one PNG per image, its size, with the detections drawn on it
        png = decode_image(str(out / f"{path.stem}.png"))
        original = decode_image(str(path), mode=ImageReadMode.RGB)
        assert png.shape == original.shape
        drawn = any(r["file_name"] == str(path) for r in results)
        assert drawn == (not torch.equal(png, original))
    assert len(list(out.glob("*.png"))) == len(images)


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.save({"weights": torch.zeros(3)}, p), "not an export"),
    (lambda p: p.write_text("hello"), "not an export"),
    (lambda p: _export(p, detector="retinanet", weights_of="faster_rcnn"), "do not fit the detector"),
])
def test_a_file_that_is_not_a_fitting_export_is_refused(shapes_root, tmp_path, capsys, make, message):
    bad = tmp_path / "bad.pt"
    make(bad)
    assert _cli().main([str(bad), str(shapes_root / "val"), "--out", str(tmp_path / "pred")]) == 2
    assert message in capsys.readouterr().err


def test_previews_draw_the_evaluation_detections_of_the_first_images(shapes_root, tmp_path):
    """The grid holds the first images of the set, each with its detections above the threshold drawn
    (where a box is, pixels change; an image without any stays as it was), padded to one tile size."""
    from pipeline.data.dataset import CocoDetection
    from pipeline.evaluation.previews import draw_previews, save_previews

    val = CocoDetection(shapes_root / "val", shapes_root / "annotations/instances_val.json", 64, 96)
    first, second = val.ids[:2]
    results = [{"image_id": first, "category_id": val.cat_ids[0], "bbox": [5.0, 6.0, 20.0, 30.0], "score": 0.9},
               {"image_id": second, "category_id": val.cat_ids[0], "bbox": [5.0, 6.0, 20.0, 30.0], "score": 0.1}]
    grid = draw_previews(results, val, count=2, score_thresh=0.3)
    tiles = [decode_image(str(val.image_path(i)), mode=ImageReadMode.RGB) for i in range(2)]
    h, w = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
    assert grid.shape == (3, h + 2 * 4, 2 * w + 3 * 4)  # two tiles in a row, make_grid's 4-pixel frame
    got = [grid[:, 4:4 + t.shape[1], 4 + k * (w + 4):4 + k * (w + 4) + t.shape[2]] for k, t in enumerate(tiles)]
    assert not torch.equal(got[0], tiles[0]) and torch.equal(got[0][:, 40:, 30:], tiles[0][:, 40:, 30:])
    assert torch.equal(got[1], tiles[1])  # its only detection scores below the threshold
    png = save_previews(grid, tmp_path, 12)
    assert png == tmp_path / "previews/iter_00000012.png" and decode_image(str(png)).shape == grid.shape
    assert draw_previews(results, val, count=0) is None


def test_mask_rcnn_predictions_carry_masks_and_draw_them(shapes_root, tmp_path):
    export = _export(tmp_path / "mask.pt", detector="mask_rcnn")
    out = tmp_path / "pred"
    image = sorted((shapes_root / "val").glob("*.jpg"))[0]
    assert _cli().main([str(export), str(image), "--out", str(out), "--score-thresh", "0.0", "--max-dets", "3"]) == 0
    results = json.loads((out / "predictions.json").read_text())
    assert results and all({"counts", "size"} <= set(r["segmentation"]) for r in results)
    png, original = decode_image(str(out / f"{image.stem}.png")), decode_image(str(image), mode=ImageReadMode.RGB)
    assert png.shape == original.shape and not torch.equal(png, original)


def test_label_0_is_never_reported_or_drawn(shapes_root, tmp_path, monkeypatch):
    """Label 0 (no class; a one-stage head's channel 0 at a low threshold): not in predictions.json."""
    from pipeline.tools import predict

    export = _export(tmp_path / "model_fp32.pt")  # an untrained Faster R-CNN scores every box above 0
    model, categories = predict.load_detector(export)

    def with_background(images):
        out = type(model).forward(model, images)
        for o in out:  # every other detection becomes label 0, the others label 1
            o["labels"] = torch.arange(len(o["labels"])) % 2
        return out

    monkeypatch.setattr(model, "forward", with_background)
    monkeypatch.setattr(predict, "load_detector", lambda path: (model, categories))
    images = sorted((shapes_root / "val").glob("*.jpg"))[:3]
    assert predict.main([str(export), *map(str, images), "--out", str(tmp_path / "p"), "--score-thresh", "0.0"]) == 0
    results = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert results and {r["category_id"] for r in results} == {1}  # label 0 gone (not categories[-1]), 1 -> 1
