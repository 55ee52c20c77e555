"""ViTDet's windowed attention against global attention: step time and activation memory (issue #17).

Builds the same Faster R-CNN on a plain ViT twice per image size, once with every block global
and once windowed (``model.vit_window``, ViTDet's 4 global blocks), and times training steps on one
fixed synthetic batch, the variants interleaved in rounds so drift in machine speed hits both.
Memory: each step's peak above what the process held when the step began (CUDA: allocated
tensors; CPU: the resident set, high-water mark reset per step), the largest over the timed steps.

    python benchmarks/bench_vit_windows.py                                     # CPU: ViT-S, 512 and 1024 px
    python benchmarks/bench_vit_windows.py --backbone vit_base_patch16_224 --sizes 1024 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import REPO, RESULTS, pipeline_step, row_label
from pipeline.distributed.job import init_distributed, leave_job
from pipeline.utils.memory import current_memory, peak_memory, pin_mmap_threshold, reset_peak_memory


def measured_step(step, device: torch.device) -> tuple[float, float]:
    """(seconds, GiB of peak above the start) of one step."""
    before = current_memory(device)
    reset_peak_memory(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic, (peak_memory(device) - before) / 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_small_patch16_224")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="square image sides")
    p.add_argument("--window", type=int, default=14, help="tokens per window side (ViTDet: 14)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --steps steps per variant")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("overrides", nargs="*", help="further key=value overrides of the experiment config")
    return p.parse_args(argv)


def measure(args: argparse.Namespace, info) -> list[dict]:
    """Rows of seconds per step and peak memory, global and windowed, per image size (the GPU
    suite's part h calls this in its own process)."""
    variants = {"global": ["model.vit_window=0"], f"window {args.window}": [f"model.vit_window={args.window}"]}
    rows = []
    for size in args.sizes:
        steps = {}
        for label, extra in variants.items():
            _, step = pipeline_step([
                "model.detector=faster_rcnn", f"model.backbone={args.backbone}", "model.norm=frozen",
                f"data.min_size={size}", f"data.max_size={size}", f"train.micro_batch={args.batch}",
                f"train.ds_config={REPO}/ds_configs/zero0_{args.precision}.json", "model.rpn_post_nms_train=500",
                "model.roi_batch_per_image=128", *extra, *args.overrides], info, args.batch, size, size)
            step()  # lazy allocations: gradients, optimizer state
            steps[label] = step
        seconds, peaks = {k: [] for k in steps}, {k: [] for k in steps}
        for _ in range(args.rounds):
            for label, step in steps.items():
                for _ in range(args.steps):
                    s, gib = measured_step(step, info.device)
                    seconds[label].append(s)
                    peaks[label].append(gib)
        base = statistics.median(seconds["global"])
        for label in steps:
            rows.append({"bench": "vit_windows", **row_label(info.device), "backbone": args.backbone, "size": size,
                         "batch": args.batch, "precision": args.precision, "threads": torch.get_num_threads(),
                         "variant": label, "s_per_step": round(statistics.median(seconds[label]), 3),
                         "vs_global": round(statistics.median(seconds[label]) / base, 3),
                         "peak_above_start_gib": round(max(peaks[label]), 3)})
        del steps
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    info = init_distributed()
    if info.device.type == "cpu":
        pin_mmap_threshold()  # freed buffers go back to the kernel: the resident set tracks live memory
    rows = measure(args, info)
    print(f"\n{args.backbone}, Faster R-CNN, batch {args.batch}, {args.precision}, {info.device}:")
    print(f"{'size':>6} {'variant':>12} {'s/step':>8} {'vs global':>10} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['size']:>6} {r['variant']:>12} {r['s_per_step']:>8.3f} {r['vs_global']:>10.3f} "
              f"{r['peak_above_start_gib']:>9.3f}")
    with args.out.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    leave_job()


if __name__ == "__main__":
    main()
