"""One rank's error, a straggler, a hang: the job's watchdog (pipeline/distributed/watchdog.py) in real
2-rank jobs under the deepspeed launcher. Faults are injected from outside the pipeline
(tests/faults/sitecustomize.py on the ranks' PYTHONPATH): a full disk under one file, an exception in
COCOeval or W&B's init, a sleep in one rank's step.

Each fault's time to detect (from the injection to the launcher's exit) is printed for the faults
table in docs/RESULTS.md (``pytest -s``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides
from pipeline.distributed.launcher import free_port
from pipeline.train.tracking import read_metrics

FAULTS = Path(__file__).parent / "faults"
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def _job(root: Path, out: Path, fault: str, *extra: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    """A 2-rank job with ``fault`` injected; returns it and the seconds from the injection to its end."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PIPELINE_FAULT=fault, PYTHONPATH=str(FAULTS))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch/train.py"),
           *tiny_overrides(root, out, "faster_rcnn"), "schedule.max_iters=6", "train.micro_batch=1",
           "train.collective_timeout_s=60", *extra]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    end = time.time()
    injected = re.search(r"\[fault injected\] .* at ([0-9.]+)", done.stdout + done.stderr)
    return done, end - float(injected.group(1)) if injected else float("nan")


ONE_RANK_ERRORS = {  # fault -> (extra overrides, the error every rank must name)
    "ema.pt on a full disk": ("pipeline.optim.ema:save:0:enospc",
                              ("train.ema_decay=0.9", "train.ckpt_every_iters=3"), "No space left on device"),
    "the metrics file on a full disk": ("pipeline.train.tracking:Tracker.log:0:enospc:3", (),
                                        "No space left on device"),
    "COCOeval": ("pipeline.evaluation.coco:coco_evaluate:0:error", ("train.eval_every_epochs=0.25",),
                 "injected failure in coco_evaluate"),
    "W&B's init": ("wandb:init:0:error", ("tracking.wandb_mode=offline",), "injected failure in init"),
    "an error in rank 1's step": ("pipeline.train.step:TrainStep.__call__:1:error:2", (), "injected failure in"),
}
SLOW = {"the metrics file on a full disk", "COCOeval", "W&B's init", "an error in rank 1's step"}  # CI: ema.pt only


@pytest.mark.parametrize("fault", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in ONE_RANK_ERRORS])
def test_one_ranks_error_ends_every_rank_promptly_naming_it(shapes_root, tmp_path, fault):
    """Fault (d): an error on one rank only. Every rank exits within seconds (not at the 60 s collective
    timeout) and the other rank's log names the failing rank, its error and where it was raised."""
    spec, extra, words = ONE_RANK_ERRORS[fault]
    done, seconds = _job(shapes_root, tmp_path, spec, *extra)
    output = done.stdout + done.stderr
    print(f"\nfault (d) {fault}: exit {done.returncode} {seconds:.1f} s after the injection")
    assert done.returncode != 0, output[-3000:]
    failing = int(spec.split(":")[2])
    other = 1 - failing
    told = [ln for ln in output.splitlines() if f"[rank{other}]" in ln and f"rank {failing} on " in ln]
    assert told and words in told[0], output[-4000:]
    assert " (at " in told[0] or spec.startswith("wandb"), told[0]  # where in the pipeline it was raised
    assert seconds < 30, output[-3000:]


def test_a_straggler_is_named_with_its_stack_and_the_job_goes_on(shapes_root, tmp_path):
    """Fault (e): rank 1 sleeps 12 s in its third step. Within ``train.stall_report_s`` (3 s) plus a poll,
    both ranks report a stall, rank 0 names rank 1 as the one behind, rank 1's stack file shows the sleep;
    the job then finishes with every iteration logged once."""
    done, _ = _job(shapes_root, tmp_path, "pipeline.train.step:TrainStep.__call__:1:sleep12:3",
                   "train.stall_report_s=3", "train.evaluate=false")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert re.search(r"rank\(s\) \[1\] behind the others: rank 1 on \S+ at mark \d+", output), output[-4000:]
    stacks = (tmp_path / "run/stalls").glob("rank1-*.txt")
    text = "".join(p.read_text() for p in stacks)
    assert "in faulty" in text and "time.sleep" in text, text[-2000:]
    assert sorted(r["iteration"] for r in read_metrics(tmp_path / "run") if "train/loss" in r) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_at_the_collective_timeout_naming_it(shapes_root, tmp_path):
    """A rank that never returns from its step: the stall is reported with its stack after
    ``stall_report_s``, and the job ends at ``train.collective_timeout_s`` (10 s here), every rank naming
    the timeout, instead of never."""
    done, seconds = _job(shapes_root, tmp_path, "pipeline.train.step:TrainStep.__call__:1:hang:3",
                         "train.stall_report_s=3", "train.collective_timeout_s=10", "train.evaluate=false")
    output = done.stdout + done.stderr
    print(f"\nfault (e) hung rank: exit {done.returncode} {seconds:.1f} s after the injection")
    assert done.returncode != 0 and seconds < 40, output[-4000:]
    assert "rank(s) [1] behind the others" in output, output[-4000:]
    told = [ln for ln in output.splitlines() if "[rank1]" in ln and "rank 0 on " in ln and "failed" in ln]
    assert told, output[-4000:]


def _group_timeouts(rank: int, world: int) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from deepspeed.utils import groups

    from pipeline.distributed.job import init_distributed

    init_distributed(timeout_s=7)
    made_later = {"a BN group (new_group)": dist.new_group([0, 1]),
                  "DeepSpeed's data-parallel group": groups._get_data_parallel_group()}
    for name, group in made_later.items():
        timeout = group._get_backend(torch.device("cpu")).options._timeout
        assert timeout == timedelta(seconds=7), f"{name}: {timeout}, not train.collective_timeout_s"


def test_groups_made_after_the_job_formed_keep_its_collective_timeout():
    """``train.collective_timeout_s`` bounds every collective: the BN groups and DeepSpeed's own groups are
    made after the process group, and ``new_group`` would give them torch's 30-minute default."""
    from conftest import run_distributed

    run_distributed(_group_timeouts, 2)
