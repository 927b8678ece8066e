"""Sum of Kronecker products: W = sum_j kron(A[j], B[j]).

Layout: A [r, o1, i1], B [r, o2, i2] with (i1, i2), (o1, o2) = `KroneckerConfig.resolved_factors`, so
W[a*o2 + b, c*i2 + d] = sum_j A[j, a, c] * B[j, b, d]. Read x[..., in] as a matrix X[..., i1, i2]
(row-major); then y = sum_j A[j] @ X @ B[j]^T, an [..., o1, o2] matrix flattened row-major. The two
contractions can run in either order; `forward` takes the one with fewer FLOPs.

Projection (Van Loan & Pitsianis, 1993): rearranging W so that each (a, c) block becomes a row,
R(W)[a*i1 + c, b*i2 + d] = W[a*o2 + b, c*i2 + d], maps kron(A_j, B_j) to the rank-1 matrix
vec(A_j) vec(B_j)^T and preserves the Frobenius norm. So the nearest r-term sum is the rank-r
truncated SVD of R(W), and its factors reshape back into the A_j and B_j.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..configs import KroneckerConfig
from ..ops.kronecker.op import kernel_applies, kron_matmul
from .base import Structure, register
from ._lowrank_math import best_rank_factors


@register(KroneckerConfig)
class Kronecker(Structure):
    def __init__(self, in_features, out_features, config: KroneckerConfig, *, device=None, dtype=None):
        super().__init__(in_features, out_features, config, device=device, dtype=dtype)
        (i1, i2), (o1, o2) = config.resolved_factors(in_features, out_features)
        self.in_factors, self.out_factors, self.terms = (i1, i2), (o1, o2), config.terms
        self.A = nn.Parameter(torch.empty(config.terms, o1, i1, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(config.terms, o2, i2, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A dense entry is a sum of r products A*B: variance r * var(A) * var(B) = 1/(3*in) with
        # var(A) = 1/i1 and var(B) = 1/(3*r*i2), nn.Linear's variance.
        (i1, i2), r = self.in_factors, self.terms
        nn.init.normal_(self.A, std=1.0 / math.sqrt(i1))
        nn.init.normal_(self.B, std=1.0 / math.sqrt(3.0 * r * i2))

    def _b_first(self) -> bool:
        """Whether contracting with B first (X @ B^T, then A @ .) costs fewer FLOPs than A first."""
        (i1, i2), (o1, o2) = self.in_factors, self.out_factors
        return i1 * o2 * (i2 + o1) <= o1 * i2 * (i1 + o2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and kernel_applies(x, self.A, self.B):  # fused Triton kernels; see mmm/ops/kronecker
            return kron_matmul(x, self.A, self.B)
        lead = x.shape[:-1]
        xm = x.reshape(-1, *self.in_factors)  # [N, i1, i2]
        if self._b_first():
            t = torch.einsum("ncd,jbd->njcb", xm, self.B)  # [N, r, i1, o2]
            y = torch.einsum("njcb,jac->nab", t, self.A)
        else:
            t = torch.einsum("ncd,jac->njad", xm, self.A)  # [N, r, o1, i2]
            y = torch.einsum("njad,jbd->nab", t, self.B)
        return y.reshape(*lead, self.out_features)

    def to_dense(self) -> torch.Tensor:
        return torch.einsum("jac,jbd->abcd", self.A, self.B).reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def _project(self, weight: torch.Tensor) -> None:
        (i1, i2), (o1, o2) = self.in_factors, self.out_factors
        rearranged = weight.view(o1, o2, i1, i2).permute(0, 2, 1, 3).reshape(o1 * i1, o2 * i2)
        left, right = best_rank_factors(rearranged, self.terms)  # [o1*i1, r], [r, o2*i2]
        self.A.copy_(left.mT.reshape(self.A.shape))
        self.B.copy_(right.reshape(self.B.shape))

    def flops(self, num_tokens: int) -> int:
        (i1, i2), (o1, o2) = self.in_factors, self.out_factors
        macs = min(i1 * o2 * (i2 + o1), o1 * i2 * (i1 + o2))
        return 2 * num_tokens * self.terms * macs
