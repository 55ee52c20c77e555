"""Consolidate a run's DeepSpeed checkpoint (any ZeRO stage) into one fp32 export to share.

    python launch/export.py runs/NAME [--tag iter_00001000] [--out FILE] [--weights auto|ema|live]

Uses DeepSpeed's own ``zero_to_fp32`` consolidation and writes one safetensors file (default
``runs/NAME/model_fp32.safetensors``): the fp32 weights, and in its metadata the experiment config,
``num_classes`` and the categories as JSON. Nothing in it is code: safetensors holds tensors and
strings only, so a file received from elsewhere cannot run anything when it is read (a pickled
``.pt`` can). The export is checked to load, strictly, into a freshly built model;
``load_exported`` rebuilds the model for inference from that file alone. Older ``.pt`` exports
still load, through ``torch.load(weights_only=True)``, which refuses any file that needs more than
tensors and plain containers.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.checkpoint.manager import choose, complete_tags
from pipeline.config import ExperimentConfig, load_config
from pipeline.distributed.ds_internals import count_parameters
from pipeline.errors import DataError
from pipeline.optim.ema import EMA_FILE
from pipeline.train.build import build_model


def _fresh_model(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    # No pretrained weights: every weight comes from the export, so its file alone rebuilds the model.
    return build_model(cfg, num_classes, pretrained=False)


def consolidated_state_dict(run_dir: Path, tag: Optional[str] = None, weights: str = "auto") -> dict[str, torch.Tensor]:
    """Parameters gathered from the ZeRO shards plus the module's buffers (BN statistics), fp32.
    ``weights``: ema (the checkpoint's weight EMA, ``pipeline.optim.ema``; its buffers are the live ones),
    live (the trained weights themselves), auto (ema when the checkpoint has one)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir = run_dir / "checkpoints"
    if tag is not None and not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"--tag {tag}: no such checkpoint in {ckpt_dir}; complete ones: "
                                f"{complete_tags(ckpt_dir) or 'none'}")
    tag = tag or choose(ckpt_dir)  # the newest complete one: DeepSpeed's `latest` may name a save cut short
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint: is {run_dir} a run directory with checkpoints?")
    folder = ckpt_dir / tag
    ema_file = folder / EMA_FILE
    if weights == "ema" and not ema_file.is_file():
        raise FileNotFoundError(f"{ema_file} not found: the run kept no weight EMA (train.ema_decay); use "
                                "--weights live")
    if not any(folder.glob("*optim_states.pt")):  # ZeRO-0: the whole module in one file, nothing to gather
        module = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    if weights != "live" and ema_file.is_file():
        state.update(torch.load(ema_file, map_location="cpu", weights_only=True)["state_dict"])
    return state


EXPORT_FORMAT = "megdet-agvm-export/1"  # the safetensors metadata's "format"
EXPORT_SUFFIX = ".safetensors"


def export_fp32(run_dir: Path, out: Optional[Path] = None, tag: Optional[str] = None, weights: str = "auto") -> Path:
    """Write ``run_dir``'s checkpoint ``tag`` (default: the newest complete one) as an fp32 export."""
    cfg = load_config(run_dir / "config.yaml")
    facts = json.loads((run_dir / "model.json").read_text())
    num_classes = facts["num_classes"]
    state = consolidated_state_dict(run_dir, tag, weights)
    _fresh_model(cfg, num_classes).load_state_dict(state, strict=True)  # fails loudly on any mismatch
    # categories: label i + 1 is categories[i] (runs before they were recorded have none)
    return write_export(out or run_dir / f"model_fp32{EXPORT_SUFFIX}", state, num_classes, cfg.model_dump(mode="json"),
                        facts.get("categories"))


def write_export(path: Path, state: dict[str, torch.Tensor], num_classes: int, config: dict,
                 categories: Optional[list[dict]]) -> Path:
    """``state`` as a safetensors file, with the config, class count and categories as JSON metadata."""
    seen, tensors = set(), {}
    for name, tensor in state.items():  # safetensors stores each tensor once: copy any that share storage
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        tensors[name] = tensor.detach().clone().contiguous() if key in seen else tensor.detach().contiguous()
        seen.add(key)
    metadata = {"format": EXPORT_FORMAT, "num_classes": str(num_classes), "config": json.dumps(config),
                "categories": json.dumps(categories)}
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def _not_an_export(path: Path, why: str) -> DataError:
    return DataError(f"{path}: not an export of python launch/export.py ({why})")


def _read_safetensors(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != EXPORT_FORMAT:
            raise _not_an_export(path, f"its safetensors metadata has format={meta.get('format')!r}, not "
                                       f"{EXPORT_FORMAT!r}")
        return {"model": load_file(str(path)), "num_classes": int(meta["num_classes"]),
                "config": json.loads(meta["config"]), "categories": json.loads(meta.get("categories", "null"))}
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise _not_an_export(path, f"safetensors: {str(err).splitlines()[0][:200]}") from None


def _read_legacy_pt(path: Path) -> dict:
    """An export written before safetensors (a ``torch.save`` dict), read without running any code."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only's refusal: the file asks for code to run
        raise DataError(f"{path}: refused: reading it would need a full unpickler, which can run code from the "
                        f"file ({str(err).splitlines()[0][:200]}). Exports are read as tensors only; re-export "
                        "the run with python launch/export.py RUN_DIR (safetensors)") from None
    except Exception as err:  # torch's zip and pickle readers raise many kinds
        raise _not_an_export(path, f"torch.load: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(blob, dict) or not {"model", "num_classes", "config"} <= set(blob):
        raise _not_an_export(path, "it holds no model, num_classes and config")
    return blob


def read_export(path: Path) -> dict:
    """An export's contents: ``model`` (state dict), ``num_classes``, ``config``, ``categories``. No code
    from the file runs: safetensors, or a legacy ``.pt`` through ``torch.load(weights_only=True)``.
    DataError naming ``path`` when it is missing, refused, or not an export."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as f:
        zip_or_pickle = f.read(2) in (b"PK", b"\x80\x02")  # torch.save's zip archive, or the legacy pickle
    return _read_legacy_pt(path) if zip_or_pickle else _read_safetensors(path)


def model_from_export(blob: dict) -> nn.Module:
    """The model in eval mode from ``read_export``'s contents (no DeepSpeed, no run directory needed)."""
    cfg = ExperimentConfig.model_validate(blob["config"])
    model = _fresh_model(cfg, blob["num_classes"])
    model.load_state_dict(blob["model"], strict=True)
    return model.eval()


def load_exported(path: Path) -> nn.Module:
    """The model in eval mode from an exported file."""
    return model_from_export(read_export(path))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/export.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--out", type=Path, help="output file (default: <run_dir>/model_fp32.safetensors)")
    parser.add_argument("--weights", choices=["auto", "ema", "live"], default="auto",
                        help="the weight EMA (train.ema_decay) or the trained weights; auto: the EMA when kept")
    args = parser.parse_args(argv)
    out = export_fp32(args.run_dir, args.out, args.tag, args.weights)
    model = load_exported(out)
    print(f"wrote {out}: {count_parameters(model):,} parameters, loads strictly into a fresh model")
    return 0


def cli() -> None:
    """The command (``launch/export.py``): ``main`` with its exit status."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
