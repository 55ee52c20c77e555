"""Run tracking: Weights & Biases (offline by default) plus a JSON-lines log in the run directory.

Only rank 0 tracks. The JSON-lines file is the durable record (the study runner
and plot commands read it); W&B gets the same dicts. Offline runs land in
``<run_dir>/wandb/`` and can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Optional

from pipeline.config import ExperimentConfig
from pipeline.errors import DataError
from pipeline.utils.files import write_text

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"
WANDB_HISTORY_FILE = "wandb_runs.json"  # the earlier W&B runs of this run directory, after rollbacks


class Tracker:
    """Log scalar dicts to W&B and ``<run_dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, rank: int, resume: bool = False):
        self.active = rank == 0
        self.jsonl: Optional[Path] = run_dir / METRICS_FILE if self.active else None
        self.wandb = None
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.tracking.wandb_mode != "disabled":
            import wandb  # imported lazily: tests and disabled runs skip its start-up cost

            self.wandb = wandb.init(
                mode=cfg.tracking.wandb_mode, project=cfg.tracking.project, entity=cfg.tracking.entity,
                group=cfg.tracking.group, tags=list(cfg.tracking.tags), name=cfg.train.run_name,
                dir=str(run_dir), config=dict(cfg.model_dump(mode="json"), previous_wandb_runs=_history(run_dir)),
                id=_run_id(run_dir), resume="allow" if resume else None)

    def log(self, metrics: dict, step: int) -> None:
        if not self.active:
            return
        record = {"iteration": step, "time": time.time(), **metrics}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def image(self, key: str, path: Path, step: int) -> None:
        """An image file for W&B (``wandb.Image``); the run directory keeps the file itself."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def add_config(self, extra: dict) -> None:
        """Values resolved at start-up (the schedule in iterations) beside the config."""
        if self.wandb is not None:
            self.wandb.config.update(extra, allow_val_change=True)

    def summary(self, metrics: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(metrics)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _run_id(run_dir: Path) -> str:
    """A W&B run id kept in the run directory, so a resumed run continues the same W&B run."""
    id_file = run_dir / WANDB_ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return run_id


def _parse_log(path: Path) -> list[dict]:
    """The records of ``path``. A torn last line (an append cut short by a kill) is dropped with a
    warning; a damaged line before it is an error naming the file and the line."""
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for k, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if k == len(lines) - 1:
                log.warning("%s:%d: torn last record dropped (an append cut short): %r", path, n, line[:80])
                break
            raise DataError(f"{path}:{n}: not a JSON record ({err}); the log is damaged before its last line: "
                            "repair or remove that line") from None
    return records


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / WANDB_HISTORY_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's metrics.jsonl (for plots, studies and tests)."""
    path = Path(run_dir) / METRICS_FILE
    return _parse_log(path) if path.is_file() else []


def truncate_metrics(run_dir: Path, after: int) -> int:
    """On resume, drop the records logged after iteration ``after`` (they are about to be redone),
    rewriting the file atomically: a kill or a full disk here leaves the whole history. Returns how
    many were dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    records = _parse_log(path)
    keep = [r for r in records if r["iteration"] <= after]
    if len(keep) < len(records):
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(records) - len(keep)


def new_wandb_run_after_rollback(run_dir: Path, iteration: int) -> Optional[str]:
    """A resume that redoes logged iterations continues in a new W&B run: W&B keeps a run's steps
    increasing and would drop every re-logged step up to the old last one. The new run's config
    names the earlier runs (``previous_wandb_runs``); ``metrics.jsonl`` stays one file. Returns the
    new id (None when the run has no W&B id yet)."""
    id_file = Path(run_dir) / WANDB_ID_FILE
    if not id_file.is_file():
        return None
    old, new = id_file.read_text().strip(), uuid.uuid4().hex[:12]
    history_file = Path(run_dir) / WANDB_HISTORY_FILE
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    write_text(history_file, json.dumps(history + [{"run_id": old, "until_iteration": iteration}], indent=2))
    write_text(id_file, new)
    log.warning("resuming at iteration %d redoes logged iterations: W&B continues in a new run %s (the earlier "
                "one, %s, keeps what it logged)", iteration, new, old)
    return new


def start_metrics_afresh(run_dir: Path) -> Optional[Path]:
    """A resumed run with no checkpoint to resume starts from iteration 0: the earlier attempt's
    log moves aside (returned), and its summary goes, so records are never logged twice."""
    path = Path(run_dir) / METRICS_FILE
    (Path(run_dir) / "run_summary.json").unlink(missing_ok=True)
    if not path.is_file():
        return None
    old = path.with_name(f"{METRICS_FILE}.before-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(old)
    log.warning("%s held an attempt that saved no checkpoint: moved to %s, logging starts afresh", path, old)
    return old
