"""AGVM's step-time overhead: plain SGD vs AGVM-SGD at tau = 10 and tau = 1, same engine.

Builds three engines of the same detector (default: Faster R-CNN R50-FPN, torchvision's
head sizes) and times them in interleaved rounds of ``tau_max`` iterations (ABC ABC ...),
so drift in machine speed hits all three alike; reports the median seconds per iteration
and the overhead against plain SGD. AGVM needs two halves of the batch: with one rank the
script accumulates 2 micro-batches per iteration (for all three variants alike); under a
launcher with 2+ ranks the halves are ranks. Appends rows to benchmarks/results.jsonl.

    python benchmarks/bench_agvm_overhead.py                                   # CPU, 1 rank
    deepspeed --num_gpus 1 benchmarks/bench_agvm_overhead.py --height 800 --width 1333 --batch 8 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from common import REPO, RESULTS, pipeline_step, row_label, time_steps
from pipeline.distributed.job import init_distributed, leave_job

VARIANTS = [("sgd", None), ("agvm_sgd", 10), ("agvm_sgd", 1)]


def build_variant(args, name: str, tau, info):
    accum = 2 if info.world == 1 else 1
    return pipeline_step([
        "model.detector=faster_rcnn", f"model.backbone={args.backbone}", "model.norm=per_gpu",
        f"data.min_size={args.height}", f"data.max_size={max(args.height, args.width)}",
        f"train.micro_batch={args.batch}", f"train.grad_accum={accum}",
        f"train.ds_config={REPO}/ds_configs/zero{args.zero}_{args.precision}.json", f"optim.name={name}",
        f"agvm.tau={tau or 10}", "agvm.start_iter=0", "agvm.clip_norm=0", *args.overrides],
        info, args.batch, args.height, args.width)[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--batch", type=int, default=2, help="images per micro-batch per rank")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of 10 iterations per variant")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("overrides", nargs="*", help="further key=value overrides of the experiment config")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p.parse_args(argv)


def measure(args: argparse.Namespace, info) -> list[dict]:
    """The three variants' median seconds per iteration and AGVM's overhead (the GPU suite's part d
    calls this in its own process)."""
    steps = {v: build_variant(args, *v, info) for v in VARIANTS}
    for step in steps.values():  # warm-up: allocator, first estimates, DeepSpeed's lazy state
        time_steps(step, info.device, 0, 2)
    times = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v, step in steps.items():
            times[v].append(time_steps(step, info.device, 0, 10))
    base = statistics.median(times[VARIANTS[0]])
    rows = []
    for (name, tau), ts in times.items():
        med = statistics.median(ts)
        rows.append({"bench": "agvm_overhead", **row_label(info.device), "ranks": info.world,
                     "threads": torch.get_num_threads(), "backbone": args.backbone, "size": [args.height, args.width],
                     "batch": args.batch, "precision": args.precision, "zero": args.zero, "optimizer": name,
                     "tau": tau, "s_per_iter": round(med, 4), "spread": [round(t, 4) for t in ts],
                     "overhead_pct": round(100 * (med / base - 1), 2)})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    info = init_distributed()
    rows = measure(args, info)
    if info.rank == 0:
        print(f"\n{'optimizer':>10} {'tau':>4} {'s/iter (median)':>16} {'overhead':>9}  rounds")
        for r in rows:
            print(f"{r['optimizer']:>10} {str(r['tau'] or '-'):>4} {r['s_per_iter']:>16.4f} "
                  f"{r['overhead_pct']:>8.2f}%  {r['spread']}")
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    leave_job()  # also unlinks DeepSpeed's CPU all-reduce segment in /dev/shm


if __name__ == "__main__":
    main()
