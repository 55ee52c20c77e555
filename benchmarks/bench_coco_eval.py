"""COCO evaluation at val2017's size: pycocotools' COCOeval against faster-coco-eval's, same input.

Writes a synthetic ground truth of 5,000 images (val2017's count; ~7 boxes per image, ~36k in all,
80 categories, COCO's size mix) and a results file of 100 detections per image (noisy copies of
the boxes, wrong categories, random boxes; random scores), then times ``coco_evaluate`` with each
backend (bbox: loadRes, evaluate, accumulate, summarize) and compares the twelve numbers.
Appends both rows to benchmarks/results.jsonl.

    python benchmarks/bench_coco_eval.py [--images 5000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from pycocotools.coco import COCO

from common import RESULTS, row_label
from pipeline.evaluation.coco import STAT_NAMES, coco_evaluate


def synthetic_set(images: int, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = random.Random(seed)
    imgs, anns, dets = [], [], []
    for i in range(1, images + 1):
        w, h = rng.choice([(640, 480), (480, 640), (640, 427), (500, 375)])
        imgs.append({"id": i, "width": w, "height": h, "file_name": f"{i:012d}.jpg"})
        boxes = []
        for _ in range(max(1, round(rng.expovariate(1 / 7.3)))):
            side = rng.choice([rng.uniform(4, 32), rng.uniform(32, 96), rng.uniform(96, 400)])  # small/medium/large
            bw, bh = min(side * rng.uniform(0.5, 1.5), w - 1), min(side * rng.uniform(0.5, 1.5), h - 1)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = rng.randint(1, 80)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
            boxes.append((x, y, bw, bh, cat))
        for k in range(100):
            if k < 3 * len(boxes):  # noisy copies of the ground truth, sometimes of the wrong class
                x, y, bw, bh, cat = boxes[k % len(boxes)]
                box = [x + rng.gauss(0, 0.1 * bw), y + rng.gauss(0, 0.1 * bh), bw * rng.uniform(0.8, 1.2),
                       bh * rng.uniform(0.8, 1.2)]
                cat = cat if rng.random() < 0.7 else rng.randint(1, 80)
            else:  # background detections
                bw, bh = rng.uniform(4, 200), rng.uniform(4, 200)
                box, cat = [rng.uniform(0, w - 4), rng.uniform(0, h - 4), bw, bh], rng.randint(1, 80)
            dets.append({"image_id": i, "category_id": cat, "bbox": box, "score": rng.random()})
    gt = {"images": imgs, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}
    return gt, dets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each backend (the best is kept)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    gt_dict, dets = synthetic_set(args.images)
    gt = COCO()
    gt.dataset = gt_dict
    gt.createIndex()
    stats, rows = {}, []
    import torch

    for backend in ("pycocotools", "faster_coco_eval"):
        times = []
        for _ in range(args.rounds):
            gt.__dict__.pop("_faster_coco_eval", None)  # each round builds its own index, as a first evaluation does
            tic = time.perf_counter()
            stats[backend] = coco_evaluate(gt, dets, ("bbox",), backend=backend)
            times.append(time.perf_counter() - tic)
        rows.append({"bench": "coco_eval", **row_label(torch.device("cpu")), "backend": backend,
                     "images": args.images, "gt_boxes": len(gt_dict["annotations"]), "detections": len(dets),
                     "seconds": round(min(times), 2), "all_seconds": [round(t, 2) for t in times]})
    worst = max(abs(stats["faster_coco_eval"][f"bbox/{n}"] - stats["pycocotools"][f"bbox/{n}"]) for n in STAT_NAMES)
    for r in rows:
        r["max_abs_difference"] = worst
    print(f"{args.images} images, {len(gt_dict['annotations'])} boxes, {len(dets)} detections (bbox)")
    for r in rows:
        print(f"  {r['backend']:>17}: {r['seconds']:7.2f} s (best of {args.rounds})")
    print("  AP/AR numbers: largest difference " + f"{worst:.2e}; pycocotools " +
          " ".join(f"{n} {stats['pycocotools'][f'bbox/{n}']:.4f}" for n in STAT_NAMES))
    with args.out.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
