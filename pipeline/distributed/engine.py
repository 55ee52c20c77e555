"""The DeepSpeed engine: ``deepspeed.initialize`` with our client optimizer, and the context that
builds a model already partitioned under ZeRO-3.

The DeepSpeed dict it is built from comes from ``pipeline.distributed.ds_config``; the process
group it joins from ``pipeline.distributed.job``; checkpoints on disk are
``pipeline.checkpoint.manager``'s; what DeepSpeed does not offer publicly is in
``pipeline.distributed.ds_internals``.
"""

from __future__ import annotations

import logging

import deepspeed
import torch

from pipeline.distributed.ds_config import zero_stage
from pipeline.distributed.ds_internals import check_version, load_checkpoints_memory_mapped, skip_single_rank_allreduce

log = logging.getLogger(__name__)


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """``deepspeed.initialize`` with our client optimizer; returns the engine."""
    check_version()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    load_checkpoints_memory_mapped(engine)
    skip_single_rank_allreduce(engine)
    return engine


def model_init_context(ds_config: dict, enabled: bool):
    """Build the model inside this context to create it already partitioned under ZeRO-3
    (``deepspeed.zero.Init``): no rank ever holds the whole fp32 model."""
    return deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=enabled and zero_stage(ds_config) == 3)
