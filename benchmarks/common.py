"""What every benchmark shares: synthetic batches, timing, and how a result row is labelled."""

from __future__ import annotations

import itertools
import platform
import subprocess
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.data.synthetic import synthetic_batch  # noqa: F401  (the benchmarks import it from here)
from pipeline.train.build import build_training

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks/results.jsonl"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step after ``warmup`` untimed steps (synchronised at the ends only)."""
    for _ in range(warmup):
        step()
    _sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - tic) / steps


def row_label(device: torch.device) -> dict:
    """Date, commit and device of a result row."""
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit, "device": name}


def pipeline_step(overrides: list[str], info, batch: int, height: int, width: int):
    """Our detector built and stepped as a training run is (``build_training`` and its train step),
    fed one fixed synthetic batch; returns the run and its step function."""
    cfg = load_config(None, overrides + ["schedule.max_iters=1000", "schedule.warmup_iters=0"])
    training = build_training(cfg, info, data=False, num_classes=80)
    batches = itertools.repeat(synthetic_batch(batch, height, width, info.device, seed=info.rank))
    return training, lambda: training.step(batches)


def torchvision_step(hw: tuple[int, int], batch: int, precision: str, device: torch.device):
    """torchvision's ``fasterrcnn_resnet50_fpn`` trained in plain torch (SGD, optional bf16 autocast) on one
    fixed synthetic batch: the reference the benchmarks compare against; returns (model, step).
    ``step()`` returns the loss, on the device."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81, min_size=min(hw),
                                    max_size=max(hw)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images, targets = synthetic_batch(batch, *hw, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step():
        with autocast:
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return model, step
