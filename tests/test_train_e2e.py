"""The entry point end to end, as a user runs it: subprocesses, real launcher, real checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, tiny_overrides
from pipeline.engine import free_port
from pipeline.tracking import read_metrics

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(var, None)


def _train_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launch/train.py"), *tiny_overrides(root, out, "faster_rcnn"), *extra]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_killed_run_resumes_exactly(shapes_root, tmp_path):
    """Faster R-CNN (random RoI sampling) killed after a checkpoint, resumed: same losses."""
    common = ("schedule.max_iters=16", "train.ckpt_every_iters=4")
    ref = subprocess.run(_train_cmd(shapes_root, tmp_path / "ref", *common), env=ENV, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = _losses(tmp_path / "ref/run")
    assert sorted(expected) == list(range(1, 17))

    victim = subprocess.Popen(_train_cmd(shapes_root, tmp_path / "cut", *common), env=ENV, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "cut/run/checkpoints/latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() == "iter_00000004") and time.time() < deadline:
        assert victim.poll() is None, "training ended before it could be killed"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    resumed = subprocess.run(_train_cmd(shapes_root, tmp_path / "cut", *common, "train.resume=true"), env=ENV,
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at iteration" in resumed.stderr
    got = _losses(tmp_path / "cut/run")
    assert sorted(got) == list(range(1, 17)), "log after resume must hold each iteration once"
    for it in range(5, 17):
        assert abs(got[it] - expected[it]) <= 1e-4 * abs(expected[it]), (it, got[it], expected[it])


def test_deepspeed_launcher_two_ranks_zero2(shapes_root, tmp_path):
    """`deepspeed --num_gpus 2 launch/train.py` on CPU/gloo with ZeRO-2: ranks agree, eval runs."""
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch/train.py"),
           *tiny_overrides(shapes_root, tmp_path, "retinanet"), "train.ds_config=ds_configs/zero2_fp32.json",
           "schedule.max_iters=3"]
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    run_dir = tmp_path / "run"
    agree = json.loads((run_dir / "rank_params.json").read_text())
    assert agree["identical"] and len(agree["fingerprint_sum"]) == 2
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    assert ds_config["train_batch_size"] == 4 and ds_config["zero_optimization"]["stage"] == 2
    metrics = json.loads((run_dir / "eval_metrics.json").read_text())
    assert 0.0 <= metrics["bbox/AP50"] <= 1.0
    assert (run_dir / "checkpoints/latest").read_text().strip() == "iter_00000003"


def test_bad_config_exits_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_bath: 4\n")
    proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config", str(bad)], env=ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.micro_bath: unknown key" in proc.stderr and str(bad) in proc.stderr


def _archive_worker(rank: int, world: int, run_dir: str) -> None:
    import torch.distributed as dist

    from pipeline.trainer import archive_previous_run

    dist.init_process_group("gloo")
    archive_previous_run(Path(run_dir), rank)


def test_fresh_run_moves_an_earlier_run_aside(tmp_path):
    from conftest import run_distributed

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints/latest").write_text("iter_00000004")
    run_distributed(_archive_worker, 1, str(run_dir))
    assert not run_dir.exists()
    old = list(tmp_path.glob("run.old-*"))
    assert len(old) == 1 and (old[0] / "checkpoints/latest").read_text() == "iter_00000004"
