"""Parameter groups per detector module, and the client optimizer handed to DeepSpeed.

Groups carry a ``module`` key (backbone, neck, rpn_head, ...) because AGVM
(Xue et al., 2022) sets a learning rate per module; weight-decay exemptions
(norm layers and biases, when ``optim.norm_weight_decay`` is set) split a module
into sub-groups that keep its name. Which parameters skip weight decay is
decided here, by module type, never by name matching inside ``step``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.detector import module_parameters
from pipeline.config import OptimConfig

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _no_decay_params(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, _NORMS) or name == "bias" or p.ndim <= 1:
                ids.add(id(p))
    return ids


def build_param_groups(model: nn.Module, detector: str, cfg: OptimConfig) -> list[dict]:
    """One group per detector module (two if norm/bias weight decay differs)."""
    exempt = _no_decay_params(model) if cfg.norm_weight_decay is not None else set()
    groups = []
    for module, named in module_parameters(model, detector).items():
        decay = [p for _, p in named if id(p) not in exempt]
        no_decay = [p for _, p in named if id(p) in exempt]
        if decay:
            groups.append({"params": decay, "module": module, "weight_decay": cfg.weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "module": module, "weight_decay": cfg.norm_weight_decay})
    return groups


def build_optimizer(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW over ``groups``; lr is set every step by the schedule."""
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r}: expected one of sgd, adamw")
