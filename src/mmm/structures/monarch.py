"""Monarch: block-diagonal L, a fixed shuffle, block-diagonal R.

With b blocks, p = in/b, s = out/b and block rank c (`MonarchConfig.resolved_block_rank`):

    L: [b, b*c, p]    stage 1, block k:  y[..., k, :] = L[k] @ x[..., k, :]        (y: [..., b, b*c])
    shuffle          chunk l (c values) of block k moves to block l, position k:
                      z[..., l, k*c + t] = y[..., k, l*c + t]
    R: [b, s, b*c]    stage 2, block l:  out[..., l, :] = R[l] @ z[..., l, :]       (block-major, index l*s + i)

So the dense block coupling input block k to output block l is

    W[l*s:(l+1)*s, k*p:(k+1)*p] = R[l][:, k*c:(k+1)*c] @ L[k][l*c:(l+1)*c, :],

a rank-c matrix, and the b*b blocks use disjoint parameters. A Monarch matrix is therefore exactly a
b x b grid of rank-c blocks, and the Frobenius-nearest one to any W is the blockwise truncated SVD
(Eckart-Young on each block). With c = 1 and b*b = n this is the classic square Monarch of Dao et
al. (2022); with the default c the square case costs 2/b of the dense arithmetic.

The batched truncated SVD, `best_rank_factors`, is in `_lowrank_math` (shared with low rank and Kronecker).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..configs import MonarchConfig
from ..ops.monarch.op import monarch_matmul
from ._lowrank_math import best_rank_factors
from .base import Structure, register

@register(MonarchConfig)
class Monarch(Structure):
    def __init__(self, in_features, out_features, config: MonarchConfig, *, device=None, dtype=None):
        super().__init__(in_features, out_features, config, device=device, dtype=dtype)
        b = config.nblocks
        c = config.resolved_block_rank(in_features, out_features)
        self.nblocks, self.block_rank = b, c
        self.L = nn.Parameter(torch.empty(b, b * c, in_features // b, device=device, dtype=dtype))
        self.R = nn.Parameter(torch.empty(b, out_features // b, b * c, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A dense entry is a sum of c products L*R, so its variance is c * var(L) * var(R); with
        # var(L) = 1/p (stage 1 keeps the input's scale) and var(R) = 1/(3*b*c) it is 1/(3*in),
        # nn.Linear's variance.
        b, c = self.nblocks, self.block_rank
        nn.init.normal_(self.L, std=1.0 / math.sqrt(self.in_features // b))
        nn.init.normal_(self.R, std=1.0 / math.sqrt(3.0 * b * c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # Triton kernels or cuBLAS, whichever measured faster; see mmm/ops/monarch
            return monarch_matmul(x, self.L, self.R, self.block_rank)
        b, c = self.nblocks, self.block_rank
        lead = x.shape[:-1]
        xb = x.reshape(-1, b, self.in_features // b).transpose(0, 1)  # [b, N, p]
        y = torch.bmm(xb, self.L.mT)  # [b(k), N, b*c]
        n = y.shape[1]
        z = y.view(b, n, b, c).permute(2, 1, 0, 3).reshape(b, n, b * c)  # [b(l), N, (k, t)]
        out = torch.bmm(z, self.R.mT)  # [b(l), N, s]
        return out.transpose(0, 1).reshape(*lead, self.out_features)

    def to_dense(self) -> torch.Tensor:
        b, c = self.nblocks, self.block_rank
        r4 = self.R.view(b, -1, b, c)  # [l, s, k, t]
        l4 = self.L.view(b, b, c, -1)  # [k, l, t, p]
        return torch.einsum("lskt,kltp->lskp", r4, l4).reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def _project(self, weight: torch.Tensor) -> None:
        b, c = self.nblocks, self.block_rank
        blocks = weight.view(b, self.out_features // b, b, self.in_features // b).permute(0, 2, 1, 3)  # [l, k, s, p]
        left, right = best_rank_factors(blocks, c)  # [l, k, s, c], [l, k, c, p]
        self.R.copy_(left.permute(0, 2, 1, 3).reshape(self.R.shape))
        self.L.copy_(right.permute(1, 0, 2, 3).reshape(self.L.shape))

    def flops(self, num_tokens: int) -> int:
        # Stage 1: b blocks of (b*c) x p; stage 2: b blocks of s x (b*c).
        return 2 * num_tokens * self.nblocks * self.block_rank * (self.in_features + self.out_features)
