"""Triton kernels for y_n = sum_j A_j X_n B_j^T (a sum of Kronecker products applied to each token).

Each token's X_n is a small [i1, i2] matrix, so the whole product for a token is two small matrix
products that stay on chip: the kernel reads x once and writes y once, the minimum, and the
arithmetic is 2 r (i1 i2 o2 + o1 i1 o2) per token instead of 2 i1 i2 o1 o2 for the dense layer.

- `kron_apply_kernel`: y_n[o1 tile, o2 tile] = sum_j A_j (X_n B_j^T); grid (token groups, o1 tiles,
  o2 tiles). Factors are addressed through strides, so the data gradient dX_n = sum_j A_j^T dY_n B_j
  is the same kernel with the factors' strides swapped (no transposed copies).
- `kron_factor_grad_kernel`: out_j = sum_n G_n F_j H_n^T, a reduction over tokens split across
  programs (partial sums in fp32, added up afterwards). dA_j = sum_n dY_n B_j X_n^T and
  dB_j = sum_n dY_n^T A_j X_n are both this kernel with different strides.

The first factor's dims (i1, o1) are one tile each (<= MAX_TILE); the second factor's dims are
looped over, so a layer like 32768 = 128 x 256 fits. Intermediates are rounded to the input dtype
before the second product, as two PyTorch matmuls would.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_TILE = 128  # largest padded first-factor dimension the kernels keep in one tile


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def supported(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether the kernels take these factor shapes (else the caller uses the reference)."""
    return _pad(A.shape[1]) <= MAX_TILE and _pad(A.shape[2]) <= MAX_TILE


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@triton.jit
def kron_apply_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr,
    N, I1, I2, O1, O2, R, TOK,
    sxn, sx1, sx2,
    saj, sao, sai,
    sbj, sbo, sbi,
    syn, sy1, sy2,
    BI1: tl.constexpr, BO1: tl.constexpr, BO2: tl.constexpr, BK2: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    o1 = tl.program_id(1) * BO1 + tl.arange(0, BO1)
    o2 = tl.program_id(2) * BO2 + tl.arange(0, BO2)
    i1 = tl.arange(0, BI1)
    kk = tl.arange(0, BK2)
    o1_ok, o2_ok, i1_ok = o1 < O1, o2 < O2, i1 < I1
    dt = x_ptr.dtype.element_ty
    for t in range(TOK):
        n = pid_t * TOK + t
        n_ok = n < N
        acc = tl.zeros((BO1, BO2), dtype=tl.float32)
        for j in range(R):
            # t1 = X_n B_j^T restricted to this o2 tile, contracting over i2 in chunks
            t1 = tl.zeros((BI1, BO2), dtype=tl.float32)
            for k0 in range(0, I2, BK2):
                k = k0 + kk
                k_ok = k < I2
                xk = tl.load(x_ptr + n * sxn + i1.to(tl.int64)[:, None] * sx1 + k[None, :] * sx2,
                             mask=n_ok & i1_ok[:, None] & k_ok[None, :], other=0.0)
                bt = tl.load(b_ptr + j * sbj + k[:, None] * sbi + o2[None, :] * sbo,
                             mask=k_ok[:, None] & o2_ok[None, :], other=0.0)
                t1 = tl.dot(xk, bt, t1, input_precision=PRECISION)
            a = tl.load(a_ptr + j * saj + o1[:, None] * sao + i1[None, :] * sai,
                        mask=o1_ok[:, None] & i1_ok[None, :], other=0.0)
            acc = tl.dot(a, t1.to(dt), acc, input_precision=PRECISION)
        tl.store(y_ptr + n * syn + o1.to(tl.int64)[:, None] * sy1 + o2[None, :] * sy2,
                 acc.to(dt), mask=n_ok & o1_ok[:, None] & o2_ok[None, :])


@triton.jit
def kron_factor_grad_kernel(
    g_ptr, f_ptr, h_ptr, out_ptr,
    N, M, K1, K2, P, TOK,
    sgn, sgm, sgk,
    sfj, sfk, sfl,
    shn, shp, shl,
    sos, soj, som, sop,
    BM: tl.constexpr, BP: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[split, j, m tile, p tile] = sum over this split's tokens of G_n F_j H_n^T."""
    split = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    p_tiles = tl.cdiv(P, BP)
    m = (tl.program_id(2) // p_tiles) * BM + tl.arange(0, BM)
    p = (tl.program_id(2) % p_tiles) * BP + tl.arange(0, BP)
    k1 = tl.arange(0, BK1)
    k2 = tl.arange(0, BK2)
    m_ok, p_ok = m < M, p < P
    dt = g_ptr.dtype.element_ty
    acc = tl.zeros((BM, BP), dtype=tl.float32)
    for t in range(TOK):
        n = split * TOK + t
        n_ok = n < N
        for c0 in range(0, K2, BK2):
            c = c0 + k2
            c_ok = c < K2
            tmp = tl.zeros((BM, BK2), dtype=tl.float32)  # (G_n F_j)[m tile, c chunk]
            for r0 in range(0, K1, BK1):
                r = r0 + k1
                r_ok = r < K1
                g = tl.load(g_ptr + n * sgn + m.to(tl.int64)[:, None] * sgm + r[None, :] * sgk,
                            mask=n_ok & m_ok[:, None] & r_ok[None, :], other=0.0)
                f = tl.load(f_ptr + j * sfj + r[:, None] * sfk + c[None, :] * sfl,
                            mask=r_ok[:, None] & c_ok[None, :], other=0.0)
                tmp = tl.dot(g, f, tmp, input_precision=PRECISION)
            ht = tl.load(h_ptr + n * shn + c[:, None] * shl + p.to(tl.int64)[None, :] * shp,
                         mask=n_ok & c_ok[:, None] & p_ok[None, :], other=0.0)
            acc = tl.dot(tmp.to(dt), ht, acc, input_precision=PRECISION)
    tl.store(out_ptr + split * sos + j * soj + m[:, None] * som + p[None, :] * sop, acc,
             mask=m_ok[:, None] & p_ok[None, :])


def _num_programs_target(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def kron_apply(x3: torch.Tensor, A: torch.Tensor, B: torch.Tensor, out3: torch.Tensor) -> None:
    """out3[n] = sum_j A[j] @ x3[n] @ B[j]^T for strided views x3 [N, i1, i2], A [r, o1, i1],
    B [r, o2, i2], out3 [N, o1, o2] (any strides: transposed factors are just strides)."""
    N, I1, I2 = x3.shape
    R, O1, _ = A.shape
    O2 = B.shape[1]
    BI1, BO1 = _pad(I1), _pad(O1)
    BO2 = min(_pad(O2), 64 if INTERPRET else 128)
    BK2 = min(_pad(I2), 32 if INTERPRET else 64)
    o_tiles = triton.cdiv(O2, BO2)
    # few tokens per program when the grid is already large; more when it would be tiny
    tok = max(1, min(8, (N * o_tiles) // max(1, 8 * _num_programs_target(x3.device))))
    grid = (triton.cdiv(N, tok), triton.cdiv(O1, BO1), o_tiles)
    wrap_triton(kron_apply_kernel)[grid](
        x3, A, B, out3, N, I1, I2, O1, O2, R, tok,
        *x3.stride(), *A.stride(), *B.stride(), *out3.stride(),
        BI1=BI1, BO1=BO1, BO2=BO2, BK2=BK2, PRECISION=_precision(x3.dtype),
        num_warps=4 if INTERPRET else 8,
    )


def kron_factor_grad(G: torch.Tensor, F: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """sum_n G[n] @ F[j] @ H[n]^T for every j, in fp32: G [N, M, K1], F [r, K1, K2], H [N, P, K2]
    (strided views) -> [r, M, P]."""
    N, M, K1 = G.shape
    R, _, K2 = F.shape
    P = H.shape[1]
    BM = min(_pad(M), 64)
    BP = min(_pad(P), 32 if INTERPRET else 128)
    BK1 = min(_pad(K1), 32 if INTERPRET else 64)
    BK2 = min(_pad(K2), 32 if INTERPRET else 64)
    tiles = triton.cdiv(M, BM) * triton.cdiv(P, BP)
    splits = max(1, min(N, _num_programs_target(G.device) // max(1, R * tiles)))
    tok = triton.cdiv(N, splits)
    splits = triton.cdiv(N, tok)
    partial = torch.empty((splits, R, M, P), device=G.device, dtype=torch.float32)
    wrap_triton(kron_factor_grad_kernel)[(splits, R, tiles)](
        G, F, H, partial, N, M, K1, K2, P, tok,
        *G.stride(), *F.stride(), *H.stride(), *partial.stride(),
        BM=BM, BP=BP, BK1=BK1, BK2=BK2, PRECISION=_precision(G.dtype),
        num_warps=4 if INTERPRET else 8,
    )
    return partial.sum(0)
