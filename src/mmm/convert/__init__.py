"""Conversion of existing models: swap linear layers for structured ones, save and load the result."""

from .checkpoint import load_pretrained, save_pretrained
from .surgery import ConversionReport, LayerReport, convert_

__all__ = ["convert_", "ConversionReport", "LayerReport", "save_pretrained", "load_pretrained"]
