"""The entry point end to end, as a user runs it: subprocesses, real launcher, real checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides
from pipeline.distributed.launcher import free_port
from pipeline.evaluation.coco import STAT_NAMES
from pipeline.train.tracking import read_metrics

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(var, None)


def _train_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launch/train.py"), *tiny_overrides(root, out, "faster_rcnn"), *extra]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_killed_run_resumes_exactly(shapes_root, tmp_path):
    """Faster R-CNN (random RoI sampling) killed after a checkpoint, resumed: same losses. The JPEGs
    are decoded by the training process (data.decode=device), whose path must resume exactly too."""
    common = ("schedule.max_iters=16", "train.ckpt_every_iters=4", "data.decode=device")
    ref = subprocess.run(_train_cmd(shapes_root, tmp_path / "ref", *common), env=ENV, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # every 4th iteration once; the 16th, periodic and final at once, once too
    assert [ref.stderr.count(f"checkpoint iter_{i:08d} saved") for i in (4, 8, 12, 16)] == [1, 1, 1, 1]
    expected = _losses(tmp_path / "ref/run")
    assert sorted(expected) == list(range(1, 17))

    victim = subprocess.Popen(_train_cmd(shapes_root, tmp_path / "cut", *common), env=ENV, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # DeepSpeed writes `latest` before the files are done; only our marker says the checkpoint is whole,
    # so the kill waits for it (killing between the two leaves no complete checkpoint to resume, by design).
    marker = tmp_path / "cut/run/checkpoints/iter_00000004/complete.json"
    deadline = time.time() + 300
    while not marker.is_file() and time.time() < deadline:
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
    launcher, port = Path(sys.executable).parent / "deepspeed", free_port()
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(port), str(REPO / "launch/train.py"),
           *tiny_overrides(shapes_root, tmp_path, "retinanet"), "train.ds_config=ds_configs/zero2_fp32.json",
           "schedule.max_iters=3", "model.score_thresh=0", "model.detections_per_img=20"]
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    run_dir = tmp_path / "run"
    agree = json.loads((run_dir / "rank_params.json").read_text())
    assert agree["identical"] and len(agree["fingerprint_sum"]) == 2
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    assert ds_config["train_batch_size"] == 4 and ds_config["zero_optimization"]["stage"] == 2
    assert (run_dir / "checkpoints/latest").read_text().strip() == "iter_00000003"
    metrics = json.loads((run_dir / "eval_metrics.json").read_text())
    want, want_dets = _coco_stats_of_export(run_dir, shapes_root)
    got = [metrics[f"bbox/{name}"] for name in STAT_NAMES]
    assert got == pytest.approx(want, abs=1e-6), "2 ranks' sharded, gathered evaluation != COCOeval on one process"
    _assert_same_detections(json.loads((run_dir / "eval_detections.json").read_text()), want_dets)
    # DeepSpeed's CPU all-reduce leaves 66 MB per rank in /dev/shm unless the run unlinks it
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


# ZeRO-3 releasing every parameter after use, as a billion-parameter model does: each forward
# gathers, so ranks must run the same number of forwards.
RELEASING_ZERO3 = {"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 0,
                                         "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0}}


def test_zero3_evaluation_of_an_odd_validation_set(tmp_path):
    """9 validation images on 2 ranks at micro-batch 2: rank 0 runs 3 forwards, rank 1 2 and a padding
    one. Without the padding, gloo aborts on mismatched collectives (NCCL would hang)."""
    from pipeline.data.synthetic import make_dataset

    root = tmp_path / "data"
    make_dataset(root, num_train=8, num_val=9, seed=0, min_side=64, max_side=96)
    ds_config = tmp_path / "zero3_release.json"
    ds_config.write_text(json.dumps(RELEASING_ZERO3))
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch/train.py"),
           *tiny_overrides(root, tmp_path, "retinanet"), f"train.ds_config={ds_config}", "schedule.max_iters=2",
           "model.score_thresh=0", "model.detections_per_img=20"]
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=420)  # a hang fails
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "eval_metrics.json").read_text())
    want, want_dets = _coco_stats_of_export(run_dir, root)
    got = [metrics[f"bbox/{name}"] for name in STAT_NAMES]
    assert got == pytest.approx(want, abs=1e-6), "2 ranks' padded evaluation != COCOeval on one process"
    _assert_same_detections(json.loads((run_dir / "eval_detections.json").read_text()), want_dets)


def _coco_stats_of_export(run_dir: Path, root: Path, world: int = 2) -> tuple[list[float], list[dict]]:
    """The independent score: the run's final weights (consolidated export) predict every validation
    image in one process, and pycocotools' COCOeval itself scores the detections. Returns COCOeval's
    stats and the detections."""
    import contextlib
    import io

    import torch
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from pipeline.config import load_config
    from pipeline.data.dataset import CocoDetection
    from pipeline.data.samplers import eval_batches
    from pipeline.tools.export import export_fp32, load_exported

    cfg = load_config(run_dir / "config.yaml")
    model = load_exported(export_fp32(run_dir, run_dir / "independent_fp32.pt"))
    ann = root / "annotations/instances_val.json"
    val = CocoDetection(root / "val", ann, cfg.data.min_size, cfg.data.max_size)  # the loader's resize
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann))
    dets = []
    # The same pairs of images the ranks evaluated together: a batch pads its images to one size, and
    # the padding changes convolution outputs at the borders.
    batches = [b for rank in range(world) for b in eval_batches(len(val), cfg.train.micro_batch, world, rank)]
    with torch.no_grad():
        for batch in batches:
            items = [val[i] for i in batch]
            outputs = model([image.float() for image, _ in items])
            for (_, target), out in zip(items, outputs):
                dets += _as_coco(out, target, val.cat_ids)
    if not dets:  # loadRes cannot take an empty list: no detections score 0 everywhere
        return [0.0] * len(STAT_NAMES), dets
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes([dict(d) for d in dets]), "bbox")
        ev.params.imgIds = list(val.ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats], dets


def _assert_same_detections(got: list[dict], want: list[dict]) -> None:
    """The run's detections (every image once, no padding) against the independent ones."""
    def key(d):
        return d["image_id"], -d["score"]
    got, want = sorted(got, key=key), sorted(want, key=key)
    assert want, "no detections: the comparison would be vacuous"
    assert [(d["image_id"], d["category_id"]) for d in got] == [(d["image_id"], d["category_id"]) for d in want]
    assert [d["bbox"] + [d["score"]] for d in got] == [pytest.approx(d["bbox"] + [d["score"]], abs=1e-3) for d in want]


def _as_coco(out: dict, target: dict, cat_ids: list[int]) -> list[dict]:
    dets = []
    for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
        x0, y0, x1, y1 = (v / target["scale"] for v in box)  # back to the annotation file's pixels
        dets.append({"image_id": target["image_id"], "category_id": cat_ids[label - 1],
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return dets


def test_bad_config_exits_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_bath: 4\n")
    proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config", str(bad)], env=ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.micro_bath: unknown key" in proc.stderr and str(bad) in proc.stderr


def _archive_worker(rank: int, world: int, run_dir: str) -> None:
    import torch.distributed as dist

    from pipeline.train.trainer import archive_previous_run

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


SLOW_LOADER_S = 0.3


def _slow_loader_worker(rank: int, world: int, overrides: list) -> None:
    import pipeline.train.trainer as trainer
    from pipeline.config import load_config

    fast = trainer.device_batches

    def slow(loader, device):  # a loader that takes SLOW_LOADER_S per micro-batch
        for batch in fast(loader, device):
            time.sleep(SLOW_LOADER_S)
            yield batch

    trainer.device_batches = slow
    trainer.run(load_config(None, overrides))


def test_log_records_split_data_wait_from_compute_and_give_an_eta(shapes_root, tmp_path):
    """Every log record has per-iteration data and compute seconds and the time left: a loader slowed by
    0.3 s per micro-batch shows as >= 0.3 s of data time per iteration, data + compute is the
    iteration's wall time, and the ETA counts the iterations left at the window's pace."""
    from conftest import run_distributed

    overrides = tiny_overrides(shapes_root, tmp_path, "faster_rcnn") + [
        "schedule.max_iters=6", "train.log_every=2", "train.grad_accum=2", "train.evaluate=false",
        "train.final_checkpoint=false"]
    run_distributed(_slow_loader_worker, 1, overrides)
    records = [r for r in read_metrics(tmp_path / "run") if "train/data_s" in r]
    assert [r["iteration"] for r in records] == [2, 4, 6]
    for r in records:
        seconds_per_iter = 4 / r["train/images_per_s"]  # global batch 4: 2 images x 2 micro-batches
        assert 2 * SLOW_LOADER_S <= r["train/data_s"] < seconds_per_iter
        assert r["train/data_s"] + r["train/compute_s"] == pytest.approx(seconds_per_iter, rel=1e-6)
        assert r["train/eta_s"] == pytest.approx((6 - r["iteration"]) * seconds_per_iter, rel=1e-6)
    assert records[-1]["train/eta_s"] == 0
    # model FLOPs counted on the first iteration: TFLOP/s per rank in every record; no MFU on a CPU
    summary = json.loads((tmp_path / "run/run_summary.json").read_text())
    assert summary["flops_per_image"] > 1e6 and summary["peak_tflops"] is None and "mfu" not in summary
    for r in records:
        assert r["train/tflops_per_rank"] == pytest.approx(summary["flops_per_image"] * r["train/images_per_s"] / 1e12)
        assert "train/mfu" not in r
