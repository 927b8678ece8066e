"""The interface every structure implements, and the registry from config class to structure class.

A structure is an `nn.Module` holding only its own parameters. It maps x[..., in] to y[..., out]
(no bias: `StructuredLinear` adds it) without ever building the dense matrix, and knows how to
build it (`to_dense`), how to project a dense matrix onto itself (`from_dense`) and what it costs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..configs import StructureConfig

_STRUCTURES: dict[type[StructureConfig], type["Structure"]] = {}


def register(config_cls: type[StructureConfig]):
    """Class decorator: `@register(MonarchConfig) class Monarch(Structure): ...`."""

    def wrap(cls: type["Structure"]) -> type["Structure"]:
        cls.config_cls = config_cls
        _STRUCTURES[config_cls] = cls
        return cls

    return wrap


def structure_class(config: StructureConfig) -> type["Structure"]:
    if not isinstance(config, StructureConfig):
        raise TypeError(f"config must be a StructureConfig (e.g. mmm.MonarchConfig(nblocks=4)), got {type(config).__name__}")
    try:
        return _STRUCTURES[type(config)]
    except KeyError:
        raise ValueError(f"no structure is registered for {type(config).__name__}") from None


def build_structure(in_features: int, out_features: int, config: StructureConfig, *, device=None, dtype=None) -> "Structure":
    return structure_class(config)(in_features, out_features, config, device=device, dtype=dtype)


class Structure(nn.Module):
    """Base class. Subclasses define parameters in __init__ (after calling super().__init__) and
    implement forward, to_dense, _project, and flops."""

    config_cls: ClassVar[type[StructureConfig]]

    def __init__(self, in_features: int, out_features: int, config: StructureConfig, *, device=None, dtype=None):
        super().__init__()
        config.check_shape(in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.config = config

    # --- what each structure implements -------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x[..., in] -> [..., out]
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The [out, in] matrix this structure multiplies by."""
        raise NotImplementedError

    @torch.no_grad()
    def _project(self, weight: torch.Tensor) -> None:
        """Set this structure's parameters to (an approximation of) the nearest structured matrix to
        `weight` [out, in] in Frobenius norm. `weight` is finite, on this module's device, in fp32 or fp64."""
        raise NotImplementedError

    def flops(self, num_tokens: int) -> int:
        """Floating-point operations (multiply and add counted separately) of a forward pass over
        num_tokens rows."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, config: StructureConfig) -> "Structure":
        """Projection of a dense [out, in] weight onto this structure (see `mmm.project`)."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, config, device=weight.device, dtype=weight.dtype)
        work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            module._project(weight.to(work_dtype))
        return module

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def bytes_moved(self, num_tokens: int, element_size: int = 2) -> int:
        """Fewest bytes a forward pass must move: read x and the parameters, write y."""
        return element_size * (num_tokens * (self.in_features + self.out_features) + self.num_params)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.config.describe()}"
