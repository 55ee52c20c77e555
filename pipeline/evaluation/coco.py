"""COCO evaluation: inference on each rank's shard, gather to rank 0, COCOeval once.

Predictions are mapped back to the annotation file's pixel coordinates (the
loader resized the images) and category ids, then scored by pycocotools'
COCOeval itself. The result is a flat dict of floats such as ``bbox/AP50``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

# COCOeval.stats order, named as detectron2 and mmdet report them.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def foreground(output: dict) -> dict:
    """``output`` without label-0 detections. Labels 1..K are the classes; the one-stage heads
    (RetinaNet, FCOS) also score an output channel 0 that never trains as a positive, and at a low
    ``model.score_thresh`` it shows up. It is no category: indexing a label table with ``0 - 1``
    would silently name the last one."""
    keep = output["labels"] > 0
    if bool(keep.all()):
        return output
    return {k: v[keep] if torch.is_tensor(v) and len(v) == len(keep) else v for k, v in output.items()}


# One detection as it is gathered to rank 0. float64: a COCO image id stays exact (float32 is exact only
# below 2**24), and the float32 boxes and scores convert without change.
ROW = ("image_id", "label", "x", "y", "w", "h", "score")


def detection_rows(output: dict, target: dict) -> torch.Tensor:
    """One image's detections as ``[n, len(ROW)]`` float64 rows on the output's device, boxes in the
    annotation file's pixels (the loader resized the image by ``target["scale"]``) as xywh. No host sync:
    the rows stay on the device until the gather."""
    boxes = output["boxes"].float() / target["scale"]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    image = torch.full((len(boxes), 1), float(target["image_id"]), dtype=torch.float64, device=boxes.device)
    return torch.cat([image, output["labels"][:, None].double(), xywh.double(), output["scores"][:, None].double()],
                     dim=1)


def mask_rles(output: dict, orig_hw: tuple[int, int]) -> list[dict]:
    """Each detection's mask as COCO RLE (``counts`` a str) at the original image size."""
    if not len(output["masks"]):
        return []
    masks = F.interpolate(output["masks"].float(), size=orig_hw, mode="bilinear", align_corners=False)
    binary = np.asfortranarray((masks[:, 0] > 0.5).cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(binary)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def to_coco_results(rows: torch.Tensor, label_to_cat: list[int], rles: Optional[list[dict]] = None) -> list[dict]:
    """Detection rows (``ROW``; with their masks' RLEs) as COCO result dicts, label-0 rows dropped (see
    ``foreground``)."""
    results = []
    for i, (image_id, label, x, y, w, h, score) in enumerate(rows.cpu().tolist()):
        if label < 1:
            continue
        res = {"image_id": int(image_id), "category_id": label_to_cat[int(label) - 1], "bbox": [x, y, w, h],
               "score": score}
        if rles is not None:
            res["segmentation"] = rles[i]
        results.append(res)
    return results


@torch.no_grad()
def predict(model, loader: Iterable, coco_gt: COCO, device: torch.device, with_masks: bool = False,
            progress: bool = False) -> tuple[torch.Tensor, Optional[list[dict]]]:
    """Run the model over this rank's loader; return its detection rows (``ROW``) and, ``with_masks``,
    each row's mask RLE.

    Every rank runs as many forwards as the rank with the most batches: a validation set that does
    not divide evenly (COCO's 5,000 images on 64 ranks) gives some ranks one batch more, and under
    ZeRO-3 every forward gathers parameters, a collective, so a rank that stopped early would leave
    the others waiting (NCCL: a hang) or mismatch the next collective (gloo: abort). The extra
    forwards repeat this rank's last batch and their outputs are dropped.
    """
    forwards = _most_batches(len(loader), device)  # before any forward: it is itself a collective
    rows, rles, images = [], [] if with_masks else None, None
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        images = [im.to(device, non_blocking=True).float() for im in images]
        outputs = model(images)
        for out, tgt in zip(outputs, targets):
            if rles is not None:  # masks go through the host anyway: no label-0 mask is encoded or sent
                out = foreground(out)
                info = coco_gt.imgs[tgt["image_id"]]
                rles += mask_rles(out, (info["height"], info["width"]))
            rows.append(detection_rows(out, tgt))
    if images is None:  # this rank had no image at all (fewer images than ranks)
        images = [torch.zeros(3, 64, 64, device=device)]
    for _ in range(forwards - len(loader)):
        model(images)
    rows = torch.cat(rows) if rows else torch.zeros((0, len(ROW)), dtype=torch.float64, device=device)
    return rows, rles


def _most_batches(mine: int, device: torch.device) -> int:
    """The largest number of evaluation batches on any rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    most = torch.tensor([mine], device=device)  # NCCL reduces device tensors only
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most)


def gather_capacity(num_images: int, world: int, detections_per_img: int) -> int:
    """Rows of each rank's block in ``gather_to_rank0``: the most images a rank evaluates (``eval_batches``
    deals them round-robin) times the most detections the model keeps per image."""
    return -(-num_images // world) * detections_per_img


def gather_to_rank0(rows: torch.Tensor, rles: Optional[list[dict]], capacity: int
                    ) -> tuple[Optional[torch.Tensor], Optional[list[dict]]]:
    """Every rank's detection rows (and mask RLEs) on rank 0 in rank order; (None, None) elsewhere.

    The rows travel as one ``gather`` of a ``[capacity, len(ROW)]`` float64 block per rank, padded with NaN
    image ids: the same size on every rank, known from the config alone, so the communication plan
    (``pipeline.tools.comm_plan.eval_transfers``) is exact, and no detection is pickled. Mask RLEs are
    strings of data-dependent length: ``gather_object``."""
    # checked on one rank too, so a config fails alike on 1 and on 64 GPUs (there the job's watchdog stops the
    # ranks waiting in the gather)
    if len(rows) > capacity:
        raise RuntimeError(f"{len(rows)} detections to gather on this rank, more than its block of {capacity} (its "
                           "images x model.detections_per_img): the detector keeps more detections per image than "
                           "model.detections_per_img")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows, rles
    block = rows.new_full((capacity, len(ROW)), float("nan"))
    block[:len(rows)] = rows
    first = dist.get_rank() == 0
    blocks = [torch.empty_like(block) for _ in range(dist.get_world_size())] if first else None
    dist.gather(block, blocks, dst=0)
    if rles is not None:
        parts = [None] * dist.get_world_size() if first else None
        dist.gather_object(rles, parts, dst=0)
        rles = [r for part in parts for r in part] if first else None
    if not first:
        return None, None
    rows = torch.cat(blocks)
    return rows[~rows[:, 0].isnan()], rles


def coco_eval_backend(name: str) -> str:
    """``train.coco_eval``: ``auto`` is faster-coco-eval where it is installed (the same numbers as
    pycocotools, measured in BENCHMARKS.md), else pycocotools."""
    if name != "auto":
        return name
    import importlib.util

    return "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"


def _cocoeval(coco_gt: COCO, dets: list[dict], iou_type: str, backend: str):
    """COCOeval of ``backend``: pycocotools' (the reference) or faster-coco-eval's C++ one, which
    computes the same twelve numbers (``benchmarks/bench_coco_eval.py`` compares them)."""
    if coco_eval_backend(backend) == "pycocotools":
        return COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
    from faster_coco_eval import COCO as FastCOCO
    from faster_coco_eval import COCOeval_faster

    fast_gt = getattr(coco_gt, "_faster_coco_eval", None)
    if fast_gt is None:  # its own index of the ground truth, built once per dataset
        fast_gt = coco_gt._faster_coco_eval = FastCOCO(copy.deepcopy(coco_gt.dataset))
    return COCOeval_faster(fast_gt, fast_gt.loadRes(dets), iou_type, print_function=print)


def coco_evaluate(coco_gt: COCO, results: list[dict], iou_types: Iterable[str] = ("bbox",),
                  img_ids: Optional[list[int]] = None, report: Optional[list[str]] = None,
                  backend: str = "pycocotools") -> dict[str, float]:
    """COCOeval per IoU type; flat dict ``{"bbox/AP": ..., "bbox/AP50": ...}``.

    No detections at all scores 0 (pycocotools' loadRes cannot take an empty list). ``report``
    receives COCOeval's own printed summary of each IoU type (its twelve lines). ``backend``:
    ``pycocotools`` or ``faster_coco_eval`` (``train.coco_eval``).
    """
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        # Copies: loadRes edits its input in place. For segm the bbox is dropped so that
        # loadRes takes mask areas (COCO size ranges) rather than box areas.
        if iou_type == "segm":
            dets = [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]
        else:
            dets = [dict(r) for r in results]
        if not dets:
            metrics.update({f"{iou_type}/{n}": 0.0 for n in STAT_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            ev = _cocoeval(coco_gt, dets, iou_type, backend)
            if img_ids is not None:
                ev.params.imgIds = img_ids
            ev.evaluate()
            ev.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            ev.summarize()
        if report is not None:
            report.append(f"{iou_type}:\n{summary.getvalue().rstrip()}")
        # COCOeval reports -1 where a size range has no ground truth: keep that, it is not an AP of 0.
        metrics.update({f"{iou_type}/{n}": float(v) for n, v in zip(STAT_NAMES, ev.stats)})  # faster adds more
    return metrics


def evaluate(model, loader, dataset, device: torch.device, with_masks: bool, detections_per_img: int,
             progress: bool = False, detections_file: Optional[Path] = None, report: Optional[list[str]] = None,
             detections: Optional[list[dict]] = None, backend: str = "pycocotools") -> dict:
    """Distributed COCO evaluation of ``model`` on ``dataset``; metrics on rank 0, {} elsewhere.

    ``detections_per_img``: the most detections the model keeps per image (``model.detections_per_img``),
    which sizes the gather. ``detections_file``: rank 0 also writes every detection there, as a COCO results
    JSON (``COCO.loadRes`` reads it back; masks as RLE). ``report``: COCOeval's printed summaries.
    ``detections``: rank 0 appends every detection (COCO results) to it. ``backend``: the COCOeval.
    """
    was_training = model.training
    model.eval()
    rows, rles = predict(model, loader, dataset.coco, device, with_masks, progress)
    model.train(was_training)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rows, rles = gather_to_rank0(rows, rles, gather_capacity(len(dataset), world, detections_per_img))
    if rows is None:
        return {}
    results = to_coco_results(rows, dataset.cat_ids, rles)
    if detections_file is not None:
        detections_file.write_text(json.dumps(results))
    if detections is not None:
        detections.extend(results)
    iou_types = ("bbox", "segm") if with_masks else ("bbox",)
    return coco_evaluate(dataset.coco, results, iou_types, img_ids=list(dataset.ids), report=report, backend=backend)
