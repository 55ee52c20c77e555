"""Cross-GPU BN's step-time cost: the same detector with per-GPU BN and with CGBN over a group.

MegDet's CGBN adds two all-reduces per BN layer in forward and one in backward. This builds
one engine per norm (default: Faster R-CNN R50-FPN, torchvision's head sizes; `per_gpu`, then
`cgbn` over all ranks, or `--bn-group K` ranks) and times them in interleaved rounds (AB AB ...),
so drift in machine speed hits both alike; prints the median seconds per iteration and the
overhead, and appends rows to benchmarks/results.jsonl. With one rank the group is that rank
alone: the collectives still run, which measures the layer's own cost, not the network's.

    deepspeed --num_gpus 8 benchmarks/bench_cgbn_overhead.py --height 800 --width 1333 --batch 2 --precision bf16
    python benchmarks/bench_cgbn_overhead.py                            # CPU smoke size, 1 rank
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_vs_torchvision import _commit, synthetic_batch, time_steps  # noqa: E402
from models.detector import build_detector  # noqa: E402
from pipeline import engine as eng  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.norm import build_bn_group, convert_norms  # noqa: E402
from pipeline.optim import build_optimizer, build_param_groups  # noqa: E402


def build_norm_variant(args, norm: str, info):
    """One engine whose BatchNorms are ``norm``; returns its training step."""
    ds_file = REPO / f"ds_configs/zero{args.zero}_{args.precision}.json"
    cfg = load_config(None, [
        "model.detector=faster_rcnn", f"model.backbone={args.backbone}", f"data.min_size={args.height}",
        f"data.max_size={max(args.height, args.width)}", f"train.micro_batch={args.batch}",
        f"train.ds_config={ds_file}", f"model.norm={norm}", f"model.bn_group={args.bn_group}"])
    torch.manual_seed(0)
    model = build_detector(cfg.model, 80, cfg.data.min_size, cfg.data.max_size).to(info.device)
    group = build_bn_group(cfg.model, args.batch)[0] if norm == "cgbn" else None
    convert_norms(model, norm, group, cfg.model.gn_groups)
    layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(m).__name__
                 for m in model.modules())
    optimizer = build_optimizer(build_param_groups(model, "faster_rcnn", cfg.optim), cfg.optim, 0.01)
    engine = eng.build_engine(model, optimizer, eng.fill_ds_config(eng.load_ds_config(ds_file), cfg, info.world))
    images, targets = synthetic_batch(args.batch, args.height, args.width, info.device, seed=info.rank)

    def step():
        engine.backward(sum(engine(images, targets).values()))
        engine.step()

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
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results.jsonl")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args()
    args.bn_group = int(args.bn_group) if args.bn_group.isdigit() else args.bn_group
    info = eng.init_distributed()
    variants = {norm: build_norm_variant(args, norm, info) for norm in ("per_gpu", "cgbn")}
    for step, _ in variants.values():  # warm-up: allocator, NCCL communicators, DeepSpeed's lazy state
        time_steps(step, info.device, 0, 2)
    times = {norm: [] for norm in variants}
    for _ in range(args.rounds):
        for norm, (step, _) in variants.items():
            times[norm].append(time_steps(step, info.device, 0, args.steps))
    base = statistics.median(times["per_gpu"])
    device_name = torch.cuda.get_device_name() if info.device.type == "cuda" else platform.processor() or "cpu"
    rows = [{"bench": "cgbn_overhead", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "commit": _commit(), "device": device_name, "ranks": info.world, "bn_group": args.bn_group,
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
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
