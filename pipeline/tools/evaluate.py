"""COCO metrics of a run's checkpoint, or of an fp32 export, with COCOeval's full summary.

    python launch/evaluate.py runs/NAME                                  # newest complete checkpoint
    deepspeed --num_gpus 8 launch/evaluate.py runs/NAME --tag iter_00004000
    python launch/evaluate.py --export runs/NAME/model_fp32.safetensors           # one process, CPU or GPU
    python launch/evaluate.py runs/NAME --ann /data/other.json --images /data/other/   # another set

A checkpoint of any ZeRO stage, saved by any number of ranks, is read as DeepSpeed's
``zero_to_fp32`` reads it (each rank gathers the fp32 weights from the shards on disk), so the
evaluation may run on another number of processes than training did; the run's config
(``config.yaml``) rebuilds the model. The validation set is the run's (``data.val_*``) unless
``--ann``/``--images`` name another COCO annotation file and image folder with the same
categories. Evaluated like training evaluates (same batches when the number of processes and
``--batch`` are training's, hence the same metrics), it prints COCOeval's summary and writes
``eval_metrics.json`` (the keys of training's) and ``eval_detections.json`` to ``--out``
(default ``<run>/evaluations/<tag>/``, or beside the export); it never writes into checkpoints.
Extra ``key=value`` arguments override the config (e.g. ``data.workers=4``).
Exit status: 0 done, 2 a missing or unusable input (named).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from pipeline.config import ExperimentConfig, load_config
from pipeline.distributed.job import exit_skipping_teardown, leave_job
from pipeline.errors import ConfigError, DataError
from pipeline.utils.files import write_json

EXIT_INPUT = 2
log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, nargs="?", help="a run directory (its config.yaml and checkpoints/)")
    p.add_argument("--export", type=Path, help="an fp32 export (python launch/export.py) instead of a checkpoint")
    p.add_argument("--tag", help="checkpoint tag, e.g. iter_00004000 (default: the newest complete one)")
    p.add_argument("--ann", type=Path, help="COCO annotation file to evaluate on (default: the run's val set)")
    p.add_argument("--images", type=Path, help="its image folder (with --ann)")
    p.add_argument("--batch", type=int, help="images per forward per process (default: train.micro_batch)")
    p.add_argument("--weights", choices=["auto", "ema", "live"], default="auto",
                   help="a checkpoint's weight EMA (train.ema_decay) or its trained weights; auto: the EMA when kept")
    p.add_argument("--out", type=Path, help="where eval_metrics.json goes (default: see above)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.workers=4")
    args = p.parse_args(argv)
    if (args.run_dir is None) == (args.export is None):
        p.error("give a run directory or --export FILE (one of them)")
    if (args.ann is None) != (args.images is None):
        p.error("--ann and --images go together: an annotation file and its image folder")
    return args


def _inputs(args) -> tuple[ExperimentConfig, int, Path, Optional[str]]:
    """The config, class count and weights source of what is evaluated; raises naming what is missing."""
    overrides = list(args.overrides)
    if args.ann is not None:
        overrides += ["data.source=coco", f"data.val_ann={args.ann.resolve()}", f"data.val_images={args.images.resolve()}"]
    if args.export is not None:
        from pipeline.tools.export import read_export

        blob = read_export(args.export)
        with tempfile.TemporaryDirectory() as tmp:  # the export's config, with the overrides on top
            config_file = Path(tmp) / "config.yaml"
            config_file.write_text(yaml.safe_dump(blob["config"]))
            cfg = load_config(config_file, overrides)
        return cfg, blob["num_classes"], args.export, None
    config_file, model_file = args.run_dir / "config.yaml", args.run_dir / "model.json"
    for f in (config_file, model_file):
        if not f.is_file():
            raise DataError(f"{f} not found: {args.run_dir} is not a run directory (launch/train.py writes both)")
    cfg = load_config(config_file, overrides)
    from pipeline.checkpoint import manager as ckpt

    ckpt_dir = args.run_dir / "checkpoints"
    if args.tag is not None and not (ckpt_dir / args.tag).is_dir():
        raise DataError(f"--tag {args.tag}: no such checkpoint in {ckpt_dir}; complete ones: "
                        f"{ckpt.complete_tags(ckpt_dir) or 'none'}")
    tag = ckpt.choose(ckpt_dir, args.tag)
    if tag is None:
        raise DataError(f"{ckpt_dir} holds no checkpoint to evaluate")
    return cfg, json.loads(model_file.read_text())["num_classes"], args.run_dir, tag


def evaluate_weights(cfg: ExperimentConfig, num_classes: int, source: Path, tag: Optional[str], batch: int,
                     out: Optional[Path], weights: str = "auto") -> dict:
    """Build the model, load the weights, evaluate on every rank; metrics on rank 0 ({} elsewhere)."""
    from pipeline.data.dataset import CocoDetection, check_image_files
    from pipeline.data.loaders import loader as _loader
    from pipeline.data.samplers import eval_batches
    from pipeline.distributed.job import init_distributed
    from pipeline.evaluation.coco import evaluate
    from pipeline.tools.export import consolidated_state_dict, read_export
    from pipeline.train.build import build_model

    info = init_distributed()
    if source.is_file():  # an export
        state = read_export(source)["model"]
        out = out or source.parent / "evaluations" / source.stem
    else:
        state = consolidated_state_dict(source, tag, weights)
        out = out or source / "evaluations" / tag
    model = build_model(cfg, num_classes, pretrained=False)
    model.load_state_dict(state, strict=True)
    del state
    model.to(info.device).eval()
    d = cfg.data
    val = CocoDetection(d.path(d.val_images), d.path(d.val_ann), d.min_size, d.max_size, flip_prob=0.0,
                        with_masks=False, keep_empty=True, check_files=False)
    check_image_files([val])
    if len(val.cat_ids) != num_classes:
        raise DataError(f"{d.path(d.val_ann)} has {len(val.cat_ids)} categories, the model {num_classes}: "
                        "evaluate on an annotation file with the training set's categories")
    loader = _loader(val, eval_batches(len(val), batch, info.world, info.rank), d.workers, cfg.train.seed + info.rank)
    report: list[str] = []
    if info.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(model, loader, val, info.device, cfg.model.detector == "mask_rcnn",
                       cfg.model.detections_per_img, progress=info.rank == 0,
                       detections_file=out / "eval_detections.json" if info.rank == 0 else None, report=report,
                       backend=cfg.train.coco_eval)
    if info.rank == 0:
        write_json(out / "eval_metrics.json", metrics)
        what = f"{source}" + (f" at {tag}" if tag else "")
        print(f"{what} on {d.path(d.val_ann)} ({len(val)} images, {info.world} process(es)):\n" + "\n".join(report)
              + f"\nwrote {out / 'eval_metrics.json'}", flush=True)
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg, num_classes, source, tag = _inputs(args)
        evaluate_weights(cfg, num_classes, source, tag, args.batch or cfg.train.micro_batch, args.out, args.weights)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT
    finally:
        leave_job()
    return 0


def cli() -> None:
    """The command (``launch/evaluate.py``): ``main``, then exit; a finished evaluation without the
    interpreter's teardown (``exit_skipping_teardown``)."""
    code = main()
    exit_skipping_teardown(code, finished=code == 0)


if __name__ == "__main__":
    cli()
