"""Consolidate a run's DeepSpeed checkpoint (any ZeRO stage) into one fp32 state dict.

    python launch/export.py runs/NAME [--tag iter_00001000] [--out FILE] [--weights auto|ema|live]

Uses DeepSpeed's own ``zero_to_fp32`` consolidation, writes ``{"model": state_dict,
"num_classes": N, "config": {...}}`` (default ``runs/NAME/model_fp32.pt``) and checks that
it loads, strictly, into a freshly built model. ``load_exported`` rebuilds the model for
inference from that file alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

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
    if tag is None and not (ckpt_dir / "latest").is_file():
        raise FileNotFoundError(f"{ckpt_dir}/latest not found: is {run_dir} a run directory with checkpoints?")
    folder = ckpt_dir / (tag or (ckpt_dir / "latest").read_text().strip())
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


def export_fp32(run_dir: Path, out: Optional[Path] = None, tag: Optional[str] = None, weights: str = "auto") -> Path:
    cfg = load_config(run_dir / "config.yaml")
    facts = json.loads((run_dir / "model.json").read_text())
    num_classes = facts["num_classes"]
    state = consolidated_state_dict(run_dir, tag, weights)
    _fresh_model(cfg, num_classes).load_state_dict(state, strict=True)  # fails loudly on any mismatch
    out = out or run_dir / "model_fp32.pt"
    # categories: label i + 1 is categories[i] (runs before they were recorded have none)
    torch.save({"model": state, "num_classes": num_classes, "config": cfg.model_dump(mode="json"),
                "categories": facts.get("categories")}, out)
    return out


def read_export(path: Path) -> dict:
    """An export's contents (model, num_classes, config, categories); DataError naming ``path`` when
    it is missing or not an export."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch's zip and pickle readers raise many kinds
        raise DataError(f"{path}: not an export of python launch/export.py "
                        f"(torch.load: {str(err).splitlines()[0][:200]})") from None
    if not isinstance(blob, dict) or not {"model", "num_classes", "config"} <= set(blob):
        raise DataError(f"{path}: not an export of python launch/export.py (it holds no model, num_classes "
                        "and config)")
    return blob


def load_exported(path: Path) -> nn.Module:
    """A model in eval mode from an exported file (no DeepSpeed, no run directory needed)."""
    blob = read_export(path)
    cfg = ExperimentConfig.model_validate(blob["config"])
    model = _fresh_model(cfg, blob["num_classes"])
    model.load_state_dict(blob["model"], strict=True)
    return model.eval()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/export.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tag", help="checkpoint tag (default: the latest)")
    parser.add_argument("--out", type=Path, help="output file (default: <run_dir>/model_fp32.pt)")
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
