"""Cross-GPU BN's step-time cost: the same detector with per-GPU BN and with CGBN over a group.

MegDet's CGBN adds two all-reduces per BN layer in forward and one in backward. This builds
one engine per norm (default: Faster R-CNN R50-FPN, torchvision's head sizes; `per_gpu`, then
`cgbn` over all ranks, or `--bn-group K` ranks) and times them in interleaved rounds (AB AB ...),
so drift in machine speed hits both alike; prints the median seconds per iteration and the
overhead, and appends rows to benchmarks/results.jsonl. With one rank the group is that rank
alone, which is torch's own BN (no collectives): run it with 2 or more ranks.

    deepspeed --num_gpus 8 benchmarks/bench_cgbn_overhead.py --height 800 --width 1333 --batch 2 --precision bf16
    python benchmarks/bench_cgbn_overhead.py                            # CPU smoke size, 1 rank
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from common import REPO, RESULTS, pipeline_step, row_label, time_steps
from pipeline.distributed.job import init_distributed, leave_job


def build_norm_variant(args, norm: str, info):
    """One training run whose BatchNorms are ``norm``; returns its step and how many BN layers it has."""
    training, step = pipeline_step([
        "model.detector=faster_rcnn", f"model.backbone={args.backbone}", f"data.min_size={args.height}",
        f"data.max_size={max(args.height, args.width)}", f"train.micro_batch={args.batch}",
        f"train.ds_config={REPO}/ds_configs/zero{args.zero}_{args.precision}.json", f"model.norm={norm}",
        f"model.bn_group={args.bn_group}"], info, args.batch, args.height, args.width)
    layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in training.engine.module.modules())
    return step, layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--batch", type=int, default=2, help="images per rank")
    p.add_argument("--bn-group", default="world", help="cgbn group: world, node or a rank count")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --steps iterations per norm")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args()
    args.bn_group = int(args.bn_group) if args.bn_group.isdigit() else args.bn_group
    info = init_distributed()
    variants = {norm: build_norm_variant(args, norm, info) for norm in ("per_gpu", "cgbn")}
    for step, _ in variants.values():  # warm-up: allocator, NCCL communicators, DeepSpeed's lazy state
        time_steps(step, info.device, 0, 2)
    times = {norm: [] for norm in variants}
    for _ in range(args.rounds):
        for norm, (step, _) in variants.items():
            times[norm].append(time_steps(step, info.device, 0, args.steps))
    base = statistics.median(times["per_gpu"])
    rows = [{"bench": "cgbn_overhead", **row_label(info.device), "ranks": info.world, "bn_group": args.bn_group,
             "backbone": args.backbone, "size": [args.height, args.width], "batch": args.batch,
             "precision": args.precision, "zero": args.zero, "norm": norm, "bn_layers": variants[norm][1],
             "s_per_iter": round(statistics.median(ts), 4), "spread": [round(t, 4) for t in ts],
             "overhead_pct": round(100 * (statistics.median(ts) / base - 1), 2)} for norm, ts in times.items()]
    if info.rank == 0:
        print(f"\n{'norm':>8} {'BN layers':>9} {'s/iter (median)':>16} {'overhead':>9}  rounds")
        for r in rows:
            print(f"{r['norm']:>8} {r['bn_layers']:>9} {r['s_per_iter']:>16.4f} {r['overhead_pct']:>8.2f}%  {r['spread']}")
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    leave_job()  # also unlinks DeepSpeed's CPU all-reduce segment in /dev/shm


if __name__ == "__main__":
    main()
