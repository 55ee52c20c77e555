"""Exports are safe to share: safetensors + JSON metadata, and no file from elsewhere is ever unpickled.

The crafted file is a real pickle whose ``__reduce__`` creates a marker directory; that it really runs
code is shown at the end by loading it the unsafe way. Every reader of a file a user may have received
(export, ``model.pretrained``, a checkpoint's RNG file) must refuse it, naming the file, and the
marker must never appear."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_BACKBONE
from pipeline.config import load_config
from pipeline.errors import CheckpointError, ConfigError, DataError

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]


class _Payload:
    """Unpickling this calls ``os.makedirs(marker)``: what a malicious file could do with any call."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / "model_fp32.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "num_classes": 3, "config": {}, "payload": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def _config(detector: str = "faster_rcnn", *extra: str):
    return load_config(None, [f"model.detector={detector}", f"model.backbone={TINY_BACKBONE}", "model.fpn_channels=16",
                              "model.anchor_scale=4", "model.box_head_dim=32", "model.norm=frozen",
                              "data.min_size=64", "data.max_size=96", *extra])


def test_a_crafted_pickle_is_refused_by_every_reader(crafted, tmp_path, shapes_root, capsys):
    from pipeline.checkpoint.manager import _read_rng_file
    from pipeline.tools import evaluate, predict
    from pipeline.tools.export import read_export
    from pipeline.train.build import build_model

    path, marker = crafted
    with pytest.raises(DataError, match=re.escape(str(path)) + ": refused: .*full unpickler"):
        read_export(path)
    image = next((shapes_root / "val").glob("*.jpg"))
    assert predict.main([str(path), str(image), "--out", str(tmp_path / "pred")]) == 2
    assert f"{path}: refused" in capsys.readouterr().err
    assert evaluate.main(["--export", str(path), "--out", str(tmp_path / "eval")]) == 2
    assert f"{path}: refused" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=f"model.pretrained={re.escape(str(path))}: refused"):
        build_model(_config("faster_rcnn", f"model.pretrained={path}"), 3)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": refused.*os.makedirs"):
        _read_rng_file(path)
    assert not marker.exists(), "a reader ran the file's code"
    torch.load(path, weights_only=False)  # the control: read the unsafe way, the file does run its code
    assert marker.is_dir()


def _predict(export: Path, images: list[Path], out: Path) -> list[dict]:
    from pipeline.tools import predict

    assert predict.main([str(export), *map(str, images), "--out", str(out), "--score-thresh", "0.0",
                         "--max-dets", "5"]) == 0
    return json.loads((out / "predictions.json").read_text())


def test_export_round_trip_gives_the_detections_of_the_pt_path(tmp_path, shapes_root):
    """The same weights written as a legacy ``.pt`` export (``torch.save`` of a dict, read with
    weights_only=True) and as safetensors give the same detections through launch/predict.py."""
    from safetensors import safe_open

    from pipeline.tools.export import EXPORT_FORMAT, read_export, write_export
    from pipeline.train.build import build_model

    cfg = _config()
    torch.manual_seed(0)
    state = build_model(cfg, 3, pretrained=False).state_dict()
    legacy = tmp_path / "model_fp32.pt"
    torch.save({"model": state, "num_classes": 3, "config": cfg.model_dump(mode="json"), "categories": CATEGORIES},
               legacy)
    shared = write_export(tmp_path / "model_fp32.safetensors", state, 3, cfg.model_dump(mode="json"), CATEGORIES)
    with safe_open(str(shared), framework="pt") as f:  # plain safetensors reads the metadata
        meta = f.metadata()
    assert meta["format"] == EXPORT_FORMAT and json.loads(meta["categories"]) == CATEGORIES
    assert json.loads(meta["config"]) == cfg.model_dump(mode="json") and int(meta["num_classes"]) == 3
    blob = read_export(shared)
    assert set(blob["model"]) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(blob["model"][name], tensor, rtol=0, atol=0)
    images = sorted((shapes_root / "val").glob("*.jpg"))[:4]
    want = _predict(legacy, images, tmp_path / "pred_pt")
    got = _predict(shared, images, tmp_path / "pred_st")
    assert want and got == want


def test_readme_snippet_rebuilds_the_detector(tmp_path):
    """The README's five lines (plain safetensors + torch + the pipeline's builder) rebuild the model."""
    from pipeline.tools.export import load_exported, write_export
    from pipeline.train.build import build_model

    cfg = _config("retinanet")
    torch.manual_seed(1)
    model = build_model(cfg, 3, pretrained=False).eval()
    write_export(tmp_path / "model_fp32.safetensors", model.state_dict(), 3, cfg.model_dump(mode="json"), CATEGORIES)
    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"Plain `safetensors` \+ `torch` rebuild\s+the detector:\s+```python\n(.*?)```", readme,
                        re.S).group(1)
    scope = {}
    exec(textwrap.dedent(snippet).replace("runs/NAME", str(tmp_path)), scope)  # our own README's code
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0)) * 255]
    with torch.no_grad():
        want, got, loaded = model(images), scope["model"](images), load_exported(tmp_path / "model_fp32.safetensors")(images)
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(got[0][key], want[0][key])
        torch.testing.assert_close(loaded[0][key], want[0][key])


def test_files_that_are_no_export_are_named(tmp_path):
    from safetensors.torch import save_file

    from pipeline.tools.export import read_export

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(DataError, match=f"{re.escape(str(other))}: not an export .*format='pt'"):
        read_export(other)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=f"{re.escape(str(junk))}: not an export"):
        read_export(junk)
    with pytest.raises(DataError, match="no such file"):
        read_export(tmp_path / "missing.safetensors")
