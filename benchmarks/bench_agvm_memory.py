"""AGVM's memory on an estimate iteration against a plain one, under ZeRO (issue #15).

Trains a few iterations of one detector with AGVM-SGD (tau 2, so estimates and plain iterations
alternate) and records, per iteration, each rank's peak memory above what it held when the
iteration began (CUDA: allocated tensors; CPU: the resident set, its high-water mark reset per
iteration). The first iteration (lazy allocations: gradients, optimizer state) is left out. The
row keeps the largest rank's figures and the difference estimate - plain, the estimate's own cost.

    deepspeed --num_gpus 2 benchmarks/bench_agvm_memory.py                         # CPU: 2 gloo ranks
    deepspeed --num_gpus 2 benchmarks/bench_agvm_memory.py --backbone vit_large_patch16_224 --zero 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from common import REPO, RESULTS, pipeline_step, row_label
from pipeline.distributed.job import init_distributed, leave_job
from pipeline.utils.memory import current_memory, peak_memory, pin_mmap_threshold, reset_peak_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_large_patch16_224")
    p.add_argument("--size", type=int, default=224, help="square image side")
    p.add_argument("--batch", type=int, default=1, help="images per micro-batch per rank")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--iters", type=int, default=5, help="iterations; estimates at the odd ones")
    p.add_argument("--label", default="", help="what this run measures (e.g. the commit's estimate)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("overrides", nargs="*", help="further key=value overrides of the experiment config")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args()
    info = init_distributed()
    if info.device.type == "cpu":
        pin_mmap_threshold()  # freed buffers go back to the kernel: the resident set tracks live memory
    accum = 2 if info.world == 1 else 1
    training, step = pipeline_step([
        "model.detector=faster_rcnn", f"model.backbone={args.backbone}", "model.norm=per_gpu",
        f"data.min_size={args.size}", f"data.max_size={args.size}", f"train.micro_batch={args.batch}",
        f"train.grad_accum={accum}", f"train.ds_config={REPO}/ds_configs/zero{args.zero}_{args.precision}.json",
        "optim.name=agvm_sgd", "agvm.tau=2", "agvm.start_iter=1", "agvm.clip_norm=0", "model.rpn_post_nms_train=500",
        "model.roi_batch_per_image=128", *args.overrides], info, args.batch, args.size, args.size)
    growth = {"estimate": [], "plain": []}
    absolute = {"estimate": 0.0, "plain": 0.0}  # the rank's whole peak (what must fit), GiB
    for it in range(args.iters):
        kind = "estimate" if training.agvm.estimating(it) else "plain"
        before = current_memory(info.device)
        reset_peak_memory(info.device)
        step()
        if it > 0:
            growth[kind].append((peak_memory(info.device) - before) / 2**30)
            absolute[kind] = max(absolute[kind], peak_memory(info.device) / 2**30)
    worst = torch.tensor([max(growth["estimate"]), max(growth["plain"]), absolute["estimate"], absolute["plain"]],
                         dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in training.engine.module.parameters())
    row = {"bench": "agvm_memory", **row_label(info.device), "label": args.label, "ranks": info.world,
           "backbone": args.backbone, "parameters": params, "size": args.size, "batch": args.batch,
           "zero": args.zero, "precision": args.precision, "estimate_peak_gib": round(float(worst[0]), 3),
           "plain_peak_gib": round(float(worst[1]), 3), "estimate_cost_gib": round(float(worst[0] - worst[1]), 3),
           "estimate_abs_peak_gib": round(float(worst[2]), 3), "plain_abs_peak_gib": round(float(worst[3]), 3),
           "fp32_gradient_gib": round(params * 4 / 2**30, 3)}
    if info.rank == 0:
        print(f"\n{args.backbone} ({params / 1e6:.0f}M parameters), ZeRO-{args.zero} {args.precision}, {info.world} "
              f"rank(s): peak above the iteration's start, largest rank")
        print(f"  estimate iteration {row['estimate_peak_gib']:.3f} GiB, plain {row['plain_peak_gib']:.3f} GiB, "
              f"estimate's cost {row['estimate_cost_gib']:.3f} GiB (one fp32 gradient: {row['fp32_gradient_gib']} GiB)")
        print(f"  whole peak of a rank: estimate iteration {row['estimate_abs_peak_gib']:.2f} GiB, "
              f"plain {row['plain_abs_peak_gib']:.2f} GiB")
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    leave_job()  # DeepSpeed's CPU all-reduce never unlinks its 66 MB segment itself


if __name__ == "__main__":
    main()
