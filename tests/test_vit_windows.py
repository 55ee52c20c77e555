"""ViTDet's windowed attention (``model.vit_window``, ``model.vit_global_blocks``, models/vit.py).

Truths: a window that covers the whole token grid is the global model (bit for bit without
padding; with padding the masked keys take no part, so equal to float rounding); with windows,
autograd shows each output token depends only on the pixels of its own window (a model without
prefix tokens, every block windowed), while one global block spreads it; whole training runs with
activation checkpointing under ZeRO-3 train like the global model when the window covers the grid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_distributed, tiny_overrides
from models.errors import ModelConfigError
from models.vit import ViTBody, create_vit_body, vitdet_global_blocks

PATCH = 16  # timm's test_vit


def _body(**timm_kwargs) -> ViTBody:
    torch.manual_seed(0)
    return create_vit_body("test_vit", timm_kwargs).eval()


def test_vitdet_global_blocks_are_the_last_of_each_quarter():
    assert vitdet_global_blocks(12) == (2, 5, 8, 11)
    assert vitdet_global_blocks(24) == (5, 11, 17, 23)
    assert vitdet_global_blocks(40) == (9, 19, 29, 39)


@pytest.mark.parametrize("height,width", [(64, 64), (64, 96)], ids=["square", "padded"])
def test_one_window_over_the_whole_grid_is_the_global_model(height, width):
    body = _body()
    assert body.vit.num_prefix_tokens == 1  # the class token joins every window
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        want = body(x)[0]
        got = ViTBody(body.vit, window=max(height, width) // PATCH, global_blocks=())(x)[0]
    if height == width:
        assert torch.equal(got, want)
    else:  # the grid is padded to the window: its keys are masked (unmasked, they change every output)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _receptive_field(body: ViTBody, token: tuple[int, int], hw=(96, 96)) -> torch.Tensor:
    """Which input pixels the output token at ``token`` (grid row, column) depends on."""
    x = torch.randn(1, 3, *hw, requires_grad=True)
    out = body(x)[0][0, :, token[0], token[1]]
    (out * torch.randn(out.shape)).sum().backward()  # a plain sum of the final LayerNorm's output is constant
    return x.grad.abs().sum(1)[0] > 0


def test_each_token_of_a_windowed_model_depends_only_on_its_window():
    body = _body(class_token=False)  # no prefix tokens: nothing else carries information across windows
    assert body.vit.num_prefix_tokens == 0
    windowed = ViTBody(body.vit, window=2, global_blocks=())  # a 6 x 6 grid, 3 x 3 windows of 2 x 2 tokens
    for token, (rows, cols) in [((0, 0), (slice(0, 32), slice(0, 32))), ((3, 4), (slice(32, 64), slice(64, 96)))]:
        field = _receptive_field(windowed, token)
        inside = torch.zeros_like(field)
        inside[rows, cols] = True
        assert field[inside].all() and not field[~inside].any(), token
    one_global = ViTBody(body.vit, window=2, global_blocks=(3,))
    assert _receptive_field(one_global, (0, 0)).all()  # the test can tell: a global block sees everything


def test_windows_are_refused_where_they_cannot_apply():
    with pytest.raises(ModelConfigError, match="model.vit_global_blocks"):
        create_vit_body("test_vit", {}, window=2, global_blocks=(99,))
    with pytest.raises(ModelConfigError, match="model.vit_window"):
        create_vit_body("eva02_tiny_patch14_224", {}, window=2)  # rotary embedding over the whole grid
    from models.detector import build_backbone
    from pipeline.config import load_config

    cfg = load_config(None, ["model.backbone=test_byobnet", "model.vit_window=14"]).model
    with pytest.raises(ModelConfigError, match="plain ViT"):
        build_backbone(cfg)


def _training_worker(rank: int, world: int, out: str) -> None:
    from test_levers import VIT, _run

    base = ["model.activation_checkpointing=true"]  # _run's ViT images: 32 x 32, a 2 x 2 token grid
    torch.save({"global": _run(VIT, 3, "sgd", base),
                "whole_grid_window": _run(VIT, 3, "sgd", base + ["model.vit_window=2", "model.vit_global_blocks=[]"]),
                "windows": _run(VIT, 3, "sgd", base + ["model.vit_window=1", "model.vit_global_blocks=[1]"])}, out)


def test_windowed_training_with_checkpointing_under_zero3(tmp_path):
    out = tmp_path / "runs.pt"
    run_distributed(_training_worker, 1, str(out))
    runs = torch.load(out, weights_only=False)
    plain, whole = runs["global"], runs["whole_grid_window"]
    assert whole["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    for name, w in plain["weights"].items():
        torch.testing.assert_close(whole["weights"][name], w, rtol=0, atol=1e-5, msg=name)
    windows = runs["windows"]["losses"]
    assert all(torch.isfinite(torch.tensor(windows))) and windows != pytest.approx(plain["losses"], rel=1e-4)


def test_the_shipped_vitdet_config_trains_a_few_iterations(shapes_root, tmp_path):
    """configs/coco_vitdet_b.yaml at tiny size: its recipe (windows, layer decay, AdamW, checkpointing)
    on the embedded shapes data, with AdamW and with AGVM-AdamW (and a weight EMA). The start-up block
    names the recipe: windows, layer decay, large-scale jitter, EMA, AGVM."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    for optimizer, extra in [("adamw", []), ("agvm_adamw", ["train.grad_accum=2", "agvm.start_iter=0",
                                                           "train.ema_decay=0.99"])]:
        cmd = [sys.executable, str(REPO / "launch/train.py"), "--config", str(REPO / "configs/coco_vitdet_b.yaml"),
               *tiny_overrides(shapes_root, tmp_path / optimizer, "faster_rcnn"), "model.backbone=test_vit",
               "model.vit_window=2", "train.ds_config=ds_configs/zero1_fp32.json", "train.evaluate=false",
               "data.train_images=train", "data.train_ann=annotations/instances_train.json", "data.val_images=val",
               "data.val_ann=annotations/instances_val.json",
               f"optim.name={optimizer}", "schedule.policy=constant", *extra]
        done = subprocess.run(cmd, cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((tmp_path / optimizer / "run" / "run_summary.json").read_text())
        assert summary["iterations"] == 4 and not summary["diverged"], summary
        block = done.stderr[done.stderr.index("what runs:"):]
        assert "windows of 2x2 tokens, global blocks [" in block, block
        assert "layer decay               0.7" in block and "large-scale jitter x0.1-2 then a 96x96 crop" in block
        assert "activation checkpointing  True" in block
        if optimizer == "agvm_adamw":
            assert "EMA                       decay 0.99" in block and "agvm_adamw: tau" in block, block
        else:
            assert "EMA                       off" in block and "AGVM                      off" in block, block
