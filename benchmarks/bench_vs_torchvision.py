"""Training throughput: this pipeline vs torchvision's own fasterrcnn_resnet50_fpn, side by side.

Both train on the same synthetic images (same size, batch, boxes, precision) for
the same number of timed steps after warm-up. Ours runs through the DeepSpeed
engine with the experiment's detector (timm resnet50 + FPN + torchvision heads at
torchvision's default head sizes); torchvision's runs in plain torch with SGD.
Prints a table with the ratio and appends the rows to benchmarks/results.jsonl.

    python benchmarks/bench_vs_torchvision.py                     # CPU smoke size
    python benchmarks/bench_vs_torchvision.py --height 800 --width 1333 --batch 8 16 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.detector import build_detector  # noqa: E402
from pipeline import engine as eng  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.optim import build_optimizer, build_param_groups  # noqa: E402


def synthetic_batch(batch: int, h: int, w: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [(torch.rand(3, h, w, generator=g) * 255).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        n = int(torch.randint(3, 13, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, 81, (n,), generator=g).to(device)})
    return images, targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device, warmup: int, steps: int) -> float:
    """Seconds per step after ``warmup`` untimed steps (synchronised at the ends only)."""
    for _ in range(warmup):
        step()
    _sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - tic) / steps


def bench_torchvision(args, batch, device) -> float:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81,
                                    min_size=args.height, max_size=max(args.height, args.width)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images, targets = synthetic_batch(batch, args.height, args.width, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()

    def step():
        with autocast:
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return time_steps(step, device, args.warmup, args.steps)


def bench_pipeline(args, batch, device, world) -> float:
    ds_file = REPO / f"ds_configs/zero{args.zero}_{args.precision}.json"
    cfg = load_config(None, ["model.detector=faster_rcnn", "model.backbone=resnet50", "model.anchor_scale=8",
                             f"data.min_size={args.height}", f"data.max_size={max(args.height, args.width)}",
                             f"train.micro_batch={batch}", f"train.ds_config={ds_file}"])
    torch.manual_seed(0)
    model = build_detector(cfg.model, 80, cfg.data.min_size, cfg.data.max_size).to(device)
    optimizer = build_optimizer(build_param_groups(model, "faster_rcnn", cfg.optim), cfg.optim, 0.01)
    engine = eng.build_engine(model, optimizer, eng.fill_ds_config(eng.load_ds_config(ds_file), cfg, world))
    images, targets = synthetic_batch(batch, args.height, args.width, device)

    def step():
        engine.backward(sum(engine(images, targets).values()))
        engine.step()

    return time_steps(step, device, args.warmup, args.steps)


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--batch", type=int, nargs="+", default=[2])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results.jsonl")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args()
    info = eng.init_distributed()
    device_name = torch.cuda.get_device_name() if info.device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    for batch in args.batch:
        tv = batch / bench_torchvision(args, batch, info.device)
        ours = batch / bench_pipeline(args, batch, info.device, info.world)
        rows.append({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
                     "device": device_name, "threads": torch.get_num_threads(), "size": [args.height, args.width],
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
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
