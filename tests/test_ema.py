"""Weight EMA (``train.ema_decay``, pipeline/optim/ema.py) against an EMA computed by hand from the
weights after each step, under ZeRO 0, 2 and 3 on 2 ranks; the EMA weights are what the model
computes with inside ``applied()`` (persistent ZeRO-3 parameters included) and the live ones after;
a saved EMA loads into another ZeRO stage unchanged; export and evaluation pick it."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_BACKBONE, run_distributed, tiny_overrides

DECAY = 0.8


def _overrides(stage: int) -> list[str]:
    return ["model.detector=faster_rcnn", f"model.backbone={TINY_BACKBONE}", "model.fpn_channels=16",
            "model.anchor_scale=4", "model.rpn_post_nms_train=100", "model.roi_batch_per_image=32",
            "model.box_head_dim=32", "data.min_size=64", "data.max_size=64", "train.micro_batch=2",
            f"train.ds_config=ds_configs/zero{stage}_fp32.json", "optim.base_lr=0.05", "schedule.max_iters=10",
            "schedule.warmup_iters=0", f"train.ema_decay={DECAY}", "model.norm=per_gpu"]


def _full_weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().float().clone() for n, p in named}


def _worker(rank: int, world: int, out: str) -> None:
    from pipeline.config import load_config
    from pipeline.data.synthetic import synthetic_batch
    from pipeline.distributed.job import init_distributed
    from pipeline.optim import ema as ema_io
    from pipeline.train.build import build_training

    info = init_distributed()
    result = {}
    for stage in (0, 2, 3):
        training = build_training(load_config(None, _overrides(stage)), info, data=False, num_classes=3)
        batches = itertools.cycle([synthetic_batch(2, 64, 64, info.device, seed=10 * s + rank, num_classes=3)
                                   for s in (1, 2)])
        want = _full_weights(training.engine)  # the EMA starts at the weights the run starts from
        for _ in range(3):
            training.step(batches)
            for name, w in _full_weights(training.engine).items():
                want[name] = DECAY * want[name] + (1 - DECAY) * w
        got = training.ema.full_state_dict()
        live = _full_weights(training.engine)
        with training.ema.applied():
            inside = _full_weights(training.engine)
        after = _full_weights(training.engine)
        persistent = len(getattr(training.engine.optimizer, "persistent_parameters", []))
        ema_io.save(training.ema, Path(out) / f"zero{stage}")
        if rank == 0:
            result[stage] = {
                "ema_vs_hand": max((got[n] - w).abs().max().item() for n, w in want.items()),
                "moved": max((live[n] - w).abs().max().item() for n, w in want.items()),
                "inside_vs_ema": max((inside[n] - got[n]).abs().max().item() for n in got),
                "after_vs_live": max((after[n] - live[n]).abs().max().item() for n in live),
                "persistent": persistent}
        del training
    # the ZeRO-3 EMA, loaded by a ZeRO-2 run (another layout: whole parameters), is the same EMA
    training = build_training(load_config(None, _overrides(2)), info, data=False, num_classes=3)
    assert ema_io.load(training.ema, Path(out) / "zero3")
    reloaded = training.ema.full_state_dict()
    if rank == 0:
        saved = torch.load(f"{out}/zero3/ema.pt", weights_only=True)["state_dict"]
        result["reload_vs_saved"] = max((reloaded[n] - saved[n]).abs().max().item() for n in saved)
        with open(f"{out}/result.json", "w") as f:
            json.dump(result, f)


def test_ema_matches_the_hand_computed_average_under_zero_0_2_3(tmp_path):
    run_distributed(_worker, 2, str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    for stage in ("0", "2", "3"):
        r = result[stage]
        assert r["moved"] > 1e-3, r  # the weights moved away from their EMA: the check can fail
        assert r["ema_vs_hand"] < 1e-6 and r["inside_vs_ema"] == 0 and r["after_vs_live"] == 0, (stage, r)
    assert result["3"]["persistent"] > 0  # ZeRO-3's gathered small parameters were exercised
    assert result["reload_vs_saved"] == 0


def test_a_run_with_ema_checkpoints_exports_and_evaluates_it(shapes_root, tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ["PATH"]}
    run = [sys.executable, str(REPO / "launch/train.py"), *tiny_overrides(shapes_root, tmp_path, "faster_rcnn"),
           "train.ema_decay=0.5", "train.evaluate=true"]
    done = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    tag = (run_dir / "checkpoints/latest").read_text().strip()
    ema = torch.load(run_dir / "checkpoints" / tag / "ema.pt", weights_only=True)
    assert ema["updates"] == 4 and ema["decay"] == 0.5
    from pipeline.tools.export import consolidated_state_dict

    picked, live = consolidated_state_dict(run_dir), consolidated_state_dict(run_dir, weights="live")
    assert set(picked) == set(live)
    differs = [n for n, v in ema["state_dict"].items() if not torch.equal(live[n], v)]
    assert differs and all(torch.equal(picked[n], v) for n, v in ema["state_dict"].items())
    # launch/evaluate.py on the checkpoint evaluates the EMA (auto), as the training run's final evaluation
    # did: the same detections; with --weights live, other ones
    trained = _detections(run_dir / "eval_detections.json")
    for weights in ("auto", "live"):
        out = tmp_path / weights
        done = subprocess.run([sys.executable, str(REPO / "launch/evaluate.py"), str(run_dir), "--weights", weights,
                               "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        got = _detections(out / "eval_detections.json")
        if weights == "auto":
            assert len(got) == len(trained) > 0 and got == pytest.approx(trained, abs=1e-4)
        else:
            assert got != pytest.approx(trained, abs=1e-4)


def _detections(path) -> list[float]:
    """Every detection's score and box, in a fixed order."""
    dets = sorted(json.loads(path.read_text()), key=lambda d: (d["image_id"], -d["score"]))
    return [v for d in dets for v in (d["score"], *d["bbox"])]
