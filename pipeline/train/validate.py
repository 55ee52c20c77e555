"""The whole experiment checked for a launch shape, before any process group exists.

The config schema (``pipeline.config``) checks each field on its own; what depends on the
world size, the machines, the ds_config file or the dataset on disk is checked here, for a
given number of ranks and ranks per machine. ``launch/train.py`` runs it before the process
group forms, and the study runner over every point before the first one starts, so a
configuration error costs seconds, not a queue slot. Every problem found is reported at once,
each naming the key, the value and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from models.detector import MODULE_PREFIXES, check_backbone_name
from pipeline.config import ExperimentConfig
from pipeline.distributed.ds_config import engine_config, zero_stage
from pipeline.distributed.norm import bn_group_layout
from pipeline.errors import ConfigError, ModelConfigError
from pipeline.optim.agvm import check_halves, check_loss_scaling
from pipeline.optim.optimizers import check_zero_support


def validate(cfg: ExperimentConfig, world: int, ranks_per_node: int) -> None:
    """Raise one ConfigError listing every problem of ``cfg`` for ``world`` ranks, ``ranks_per_node``
    on each machine (the last machine may hold fewer)."""
    if world < 1 or ranks_per_node < 1:
        raise ValueError(f"world={world}, ranks_per_node={ranks_per_node}: both must be >= 1")
    errors: list[str] = []

    def check(fn: Callable[[], None]) -> None:
        try:
            fn()
        except (ConfigError, ModelConfigError) as err:
            errors.append(str(err))

    check(lambda: _check_engine(cfg, world))
    check(lambda: check_backbone_name(cfg.model.backbone))
    if cfg.optim.name.startswith("agvm"):
        check(lambda: check_halves(world, cfg.train.grad_accum))
        modules = MODULE_PREFIXES[cfg.model.detector]
        if cfg.agvm.anchor not in modules:
            errors.append(f"agvm.anchor={cfg.agvm.anchor!r} is not a module of {cfg.model.detector}: use one of "
                          f"{list(modules)} (the backbone is AGVM's anchor)")
    if cfg.model.norm == "cgbn":
        nodes = [rank // ranks_per_node for rank in range(world)]
        check(lambda: bn_group_layout(cfg.model.bn_group, nodes, cfg.train.micro_batch, cfg.model.bn_images))
    errors += _missing_files(cfg)
    if errors:
        shape = f"{world} rank(s), {min(world, ranks_per_node)} per machine"
        raise ConfigError(f"the experiment cannot run on {shape}:\n" + "\n".join(f"  - {e}" for e in errors))


def _check_engine(cfg: ExperimentConfig, world: int) -> None:
    ds = engine_config(cfg, world)
    check_zero_support(cfg.optim.name, zero_stage(ds), str(cfg.train.ds_config))
    check_loss_scaling(cfg.optim.name, ds, str(cfg.train.ds_config))


def _missing_files(cfg: ExperimentConfig) -> list[str]:
    """The dataset (unless the run writes the embedded one) and the pretrained weights."""
    d, missing = cfg.data, []
    wanted: list[tuple[str, Path, Callable[[Path], bool]]] = []
    if d.source == "coco":
        wanted += [("data.train_images", d.path(d.train_images), Path.is_dir),
                   ("data.train_ann", d.path(d.train_ann), Path.is_file),
                   ("data.val_images", d.path(d.val_images), Path.is_dir),
                   ("data.val_ann", d.path(d.val_ann), Path.is_file)]
    if cfg.model.pretrained is not None:
        wanted.append(("model.pretrained", Path(cfg.model.pretrained), Path.is_file))
    for key, path, exists in wanted:
        if not exists(path):
            kind = "directory" if exists is Path.is_dir else "file"
            hint = " (relative to data.root; set data.root or give an absolute path)" if key.startswith("data.") \
                else " (weights load from a local file)"
            missing.append(f"{key}: {kind} {path} does not exist{hint}")
    return missing
