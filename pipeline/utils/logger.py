"""Logging that suits a job of many ranks: every rank runs the same code, one of them speaks."""

from __future__ import annotations

import logging

import torch.distributed as dist


def log_dist(logger: logging.Logger, msg: str, *args) -> None:
    """``logger.info(msg, *args)`` on rank 0 only (or without a process group)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info(msg, *args)
