"""Parameter groups per detector module, and the client optimizer handed to DeepSpeed.

Groups carry a ``module`` key (backbone, neck, rpn_head, ...) because AGVM
(Xue et al., 2022) sets a learning rate per module; weight-decay exemptions
(norm layers and biases, when ``optim.norm_weight_decay`` is set) split a module
into sub-groups that keep its name. Which parameters skip weight decay is
decided here, when the groups are built, never inside ``step``: every parameter of a
norm layer, every ``bias``, and any other tensor of at most one dimension (such as
layer-scale gammas).

Layer-wise lr decay (``optim.layer_decay``, ViTDet/BEiT) splits a plain-ViT backbone further,
one sub-group per layer with an ``lr_scale``: embeddings are layer 0, block i layer i + 1, the
final norm layer depth + 1, and layer l's lr is the module's lr x decay^(depth + 1 - l). The
sub-groups keep the module's name, so AGVM modulates them with the backbone's one mu and
estimates one Phi over all of them.

The client optimizer is one of torch's or timm's, handed to DeepSpeed as is. AGVM's
optimizers (agvm_sgd, agvm_adamw) are torch's SGD and AdamW: the modulation is a
per-module lr that the train step (``pipeline.train.step``) sets before every step.
"""

from __future__ import annotations

import timm.optim
import torch
from torch import nn

from models.detector import module_parameters
from pipeline.config import OptimConfig
from pipeline.errors import ConfigError

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _no_decay_params(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, _NORMS) or name == "bias" or p.ndim <= 1:
                ids.add(id(p))
    return ids


def build_param_groups(model: nn.Module, detector: str, cfg: OptimConfig) -> list[dict]:
    """One group per detector module (two if norm/bias weight decay differs); with
    ``cfg.layer_decay``, the backbone's split further by layer, each with its ``lr_scale``."""
    exempt = _no_decay_params(model) if cfg.norm_weight_decay is not None else set()
    layers = _vit_layers(model, cfg.layer_decay) if cfg.layer_decay is not None else {}
    groups = []
    for module, named in module_parameters(model, detector).items():
        by_layer: dict[tuple, list] = {}  # (scale, decay?) -> params, in parameter order
        for name, p in named:
            scale = layers.get(name, 1.0) if module == "backbone" else 1.0
            by_layer.setdefault((scale, id(p) not in exempt), []).append(p)
        for (scale, decays), params in sorted(by_layer.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
            group = {"params": params, "module": module,
                     "weight_decay": cfg.weight_decay if decays else cfg.norm_weight_decay}
            if layers:
                group["lr_scale"] = scale
            groups.append(group)
    return groups


# A plain ViT's parameters before its first block (timm's names, relative to the ViT).
_EMBEDDINGS = ("patch_embed.", "pos_embed", "cls_token", "reg_token", "norm_pre.")


def _vit_layers(model: nn.Module, decay: float) -> dict[str, float]:
    """Parameter name -> lr scale of ViTDet's layer-wise decay, for the plain ViT in ``model``."""
    from models.vit import ViTBody

    body = next(((name, m) for name, m in model.named_modules() if isinstance(m, ViTBody)), None)
    if body is None:
        raise ConfigError(f"optim.layer_decay={decay}: layer-wise lr decay is for plain-ViT backbones (their layers "
                          "are transformer blocks); this backbone has none. Remove optim.layer_decay")
    prefix, depth = f"{body[0]}.vit.", len(body[1].vit.blocks)
    scales = {}
    for name, _ in model.named_parameters():
        if not name.startswith(prefix):
            continue
        inside = name[len(prefix):]
        if inside.startswith(_EMBEDDINGS):
            layer = 0
        elif inside.startswith("blocks."):
            layer = int(inside.split(".")[1]) + 1
        else:  # the final norm
            layer = depth + 1
        scales[name] = decay ** (depth + 1 - layer)
    return scales


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
