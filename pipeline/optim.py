"""Parameter groups per detector module, and the client optimizer handed to DeepSpeed.

Groups carry a ``module`` key (backbone, neck, rpn_head, ...) because AGVM
(Xue et al., 2022) sets a learning rate per module; weight-decay exemptions
(norm layers and biases, when ``optim.norm_weight_decay`` is set) split a module
into sub-groups that keep its name. Which parameters skip weight decay is
decided here, when the groups are built, never inside ``step``: every parameter of a
norm layer, every ``bias``, and any other tensor of at most one dimension (such as
layer-scale gammas).

The client optimizer is one of torch's or timm's, handed to DeepSpeed as is. AGVM's
optimizers (agvm_sgd, agvm_adamw) are torch's SGD and AdamW: the modulation is a
per-module lr that the train step (``pipeline.step``) sets before every step.
"""

from __future__ import annotations

import timm.optim
import torch
from torch import nn

from models.detector import module_parameters
from pipeline.config import ConfigError, OptimConfig

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


# Optimizers that need whole parameters: LARS/LAMB compute a trust ratio per tensor, and
# ZeRO >= 1 hands the optimizer one flat partition per group, so they would be silently wrong.
WHOLE_PARAMETER_OPTIMIZERS = ("lars", "lamb")


def check_zero_support(name: str, zero_stage: int, source: str = "train.ds_config") -> None:
    if zero_stage >= 1 and name in WHOLE_PARAMETER_OPTIMIZERS:
        raise ConfigError(
            f"optim.name={name} needs whole parameter tensors (per-tensor trust ratios), but {source} uses ZeRO "
            f"stage {zero_stage}, which hands the optimizer flat partitions; use a zero0_* ds_config, or "
            "optim.name=sgd/adamw/agvm_sgd/agvm_adamw with ZeRO 1-3")


def build_optimizer(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The client optimizer over ``groups``; each group's lr is set every step by the train step."""
    if cfg.name in ("sgd", "agvm_sgd"):
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name in ("adamw", "agvm_adamw"):
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "lars":  # timm's LARS: trust ratio per tensor, SGD momentum on top
        return timm.optim.Lars(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "lamb":  # global-norm clipping is the engine's job (optim.clip_grad_norm)
        return timm.optim.Lamb(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                               max_grad_norm=None)
    raise ValueError(f"optim.name={cfg.name!r}: expected one of sgd, adamw, agvm_sgd, agvm_adamw, lars, lamb")
