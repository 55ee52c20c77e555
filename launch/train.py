"""Train and evaluate a detector.

    python launch/train.py --config configs/shapes_default.yaml [key=value ...]
    deepspeed --num_gpus 8 launch/train.py --config configs/coco_r50_fpn.yaml train.micro_batch=2
    deepspeed --hostfile launch/hostfile.example launch/train.py --config ...
    torchrun --nproc_per_node 2 launch/train.py --config ...

Overrides use dotted keys of the experiment schema (pipeline/config.py), e.g.
``optim.base_lr=0.01 schedule.epochs=24 train.ds_config=ds_configs/zero2_bf16.json``.
The whole experiment is validated for the launch's world size before any process group forms.
Exit status: 0 done, 2 configuration or data error (retrying cannot help), 3 diverged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.data import DataError
from pipeline.validate import validate

EXIT_CONFIG, EXIT_DIVERGED = 2, 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="experiment YAML (defaults if omitted)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment is used instead")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.micro_batch=4")
    return parser.parse_args(argv)


def launch_shape(env=os.environ) -> tuple[int, int]:
    """(world size, ranks per machine) as the launcher set them (deepspeed: LOCAL_SIZE; torchrun:
    LOCAL_WORLD_SIZE); one process of its own without a launcher."""
    world = int(env.get("WORLD_SIZE", 1))
    return world, int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, *launch_shape())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    from pipeline.trainer import run  # heavy imports (deepspeed) only after the config is valid

    try:
        metrics = run(cfg)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except FloatingPointError as err:  # diverged: run_summary.json in the run directory says so
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if metrics:
        print(f"final bbox AP {metrics['bbox/AP']:.4f}  AP50 {metrics['bbox/AP50']:.4f}  "
              f"(run directory: {cfg.train.run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
