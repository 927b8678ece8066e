"""Low rank: W = U @ V, U: [out, r], V: [r, in]. Projection is the truncated SVD (Eckart-Young), in fp64."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..configs import LowRankConfig
from ._lowrank_math import best_rank_factors
from .base import Structure, register


@register(LowRankConfig)
class LowRank(Structure):
    def __init__(self, in_features, out_features, config: LowRankConfig, *, device=None, dtype=None):
        super().__init__(in_features, out_features, config, device=device, dtype=dtype)
        r = config.rank
        self.rank = r
        self.U = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.V = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Entries of U @ V get variance r * var(U) * var(V) = 1 / (3 * in), nn.Linear's variance.
        std_v = 1.0 / math.sqrt(self.in_features)
        std_u = 1.0 / math.sqrt(3.0 * self.rank)
        nn.init.normal_(self.V, std=std_v)
        nn.init.normal_(self.U, std=std_u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.V.t()) @ self.U.t()

    def to_dense(self) -> torch.Tensor:
        return self.U @ self.V

    @torch.no_grad()
    def _project(self, weight: torch.Tensor) -> None:
        # Eckart-Young: the top-r singular triplets are the Frobenius-optimal rank-r matrix, with the scale
        # split evenly so both factors are equally conditioned for later training. Only r of them are
        # needed: the Gram-matrix routes of best_rank_factors skip most of a full SVD's work.
        left, right = best_rank_factors(weight, self.rank)
        self.U.copy_(left)
        self.V.copy_(right)

    def flops(self, num_tokens: int) -> int:
        return 2 * num_tokens * self.rank * (self.in_features + self.out_features)
