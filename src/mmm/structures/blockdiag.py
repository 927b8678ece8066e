"""Block-diagonal: W = blockdiag(W_0, ..., W_{b-1}).

Layout: weight [b, out/b, in/b]. The input x[..., in] is read as b consecutive chunks of in/b values,
chunk k is multiplied by weight[k], and the b results are laid end to end (block-major), so output
index k*(out/b) + i depends only on input chunk k. Costs 1/b of the dense arithmetic.

Projection: the off-diagonal blocks of W cannot be represented at all and the diagonal ones
exactly, so copying the diagonal blocks is the Frobenius-nearest block-diagonal matrix.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..configs import BlockDiagConfig
from ..ops.blockdiag.op import blockdiag_matmul
from .base import Structure, register


@register(BlockDiagConfig)
class BlockDiag(Structure):
    def __init__(self, in_features, out_features, config: BlockDiagConfig, *, device=None, dtype=None):
        super().__init__(in_features, out_features, config, device=device, dtype=dtype)
        b = config.nblocks
        self.nblocks = b
        self.weight = nn.Parameter(torch.empty(b, out_features // b, in_features // b, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's init on each block (fan-in in/b) keeps the output scale of nn.Linear; the dense
        # matrix's mean square is then (1/b) * b/(3*in) = 1/(3*in), nn.Linear's variance, as well.
        bound = 1.0 / math.sqrt(self.in_features // self.nblocks)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # Triton kernels or cuBLAS, whichever measured faster; see mmm/ops/blockdiag
            return blockdiag_matmul(x, self.weight)
        lead = x.shape[:-1]
        xb = x.reshape(-1, self.nblocks, self.in_features // self.nblocks).transpose(0, 1)  # [b, N, in/b]
        y = torch.bmm(xb, self.weight.mT)  # [b, N, out/b]
        return y.transpose(0, 1).reshape(*lead, self.out_features)

    def to_dense(self) -> torch.Tensor:
        eye = torch.eye(self.nblocks, device=self.weight.device, dtype=self.weight.dtype)
        return torch.einsum("kij,kl->kilj", self.weight, eye).reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def _project(self, weight: torch.Tensor) -> None:
        b = self.nblocks
        grid = weight.view(b, self.out_features // b, b, self.in_features // b)
        self.weight.copy_(grid.diagonal(dim1=0, dim2=2).permute(2, 0, 1))  # [s, p, b] -> [b, s, p]

    def flops(self, num_tokens: int) -> int:
        return 2 * num_tokens * self.in_features * self.out_features // self.nblocks
