"""Tests for pipeline.evaluation.coco against hand-computed COCO truths.

Every AP below is worked out by hand from COCO's definition (greedy matching by
score, precision made non-increasing from the right, sampled at the 101 recall
thresholds 0, 0.01, ..., 1 and averaged), not read back from COCOeval.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.evaluation.coco import (ROW, STAT_NAMES, coco_evaluate, detection_rows, gather_to_rank0, mask_rles,
                                      to_coco_results)

# pycocotools trips numpy-2 DeprecationWarnings that are not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CAT_A, CAT_B = 3, 7  # non-contiguous category ids
IMAGES = {11: (100, 100), 22: (100, 100), 33: (100, 100), 44: (100, 100)}  # id -> (h, w)


def _poly(x, y, w, h) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def make_gt(anns: list[tuple[int, int, list[float]]], images=IMAGES, segm: str = "poly") -> COCO:
    """An in-memory COCO ground truth from (image_id, category_id, xywh) triples."""
    dataset = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"} for i, (h, w) in images.items()],
        "categories": [{"id": CAT_A, "name": "a"}, {"id": CAT_B, "name": "b"}],
        "annotations": [],
    }
    for ann_id, (img, cat, box) in enumerate(anns, start=1):  # ids from 1: COCOeval treats id 0 as "unmatched"
        if segm == "poly":
            seg = _poly(*box)
        else:  # compressed RLE of the box rectangle
            h, w = images[img]
            m = np.zeros((h, w), np.uint8, order="F")
            x, y, bw, bh = (int(v) for v in box)
            m[y:y + bh, x:x + bw] = 1
            seg = mask_utils.encode(m)
            seg["counts"] = seg["counts"].decode("ascii")
        dataset["annotations"].append({"id": ann_id, "image_id": img, "category_id": cat, "bbox": list(box),
                                       "area": float(box[2] * box[3]), "iscrowd": 0, "segmentation": seg})
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def det(img: int, cat: int, box, score: float) -> dict:
    return {"image_id": img, "category_id": cat, "bbox": [float(v) for v in box], "score": score}


# Category A: two GT boxes (one on image 11, one on image 22).
# Category B: two GT boxes (image 11 and image 33), detected perfectly.
GT_ANNS = [
    (11, CAT_A, [10, 10, 40, 40]),
    (22, CAT_A, [50, 50, 30, 30]),
    (11, CAT_B, [60, 5, 30, 20]),
    (33, CAT_B, [5, 5, 50, 50]),
]


def make_dets() -> list[dict]:
    """Fresh result dicts each call (pycocotools' loadRes edits the dicts it is given)."""
    return [
        det(11, CAT_A, [10, 10, 40, 40], 0.9),  # TP, IoU 1.0
        det(11, CAT_A, [60, 60, 20, 20], 0.8),  # FP, IoU 0 with every A box
        det(22, CAT_A, [50, 50, 30, 30], 0.7),  # TP, IoU 1.0
        det(11, CAT_B, [60, 5, 30, 20], 0.95),  # TP
        det(33, CAT_B, [5, 5, 50, 50], 0.6),    # TP
    ]

# Hand AP of category A. Detections by score: TP, FP, TP over 2 GT boxes.
#   cumulative TP = 1, 1, 2 ; FP = 0, 1, 1
#   precision     = 1/1, 1/2, 2/3 ; recall = 1/2, 1/2, 2/2
#   made non-increasing from the right: 1, 2/3, 2/3
#   each recall threshold r takes the precision at the first point with recall >= r:
#     r = 0.00 .. 0.50 (51 thresholds) -> first point (recall 0.5), precision 1
#     r = 0.51 .. 1.00 (50 thresholds) -> third point (recall 1.0), precision 2/3
#   AP_A = (51 * 1 + 50 * 2/3) / 101 = (253/3) / 101 = 253/303 ~= 0.834983
# Category B is perfect: AP_B = 101/101 = 1. The mean over categories:
#   (253/303 + 1) / 2 = 278/303 ~= 0.917492
AP_A = (51 * 1 + 50 * (2 / 3)) / 101
EXPECTED_AP = (AP_A + 1.0) / 2


def test_hand_computed_ap_two_categories():
    assert AP_A == pytest.approx(253 / 303, abs=1e-12)
    m = coco_evaluate(make_gt(GT_ANNS), make_dets())
    assert set(m) == {f"bbox/{n}" for n in STAT_NAMES}
    assert all(isinstance(v, float) for v in m.values())
    assert m["bbox/AP50"] == pytest.approx(EXPECTED_AP, abs=1e-6)
    # Every match has IoU 1 and every miss IoU 0, so the answer is the same at every IoU threshold.
    assert m["bbox/AP75"] == pytest.approx(EXPECTED_AP, abs=1e-6)
    assert m["bbox/AP"] == pytest.approx(EXPECTED_AP, abs=1e-6)
    # Every GT box is found, also with one detection per image and category (the FP ranks below the TP).
    assert m["bbox/AR100"] == pytest.approx(1.0, abs=1e-6)
    assert m["bbox/AR1"] == pytest.approx(1.0, abs=1e-6)
    # No GT box is larger than 96^2: COCOeval's -1 for an empty size range is kept.
    assert m["bbox/APl"] == -1.0


def test_result_order_does_not_matter():
    dets = make_dets()
    random.Random(0).shuffle(dets)
    m = coco_evaluate(make_gt(GT_ANNS), dets)
    assert m["bbox/AP50"] == pytest.approx(EXPECTED_AP, abs=1e-6)


def test_iou_06_counts_at_50_not_at_75():
    # GT 40 x 20, detection shifted 10 px right: overlap 30 x 20 = 600, union 50 x 20 = 1000, IoU 0.6.
    gt_a = [(11, CAT_A, [10, 10, 40, 20])]
    dets_a = [det(11, CAT_A, [20, 10, 40, 20], 0.9)]
    # Category B has no GT here, so COCOeval leaves it out of the mean (-1), which is then A's AP alone.
    m = coco_evaluate(make_gt(gt_a), dets_a)
    assert m["bbox/AP50"] == pytest.approx(1.0, abs=1e-6)
    assert m["bbox/AP75"] == pytest.approx(0.0, abs=1e-6)
    # With a perfect category B: AP50 = (1 + 1) / 2 = 1, AP75 = (0 + 1) / 2 = 0.5.
    gt_ab = gt_a + [(33, CAT_B, [5, 5, 50, 50])]
    m = coco_evaluate(make_gt(gt_ab), dets_a + [det(33, CAT_B, [5, 5, 50, 50], 0.5)])
    assert m["bbox/AP50"] == pytest.approx(1.0, abs=1e-6)
    assert m["bbox/AP75"] == pytest.approx(0.5, abs=1e-6)


# ---------------------------------------------------------------- empty and partial cases


def test_no_detections_scores_zero():
    m = coco_evaluate(make_gt(GT_ANNS), [], iou_types=("bbox", "segm"))
    assert m == {f"{t}/{n}": 0.0 for t in ("bbox", "segm") for n in STAT_NAMES}


@pytest.mark.parametrize("iou_types", [("segm", "bbox"), ("bbox", "segm")])
def test_bbox_only_results_score_zero_for_segm(iou_types):
    # Results without "segmentation" are no segm results (coco_evaluate filters on that key),
    # whatever the order of iou_types. Fails with ("bbox", "segm") while coco_evaluate hands the
    # caller's dicts to loadRes, which adds a box polygon "segmentation" to each of them in place.
    m = coco_evaluate(make_gt(GT_ANNS), make_dets(), iou_types=iou_types)
    assert m["bbox/AP50"] == pytest.approx(EXPECTED_AP, abs=1e-6)
    assert {n: m[f"segm/{n}"] for n in STAT_NAMES} == {n: 0.0 for n in STAT_NAMES}


def test_coco_evaluate_leaves_results_alone():
    # The caller's results (e.g. kept to be saved as JSON) must come back unchanged.
    gt = make_gt(GT_ANNS, segm="rle")
    results = _perfect_segm_results(gt)
    before = json.loads(json.dumps(results))
    coco_evaluate(gt, results, iou_types=("bbox", "segm"))
    assert results == before


def test_detections_for_one_image_only():
    # Category A GT on images 11 and 22, one perfect detection on 11 only (B has no GT: left out).
    # precision 1 at recall 0.5, nothing beyond: thresholds 0.00..0.50 (51 of 101) get 1, the rest 0.
    gt = make_gt([(11, CAT_A, [10, 10, 40, 40]), (22, CAT_A, [50, 50, 30, 30])])
    dets = [det(11, CAT_A, [10, 10, 40, 40], 0.9)]
    m = coco_evaluate(gt, dets)
    assert m["bbox/AP50"] == pytest.approx(51 / 101, abs=1e-6)
    assert m["bbox/AR100"] == pytest.approx(0.5, abs=1e-6)
    # Restricted to image 11 the one GT box is found: AP 1.
    m = coco_evaluate(gt, dets, img_ids=[11])
    assert m["bbox/AP50"] == pytest.approx(1.0, abs=1e-6)


def test_image_without_gt_or_detections_changes_nothing():
    # Image 44 has neither GT nor detections; it is in the annotation file and, the second
    # time, explicitly in img_ids (as evaluate() passes dataset.ids).
    gt = make_gt(GT_ANNS)
    m_all = coco_evaluate(gt, make_dets())
    m_ids = coco_evaluate(gt, make_dets(), img_ids=[11, 22, 33, 44])
    without = make_gt(GT_ANNS, images={k: v for k, v in IMAGES.items() if k != 44})
    m_without = coco_evaluate(without, make_dets())
    for n in STAT_NAMES:
        assert m_all[f"bbox/{n}"] == pytest.approx(m_without[f"bbox/{n}"], abs=1e-12)
        assert m_ids[f"bbox/{n}"] == pytest.approx(m_without[f"bbox/{n}"], abs=1e-12)


def test_detection_on_image_without_gt_is_a_false_positive():
    # A on image 11 only. By score: FP (image 44, no GT, 0.95), TP (image 11, 0.9).
    # precision 0, 1/2 at recall 0, 1 -> non-increasing from the right: 1/2, 1/2 -> AP 0.5.
    gt = make_gt([(11, CAT_A, [10, 10, 40, 40])])
    dets = [det(44, CAT_A, [10, 10, 40, 40], 0.95), det(11, CAT_A, [10, 10, 40, 40], 0.9)]
    assert coco_evaluate(gt, dets)["bbox/AP50"] == pytest.approx(0.5, abs=1e-6)


# ---------------------------------------------------------------- to_coco_results


def _results(output: dict, target: dict, label_to_cat: list[int], orig_hw: tuple[int, int]) -> list[dict]:
    """One image through evaluate()'s path on one rank: rows (and mask RLEs), then COCO results."""
    rles = mask_rles(output, orig_hw) if "masks" in output else None
    return to_coco_results(detection_rows(output, target), label_to_cat, rles)


def test_to_coco_results_boxes_categories_scores():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0]])
    output = {"boxes": boxes.clone(), "scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([1, 2])}
    res = _results(output, {"image_id": 22, "scale": 0.5}, [CAT_A, CAT_B], (200, 300))
    assert len(res) == 2
    # xyxy / 0.5 = [20, 40, 60, 120] -> xywh [20, 40, 40, 80]; [0, 0, 10, 10] -> [0, 0, 10, 10]
    assert res[0]["bbox"] == pytest.approx([20.0, 40.0, 40.0, 80.0])
    assert res[1]["bbox"] == pytest.approx([0.0, 0.0, 10.0, 10.0])
    assert [r["category_id"] for r in res] == [CAT_A, CAT_B]  # label 1 -> label_to_cat[0]
    assert [r["score"] for r in res] == pytest.approx([0.9, 0.3])
    assert all(r["image_id"] == 22 for r in res)
    assert all("segmentation" not in r for r in res)
    assert torch.equal(output["boxes"], boxes)  # the model output is left alone
    json.dumps(res)  # plain Python values, as loadRes and gather_object need


def test_label_0_of_the_one_stage_heads_is_no_category():
    """RetinaNet/FCOS score a channel 0 that is no class; at a low score threshold it appears and must be
    dropped, not mapped to ``label_to_cat[-1]`` (the last category)."""
    output = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 6.0, 6.0]]),
              "scores": torch.tensor([0.04, 0.03, 0.02]), "labels": torch.tensor([2, 0, 1])}
    res = _results(output, {"image_id": 1, "scale": 1.0}, [CAT_A, CAT_B], (50, 50))
    assert [(r["category_id"], r["score"]) for r in res] == [(CAT_B, pytest.approx(0.04)), (CAT_A, pytest.approx(0.02))]
    assert len(output["labels"]) == 3  # the model output is left alone


def test_to_coco_results_other_scale_and_empty():
    output = {"boxes": torch.tensor([[8.0, 4.0, 16.0, 12.0]], dtype=torch.float16),
              "scores": torch.tensor([0.5], dtype=torch.float16), "labels": torch.tensor([2])}
    res = _results(output, {"image_id": 1, "scale": 0.8}, [CAT_A, CAT_B], (50, 50))
    assert res[0]["bbox"] == pytest.approx([10.0, 5.0, 10.0, 10.0], abs=1e-4)
    assert res[0]["category_id"] == CAT_B
    empty = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros((0, 1, 20, 30))}
    assert _results(empty, {"image_id": 1, "scale": 0.5}, [CAT_A, CAT_B], (40, 60)) == []


def _rect_mask(h, w, x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode(dict(rle, counts=rle["counts"].encode("ascii"))).astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("orig_hw", [(40, 60), (90, 121)])
def test_to_coco_results_masks_to_original_pixels(orig_hw):
    # The loader resizes by 0.5: round(h * 0.5) x round(w * 0.5) (90 x 121 -> 45 x 60, not exactly half).
    oh, ow = orig_hw
    rh, rw = round(oh * 0.5), round(ow * 0.5)
    # Soft masks: 0.8 inside a rectangle, 0.2 outside (the 0.5 threshold must separate them).
    prob = torch.full((2, 1, rh, rw), 0.2)
    prob[0, 0, 4:12, 5:15] = 0.8  # x 5..15, y 4..12 in resized pixels
    prob[1, 0, 10:18, 20:28] = 0.8
    output = {"boxes": torch.tensor([[5.0, 4.0, 15.0, 12.0], [20.0, 10.0, 28.0, 18.0]]),
              "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2]), "masks": prob}
    res = _results(output, {"image_id": 11, "scale": 0.5}, [CAT_A, CAT_B], orig_hw)
    expected = [_rect_mask(oh, ow, 10, 8, 30, 24), _rect_mask(oh, ow, 40, 20, 56, 36)]  # resized x 2
    for r, exp in zip(res, expected):
        seg = r["segmentation"]
        assert isinstance(seg["counts"], str)
        assert list(seg["size"]) == [oh, ow]
        mask = _decode(seg)
        assert mask.shape == (oh, ow)
        assert _iou(mask, exp) > 0.9
    json.dumps(res)


# ---------------------------------------------------------------- segm


def _rle_of(gt: COCO, ann: dict) -> dict:
    rle = gt.annToRLE(ann)
    return {"size": list(rle["size"]),
            "counts": rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]}


def _perfect_segm_results(gt: COCO) -> list[dict]:
    """One result per GT annotation with its exact box and mask (compressed RLE, str counts)."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [float(v) for v in a["bbox"]],
             "score": 0.9 - 0.1 * i, "segmentation": _rle_of(gt, a)}
            for i, a in enumerate(gt.loadAnns(sorted(gt.anns)))]


@pytest.mark.parametrize("segm", ["poly", "rle"])
def test_segm_perfect_masks(segm):
    gt = make_gt(GT_ANNS, segm=segm)
    dets = _perfect_segm_results(gt)
    m = coco_evaluate(gt, dets, iou_types=("bbox", "segm"))
    assert set(m) == {f"{t}/{n}" for t in ("bbox", "segm") for n in STAT_NAMES}
    assert m["segm/AP50"] == pytest.approx(1.0, abs=1e-6)
    assert m["segm/AP"] == pytest.approx(1.0, abs=1e-6)
    assert m["bbox/AP50"] == pytest.approx(1.0, abs=1e-6)


def test_segm_from_to_coco_results_end_to_end():
    # Masks predicted at half resolution, mapped back by to_coco_results, scored against RLE GT.
    images = {11: (40, 60)}
    gt = make_gt([(11, CAT_A, [10, 8, 20, 16]), (11, CAT_B, [40, 20, 16, 16])], images=images, segm="rle")
    prob = torch.zeros((2, 1, 20, 30))
    prob[0, 0, 4:12, 5:15] = 1.0
    prob[1, 0, 10:18, 20:28] = 1.0
    output = {"boxes": torch.tensor([[5.0, 4.0, 15.0, 12.0], [20.0, 10.0, 28.0, 18.0]]),
              "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2]), "masks": prob}
    res = _results(output, {"image_id": 11, "scale": 0.5}, [CAT_A, CAT_B], (40, 60))
    m = coco_evaluate(gt, res, iou_types=("bbox", "segm"))
    assert m["bbox/AP"] == pytest.approx(1.0, abs=1e-6)
    assert m["segm/AP50"] == pytest.approx(1.0, abs=1e-6)


def test_segm_size_ranges_use_mask_area():
    # COCO's segm results carry no box, so a result's area is its mask area. Here the results
    # carry both: the box must not decide the size range of a mask result.
    # Category A: one small GT (20 x 20 = 400 < 32^2). Results by score:
    #   0.9: FP, box 100 x 100 (large) but mask 20 x 20 at (60, 60) (small, no overlap with the GT)
    #   0.8: TP, box and mask equal to the GT
    # By mask area both results are small: FP, TP -> precision 0, 1/2 at recall 0, 1 ->
    # non-increasing 1/2, 1/2 -> segm/APs = 0.5. (By box area the FP leaves the small range and
    # APs would be 1.0.)
    gt = make_gt([(11, CAT_A, [10, 10, 20, 20])], segm="rle")
    fp_mask = _rect_mask(100, 100, 60, 60, 80, 80)
    fp_rle = mask_utils.encode(np.asfortranarray(fp_mask.astype(np.uint8)))
    fp_rle["counts"] = fp_rle["counts"].decode("ascii")
    results = [dict(det(11, CAT_A, [0, 0, 100, 100], 0.9), segmentation=fp_rle),
               dict(det(11, CAT_A, [10, 10, 20, 20], 0.8), segmentation=_rle_of(gt, gt.anns[1]))]
    m = coco_evaluate(gt, results, iou_types=("segm",))
    assert m["segm/AP50"] == pytest.approx(0.5, abs=1e-6)
    assert m["segm/APs"] == pytest.approx(0.5, abs=1e-6)


# ---------------------------------------------------------------- gather


def _rank_rows(rank: int) -> tuple[torch.Tensor, list[dict]]:
    """Rank r's detections: 2 - r rows (rank 2 has none), image ids beyond float32's exact range."""
    n = max(2 - rank, 0)
    rows = torch.tensor([[2.0 ** 40 + rank, 1 + i, 10.5 * rank, 3.25, 7.0, 9.0, 0.5 - 0.1 * i] for i in range(n)],
                        dtype=torch.float64).reshape(n, len(ROW))
    return rows, [{"size": [8, 8], "counts": f"rank{rank}-row{i}"} for i in range(n)]


def _gather_worker(rank: int, world: int, out: str) -> None:
    from pipeline.distributed.job import init_distributed

    init_distributed()
    rows, rles = _rank_rows(rank)
    got = gather_to_rank0(rows, rles, capacity=3)
    torch.save(got, f"{out}/rank{rank}.pt")


def test_gather_puts_every_ranks_rows_and_masks_on_rank0_in_rank_order(tmp_path):
    """3 gloo ranks with 2, 1 and 0 detections: rank 0 gets exactly the rows each rank made, in rank order, float64
    ids intact, each mask RLE beside its row; the others get nothing."""
    from conftest import run_distributed

    run_distributed(_gather_worker, 3, str(tmp_path))
    rows, rles = torch.load(tmp_path / "rank0.pt")
    parts = [_rank_rows(r) for r in range(3)]
    assert torch.equal(rows, torch.cat([p[0] for p in parts]))
    assert rles == [r for p in parts for r in p[1]]
    assert rows[:, 0].tolist() == [2.0 ** 40, 2.0 ** 40, 2.0 ** 40 + 1]  # exact, as float32 would not keep them
    for r in (1, 2):
        assert torch.load(tmp_path / f"rank{r}.pt") == (None, None)


def test_gather_without_process_group_is_identity_and_checks_the_block():
    assert not dist.is_initialized()
    rows, rles = _rank_rows(0)
    assert gather_to_rank0(rows, rles, capacity=2) == (rows, rles)
    with pytest.raises(RuntimeError, match="2 detections to gather.*block of 1.*model.detections_per_img"):
        gather_to_rank0(rows, rles, capacity=1)


def test_faster_coco_eval_gives_pycocotools_numbers_on_the_embedded_set(shapes_root):
    """The optional backend (train.coco_eval=faster_coco_eval) against pycocotools, the reference: the
    embedded validation set, noisy copies of its boxes and masks with random scores, some wrong
    categories and some images without detections; bbox and segm agree to 1e-4."""
    gt = COCO(str(shapes_root / "annotations/instances_val.json"))
    rng = random.Random(0)
    results = []
    for ann in gt.loadAnns(gt.getAnnIds()):
        if ann["image_id"] == gt.getImgIds()[0]:
            continue  # an image with ground truth and no detection
        for _ in range(3):
            x, y, w, h = ann["bbox"]
            box = [x + rng.gauss(0, 2), y + rng.gauss(0, 2), abs(w + rng.gauss(0, 3)), abs(h + rng.gauss(0, 3))]
            mask = np.asfortranarray(gt.annToMask(ann))
            if rng.random() < 0.5:
                mask = np.roll(mask, rng.randint(-3, 3), axis=1)
            rle = mask_utils.encode(np.asfortranarray(mask))
            cat = ann["category_id"] if rng.random() < 0.8 else rng.choice(gt.getCatIds())
            results.append({"image_id": ann["image_id"], "category_id": cat, "bbox": box, "score": rng.random(),
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    reference = coco_evaluate(gt, results, ("bbox", "segm"))
    faster = coco_evaluate(gt, results, ("bbox", "segm"), backend="faster_coco_eval")
    assert faster.keys() == reference.keys() and 0.1 < reference["bbox/AP50"] < 1
    for key, value in reference.items():
        assert faster[key] == pytest.approx(value, abs=1e-4), key
