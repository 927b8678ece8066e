"""mmm: cheaper matrix multiplications for Transformers, and what they cost.

Importing mmm never initialises CUDA.
"""

from .configs import (
    BlockDiagConfig,
    CirculantConfig,
    DenseConfig,
    KroneckerConfig,
    LDRConfig,
    LowRankConfig,
    MonarchConfig,
    StructureConfig,
    ToeplitzConfig,
    config_from_dict,
)
from . import structures  # registers every structure
from ._checks import finite_checks
from .linear import StructuredLinear, project
from . import attention  # a callable package: mmm.attention(q, k, v, ...)
from .attention import attention_error
from . import nn
from .convert import ConversionReport, convert_, load_pretrained, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "StructureConfig",
    "DenseConfig",
    "LowRankConfig",
    "BlockDiagConfig",
    "MonarchConfig",
    "KroneckerConfig",
    "CirculantConfig",
    "ToeplitzConfig",
    "LDRConfig",
    "config_from_dict",
    "StructuredLinear",
    "project",
    "finite_checks",
    "attention",
    "attention_error",
    "nn",
    "convert_",
    "ConversionReport",
    "save_pretrained",
    "load_pretrained",
]
