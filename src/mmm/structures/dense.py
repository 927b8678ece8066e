"""Dense weight: the baseline every structure is measured against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import DenseConfig
from .base import Structure, register


@register(DenseConfig)
class Dense(Structure):
    def __init__(self, in_features, out_features, config=DenseConfig(), *, device=None, dtype=None):
        super().__init__(in_features, out_features, config, device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def to_dense(self) -> torch.Tensor:
        return self.weight

    @torch.no_grad()
    def _project(self, weight: torch.Tensor) -> None:
        self.weight.copy_(weight)

    def flops(self, num_tokens: int) -> int:
        return 2 * num_tokens * self.in_features * self.out_features
