"""Shared fixtures: a tiny embedded dataset, tiny configs and a multi-process runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.data.synthetic import make_dataset
from pipeline.distributed.launcher import free_port

REPO = Path(__file__).resolve().parent.parent

torch.set_num_threads(1)
# Every process a test starts dumps its Python stacks if it dies of a signal (SIGABRT, SIGSEGV), so a
# rare crash in CI says where it happened: in training, or at interpreter exit.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
TINY_BACKBONE = "test_byobnet"  # timm's 0.2M-parameter test network


@pytest.fixture(autouse=True)
def _no_leftover_shm_segments():
    """A run killed on purpose (or a failing one) cannot unlink DeepSpeed's CPU all-reduce segments
    (66 MB of RAM each in /dev/shm); remove the ones this test left."""
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*"
    before = set(Path("/dev/shm").glob(pattern))
    yield
    for segment in set(Path("/dev/shm").glob(pattern)) - before:
        segment.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_dataset(root, num_train=16, num_val=8, seed=0, min_side=64, max_side=96)
    return root


def tiny_overrides(root: Path, out_dir: Path, detector: str = "retinanet") -> list[str]:
    """key=value overrides for a run that trains in seconds on CPU: tiny backbone, 64 px, no W&B.

    100 proposals per image at evaluation, not 1000: an untrained model's proposals all pass, and
    NMS over them made the end-of-run evaluation of such a run 2.3 s instead of 0.8 s (2 cores)."""
    return [
        f"model.detector={detector}", f"model.backbone={TINY_BACKBONE}", "model.fpn_channels=16",
        "model.anchor_scale=4", "model.rpn_post_nms_train=200", "model.roi_batch_per_image=64",
        "model.box_head_dim=64", "model.rpn_post_nms_test=100", f"data.root={root}", "data.source=coco",
        "data.min_size=64", "data.max_size=96", "data.workers=0", "schedule.max_iters=4", "schedule.warmup_iters=2",
        "train.micro_batch=2", f"train.output_dir={out_dir}", "train.run_name=run", "train.progress=false",
        "train.log_every=1", "train.eval_every_epochs=0", "train.ckpt_every_iters=0",
        "tracking.wandb_mode=disabled",
    ]


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from pipeline.distributed.job import exit_skipping_teardown, leave_job

    try:
        fn(rank, world, *args)
    finally:
        leave_job()  # as the launch scripts end: the shm segment unlinked, the process group destroyed
    exit_skipping_teardown(0, finished=True)  # as launch/train.py: no abort in the interpreter's teardown


def run_distributed(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` real processes (gloo via the env:// rendezvous).

    ``fn`` must be a module-level function; it initialises the process group itself
    (usually through ``pipeline.distributed.job.init_distributed``). Failures in any rank fail the test.
    """
    torch.multiprocessing.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)
