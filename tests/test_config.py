"""Experiment config: validation errors name the file and the field."""

from __future__ import annotations

import pytest

from pipeline.config import dump_config, load_config
from pipeline.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.micro_batch=4", "optim.name=adamw", "schedule.milestones=[3, 5]"])
    assert cfg.train.micro_batch == 4 and cfg.optim.name == "adamw" and cfg.schedule.milestones == (3, 5)


def test_unknown_key_names_the_field(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("optim:\n  base_lr: 0.1\n  momentun: 0.9\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert "optim.momentun: unknown key" in str(err.value) and str(f) in str(err.value)


def test_malformed_yaml_names_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train:\n  micro_batch: [2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML"):
        load_config(f)


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match=r"train.micro_batch: .*greater than 0"):
        load_config(None, ["train.micro_batch=0"])
    with pytest.raises(ConfigError, match=r"model.detector"):
        load_config(None, ["model.detector=yolo"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["train.micro_batch"])
    with pytest.raises(ConfigError, match="data.max_size must be >= data.min_size"):
        load_config(None, ["data.min_size=800", "data.max_size=600"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")


@pytest.mark.parametrize("source, overrides", [
    (None, ["model.backbone=convnext_tiny", "train.run_name=x"]),
    ("configs/shapes_default.yaml", []),  # MegDet's normal policy: its fixed epochs are dumped too
    (None, ["schedule.policy=long", "schedule.warmup_factor=auto"]),
])
def test_resolved_config_round_trips(tmp_path, source, overrides):
    """A run's config.yaml (every field, resolved) loads back to the same config: export and
    launch/evaluate.py rebuild the model from it."""
    cfg = load_config(source, overrides)
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_shipped_configs_validate():
    from conftest import REPO

    for f in sorted((REPO / "configs").glob("*.yaml")):
        load_config(f)


def test_a_run_config_with_an_absolute_agvm_start_reads_back(tmp_path):
    """The billion check found it: a run's config.yaml states every field, so start_iter came back
    beside the default start_after_warmup=0 and export refused its own run's config."""
    from pipeline.config import dump_config, load_config
    from pipeline.errors import ConfigError

    cfg = load_config(None, ["optim.name=agvm_sgd", "agvm.start_iter=5"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").agvm.start_iter == 5
    # and so do the runs written when the default start_after_warmup was 0
    old = (tmp_path / "config.yaml").read_text().replace("start_after_warmup: 100", "start_after_warmup: 0")
    assert "start_after_warmup: 0" in old
    (tmp_path / "old.yaml").write_text(old)
    assert load_config(tmp_path / "old.yaml").agvm.start_iter == 5
    with pytest.raises(ConfigError, match="start_after_warmup"):
        load_config(None, ["optim.name=agvm_sgd", "agvm.start_iter=5", "agvm.start_after_warmup=3"])
