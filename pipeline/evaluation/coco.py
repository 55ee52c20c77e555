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


def to_coco_results(output: dict, target: dict, label_to_cat: list[int], orig_hw: tuple[int, int]) -> list[dict]:
    """One image's detections as COCO result dicts in original-image pixels (xywh)."""
    output = foreground(output)
    boxes = output["boxes"].float().cpu() / target["scale"]
    boxes[:, 2:] -= boxes[:, :2]
    scores, labels = output["scores"].float().cpu().tolist(), output["labels"].cpu().tolist()
    results = [{"image_id": target["image_id"], "category_id": label_to_cat[lab - 1], "bbox": box, "score": s}
               for box, s, lab in zip(boxes.tolist(), scores, labels)]
    if "masks" in output and len(results):
        masks = F.interpolate(output["masks"].float(), size=orig_hw, mode="bilinear", align_corners=False)
        binary = np.asfortranarray((masks[:, 0] > 0.5).cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
        for res, rle in zip(results, mask_utils.encode(binary)):
            rle["counts"] = rle["counts"].decode("ascii")
            res["segmentation"] = rle
    return results


@torch.no_grad()
def predict(model, loader: Iterable, coco_gt: COCO, label_to_cat: list[int], device: torch.device,
            progress: bool = False) -> list[dict]:
    """Run the model over this rank's loader; return its COCO result dicts.

    Every rank runs as many forwards as the rank with the most batches: a validation set that does
    not divide evenly (COCO's 5,000 images on 64 ranks) gives some ranks one batch more, and under
    ZeRO-3 every forward gathers parameters, a collective, so a rank that stopped early would leave
    the others waiting (NCCL: a hang) or mismatch the next collective (gloo: abort). The extra
    forwards repeat this rank's last batch and their outputs are dropped.
    """
    forwards = _most_batches(len(loader), device)  # before any forward: it is itself a collective
    results, images = [], None
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        images = [im.to(device, non_blocking=True).float() for im in images]
        outputs = model(images)
        for out, tgt in zip(outputs, targets):
            info = coco_gt.imgs[tgt["image_id"]]
            results += to_coco_results(out, tgt, label_to_cat, (info["height"], info["width"]))
    if images is None:  # this rank had no image at all (fewer images than ranks)
        images = [torch.zeros(3, 64, 64, device=device)]
    for _ in range(forwards - len(loader)):
        model(images)
    return results


def _most_batches(mine: int, device: torch.device) -> int:
    """The largest number of evaluation batches on any rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    most = torch.tensor([mine], device=device)  # NCCL reduces device tensors only
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most)


def gather_to_rank0(results: list[dict]) -> Optional[list[dict]]:
    """All ranks' results on rank 0 (None elsewhere); a no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return results
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(results, gathered, dst=0)
    return [r for part in gathered for r in part] if gathered is not None else None


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


def evaluate(model, loader, dataset, device: torch.device, with_masks: bool, progress: bool = False,
             detections_file: Optional[Path] = None, report: Optional[list[str]] = None,
             detections: Optional[list[dict]] = None, backend: str = "pycocotools") -> dict:
    """Distributed COCO evaluation of ``model`` on ``dataset``; metrics on rank 0, {} elsewhere.

    ``detections_file``: rank 0 also writes every detection there, as a COCO results JSON
    (``COCO.loadRes`` reads it back; masks as RLE). ``report``: COCOeval's printed summaries.
    ``detections``: rank 0 appends every detection (COCO results) to it. ``backend``: the COCOeval.
    """
    was_training = model.training
    model.eval()
    results = predict(model, loader, dataset.coco, dataset.cat_ids, device, progress)
    model.train(was_training)
    results = gather_to_rank0(results)
    if results is None:
        return {}
    if detections_file is not None:
        detections_file.write_text(json.dumps(results))
    if detections is not None:
        detections.extend(results)
    iou_types = ("bbox", "segm") if with_masks else ("bbox",)
    return coco_evaluate(dataset.coco, results, iou_types, img_ids=list(dataset.ids), report=report, backend=backend)
