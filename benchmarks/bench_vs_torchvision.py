"""Training throughput: this pipeline vs torchvision's own fasterrcnn_resnet50_fpn, side by side.

Both train on the same synthetic images (same size, batch, boxes, precision) for
the same number of timed steps after warm-up. Ours is built and stepped as a training
run is (``pipeline.train.build.build_training`` and its train step), with the experiment's detector (timm resnet50 + FPN + torchvision heads at
torchvision's default head sizes); torchvision's runs in plain torch with SGD.
Prints a table with the ratio and appends the rows to benchmarks/results.jsonl.

    python benchmarks/bench_vs_torchvision.py                     # CPU smoke size
    python benchmarks/bench_vs_torchvision.py --height 800 --width 1333 --batch 8 16 --precision bf16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import REPO, RESULTS, pipeline_step, row_label, time_steps, torchvision_step
from pipeline.distributed.job import init_distributed, leave_job


def bench_torchvision(args, batch, device) -> float:
    _, step = torchvision_step((args.height, args.width), batch, args.precision, device)
    return time_steps(step, device, args.warmup, args.steps)


def bench_pipeline(args, batch, info) -> float:
    _, step = pipeline_step([
        "model.detector=faster_rcnn", "model.backbone=resnet50", "model.anchor_scale=8", "model.norm=per_gpu",
        f"data.min_size={args.height}", f"data.max_size={max(args.height, args.width)}",
        f"train.micro_batch={batch}", f"train.ds_config={REPO}/ds_configs/zero{args.zero}_{args.precision}.json"],
        info, batch, args.height, args.width)
    return time_steps(step, info.device, args.warmup, args.steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--batch", type=int, nargs="+", default=[2])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args()
    info = init_distributed()
    rows = []
    for batch in args.batch:
        tv = batch / bench_torchvision(args, batch, info.device)
        ours = batch / bench_pipeline(args, batch, info)
        rows.append({**row_label(info.device), "threads": torch.get_num_threads(), "size": [args.height, args.width],
                     "batch": batch, "precision": args.precision, "zero": args.zero,
                     "torchvision_img_s": round(tv, 3), "pipeline_img_s": round(ours, 3),
                     "ratio": round(ours / tv, 3)})
    print(f"\n{'batch':>5} {'precision':>9} {'torchvision img/s':>18} {'pipeline img/s':>15} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {r['precision']:>9} {r['torchvision_img_s']:>18.2f} {r['pipeline_img_s']:>15.2f} "
              f"{r['ratio']:>6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    leave_job()  # also unlinks DeepSpeed's CPU all-reduce segment in /dev/shm


if __name__ == "__main__":
    main()
