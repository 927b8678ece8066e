"""Best rank-r approximations of a batch of matrices (Eckart-Young), shared by the low-rank, Monarch and
Kronecker projections.

The top right singular vectors V_r of A are the top eigenvectors of its Gram matrix G = A^T A, and A V_r V_r^T
is the nearest rank-r matrix. Three ways to find V_r, all in float64 and all within ~1e-12 of ||A||_F^2 of
the optimal captured energy ||A V_r||_F^2:

- "exact": one fp64 eigh of G.
- "iterative": block subspace iteration on A^T A, for a narrow subspace of a large matrix or many blocks
  on a GPU (see `_iteration_pays`).
- "mixed": an fp32 eigh of G (an order of magnitude faster than fp64 on a GPU), then fp64 refinement of
  its top `width` = rank + oversampling eigenvectors: Newton steps for the invariant subspace, solved in
  the fp32 eigenbasis, and Rayleigh-Ritz (an fp64 eigh of the small width x width matrix). A matrix whose
  kept spectrum fp32 cannot resolve (kept singular values below ~1e-3 sigma_1 that carry energy) is
  redone with "exact", so the result is always optimal.
"""

from __future__ import annotations

import math
import warnings

import torch

# The methods stop refining once the captured energy ||A V||_F^2 is within this fraction of ||A||_F^2 of
# the optimum (subspace iteration: once a step raises it by less than this).
_ENERGY_TOL = 1e-13
_ITERATIVE_MAX_STEPS = 1000
# Each Newton step squares the angle between span(q) and the true subspace (down to fp32 resolution); one
# step, always taken (GEMMs only), is enough on well-conditioned matrices; the estimate after it ends the loop.
_MIXED_MAX_STEPS = 3
METHODS = ("auto", "exact", "iterative", "mixed")


def best_rank_factors(a: torch.Tensor, rank: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation, in Frobenius norm, of every matrix in a[..., m, n], as factors.

    Returns (left [..., m, rank], right [..., rank, n]) with left @ right = U_r S_r V_r^T (Eckart-Young)
    and the singular values split evenly, left = U_r sqrt(S_r), right = sqrt(S_r) V_r^T, so both factors
    are equally scaled for later training. Columns come in descending singular value; when rank exceeds
    min(m, n) the extra columns/rows are zero. Computed in float64 and returned in float64.

    method: "exact", "iterative" or "mixed" (see the module docstring); "auto" picks the fastest for the
    shape and device (`_auto_method`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
    a = a.to(torch.float64)
    m, n = a.shape[-2:]
    if m < n:  # work on the side with the smaller Gram matrix
        left, right = best_rank_factors(a.mT, rank, method)
        return right.mT, left.mT
    keep = min(rank, n)
    if method == "auto":
        method = _auto_method(a.numel() // (m * n) if a.numel() else 0, n, keep, a.is_cuda)
    if method == "iterative":
        v = _top_right_vectors_iterative(a, keep, _iterative_width(n, keep))
    elif method == "mixed":
        v = _top_right_vectors_mixed(a.mT @ a, keep, _mixed_width(n, keep))
    else:
        v = _top_right_vectors_exact(a.mT @ a, keep)
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


def _iterative_width(n: int, keep: int) -> int:
    return min(n, keep + max(keep, 8))  # subspace iteration converges at rate sigma_width / sigma_keep


def _mixed_width(n: int, keep: int) -> int:
    return min(n, keep + max(16, keep // 8))  # oversampling widens the gap the Newton step divides by


def _auto_method(batch: int, n: int, keep: int, on_cuda: bool) -> str:
    """The "auto" rule: `batch` matrices with n x n Gram matrices, `keep` vectors wanted from each."""
    if _iteration_pays(batch, n, _iterative_width(n, keep), on_cuda):
        return "iterative"
    if _mixed_pays(n, _mixed_width(n, keep), on_cuda):
        return "mixed"
    return "exact"


def _iteration_pays(batch: int, n: int, width: int, on_cuda: bool) -> bool:
    """Whether subspace iteration beats one eigh of the n x n Gram matrices."""
    if 2 * width > n:  # the kept rank is a large share of n: nothing to save
        return False
    if on_cuda and batch >= 16:
        # torch's CUDA eigh is batched only up to 32x32 and loops over larger matrices, one launch
        # each, while iteration is a few bmm's plus batched width x width eighs (width <= 32).
        return n > 32 and width <= 32
    # One or a few large matrices: a step costs O(n^2 * width) against the eigh's O(n^3), but a flat
    # spectrum takes hundreds of steps, so only a narrow subspace pays (a wide one, e.g. low rank n/8,
    # is "mixed" or "exact").
    return n >= 2048 and 64 * width <= n


def _mixed_pays(n: int, width: int, on_cuda: bool) -> bool:
    """Whether "mixed" (fp32 eigh of n x n, fp64 eigh of width x width, a few GEMMs) beats one fp64 eigh."""
    # The fp64 Rayleigh-Ritz costs (width / n)^3 of the exact eigh: under half of it up to width = 3n/4.
    # On a GPU the fp32 eigh of a large matrix is about 10x faster than fp64; below ~512 eigh is bound by
    # launches, not arithmetic, and fp32 saves little. On a CPU fp32 eigh is only 2x faster and the fp64
    # refinement GEMMs eat part of it: measured on 2 cores, 1.1x at n = 1024, 1.2-1.6x at 2048 and 4096.
    return 4 * width <= 3 * n and n >= (512 if on_cuda else 2048)


def _top_right_vectors_exact(gram: torch.Tensor, keep: int) -> torch.Tensor:
    """Top `keep` eigenvectors of the Gram matrix A^T A (= right singular vectors of A), descending."""
    _, vectors = torch.linalg.eigh(gram)  # ascending
    return vectors[..., -keep:].flip(-1)


def _cholesky_orthonormalize(z: torch.Tensor) -> torch.Tensor:
    """The Q of z = Q R, with R the Cholesky factor of z^T z: batched on the GPU (unlike QR), and accurate
    to rounding when z is well conditioned, as it is where it is used (nearly orthonormal columns)."""
    r = torch.linalg.cholesky(z.mT @ z, upper=True)
    return torch.linalg.solve_triangular(r, z, upper=True, left=False)


def _top_right_vectors_mixed(gram: torch.Tensor, keep: int, width: int) -> torch.Tensor:
    """Top `keep` eigenvectors of the fp64 Gram matrix, starting from an fp32 eigh (see the module docstring)."""
    n = gram.shape[-1]
    total = gram.diagonal(dim1=-2, dim2=-1).sum(-1)  # ||A||_F^2 of each matrix
    eigenvalues, vectors = torch.linalg.eigh(gram.to(torch.float32))  # ascending; accurate to ~1e-7 ||G||
    q = _cholesky_orthonormalize(vectors[..., -width:].to(gram.dtype))
    unresolved = torch.zeros_like(total, dtype=torch.bool)
    if width < n:
        rest = vectors[..., :-width].to(gram.dtype)  # the other eigenvectors, nearly orthogonal to q
        rest_values = eigenvalues[..., :-width].to(gram.dtype)
        for step in range(_MIXED_MAX_STEPS + 1):
            gq = gram @ q
            coupling = rest.mT @ (gq - q @ (q.mT @ gq))  # [n - width, width]; zero when span(q) is invariant
            gap = (q * gq).sum(-2)[..., None, :] - rest_values[..., :, None]  # Rayleigh quotients - rest's
            # Column i of q leans by coupling/gap towards rest vector j, which costs coupling^2/gap of
            # captured energy (at most the gap: a lean is at most 90 degrees). Sum over the kept columns
            # (the last `keep`: eigh sorts ascending).
            pair_loss = torch.minimum(coupling.square() / gap.abs(), gap.abs()).nan_to_num(0.0)
            unresolved = pair_loss[..., -keep:].sum((-2, -1)) > _ENERGY_TOL * total
            if step == _MIXED_MAX_STEPS or (step > 0 and not unresolved.any()):
                break
            # Newton step for the invariant subspace: column i moves by x_i in span(rest) solving
            # (G - rq_i) x_i = -(its residual); rest diagonalises G, so x_i = rest @ (coupling_i / gap_i).
            # Leans of 1 or more are not first-order small (near-equal eigenvalues): leave those.
            lean = coupling / gap
            lean = torch.where(lean.abs() < 1, lean, torch.zeros_like(lean))
            q = _cholesky_orthonormalize(q + rest @ lean)
    # Rayleigh-Ritz: the best `keep` directions within span(q), from an fp64 eigh of width x width.
    _, e = torch.linalg.eigh(q.mT @ gram @ q)
    v = q @ e[..., -keep:].flip(-1)
    if unresolved.any():  # fp32 could not separate the kept spectrum (e.g. sigma_keep < ~1e-3 sigma_1)
        v[unresolved] = _top_right_vectors_exact(gram[unresolved], keep)
    return v


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
        if energy - energy_before <= _ENERGY_TOL * total:
            break
        if step == _ITERATIVE_MAX_STEPS - 1:
            warnings.warn(
                f"best_rank_factors: subspace iteration stopped after {_ITERATIVE_MAX_STEPS} steps while its "
                f"last step still captured {(energy - energy_before) / total:.1e} of ||A||_F^2 (target "
                f"{_ENERGY_TOL:.0e}); the projection may be slightly worse than optimal (method='exact' is exact)",
                stacklevel=3,
            )
            break
        energy_before = energy
        q, _, _ = _orthonormalize(a.mT @ y)
    # Rayleigh-Ritz: the top `keep` right singular vectors of A restricted to span(q).
    v, _, _ = _orthonormalize(q @ e[..., -keep:].flip(-1))
    return v
