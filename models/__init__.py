"""Detector construction: timm backbones, torchvision FPN and heads."""
from models.detector import MODULE_PREFIXES, build_detector, module_parameters

__all__ = ["MODULE_PREFIXES", "build_detector", "module_parameters"]
