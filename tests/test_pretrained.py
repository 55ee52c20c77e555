"""Pretrained backbone weights under ZeRO-3 with ``zero.Init``, on 2 real processes.

Independent truth: timm's own loader (``pretrained_cfg_overlay=dict(file=...)``) on an ordinary,
unpartitioned model in this process; the file's tensors themselves where timm keeps them as they
are. The ViT's checkpoint was saved at another image size, so timm's checkpoint filter has to
resample ``pos_embed``, the case that broke on partitioned parameters (DINOv2/EVA on ViT-g, here
at test size through the same code path).
"""

from __future__ import annotations

import pytest
import timm
import torch

from conftest import run_distributed
from pipeline.config import load_config
from pipeline.distributed.ds_config import engine_config
from pipeline.distributed.ds_internals import gathered, is_partitioned
from pipeline.distributed.job import init_distributed
from pipeline.train.build import build_model

CNN, VIT = "test_byobnet", "test_vit"


def _cfg(backbone: str, pretrained, stage3: bool = True):
    return load_config(None, [
        "model.detector=retinanet", f"model.backbone={backbone}", f"model.pretrained={pretrained}",
        "model.fpn_channels=16", "model.norm=per_gpu", "data.min_size=64", "data.max_size=96",
        "train.micro_batch=1", f"train.ds_config=ds_configs/{'zero3_fp32' if stage3 else 'zero0_fp32'}.json"])


def _build_partitioned(rank: int, world: int, files: dict, result_file: str) -> None:
    info = init_distributed()
    out = {}
    for backbone, file in files.items():
        cfg = _cfg(backbone, file)
        model = build_model(cfg, 3, ds_config=engine_config(cfg, info.world))
        params = dict(model.backbone.body.named_parameters())
        assert all(is_partitioned(p) for p in params.values())
        with gathered(list(params.values())):
            out[backbone] = {n: p.detach().clone() for n, p in params.items()}
    if rank == 0:
        torch.save(out, result_file)


def _timm_loaded(backbone: str, file) -> dict[str, torch.Tensor]:
    overlay = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    if backbone == VIT:
        model = timm.create_model(VIT, num_classes=0, global_pool="", dynamic_img_size=True, dynamic_img_pad=True,
                                  **overlay)
        return {f"vit.{n}": p for n, p in model.named_parameters()}
    model = timm.create_model(CNN, features_only=True, **overlay)
    return dict(model.named_parameters())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(123)
    files = {CNN: root / "cnn.pth", VIT: root / "vit.pth"}
    torch.save(timm.create_model(CNN).state_dict(), files[CNN])
    torch.save(timm.create_model(VIT, img_size=96).state_dict(), files[VIT])  # pos_embed must be resampled
    return files


def test_pretrained_weights_reach_partitioned_parameters(tmp_path, checkpoints):
    result_file = str(tmp_path / "gathered.pt")
    run_distributed(_build_partitioned, 2, checkpoints, result_file)
    got = torch.load(result_file)
    for backbone, file in checkpoints.items():
        want = _timm_loaded(backbone, file)
        assert got[backbone].keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(got[backbone][name], value, rtol=0, atol=0, msg=f"{backbone}: {name}")
    vit_file = torch.load(checkpoints[VIT])
    assert got[VIT]["vit.pos_embed"].shape != vit_file["pos_embed"].shape  # resampled, not copied
    torch.testing.assert_close(got[VIT]["vit.blocks.0.attn.qkv.weight"], vit_file["blocks.0.attn.qkv.weight"],
                               rtol=0, atol=0)
    fresh = dict(timm.create_model(CNN, features_only=True).named_parameters())
    assert any(not torch.equal(got[CNN][n], fresh[n]) for n in fresh), "the file's values never arrived"


def _build_mismatched(rank: int, world: int, file: str, result_file: str) -> None:
    info = init_distributed()
    cfg = _cfg(CNN, file)
    try:
        build_model(cfg, 3, ds_config=engine_config(cfg, info.world))
    except RuntimeError as err:
        with open(f"{result_file}.{rank}", "w") as f:
            f.write(str(err))


def test_a_file_that_does_not_fit_fails_on_every_rank_with_its_name(tmp_path, checkpoints):
    result_file = str(tmp_path / "err")
    run_distributed(_build_mismatched, 2, str(checkpoints[VIT]), result_file)
    for rank in range(2):
        message = open(f"{result_file}.{rank}").read()
        assert f"model.pretrained={checkpoints[VIT]} does not fit backbone '{CNN}'" in message
