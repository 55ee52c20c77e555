"""The GPU suite's code paths, on CPU at tiny sizes (``--smoke``), so that the one call a lent GPU
gets measures instead of debugging; and a part that runs out of time is reported, not fatal."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

SUITE = REPO / "benchmarks/gpu_suite.py"


def _suite(out, *args: str, timeout: int = 3000) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), str(out), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_every_part_runs_in_smoke_mode(tmp_path):
    done = _suite(tmp_path, "--smoke")
    report = (tmp_path / "suite.md").read_text() if (tmp_path / "suite.md").is_file() else done.stdout
    assert done.returncode == 0, report[-6000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    parts = suite["parts"]
    assert sorted(parts) == list("abcdefgh") and all(p["status"] == "ok" for p in parts.values())
    assert "(smoke: CPU, tiny sizes; not GPU figures)" in report

    smoke = parts["a"]["rows"]
    assert len(smoke) == 9 and all(r["ok"] and r["cgbn_layers"] > 0 for r in smoke), smoke  # 3 configs x ZeRO 0/2/3
    speed = {r["variant"]: r for r in parts["b"]["rows"]}
    assert speed["torchvision fasterrcnn_resnet50_fpn"]["img_s"] > 0
    assert all(r["tflops"] > 0 and r["mfu"] == "" for r in speed.values() if r["img_s"])  # no CPU peak: no MFU
    assert speed["+ channels_last"]["img_s"] > 0 and speed["+ fused cross-GPU BN"]["note"] == "CUDA only"
    counts = {r["model"]: r for r in parts["c"]["rows"]}
    tv = counts["torchvision fasterrcnn_resnet50_fpn"]
    assert tv["gflop_per_image"] > 0 and tv["aten_ops"] > 100 and tv["syncs_by_package"].get("torchvision", 0) > 0
    assert (tmp_path / "profile_top15.txt").read_text().count("\n") > 15
    costs = {r["what"]: r for r in parts["d"]["rows"]}
    assert {"sgd tau -", "agvm_sgd tau 10", "agvm_sgd tau 1", "per-GPU BN", "cross-GPU BN, ours"} <= set(costs)
    planner = parts["e"]["rows"]
    assert planner[0]["peak_gib"] > 0 and planner[1]["peak_gib"] > 0 and planner[2]["img_s"] > 0
    loader = parts["f"]["rows"]
    assert {r["decode"] for r in loader} == {"workers (CPU)", "training process (CPU)"}
    assert all(r["img_s"] > 0 for r in loader)
    assert parts["g"]["rows"][0]["exit"] == 0  # the gpu tests skip cleanly without CUDA
    windows = {r["variant"]: r for r in parts["h"]["rows"]}
    assert windows["global"]["s_per_step"] > 0 and windows["window 2"]["s_per_step"] > 0


def test_a_part_out_of_time_is_reported_and_the_suite_still_writes_its_table(tmp_path):
    done = _suite(tmp_path, "--smoke", "--parts", "f", "--time-scale", "0.00001", timeout=120)
    assert done.returncode == 1
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["parts"]["f"]["status"].startswith("stopped after")
    assert "## (f) data loader alone: stopped after" in (tmp_path / "suite.md").read_text()
