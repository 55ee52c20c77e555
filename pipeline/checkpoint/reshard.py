"""Resume a ZeRO 1-3 checkpoint on another number of ranks, through DeepSpeed's universal checkpoints.

A ZeRO checkpoint holds each rank's slice of the flat fp32 weights and optimizer state; another
number of ranks slices them differently, so DeepSpeed cannot load it as it is. Its universal
format holds every parameter whole (``deepspeed.checkpoint.ds_to_universal``), and an engine
configured with ``checkpoint.load_universal`` slices that anew. Rank 0 converts once, into
``<tag>/universal/`` beside the shards (so it is deleted with the checkpoint, and a second resume
reuses it); then every rank loads from there. The checkpoint directory must be one that every
rank sees (a shared filesystem), as for any resume.

What DeepSpeed 0.19.8 lacks, and what this module does about it:

- The converter knows Adam's state only: ``exp_avg`` and ``exp_avg_sq`` are hard-coded, and SGD's
  ``momentum_buffer`` is a KeyError at every stage. So SGD's momentum travels in Adam's slots: the
  converter reads a staging copy of the optimizer shards in which ``exp_avg`` is the momentum (and
  ``exp_avg_sq`` the same tensor, stored once). After the conversion the files are renamed back
  (ZeRO-1/2, whose loader takes every state file it finds); ZeRO-3's loader reads only Adam's
  names, so there the loaded state is renamed in memory.
- ZeRO-3's loader gives every parameter group one shared ``step`` tensor (AdamW increments it in
  place once per group, so the bias correction would run ahead) and group 0's hyper-parameters
  (the norms' and biases' weight decay 0 would be lost): ``ds_internals.repair_zero3_universal_load``
  undoes both.

tests/test_checkpoint.py checks, for SGD and AdamW at every stage, that the resumed run holds the
saved weights and optimizer state and continues the saved run loss for loss.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from argparse import Namespace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.distributed.ds_internals import repair_zero3_universal_load
from pipeline.errors import ReshardError

log = logging.getLogger(__name__)

UNIVERSAL = "universal"  # the converted copy, inside the checkpoint's tag directory
DONE = "converted.json"  # written once the conversion has finished: a cut-short one is redone
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
SGD_KEY = "momentum_buffer"
# Rank 0 converts while the others wait: hours for a multi-billion-parameter checkpoint on a slow
# filesystem must not trip the process group's default 30-minute timeout.
CONVERSION_TIMEOUT = timedelta(hours=6)


def needed(saved: dict | None, world: int, zero_stage: int) -> bool:
    """Whether resuming this checkpoint on ``world`` ranks goes through the universal format."""
    return saved is not None and zero_stage > 0 and saved["world_size"] != world


def with_universal_load(ds_config: dict) -> dict:
    """The engine's DeepSpeed config for loading a universal checkpoint."""
    return dict(ds_config, checkpoint=dict(ds_config.get("checkpoint", {}), load_universal=True))


def prepare(ckpt_dir: Path, tag: str) -> Path:
    """Convert checkpoint ``tag`` to the universal format on rank 0 (unless an earlier resume did);
    every rank returns the converted directory once it is there, or raises rank 0's error."""
    out = ckpt_dir / tag / UNIVERSAL
    waiting = dist.new_group(backend="gloo", timeout=CONVERSION_TIMEOUT)
    error = [None]
    if dist.get_rank() == 0 and not (out / DONE).is_file():
        try:
            convert(ckpt_dir / tag, out)
        except Exception as err:  # every rank stops with rank 0's reason, none waits forever
            error = [f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(error, src=0, group=waiting)
    dist.destroy_process_group(waiting)
    if error[0] is not None:
        raise ReshardError(f"converting checkpoint {ckpt_dir / tag} for another number of ranks failed: {error[0]}")
    return out


def load(engine, ckpt_dir: Path, tag: str, zero_stage: int) -> dict:
    """Load the converted checkpoint into ``engine`` (built ``with_universal_load``); returns the
    client state. The caller restores the RNG state."""
    out = ckpt_dir / tag / UNIVERSAL
    _, client_state = engine.load_checkpoint(str(out.parent), tag=out.name)
    if client_state is None:
        raise ReshardError(f"DeepSpeed could not load {out} (see its message above)")
    if zero_stage == 3:
        sgd = _done(out)["optimizer"] == "sgd"
        saved = torch.load(out / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
        repair_zero3_universal_load(engine, saved["optimizer_state_dict"]["param_groups"],
                                    renames={"exp_avg": SGD_KEY} if sgd else {},
                                    drop=("exp_avg_sq", "step") if sgd else ())
    return client_state


# ---------------------------------------------------------------------------- the conversion (rank 0)

def convert(src: Path, out: Path) -> None:
    """Universal checkpoint of the ZeRO checkpoint in ``src``, written to ``out``."""
    from deepspeed.checkpoint import ds_to_universal

    tic = time.time()
    shutil.rmtree(out, ignore_errors=True)  # a conversion cut short starts over
    shards = sorted(src.glob("*optim_states.pt"))
    if not shards:
        raise ReshardError(f"{src} holds no ZeRO optimizer shards (*optim_states.pt)")
    optimizer, stage3 = _kind_of(shards[0])
    source = src
    if optimizer == "sgd":
        source = out.parent / f"{UNIVERSAL}.staging"
        _stage_sgd(src, source)
    log.info("converting %s to a universal checkpoint for another number of ranks (%s state)", src, optimizer)
    try:
        ds_to_universal.main(Namespace(input_folder=str(source), output_folder=str(out), num_extract_workers=1,
                                       num_merge_workers=1, keep_temp_folder=False, strict=True,
                                       inject_missing_state=True))
    finally:
        if source != src:
            shutil.rmtree(source, ignore_errors=True)
    (out.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; we load by name
    if optimizer == "sgd" and not stage3:
        _rename_states(out, {"exp_avg": SGD_KEY}, drop=("exp_avg_sq",))
    (out / DONE).write_text(json.dumps({"optimizer": optimizer, "seconds": round(time.time() - tic, 1)}))
    log.info("converted in %.1f s: %s", time.time() - tic, out)


def _done(out: Path) -> dict:
    return json.loads((out / DONE).read_text())


def _base_state(shard: dict) -> dict:
    """The client optimizer's per-group state inside one ZeRO optimizer shard (ZeRO-1/2 or 3)."""
    osd = shard["optimizer_state_dict"]
    return (osd["base_optimizer_state"] if "base_optimizer_state" in osd else osd["optimizer_state_dict"])["state"]


def _kind_of(shard_file: Path) -> tuple[str, bool]:
    """('adam' or 'sgd', whether ZeRO-3), from one optimizer shard; other optimizers cannot be converted."""
    shard = torch.load(shard_file, map_location="cpu", weights_only=False, mmap=True)
    stage3 = "base_optimizer_state" not in shard["optimizer_state_dict"]
    state = _base_state(shard)
    keys = set().union(*(s.keys() for s in state.values())) if state else set()
    if set(ADAM_KEYS) <= keys:
        return "adam", stage3
    if keys - {"step"} == {SGD_KEY}:
        return "sgd", stage3
    raise ReshardError(
        f"{shard_file}: optimizer state {sorted(keys) or 'empty'} cannot be converted (DeepSpeed's converter "
        f"knows {list(ADAM_KEYS)}, this pipeline adds SGD's {SGD_KEY!r}); resume on the saved number of ranks")


def _stage_sgd(src: Path, staging: Path) -> None:
    """A copy of ``src`` for the converter: model files linked, optimizer shards rewritten with the
    momentum in Adam's slots (one tensor, stored once) and a ``step`` for ZeRO-3's loader."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for f in src.glob("*.pt"):
        if not f.name.endswith("optim_states.pt"):
            (staging / f.name).symlink_to(f.resolve())
    for f in src.glob("*optim_states.pt"):
        shard = torch.load(f, map_location="cpu", weights_only=False)
        stage3 = "base_optimizer_state" not in shard["optimizer_state_dict"]
        for state in _base_state(shard).values():
            state["exp_avg"] = state["exp_avg_sq"] = state[SGD_KEY]
            if stage3:
                state.setdefault("step", torch.tensor(0.0))  # ZeRO-3's loader reads group 0's step
        torch.save(shard, staging / f.name)


def _rename_states(out: Path, renames: dict[str, str], drop: tuple[str, ...]) -> None:
    """Rename each parameter's state files in a universal checkpoint (``zero/<param>/<state>.pt``)."""
    for param_dir in (out / "zero").iterdir():
        if not param_dir.is_dir():
            continue
        for old, new in renames.items():
            if (param_dir / f"{old}.pt").is_file():
                (param_dir / f"{old}.pt").rename(param_dir / f"{new}.pt")
        for name in drop:
            (param_dir / f"{name}.pt").unlink(missing_ok=True)
