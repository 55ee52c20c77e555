"""train.profile (a torch.profiler trace per rank, the top operators, the host syncs of the window) and the
out-of-memory report (a CUDA snapshot, the planner's estimate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from pipeline.config import load_config
from pipeline.train.profiling import oom_report

REPO = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                        "MASTER_PORT")}


def test_a_profile_window_writes_a_trace_a_table_and_the_host_syncs(shapes_root, tmp_path):
    """Iterations 2-3 of 4, one rank: a Chrome trace with events of the model's operators, the top-15 table
    by self time (file and log) and the host syncs of those iterations by source line (torchvision's NMS
    and the heads' sampling sync on CUDA: on a CPU they are counted as the calls that would)."""
    cmd = [sys.executable, str(REPO / "launch/train.py"), *tiny_overrides(shapes_root, tmp_path, "faster_rcnn"),
           "train.profile=[2, 3]", "train.evaluate=false", "train.final_checkpoint=false"]
    done = subprocess.run(cmd, cwd=REPO, env=dict(ENV, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run/profile"
    trace = json.loads((out / "rank0.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::convolution" in names and "torchvision::roi_align" in names
    table = (out / "rank0_top15.txt").read_text()
    assert "Self CPU" in table and len([ln for ln in table.splitlines() if ln.strip().startswith("aten::")]) >= 8
    syncs = (out / "rank0_host_syncs.txt").read_text().splitlines()
    assert any("torchvision/ops/boxes.py:" in ln and "(nms)" in ln for ln in syncs), syncs
    assert "profile of iterations 2-3" in done.stderr and "Self CPU" in done.stderr
    assert "host calls that would synchronise on CUDA" in done.stderr


def test_a_profile_window_must_be_ordered():
    with pytest.raises(Exception, match=r"train.profile=\[5, 2\]: need \[first, last\]"):
        load_config(None, ["train.profile=[5, 2]"])


def test_the_oom_report_names_the_plan_and_what_to_change(tmp_path):
    """On a CPU there is no snapshot to write; the report names what to change, and the planner's line
    (which launch/train.py adds) gives its model-state estimate (ResNet-18 Faster R-CNN, fp32, SGD with
    momentum, ZeRO-0: parameters + gradients + momentum, 12 bytes per parameter at least) and the planner
    command with the run's config."""
    from pipeline.tools.planner import model_states_summary

    cfg = load_config(REPO / "configs/shapes_default.yaml", [f"train.output_dir={tmp_path}"])
    planned = model_states_summary(cfg, world=1)
    gib = float(planned.split("world size 1: ")[1].split(" GiB")[0])
    assert gib > 12 * 11e6 / 2**30  # ResNet-18 alone has 11M parameters
    assert f"python launch/plan.py --config {tmp_path}/shapes_default/config.yaml --world-size 1" in planned
    err = oom_report(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), tmp_path / "oom", 3,
                     torch.device("cpu"))
    text = str(err)
    assert text.startswith("rank 3 ran out of memory on cpu: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "train.micro_batch" in text and not (tmp_path / "oom").exists()


@pytest.mark.gpu
def test_a_cuda_oom_in_training_writes_a_snapshot_and_names_it(shapes_root, tmp_path):
    """A micro-batch far beyond the GPU: the run stops with the report, and the snapshot it names exists."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cmd = [sys.executable, str(REPO / "launch/train.py"), *tiny_overrides(shapes_root, tmp_path, "faster_rcnn"),
           "model.backbone=resnet50", "data.min_size=1600", "data.max_size=2400", "train.micro_batch=512",
           "train.evaluate=false"]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "ran out of memory on cuda" in done.stderr and "memory snapshot:" in done.stderr, done.stderr[-3000:]
    assert "the memory planner's model states for this config" in done.stderr
    assert (tmp_path / "run/oom/rank0.pickle").stat().st_size > 0
