"""Validation of a whole experiment for a launch shape, before any process starts: each problem
names the key, the value and the fix, and all of them are reported at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.train.validate import validate


def _errors(overrides: list[str], world: int, per_node: int) -> str:
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, overrides), world, per_node)
    return str(err.value)


def test_default_experiment_is_valid_everywhere():
    for world, per_node in ((1, 1), (2, 2), (16, 8), (64, 8)):
        validate(load_config(None, []), world, per_node)


def test_whole_tensor_optimizer_under_zero_partitions():
    message = _errors(["optim.name=lars", "train.ds_config=ds_configs/zero2_fp32.json"], 2, 2)
    assert "optim.name=lars" in message and "zero2_fp32.json" in message and "ZeRO stage 2" in message
    assert "use a zero0_* ds_config" in message
    validate(load_config(None, ["optim.name=lars", "train.ds_config=ds_configs/zero0_fp32.json"]), 2, 2)


def test_agvm_needs_two_halves():
    message = _errors(["optim.name=agvm_sgd"], 1, 1)
    assert "train.grad_accum=1" in message and "train.grad_accum >= 2" in message
    validate(load_config(None, ["optim.name=agvm_sgd"]), 2, 2)  # halves are ranks
    validate(load_config(None, ["optim.name=agvm_adamw", "train.grad_accum=2"]), 1, 1)  # or micro-batches
    assert "agvm.anchor='trunk'" in _errors(["optim.name=agvm_sgd", "agvm.anchor=trunk"], 2, 2)


def test_agvm_adamw_refuses_fp16_loss_scaling(tmp_path):
    """The halves would carry the loss scale, the second moment that preconditions them would not."""
    fp16 = tmp_path / "fp16.json"
    fp16.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    message = _errors(["optim.name=agvm_adamw", f"train.ds_config={fp16}"], 2, 2)
    assert "optim.name=agvm_adamw" in message and "fp16.json enables fp16" in message and "use bf16" in message
    validate(load_config(None, ["optim.name=agvm_sgd", f"train.ds_config={fp16}"]), 2, 2)  # a cosine: scale-free


def test_bn_groups_must_fit_the_machines():
    message = _errors(["model.bn_group=3"], 16, 8)
    assert "model.bn_group=3" in message and "machine 0's 8 ranks" in message and "divisor of 8" in message
    assert "model.bn_images=12" in _errors(["model.bn_images=12", "train.micro_batch=2"], 16, 8)  # 6 ranks
    validate(load_config(None, ["model.bn_images=16", "train.micro_batch=2"]), 16, 8)  # 8 ranks: one node
    validate(load_config(None, ["model.bn_group=3", "model.norm=frozen"]), 16, 8)  # no BN groups at all


def test_ds_config_contradictions(tmp_path):
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 1}}))
    message = _errors([f"train.ds_config={batch}", "train.micro_batch=2"], 8, 8)
    assert "train_batch_size=8 but the experiment gives 16" in message and "remove train_batch_size" in message
    validate(load_config(None, [f"train.ds_config={batch}", "train.micro_batch=2"]), 4, 4)
    bf16 = tmp_path / "bf16.json"
    bf16.write_text(json.dumps({"bf16": {"enabled": True}}))
    assert "torch_autocast" in _errors([f"train.ds_config={bf16}"], 1, 1)
    assert "does not exist" in _errors([f"train.ds_config={tmp_path / 'none.json'}"], 1, 1)


def test_dataset_and_weights_must_exist(tmp_path, shapes_root):
    missing = tmp_path / "nowhere"
    message = _errors(["data.source=coco", f"data.root={missing}", f"model.pretrained={tmp_path / 'w.pth'}"], 1, 1)
    for key in ("data.train_images", "data.train_ann", "data.val_images", "data.val_ann", "model.pretrained"):
        assert key in message
    assert str(missing / "annotations/instances_train.json") in message
    validate(load_config(None, ["data.source=coco", f"data.root={shapes_root}"]), 1, 1)
    validate(load_config(None, [f"data.root={missing}"]), 1, 1)  # synthetic: the run writes it


def test_every_problem_is_reported_at_once():
    message = _errors(["optim.name=agvm_sgd", "model.bn_group=3", "data.source=coco", "data.root=/nowhere"], 1, 1)
    assert message.startswith("the experiment cannot run on 1 rank(s), 1 per machine:")
    assert "grad_accum" in message and "model.bn_group=3" in message and "data.train_ann" in message


def test_ds_config_presets_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["train.ds_config=ds_configs/zero2_fp32.json"])
    assert cfg.train.ds_config == REPO / "ds_configs/zero2_fp32.json" and cfg.train.ds_config.is_file()
    assert load_config(None, []).train.ds_config == REPO / "ds_configs/zero0_fp32.json"
    own = tmp_path / "ds_configs/zero2_fp32.json"  # a file of the user's own, here, wins
    own.parent.mkdir()
    own.write_text("{}")
    assert load_config(None, ["train.ds_config=ds_configs/zero2_fp32.json"]).train.ds_config == own


def test_launcher_refuses_before_a_process_group_forms(tmp_path):
    """launch/train.py from another directory, as the 2nd rank of a 2-rank job whose master does not
    exist: a bad experiment must exit 2 with the message, not wait for the rendezvous."""
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="9", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "optim.name=lars",
                           "train.ds_config=ds_configs/zero3_fp32.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot run on 2 rank(s), 2 per machine" in proc.stderr and "optim.name=lars" in proc.stderr
