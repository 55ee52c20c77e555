"""Train and evaluate a detector.

    python launch/train.py --config configs/shapes_default.yaml [key=value ...]
    deepspeed --num_gpus 8 launch/train.py --config configs/coco_r50_fpn.yaml train.micro_batch=2
    deepspeed --hostfile launch/hostfile.example launch/train.py --config ...
    torchrun --nproc_per_node 2 launch/train.py --config ...
    srun python launch/train.py --config ...  (one task per GPU; see launch/slurm.sbatch)
    mpirun -np 16 -x MASTER_ADDR=node1 -x MASTER_PORT=29500 python launch/train.py --config ...

Overrides use dotted keys of the experiment schema (pipeline/config.py), e.g.
``optim.base_lr=0.01 schedule.epochs=24 train.ds_config=ds_configs/zero2_bf16.json``.
The launcher's variables (pipeline/distributed/launcher.py) and the whole experiment, for the launch's world size,
are validated before any process group forms.
Exit status: 0 done, 1 a failure a retry may get past (an I/O error, out of memory, another job holding the
run directory: the message names it), 2 a configuration, data or checkpoint error (retrying cannot help),
3 diverged, 4 preempted (SIGTERM or SIGUSR1: a complete checkpoint was saved at the next log step;
requeue with train.resume=auto). A rank stopped because another failed exits with that rank's status
(pipeline/distributed/watchdog.py), so the launcher's is the same whichever rank it reports.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.config import load_config
from pipeline.distributed.job import exit_skipping_teardown, leave_job
from pipeline.distributed.launcher import mpi4py_importable, resolve
from pipeline.errors import EXIT_CONFIG, EXIT_DIVERGED, ConfigError, DataError, exit_status
from pipeline.train.preemption import EXIT_PREEMPTED, Preempted
from pipeline.train.run_lock import RunLocked
from pipeline.train.validate import validate


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="experiment YAML (defaults if omitted)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment is used instead")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.micro_batch=4")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        launch = resolve(os.environ, mpi4py=mpi4py_importable())
    except ConfigError as err:  # before logging: every rank prints its own reason
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=logging.INFO if launch.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{launch.rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, launch.world, launch.local_world)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    from pipeline.tools.planner import model_states_summary
    from pipeline.train.profiling import OutOfMemory
    from pipeline.train.trainer import run  # heavy imports (deepspeed) only after the config is valid

    try:
        metrics = run(cfg)
    except (ConfigError, DataError, Preempted, RunLocked, FloatingPointError) as err:
        # expected ends, one line each; the status from the one mapping (pipeline.errors.exit_status):
        # 2 fix the config or data, 4 preempted (requeue: a complete checkpoint is saved), 1 the run
        # directory is held (a later retry can succeed), 3 diverged (run_summary.json says so)
        print(f"{'stopped' if isinstance(err, Preempted) else 'error'}: {err}", file=sys.stderr)
        return exit_status(err)
    except OutOfMemory as err:  # the snapshot is named; add what the planner expects of this config
        print(f"error: {err}\n{model_states_summary(cfg, launch.world)}", file=sys.stderr)
        return exit_status(err)
    finally:
        leave_job()
    if metrics:
        print(f"final bbox AP {metrics['bbox/AP']:.4f}  AP50 {metrics['bbox/AP50']:.4f}  "
              f"(run directory: {cfg.train.run_dir})")
    return 0


def cli() -> None:
    """The command (``launch/train.py``): ``main``, then exit; a finished or diverged run (its tracker
    closed too) without the interpreter's teardown (``exit_skipping_teardown``)."""
    code = main()
    exit_skipping_teardown(code, finished=code in (0, EXIT_DIVERGED, EXIT_PREEMPTED))


if __name__ == "__main__":
    cli()
