"""launch/evaluate.py: a checkpoint evaluates to the metrics its training run reported, through the
deepspeed launcher; an fp32 export evaluates in one process; bad inputs are named; checkpoints are
never written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides
from pipeline.distributed.launcher import free_port
from pipeline.evaluation.coco import STAT_NAMES
from test_train_e2e import ENV

EVALUATE = str(REPO / "launch/evaluate.py")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def _main():
    """The evaluate command's ``main`` (``launch/evaluate.py`` calls it)."""
    from pipeline.tools.evaluate import main

    return main


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_checkpoint_and_export_evaluate_like_training(shapes_root, tmp_path):
    run_dir = tmp_path / "run"
    train = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch/train.py"),
             *tiny_overrides(shapes_root, tmp_path, "faster_rcnn"), "train.ds_config=ds_configs/zero2_fp32.json"]
    done = subprocess.run(train, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reported = json.loads((run_dir / "eval_metrics.json").read_text())
    assert "COCOeval:" in done.stderr and "maxDets=100 ] =" in done.stderr  # training logs the whole table
    assert (run_dir / "previews/iter_00000004.png").is_file()  # its evaluation's detections, drawn
    checkpoints = _files(run_dir / "checkpoints")

    # the final checkpoint (ZeRO-2 shards of 2 ranks), on 2 ranks with training's batches: training's metrics
    done = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), EVALUATE, str(run_dir)],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((run_dir / "evaluations/iter_00000004/eval_metrics.json").read_text())
    assert got.keys() == reported.keys() == {f"bbox/{n}" for n in STAT_NAMES}
    for key, value in reported.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    for line in ("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
                 "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]"):
        assert line in done.stdout, done.stdout[-2000:]
    assert (run_dir / "evaluations/iter_00000004/eval_detections.json").is_file()
    assert _files(run_dir / "checkpoints") == checkpoints  # nothing written there

    # an fp32 export, one process, on another annotation file (the same set, named explicitly)
    assert subprocess.run([sys.executable, str(REPO / "launch/export.py"), str(run_dir)], env=ENV, cwd=REPO,
                          capture_output=True, timeout=600).returncode == 0
    done = subprocess.run([sys.executable, EVALUATE, "--export", str(run_dir / "model_fp32.safetensors"), "--ann",
                           str(shapes_root / "annotations/instances_val.json"), "--images", str(shapes_root / "val"),
                           "--out", str(tmp_path / "export_eval")], env=ENV, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = json.loads((tmp_path / "export_eval/eval_metrics.json").read_text())
    assert exported.keys() == reported.keys() and 0 <= exported["bbox/AP50"] <= 1
    assert "1 process(es)" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere"], "is not a run directory"),
    (["--export", "{tmp}/notes.txt"], "not an export"),
    (["--export", "{tmp}/missing.pt"], "no such file"),
])
def test_bad_inputs_are_named(tmp_path, capsys, args, message):
    main = _main()
    (tmp_path / "notes.txt").write_text("not a model")
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_tag_names_the_complete_ones(tmp_path, capsys):
    main = _main()
    run = tmp_path / "run"
    (run / "checkpoints/iter_00000002").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  micro_batch: 2\n")
    (run / "model.json").write_text(json.dumps({"num_classes": 3, "parameters": 1}))
    assert main([str(run), "--tag", "iter_00000009"]) == 2
    assert "--tag iter_00000009: no such checkpoint" in capsys.readouterr().err


def test_a_zero0_run_exports_and_its_export_evaluates_to_the_reported_metrics(shapes_root, tmp_path):
    """ZeRO-0 checkpoints hold the whole module in one file and no ZeRO shards (DeepSpeed's zero_to_fp32
    has nothing to consolidate): the export still works, and its evaluation in one process, batched
    as training's was, gives the metrics the run reported."""
    run_dir = tmp_path / "run"
    train = [sys.executable, str(REPO / "launch/train.py"), *tiny_overrides(shapes_root, tmp_path, "faster_rcnn"),
             "train.ds_config=ds_configs/zero0_fp32.json", "schedule.max_iters=3"]
    done = subprocess.run(train, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, str(REPO / "launch/export.py"), str(run_dir)], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, EVALUATE, "--export", str(run_dir / "model_fp32.safetensors")], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((run_dir / "evaluations/model_fp32/eval_metrics.json").read_text())
    for key, value in json.loads((run_dir / "eval_metrics.json").read_text()).items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
