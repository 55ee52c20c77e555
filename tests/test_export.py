"""ZeRO-3 built under zero.Init, trained, checkpointed, consolidated to fp32: the exported model
loads into a fresh model and predicts exactly what the partitioned engine predicted."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import run_distributed, tiny_overrides


def _zero3_worker(rank: int, world: int, overrides: list, out: str) -> None:
    """Train, then predict with the partitioned model rebuilt from the checkpoint."""
    from pipeline.config import load_config
    from pipeline.train.trainer import run

    run(load_config(None, overrides))
    _zero3_predict_worker(rank, world, overrides, out)


def _zero3_predict_worker(rank: int, world: int, overrides: list, out: str) -> None:
    """Predictions of the trained, partitioned model: a fresh run loads the checkpoint.
    (In its own processes for big models: DeepSpeed keeps a finished engine alive.)"""
    from pipeline.checkpoint import manager as ckpt
    from pipeline.config import load_config
    from pipeline.distributed.ds_internals import full_numel, is_partitioned
    from pipeline.distributed.job import init_distributed
    from pipeline.train.build import build_training

    cfg = load_config(None, overrides)
    training = build_training(cfg, init_distributed(), data=False, num_classes=3)
    assert all(is_partitioned(p) for p in training.engine.module.parameters()), \
        "zero.Init must partition at construction"
    ckpt.load(training.engine, cfg.train.run_dir / "checkpoints", ckpt.choose(cfg.train.run_dir / "checkpoints"))
    training.engine.module.eval()
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 64, 80, generator=g) * 255, torch.rand(3, 72, 64, generator=g) * 255]
    with torch.no_grad():
        preds = training.engine.module(images)
    if rank == 0:
        torch.save({"images": images, "preds": preds}, Path(out) / "zero3_preds.pt")
    numel = sum(full_numel(p) for p in training.engine.module.parameters())  # full sizes, without gathering
    if rank == 0:
        Path(out, "numel.json").write_text(json.dumps(numel))


def _partial_newer_checkpoint(ckpt_dir: Path) -> None:
    """A save cut short after DeepSpeed wrote `latest`: a newer folder without the marker, its shards
    truncated (loading it would fail)."""
    import shutil

    from pipeline.checkpoint.manager import MARKER, complete_tags

    newest = complete_tags(ckpt_dir)[-1]
    cut = ckpt_dir / "iter_99999999"
    shutil.copytree(ckpt_dir / newest, cut)
    (cut / MARKER).unlink()
    for shard in cut.glob("*.pt"):
        shard.write_bytes(shard.read_bytes()[:100])
    (ckpt_dir / "latest").write_text(cut.name)


def test_zero3_export_loads_and_predicts_the_same(shapes_root, tmp_path):
    from pipeline.tools.export import load_exported, main

    overrides = tiny_overrides(shapes_root, tmp_path, "retinanet") + [
        "train.ds_config=ds_configs/zero3_fp32.json", "schedule.max_iters=3", "model.detections_per_img=20",
        "model.score_thresh=0"]  # after 3 iterations every score is still near the 0.01 prior
    run_distributed(_zero3_worker, 2, overrides, str(tmp_path))
    run_dir = tmp_path / "run"
    _partial_newer_checkpoint(run_dir / "checkpoints")
    assert main([str(run_dir)]) == 0  # the newest complete checkpoint, not the one `latest` names
    model = load_exported(run_dir / "model_fp32.safetensors")
    assert sum(p.numel() for p in model.parameters()) == json.loads((tmp_path / "numel.json").read_text())
    ref = torch.load(tmp_path / "zero3_preds.pt", weights_only=False)
    with torch.no_grad():
        preds = model(ref["images"])
    assert len(preds[0]["boxes"]) > 0
    for got, want in zip(preds, ref["preds"]):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-4)


def test_export_rebuilds_without_the_pretrained_file(tmp_path):
    """The exported file alone rebuilds the model: the backbone weights the run started from
    (model.pretrained) may be gone since, and are not read again."""
    from conftest import TINY_BACKBONE
    from pipeline.config import load_config
    from pipeline.tools.export import load_exported
    from pipeline.train.build import build_model

    weights = tmp_path / "backbone.pth"
    cfg = load_config(None, ["model.detector=retinanet", f"model.backbone={TINY_BACKBONE}", "model.fpn_channels=16",
                             "model.norm=frozen", f"model.pretrained={weights}"])
    torch.manual_seed(3)
    model = build_model(cfg, 3, pretrained=False).eval()
    blob = tmp_path / "model_fp32.pt"
    torch.save({"model": model.state_dict(), "num_classes": 3, "config": cfg.model_dump(mode="json")}, blob)
    assert not weights.exists()
    rebuilt = load_exported(blob)
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0)) * 255]
    with torch.no_grad():
        want, got = model(images), rebuilt(images)
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(got[0][key], want[0][key])
