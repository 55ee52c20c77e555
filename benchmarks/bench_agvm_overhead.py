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
from pipeline.agvm import AGVMMonitor, modules_of  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.optim import build_optimizer, build_param_groups  # noqa: E402

VARIANTS = [("sgd", None), ("agvm_sgd", 10), ("agvm_sgd", 1)]


def build_variant(args, name: str, tau, info):
    accum = 2 if info.world == 1 else 1
    ds_file = REPO / f"ds_configs/zero{args.zero}_{args.precision}.json"
    cfg = load_config(None, [
        "model.detector=faster_rcnn", f"model.backbone={args.backbone}", f"data.min_size={args.height}",
        f"data.max_size={max(args.height, args.width)}", f"train.micro_batch={args.batch}",
        f"train.grad_accum={accum}", f"train.ds_config={ds_file}", f"optim.name={name}",
        f"agvm.tau={tau or 10}", "agvm.start_iter=0", "agvm.clip_norm=0"])
    torch.manual_seed(0)
    model = build_detector(cfg.model, 80, cfg.data.min_size, cfg.data.max_size).to(info.device)
    groups = build_param_groups(model, "faster_rcnn", cfg.optim)
    monitor = None
    if tau is not None:
        monitor = AGVMMonitor(cfg.agvm, modules_of(groups), info.world, info.rank, accum, start_iter=0)
    optimizer = build_optimizer(groups, cfg.optim, 0.01, monitor)
    engine = eng.build_engine(model, optimizer, eng.fill_ds_config(eng.load_ds_config(ds_file), cfg, info.world))
    if monitor is not None:
        monitor.attach(engine)
    images, targets = synthetic_batch(args.batch, args.height, args.width, info.device, seed=info.rank)

    def step():
        for micro in range(accum):
            losses = engine(images, targets)
            if monitor is not None:
                monitor.before_backward(micro)
            engine.backward(sum(losses.values()))
            if monitor is not None and micro == accum - 1:
                monitor.before_step()
            engine.step()
        if monitor is not None:
            monitor.after_step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--batch", type=int, default=2, help="images per micro-batch per rank")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of 10 iterations per variant")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results.jsonl")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args()
    info = eng.init_distributed()
    steps = {v: build_variant(args, *v, info) for v in VARIANTS}
    for step in steps.values():  # warm-up: allocator, first estimates, DeepSpeed's lazy state
        time_steps(step, info.device, 0, 2)
    times = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v, step in steps.items():
            times[v].append(time_steps(step, info.device, 0, 10))
    base = statistics.median(times[VARIANTS[0]])
    device_name = torch.cuda.get_device_name() if info.device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    for (name, tau), ts in times.items():
        med = statistics.median(ts)
        rows.append({"bench": "agvm_overhead", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "commit": _commit(), "device": device_name, "ranks": info.world,
                     "threads": torch.get_num_threads(), "backbone": args.backbone, "size": [args.height, args.width],
                     "batch": args.batch, "precision": args.precision, "zero": args.zero, "optimizer": name,
                     "tau": tau, "s_per_iter": round(med, 4), "spread": [round(t, 4) for t in ts],
                     "overhead_pct": round(100 * (med / base - 1), 2)})
    if info.rank == 0:
        print(f"\n{'optimizer':>10} {'tau':>4} {'s/iter (median)':>16} {'overhead':>9}  rounds")
        for r in rows:
            print(f"{r['optimizer']:>10} {str(r['tau'] or '-'):>4} {r['s_per_iter']:>16.4f} "
                  f"{r['overhead_pct']:>8.2f}%  {r['spread']}")
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
