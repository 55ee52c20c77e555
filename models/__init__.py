"""Detector construction: timm backbones, torchvision FPN and heads."""
from models.detector import build_detector, module_parameters, MODULE_PREFIXES

__all__ = ["MODULE_PREFIXES", "build_detector", "module_parameters"]
