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

`best_rank_factors` (the batched truncated SVD) lives here and is shared with the Kronecker projection.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..configs import MonarchConfig
from ..ops.monarch.op import monarch_matmul
from .base import Structure, register

# Subspace iteration stops once one more step would raise the captured energy ||A_r||_F^2 by less
# than this fraction of ||A||_F^2, i.e. when the squared relative error is within ~this of optimal.
_ITERATIVE_TOL = 1e-13
_ITERATIVE_MAX_STEPS = 1000


def best_rank_factors(a: torch.Tensor, rank: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation, in Frobenius norm, of every matrix in a[..., m, n], as factors.

    Returns (left [..., m, rank], right [..., rank, n]) with left @ right = U_r S_r V_r^T (Eckart-Young)
    and the singular values split evenly, left = U_r sqrt(S_r), right = sqrt(S_r) V_r^T, so both factors
    are equally scaled for later training. Columns come in descending singular value; when rank exceeds
    min(m, n) the extra columns/rows are zero. Computed in float64 and returned in float64.

    method: "exact" takes the top eigenvectors of the smaller Gram matrix (one batched eigh);
    "iterative" runs block subspace iteration until the captured energy stops improving (relative
    1e-13), which is far faster on a GPU when there are many blocks (torch's eigh loops over a batch
    of matrices larger than 32x32) or one large matrix with a small rank; "auto" picks between them.
    """
    if method not in ("auto", "exact", "iterative"):
        raise ValueError(f"method must be 'auto', 'exact' or 'iterative', got {method!r}")
    a = a.to(torch.float64)
    m, n = a.shape[-2:]
    if m < n:  # work on the side with the smaller Gram matrix
        left, right = best_rank_factors(a.mT, rank, method)
        return right.mT, left.mT
    keep = min(rank, n)
    width = min(n, keep + max(keep, 8))  # subspace size with oversampling
    if method == "auto":
        batch = a.numel() // (m * n) if a.numel() else 0
        method = "iterative" if _iteration_pays(batch, n, width, a.is_cuda) else "exact"
    v = _top_right_vectors_iterative(a, keep, width) if method == "iterative" else _top_right_vectors_exact(a, keep)
    # Column norms of A V are the singular values; computing them from A V (not from the eigenvalues)
    # keeps them accurate, and A V V^T is exactly the projection whatever the split.
    av = a @ v
    root = av.norm(dim=-2).sqrt()
    safe = torch.where(root > 0, root, torch.ones_like(root))
    left = torch.where(root[..., None, :] > 0, av / safe[..., None, :], torch.zeros_like(av))
    right = root[..., :, None] * v.mT
    if keep < rank:
        left = torch.cat([left, left.new_zeros(*left.shape[:-1], rank - keep)], dim=-1)
        right = torch.cat([right, right.new_zeros(*right.shape[:-2], rank - keep, n)], dim=-2)
    return left, right


def _iteration_pays(batch: int, n: int, width: int, on_cuda: bool) -> bool:
    """Whether subspace iteration beats one eigh of the n x n Gram matrices (the "auto" rule)."""
    if 2 * width > n:  # the kept rank is a large share of n: nothing to save
        return False
    if on_cuda and batch >= 16:
        # torch's CUDA eigh is batched only up to 32x32 and loops over larger matrices, one launch
        # each, while iteration is a few bmm's plus batched width x width eighs (width <= 32).
        return n > 32 and width <= 32
    return n >= 2048  # one or a few large matrices: an O(n^3) eigh against O(n^2 * width) per step


def _top_right_vectors_exact(a: torch.Tensor, keep: int) -> torch.Tensor:
    """Top `keep` eigenvectors of A^T A (= right singular vectors of A), descending."""
    _, vectors = torch.linalg.eigh(a.mT @ a)  # ascending
    return vectors[..., -keep:].flip(-1)


def _orthonormalize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The orthonormal matrix nearest to z[..., m, k], z (z^T z)^(-1/2), through the eigenvectors of the
    small Gram z^T z (batched on the GPU for k <= 32, unlike QR). Being the nearest, it leaves columns
    that are already orthonormal where they are. Directions carrying less than 1e-13 of the largest
    one's energy are dropped (become zero). Returns (basis, eigenvalues, eigenvectors) of z^T z."""
    lam, e = torch.linalg.eigh(z.mT @ z)
    ok = lam > 1e-13 * lam[..., -1:].clamp_min(torch.finfo(lam.dtype).tiny)
    scale = torch.where(ok, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), torch.zeros_like(lam))
    return (z @ e) * scale[..., None, :] @ e.mT, lam, e


def _top_right_vectors_iterative(a: torch.Tensor, keep: int, width: int) -> torch.Tensor:
    """Block subspace iteration on A^T A with `width` columns, then Rayleigh-Ritz to the top `keep`."""
    total = float(a.pow(2).sum())
    q, _, _ = _orthonormalize(torch.randn(*a.shape[:-2], a.shape[-1], width, dtype=a.dtype, device=a.device))
    energy_before = -math.inf
    for step in range(_ITERATIVE_MAX_STEPS):
        y, lam, e = _orthonormalize(a @ q)  # lam: Ritz values (squared singular values) of A on span(q)
        energy = float(lam[..., -keep:].sum())
        if energy - energy_before <= _ITERATIVE_TOL * total:
            break
        if step == _ITERATIVE_MAX_STEPS - 1:
            warnings.warn(
                f"best_rank_factors: subspace iteration stopped after {_ITERATIVE_MAX_STEPS} steps while its "
                f"last step still captured {(energy - energy_before) / total:.1e} of ||A||_F^2 (target "
                f"{_ITERATIVE_TOL:.0e}); the projection may be slightly worse than optimal (method='exact' is exact)",
                stacklevel=3,
            )
            break
        energy_before = energy
        q, _, _ = _orthonormalize(a.mT @ y)
    # Rayleigh-Ritz: the top `keep` right singular vectors of A restricted to span(q).
    v, _, _ = _orthonormalize(q @ e[..., -keep:].flip(-1))
    return v


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
