"""Bytes over torch.distributed per optimizer step of the real pipeline, measured (issue #31's raw data).

    python benchmarks/comm_bytes.py --ranks 2 --out docs/comm_bytes.md
    python benchmarks/comm_bytes.py --ranks 4 --presets zero3_fp32 --norms cgbn --optims agvm_sgd

Builds the run as training does (``build_training``, tiny Faster R-CNN, 64x80 synthetic images, gloo on
this machine), steps it once for DeepSpeed's set-up, then counts every collective of ``--steps`` steps
with ``pipeline.distributed.comm_count.CommCounter`` and prints, per configuration, one row per
(operation, group size, dtype): calls and bytes per step on rank 0. With ``--local-world`` ranks per
node the rows split into intra- and inter-node scope as on a cluster of that shape. AGVM estimates
every step here (``agvm.tau=1``, ``start_iter=0``) so its collectives are in every counted step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

MODEL = ["model.detector=faster_rcnn", "model.backbone=test_byobnet", "model.fpn_channels=16",
         "model.anchor_scale=4", "model.rpn_post_nms_train=100", "model.roi_batch_per_image=32",
         "model.box_head_dim=32", "data.min_size=64", "data.max_size=96", "train.micro_batch=2",
         "schedule.policy=constant", "schedule.max_iters=100"]


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    images = [torch.rand(3, 64, 80, generator=g) * 255 for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])} for _ in range(2)]
    return images, targets


def _rank(rank: int, world: int, port: int, local_world: int, case: dict, steps: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % local_world),
                      LOCAL_WORLD_SIZE=str(local_world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from pipeline.config import load_config
    from pipeline.distributed.comm_count import CommCounter
    from pipeline.distributed.job import init_distributed, leave_job
    from pipeline.train.build import build_training

    info = init_distributed()
    overrides = MODEL + [f"train.ds_config=ds_configs/{case['preset']}.json", f"model.norm={case['norm']}",
                         f"model.bn_group={case['bn_group']}",
                         f"optim.name={case['optim']}", "agvm.tau=1", "agvm.start_iter=0"]
    training = build_training(load_config(None, overrides), info, data=False, num_classes=3)
    training.step(iter([_batch(rank, 0)]))
    with CommCounter(local_world) as counter:
        for step in range(1, steps + 1):
            training.step(iter([_batch(rank, step)]))
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                    for p in training.engine.module.parameters() if p.requires_grad)
    if rank == 0:
        Path(out).write_text(json.dumps({"rows": counter.table(per=steps), "trainable": trainable}))
    leave_job()


def measure(case: dict, ranks: int, local_world: int, steps: int) -> dict:
    from pipeline.distributed.launcher import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.start_processes(_rank, args=(ranks, free_port(), local_world, case, steps, out), nprocs=ranks,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--local-world", type=int, default=None, help="ranks per node (default: all on one)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=["zero0_fp32", "zero1_fp32", "zero2_fp32", "zero3_fp32"])
    parser.add_argument("--norms", nargs="+", default=["frozen", "cgbn"])
    parser.add_argument("--optims", nargs="+", default=["sgd", "agvm_sgd"])
    parser.add_argument("--bn-group", default="world", help="model.bn_group of the cgbn cases (world, node, or "
                        "ranks per group; AGVM refuses one group of all ranks without accumulation)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here (markdown)")
    args = parser.parse_args(argv)
    local_world = args.local_world or args.ranks
    lines = [f"bytes per optimizer step on rank 0, {args.ranks} ranks ({local_world} per node), tiny Faster R-CNN "
             f"(test_byobnet, FPN 16), micro-batch 2, mean of {args.steps} steps after the first; "
             f"`python benchmarks/comm_bytes.py {' '.join(argv or sys.argv[1:])}`", ""]
    for preset, norm, optim in itertools.product(args.presets, args.norms, args.optims):
        case = {"preset": preset, "norm": norm, "optim": optim, "bn_group": args.bn_group}
        try:
            got = measure(case, args.ranks, local_world, args.steps)
        except mp.ProcessRaisedException as err:  # a refused configuration: say why, measure the others
            reason = str(err).strip().splitlines()[-1]
            lines += [f"### {preset}, norm {norm}, {optim}: not run ({reason})", ""]
            print(lines[-2], flush=True)
            continue
        lines += [f"### {preset}, norm {norm}, {optim} ({got['trainable']:,} trainable parameters)", "",
                  "| op | group | scope | dtype | calls | bytes |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['group']} | {r['scope']} | {r['dtype']} | {r['calls']:g} | {r['bytes']:,.0f} |"
                  for r in got["rows"]]
        lines.append("")
        print("\n".join(lines[-len(got["rows"]) - 5:]), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
