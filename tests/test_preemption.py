"""Preemption: a scheduler's signal to one rank of a 2-rank job stops every rank at the next log step
with a complete checkpoint and exit status 4 ("requeue me"); the resumed run ends with the losses of
an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, tiny_overrides
from pipeline.checkpoint.manager import complete_tags
from pipeline.distributed.launcher import free_port
from pipeline.train.preemption import EXIT_PREEMPTED
from pipeline.train.tracking import read_metrics

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
for _var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_var, None)
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
COMMON = ("schedule.max_iters=10", "train.log_every=2", "train.micro_batch=1")


def _cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch/train.py"),
            *tiny_overrides(root, out, "faster_rcnn"), *COMMON, *extra]


def _rank_pids(out: Path) -> dict[int, int]:
    """local rank -> pid of the ranks whose command line names ``out``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if f"train.output_dir={out}" in args and any(a.startswith("--local_rank=") for a in args):
            found[int(next(a for a in args if a.startswith("--local_rank=")).split("=")[1])] = int(entry.name)
    return found


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint_and_the_resume_is_exact(shapes_root, tmp_path):
    ref = subprocess.run(_cmd(shapes_root, tmp_path / "ref"), env=ENV, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "cut"
    job = subprocess.Popen(_cmd(shapes_root, out), env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while max(_losses(out / "run"), default=0) < 2 and time.time() < deadline:
        assert job.poll() is None, "the job ended before it could be signalled"
        time.sleep(0.05)
    pids = _rank_pids(out)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGUSR1)  # one rank only: SLURM's --signal, a node's preemption notice
    tic = time.time()
    output, _ = job.communicate(timeout=300)
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "preempted by SIGUSR1" in output
    saved = complete_tags(out / "run/checkpoints")
    assert len(saved) == 1 and int(saved[0].split("_")[1]) % 2 == 0  # at a log step
    stopped_at = int(saved[0].split("_")[1])
    assert stopped_at < 10, "the job ran to the end instead of stopping"
    assert time.time() - tic < 120
    resumed = subprocess.run(_cmd(shapes_root, out, "train.resume=true"), env=ENV, cwd=REPO, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at iteration {stopped_at}" in resumed.stdout + resumed.stderr
    want, got = _losses(tmp_path / "ref/run"), _losses(out / "run")
    assert sorted(got) == sorted(want)
    for it in want:
        assert abs(got[it] - want[it]) <= 1e-5 * abs(want[it]), (it, got[it], want[it])
