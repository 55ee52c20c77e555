"""Layer-wise lr decay (``optim.layer_decay``, ViTDet/BEiT) against a table written out by hand,
alone and under AGVM (whose one backbone mu multiplies every backbone layer), ZeRO 0 and 2."""

from __future__ import annotations

import itertools
import json

import pytest

from conftest import run_distributed
from pipeline.config import load_config
from pipeline.errors import ConfigError

DECAY, LR = 0.5, 0.01
# timm's test_vit: 6 blocks. Layer l's lr = lr x 0.5^(7 - l); embeddings l = 0, block i l = i + 1, final norm l = 7.
TABLE = {"cls_token": 0.5 ** 7, "pos_embed": 0.5 ** 7, "patch_embed.": 0.5 ** 7,
         **{f"blocks.{i}.": 0.5 ** (6 - i) for i in range(6)}, "norm.": 1.0}


def _expected_scale(name: str) -> float:
    """The table's scale of a full parameter name: backbone ViT parameters by their timm name, the rest 1."""
    prefix = "backbone.body.vit."
    if not name.startswith(prefix):
        return 1.0
    hits = [scale for key, scale in TABLE.items() if name[len(prefix):].startswith(key)]
    assert len(hits) == 1, name
    return hits[0]


def _overrides(optimizer: str, stage: int) -> list[str]:
    return ["model.detector=faster_rcnn", "model.backbone=test_vit", "model.fpn_channels=16", "model.anchor_scale=4",
            "model.rpn_post_nms_train=100", "model.roi_batch_per_image=32", "model.box_head_dim=32",
            "data.min_size=32", "data.max_size=32", "train.micro_batch=2", "train.grad_accum=2",
            f"train.ds_config=ds_configs/zero{stage}_fp32.json", f"optim.name={optimizer}", f"optim.base_lr={LR}",
            "optim.lr_scaling=none", f"optim.layer_decay={DECAY}", "optim.norm_weight_decay=0",
            "schedule.policy=constant", "schedule.warmup_iters=0", "schedule.max_iters=10", "agvm.tau=1",
            "agvm.start_iter=0", "agvm.clip_norm=0"]


def test_every_backbone_parameter_gets_its_layers_scale():
    from models.detector import build_detector
    from pipeline.optim.optimizers import build_param_groups

    cfg = load_config(None, _overrides("sgd", 0))
    model = build_detector(cfg.model, 3, 32, 32)
    groups = build_param_groups(model, "faster_rcnn", cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            assert g["lr_scale"] == _expected_scale(names[id(p)]), names[id(p)]
            assert g["weight_decay"] == (0 if p.ndim <= 1 else 1e-4), names[id(p)]
            seen.add(id(p))
    assert seen == {id(p) for p in model.parameters()}
    assert {round(g["lr_scale"], 6) for g in groups if g["module"] == "backbone"} == {round(v, 6) for v in TABLE.values()}


def _worker(rank: int, world: int, out: str) -> None:
    from pipeline.data.synthetic import synthetic_batch
    from pipeline.distributed.job import init_distributed
    from pipeline.train.build import build_training

    info = init_distributed()
    got = {}
    for optimizer, stage in [("sgd", 0), ("sgd", 2), ("agvm_sgd", 0), ("agvm_sgd", 2)]:
        cfg = load_config(None, _overrides(optimizer, stage))
        training = build_training(cfg, info, data=False, num_classes=3)
        names = {id(p): n for n, p in training.engine.module.named_parameters()}
        # the groups as built, in order: DeepSpeed's (flattened under ZeRO 2) keep that order
        from pipeline.optim.optimizers import build_param_groups

        built = build_param_groups(training.engine.module, "faster_rcnn", cfg.optim)
        batches = itertools.cycle([synthetic_batch(2, 32, 32, info.device, seed=s, num_classes=3) for s in (1, 2)])
        for _ in range(3):
            training.step(batches)
        mu = dict(training.agvm.mu) if training.agvm else {}
        got[f"{optimizer} zero{stage}"] = {
            "mu": mu, "groups": [{"lr": g["lr"], "module": g["module"], "names": [names[id(p)] for p in b["params"]]}
                                 for g, b in zip(training.engine.optimizer.param_groups, built)]}
    with open(out, "w") as f:
        json.dump(got, f)


def test_group_lrs_follow_the_table_with_and_without_agvm(tmp_path):
    out = tmp_path / "lrs.json"
    run_distributed(_worker, 1, str(out))
    for run, got in json.loads(out.read_text()).items():
        mu = got["mu"]
        if "agvm" in run:
            assert len({round(v, 6) for v in mu.values()}) > 1, "AGVM should have moved the modules apart"
        for g in got["groups"]:
            scales = {_expected_scale(n) for n in g["names"]}
            assert len(scales) == 1, (run, g["names"])  # one layer per group
            want = LR * scales.pop() * mu.get(g["module"], 1.0)
            assert g["lr"] == pytest.approx(want, rel=1e-9), (run, g["module"], g["names"][:2])


def test_layer_decay_needs_a_plain_vit():
    from models.detector import build_detector
    from pipeline.optim.optimizers import build_param_groups

    cfg = load_config(None, ["model.backbone=test_byobnet", "optim.layer_decay=0.8"])
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        build_param_groups(build_detector(cfg.model, 3, 32, 32), "faster_rcnn", cfg.optim)
