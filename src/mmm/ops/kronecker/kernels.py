"""Triton kernels for y_n = sum_j A_j X_n B_j^T (a sum of Kronecker products applied to each token).

Each token's X_n is a small [i1, i2] matrix, so the whole product for a token is two small matrix
products that stay on chip: the kernel reads x once and writes y once, the minimum, and the
arithmetic is 2 r (i1 i2 o2 + o1 i1 o2) per token instead of 2 i1 i2 o1 o2 for the dense layer.

- `kron_apply_kernel`: y_n[:, o2 tile] = sum_j A_j (X_n B_j^T); grid (token groups, o2 tiles). Each
  program walks its tokens in a flat loop (the terms are unrolled), so Triton software-pipelines the
  loads of the next tokens behind the current products; with one term the factors are loaded once.
  Factors are addressed through strides, so the data gradient dX_n = sum_j A_j^T dY_n B_j is the
  same kernel with the factors' strides swapped (no transposed copies).
- `kron_factor_grad_kernel`: out_j = sum_n G_n F_j H_n^T, a reduction over tokens split across
  programs (partial sums in fp32, added up afterwards), F_j loaded once per program. dA_j =
  sum_n dY_n B_j X_n^T and dB_j = sum_n dY_n^T A_j X_n are both this kernel with other strides.
- `kron_dx_da_kernel` (one term): dX_n and dA in one pass over the tokens; dB then takes a second pass.
- `kron_bwd_one_pass_kernel` (one term): dX_n, dA and dB in one pass; each program owns a chunk of i2
  columns, so it holds dA's [o1, i1] accumulator and only a [o2, chunk] slice of dB's.

Tiles: the first factor's dims (i1, o1) are one tile each (<= 128 padded), the second factor's
contracted dim one tile (<= 256), so layers up to 128 x 256 = 32768 wide run here; larger factors
use the PyTorch reference. Intermediates are rounded to the input dtype before the second product,
as two PyTorch matmuls would.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._eager import cdiv, cuda_sm_count, launcher, next_power_of_2

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_FIRST = 128   # largest padded first-factor dim (i1, o1): one register tile
MAX_SECOND = 256  # largest padded second-factor dim (i2, o2): one contraction tile


def _pad(n: int) -> int:
    return max(16, next_power_of_2(n))


def supported(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether the kernels take these factor shapes (else the caller uses the reference)."""
    return max(_pad(A.shape[1]), _pad(A.shape[2])) <= MAX_FIRST and max(_pad(B.shape[1]), _pad(B.shape[2])) <= MAX_SECOND


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _configs(tile_name: str, tokens_per_program=(None,)):
    """Tile x warps x stages (x tokens per program, when the kernel takes TOK as a constexpr)."""
    if INTERPRET:
        extra = {} if tokens_per_program == (None,) else {"TOK": 4}
        return [triton.Config({tile_name: 32, **extra}, num_warps=4, num_stages=1)]
    return [triton.Config({tile_name: t, **({} if tok is None else {"TOK": tok})}, num_warps=w, num_stages=s)
            for t in (64, 128) for w in (4, 8) for s in (1, 2, 3) for tok in tokens_per_program]


SMEM_BUDGET = 200 * 1024  # bytes; the H100/H200 limit is 227 KB per block


def _pruner(tile_name: str, tiles):
    """Drop configs whose pipelined operand tiles would not fit in shared memory (they fail to launch)."""

    def prune(configs, named_args, **kwargs):
        elem = named_args[tiles[0][0]].element_size()
        fits = []
        for c in configs:
            t = c.kwargs[tile_name]
            words = sum(rows(kwargs, t) * cols(kwargs, t) for _, rows, cols in tiles)
            if words * elem * max(1, c.num_stages) <= SMEM_BUDGET:
                fits.append(c)
        return fits or [min(configs, key=lambda c: (c.kwargs[tile_name], c.num_stages))]

    return prune


# operand tiles (name of a tensor arg for its element size, rows, cols) as functions of the constexprs
_APPLY_TILES = [("x_ptr", lambda k, t: k["BI1"], lambda k, t: k["BI2"]),
                ("x_ptr", lambda k, t: k["BI2"], lambda k, t: t),
                ("x_ptr", lambda k, t: k["BO1"], lambda k, t: k["BI1"])]
_GRAD_TILES = [("g_ptr", lambda k, t: t, lambda k, t: k["BK1"]),
               ("g_ptr", lambda k, t: k["BK1"], lambda k, t: k["BK2"]),
               ("g_ptr", lambda k, t: k["BK2"], lambda k, t: k["BP"])]


# Tokens per program trade launch width against reuse of the factors held in registers: tuned.
@triton.autotune(configs=_configs("BO2", tokens_per_program=(4, 16, 64)), key=["I1", "I2", "O1", "O2", "R", "KEY_N"],
                 prune_configs_by={"early_config_prune": _pruner("BO2", _APPLY_TILES)})
@triton.jit
def kron_apply_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr,
    N, I1, I2, O1, O2, KEY_N,
    sxn, sx1, sx2,
    saj, sao, sai,
    sbj, sbo, sbi,
    syn, sy1, sy2,
    R: tl.constexpr, BI1: tl.constexpr, BO1: tl.constexpr, BI2: tl.constexpr, BO2: tl.constexpr,
    TOK: tl.constexpr, PRECISION: tl.constexpr,
):
    n0 = tl.program_id(0).to(tl.int64) * TOK
    o2 = tl.program_id(1) * BO2 + tl.arange(0, BO2)
    o1 = tl.arange(0, BO1)
    i1 = tl.arange(0, BI1)
    i2 = tl.arange(0, BI2)
    o1_ok, o2_ok, i1_ok, i2_ok = o1 < O1, o2 < O2, i1 < I1, i2 < I2
    dt = x_ptr.dtype.element_ty
    x_off = i1.to(tl.int64)[:, None] * sx1 + i2[None, :] * sx2
    y_off = o1.to(tl.int64)[:, None] * sy1 + o2[None, :] * sy2
    b_ptrs = b_ptr + i2[:, None] * sbi + o2[None, :] * sbo        # B_j^T tile [i2, o2]
    a_ptrs = a_ptr + o1[:, None] * sao + i1[None, :] * sai        # A_j tile [o1, i1]
    b_mask = i2_ok[:, None] & o2_ok[None, :]
    a_mask = o1_ok[:, None] & i1_ok[None, :]
    if R == 1:  # factors stay in registers for every token of this program
        bt0 = tl.load(b_ptrs, mask=b_mask, other=0.0)
        a0 = tl.load(a_ptrs, mask=a_mask, other=0.0)
    for t in range(TOK):
        n = n0 + t
        n_ok = n < N
        x = tl.load(x_ptr + n * sxn + x_off, mask=n_ok & i1_ok[:, None] & i2_ok[None, :], other=0.0)
        acc = tl.zeros((BO1, BO2), dtype=tl.float32)
        for j in tl.static_range(R):
            if R == 1:
                bt, a = bt0, a0
            else:
                bt = tl.load(b_ptrs + j * sbj, mask=b_mask, other=0.0)
                a = tl.load(a_ptrs + j * saj, mask=a_mask, other=0.0)
            t1 = tl.dot(x, bt, input_precision=PRECISION)                 # X_n B_j^T  [i1, o2]
            acc = tl.dot(a, t1.to(dt), acc, input_precision=PRECISION)    # += A_j (.)  [o1, o2]
        tl.store(y_ptr + n * syn + y_off, acc.to(dt), mask=n_ok & o1_ok[:, None] & o2_ok[None, :])


@triton.autotune(configs=_configs("BM"), key=["M", "K1", "K2", "P", "KEY_N"],
                 prune_configs_by={"early_config_prune": _pruner("BM", _GRAD_TILES)})
@triton.jit
def kron_factor_grad_kernel(
    g_ptr, f_ptr, h_ptr, out_ptr,
    N, M, K1, K2, P, TOK, KEY_N,
    sgn, sgm, sgk,
    sfj, sfk, sfl,
    shn, shp, shl,
    sos, soj, som, sop,
    BP: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr, BM: tl.constexpr,
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
    m_ok, p_ok, k1_ok, k2_ok = m < M, p < P, k1 < K1, k2 < K2
    dt = g_ptr.dtype.element_ty
    f = tl.load(f_ptr + j * sfj + k1[:, None] * sfk + k2[None, :] * sfl,
                mask=k1_ok[:, None] & k2_ok[None, :], other=0.0)
    g_off = m.to(tl.int64)[:, None] * sgm + k1[None, :] * sgk
    h_off = k2[:, None] * shl + p.to(tl.int64)[None, :] * shp
    acc = tl.zeros((BM, BP), dtype=tl.float32)
    for t in range(TOK):
        n = split * TOK + t
        n_ok = n < N
        g = tl.load(g_ptr + n * sgn + g_off, mask=n_ok & m_ok[:, None] & k1_ok[None, :], other=0.0)
        ht = tl.load(h_ptr + n * shn + h_off, mask=n_ok & k2_ok[:, None] & p_ok[None, :], other=0.0)
        tmp = tl.dot(g, f, input_precision=PRECISION)                     # G_n F_j  [m, k2]
        acc = tl.dot(tmp.to(dt), ht, acc, input_precision=PRECISION)      # += (.) H_n^T  [m, p]
    tl.store(out_ptr + split * sos + j * soj + m[:, None] * som + p[None, :] * sop, acc,
             mask=m_ok[:, None] & p_ok[None, :])


# The one-term backward can share T_n = dY_n B between dX_n = A^T T_n and dA += T_n X_n^T in one pass
# over the tokens (reads dY and X once instead of twice). Measured on the H200 (n = 8192, bf16,
# results/h200/2026-11-28-kronecker-fused.json): fwd+bwd 0.93 vs 1.23 ms at d = 16384 (128 x 128) and
# 2.42 vs 3.32 ms at d = 32768, but 2-9% slower at d = 8192 and 4096 (where neither path beats dense by
# much: the backward there is launch- and reduction-bound); so on. Tests run both paths.
FUSED_DX_DA = True


@triton.autotune(configs=_configs("BC"), key=["I1", "I2", "O1", "O2", "KEY_N"],
                 prune_configs_by={"early_config_prune": _pruner("BC", [
                     ("dy_ptr", lambda k, t: k["BO1"], lambda k, t: k["BO2"]),
                     ("dy_ptr", lambda k, t: k["BO2"], lambda k, t: t),
                     ("dy_ptr", lambda k, t: k["BI1"], lambda k, t: t),
                     ("dy_ptr", lambda k, t: k["BO1"], lambda k, t: k["BI1"])])})
@triton.jit
def kron_dx_da_kernel(
    dy_ptr, x_ptr, a_ptr, b_ptr, dx_ptr, part_ptr,
    N, I1, I2, O1, O2, TOK, KEY_N,
    sdn, sd1, sd2,
    sxn, sx1, sx2,
    sao, sai,
    sbo, sbi,
    sen, se1, se2,
    sps, spo, spi,
    BO1: tl.constexpr, BI1: tl.constexpr, BO2: tl.constexpr, BC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One term (r = 1). For this program's tokens: dX_n = A^T (dY_n B) written out, and the partial
    sum of dA = sum_n (dY_n B) X_n^T, with dY_n B computed once per chunk of i2 columns."""
    split = tl.program_id(0).to(tl.int64)
    o1 = tl.arange(0, BO1)
    i1 = tl.arange(0, BI1)
    o2 = tl.arange(0, BO2)
    cc = tl.arange(0, BC)
    o1_ok, i1_ok, o2_ok = o1 < O1, i1 < I1, o2 < O2
    dt = dy_ptr.dtype.element_ty
    a_t = tl.load(a_ptr + i1[:, None] * sai + o1[None, :] * sao,                 # A^T  [i1, o1]
                  mask=i1_ok[:, None] & o1_ok[None, :], other=0.0)
    acc = tl.zeros((BO1, BI1), dtype=tl.float32)
    for t in range(TOK):
        n = split * TOK + t
        n_ok = n < N
        dy = tl.load(dy_ptr + n * sdn + o1.to(tl.int64)[:, None] * sd1 + o2[None, :] * sd2,
                     mask=n_ok & o1_ok[:, None] & o2_ok[None, :], other=0.0)
        for c0 in range(0, I2, BC):
            c = c0 + cc
            c_ok = c < I2
            bc = tl.load(b_ptr + o2[:, None] * sbo + c[None, :] * sbi, mask=o2_ok[:, None] & c_ok[None, :], other=0.0)
            tc = tl.dot(dy, bc, input_precision=PRECISION).to(dt)                   # (dY_n B)[:, c]  [o1, c]
            dxc = tl.dot(a_t, tc, input_precision=PRECISION)                        # dX_n[:, c]     [i1, c]
            tl.store(dx_ptr + n * sen + i1.to(tl.int64)[:, None] * se1 + c[None, :] * se2, dxc.to(dt),
                     mask=n_ok & i1_ok[:, None] & c_ok[None, :])
            xt = tl.load(x_ptr + n * sxn + c[:, None] * sx2 + i1.to(tl.int64)[None, :] * sx1,   # X_n[:, c]^T [c, i1]
                         mask=n_ok & c_ok[:, None] & i1_ok[None, :], other=0.0)
            acc = tl.dot(tc, xt, acc, input_precision=PRECISION)                    # dA += .. [o1, i1]
    tl.store(part_ptr + split * sps + o1[:, None] * spo + i1[None, :] * spi, acc, mask=o1_ok[:, None] & i1_ok[None, :])


def kron_dx_and_da(dY: torch.Tensor, X: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dX: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """For one term: writes dX[n] = A[0]^T dY[n] B[0] into dX and returns dA = sum_n dY[n] B[0] X[n]^T
    in fp32 [1, o1, i1] (summed into `out`, an fp32 [1, o1, i1] tensor, if given). dY [N, o1, o2], X and dX
    [N, i1, i2] (strided views)."""
    N, O1, O2 = dY.shape
    I1, I2 = X.shape[1:]
    splits = max(1, min(N, _programs_target(dY.device)))
    tok = cdiv(N, splits)
    splits = cdiv(N, tok)
    partial = torch.empty((splits, O1, I1), device=dY.device, dtype=torch.float32)
    launcher(kron_dx_da_kernel)[(splits,)](
        dY, X, A, B, dX, partial, N, I1, I2, O1, O2, tok, _key_n(N),
        *dY.stride(), *X.stride(), *A.stride()[1:], *B.stride()[1:], *dX.stride(), *partial.stride(),
        BO1=_pad(O1), BI1=_pad(I1), BO2=_pad(O2), PRECISION=_precision(dY.dtype),
    )
    return torch.sum(partial, 0, keepdim=True, out=out)


# One-pass backward for one term: each program reads its tokens' dY_n and X_n once and produces dX_n and the
# partial sums of both factor gradients, instead of a second pass over dY and X for dB (~537 MB at d = 16384,
# n = 8192). Timed against the two-pass path by scripts/gpu_kronecker.py; tests run every path.
ONE_PASS_BWD = True
# i2 columns per program (at most; see _one_pass_chunk). Compiled for sm_90 (scripts/kron_bwd_ptxas.py), 8 warps
# hold both fp32 accumulators without spilling at 128 x 128 factors with chunks of 32 or 64 (179-250 registers,
# so one program per SM), and at 128 x 256 with chunks of 32; 4 warps spill 0.3-9 KB in every case.
ONE_PASS_CHUNK = 32 if INTERPRET else 64
ONE_PASS_ACC_B = 128 * 64   # largest dB accumulator tile [o2, chunk] (elements) that compiled without spills
ONE_PASS_PROGRAMS_PER_SM = 1  # programs per SM in the launch (one fits: ~all registers of an SM each)
SMEM_LIMIT = 227 * 1024     # bytes of shared memory one block may use on the H100/H200


def _one_pass_chunk(I2: int, O2: int) -> int:
    return max(16, min(_pad(I2), ONE_PASS_CHUNK, ONE_PASS_ACC_B // _pad(O2)))


def _one_pass_configs():
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=8, num_stages=s) for s in (1, 2, 3, 4)]


def _one_pass_prune(configs, named_args, **kwargs):
    """Drop configs that would not fit in shared memory: per pipeline stage dY_n and X_n's chunk, once A,
    B's chunk and one [o1, chunk] operand (the compiled sizes for sm_90 at 128 x 128 and 128 x 256 factors).
    With one program per SM only its own pipeline hides memory latency, and with num_stages = 2 the next
    token's loads are issued after this token's products and waited for at once (seen in the TTGIR), so
    1 and 2 stages are kept only when no deeper pipeline fits."""
    elem = named_args["dy_ptr"].element_size()
    BO1, BI1, BO2, BC = kwargs["BO1"], kwargs["BI1"], kwargs["BO2"], kwargs["BC"]
    per_stage = (BO1 * BO2 + BI1 * BC) * elem
    once = (BO1 * BI1 + BO2 * BC + BO1 * BC) * elem
    fits = [c for c in configs if once + per_stage * max(1, c.num_stages) <= SMEM_LIMIT]
    deep = [c for c in fits if c.num_stages >= 3]
    return deep or fits or [min(configs, key=lambda c: c.num_stages)]


@triton.autotune(configs=_one_pass_configs(), key=["I1", "I2", "O1", "O2", "KEY_N", "BC"],
                 prune_configs_by={"early_config_prune": _one_pass_prune})
@triton.jit
def kron_bwd_one_pass_kernel(
    dy_ptr, x_ptr, a_ptr, b_ptr, dx_ptr, pa_ptr, pb_ptr,
    N, I1, I2, O1, O2, TOK, KEY_N,
    sdn, sd1, sd2,
    sxn, sx1, sx2,
    sao, sai,
    sbo, sbi,
    sen, se1, se2,
    pas, pac, pao, pai,
    pbs, pbo, pbi,
    BO1: tl.constexpr, BI1: tl.constexpr, BO2: tl.constexpr, BC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One term (r = 1). Program (chunk, split) takes columns c of dX and dB (a chunk of i2) for the split's
    tokens: dX_n[:, c] = A^T (dY_n B[:, c]) written out, and partial sums of dA = sum_n (dY_n B[:, c]) X_n[:, c]^T
    (over this chunk's columns: the chunks' partials are added afterwards) and of dB[:, c] = sum_n dY_n^T (A X_n[:, c]).
    The chunk programs of one split are launched side by side, so they share each dY_n through L2."""
    chunk = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    o1 = tl.arange(0, BO1)
    i1 = tl.arange(0, BI1)
    o2 = tl.arange(0, BO2)
    c = chunk * BC + tl.arange(0, BC)
    o1_ok, i1_ok, o2_ok, c_ok = o1 < O1, i1 < I1, o2 < O2, c < I2
    dt = dy_ptr.dtype.element_ty
    a = tl.load(a_ptr + o1[:, None] * sao + i1[None, :] * sai, mask=o1_ok[:, None] & i1_ok[None, :], other=0.0)
    bc = tl.load(b_ptr + o2[:, None] * sbo + c[None, :] * sbi, mask=o2_ok[:, None] & c_ok[None, :], other=0.0)
    dy_off = o1.to(tl.int64)[:, None] * sd1 + o2[None, :] * sd2
    x_off = i1.to(tl.int64)[:, None] * sx1 + c[None, :] * sx2
    dx_off = i1.to(tl.int64)[:, None] * se1 + c[None, :] * se2
    acc_a = tl.zeros((BO1, BI1), dtype=tl.float32)
    acc_b = tl.zeros((BO2, BC), dtype=tl.float32)
    for t in range(TOK):
        n = split * TOK + t
        n_ok = n < N
        dy = tl.load(dy_ptr + n * sdn + dy_off, mask=n_ok & o1_ok[:, None] & o2_ok[None, :], other=0.0)
        xc = tl.load(x_ptr + n * sxn + x_off, mask=n_ok & i1_ok[:, None] & c_ok[None, :], other=0.0)
        tc = tl.dot(dy, bc, input_precision=PRECISION).to(dt)                      # (dY_n B)[:, c]  [o1, c]
        dxc = tl.dot(tl.trans(a), tc, input_precision=PRECISION)                     # dX_n[:, c]     [i1, c]
        tl.store(dx_ptr + n * sen + dx_off, dxc.to(dt), mask=n_ok & i1_ok[:, None] & c_ok[None, :])
        acc_a = tl.dot(tc, tl.trans(xc), acc_a, input_precision=PRECISION)          # dA += ..       [o1, i1]
        uc = tl.dot(a, xc, input_precision=PRECISION).to(dt)                        # (A X_n)[:, c]  [o1, c]
        acc_b = tl.dot(tl.trans(dy), uc, acc_b, input_precision=PRECISION)          # dB[:, c] += .. [o2, c]
    tl.store(pa_ptr + split * pas + chunk * pac + o1[:, None] * pao + i1[None, :] * pai, acc_a,
             mask=o1_ok[:, None] & i1_ok[None, :])
    tl.store(pb_ptr + split * pbs + o2[:, None] * pbo + c[None, :] * pbi, acc_b, mask=o2_ok[:, None] & c_ok[None, :])


def kron_bwd_one_pass(dY: torch.Tensor, X: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dX: torch.Tensor,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For one term: writes dX[n] = A[0]^T dY[n] B[0] into dX and returns (dA, dB) in fp32, [1, o1, i1] and
    [1, o2, i2] (summed into `out`, two such fp32 tensors, if given). dY [N, o1, o2], X and dX [N, i1, i2]
    (strided views); one read of dY and X."""
    N, O1, O2 = dY.shape
    I1, I2 = X.shape[1:]
    BC = _one_pass_chunk(I2, O2)
    chunks = cdiv(I2, BC)
    splits = max(1, min(N, ONE_PASS_PROGRAMS_PER_SM * _sm_count(dY.device) // chunks))
    tok = cdiv(N, splits)
    splits = cdiv(N, tok)
    part_a = torch.empty((splits, chunks, O1, I1), device=dY.device, dtype=torch.float32)
    part_b = torch.empty((splits, O2, I2), device=dY.device, dtype=torch.float32)
    launcher(kron_bwd_one_pass_kernel)[(chunks, splits)](
        dY, X, A, B, dX, part_a, part_b, N, I1, I2, O1, O2, tok, _key_n(N),
        *dY.stride(), *X.stride(), *A.stride()[1:], *B.stride()[1:], *dX.stride(), *part_a.stride(), *part_b.stride(),
        BO1=_pad(O1), BI1=_pad(I1), BO2=_pad(O2), BC=BC, PRECISION=_precision(dY.dtype),
    )
    out_a, out_b = (None, None) if out is None else out
    return (torch.sum(part_a.view(splits * chunks, 1, O1, I1), 0, out=out_a),
            torch.sum(part_b.view(splits, 1, O2, I2), 0, out=out_b))


def _sm_count(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4
    return cuda_sm_count(device)


def _programs_target(device: torch.device) -> int:
    return _sm_count(device) if INTERPRET or device.type != "cuda" else 4 * _sm_count(device)


def _key_n(n: int) -> int:
    """Token-count bucket for autotuning (powers of two), so every new N does not retune."""
    return next_power_of_2(max(1, n))


def kron_apply(x3: torch.Tensor, A: torch.Tensor, B: torch.Tensor, out3: torch.Tensor) -> None:
    """out3[n] = sum_j A[j] @ x3[n] @ B[j]^T for strided views x3 [N, i1, i2], A [r, o1, i1],
    B [r, o2, i2], out3 [N, o1, o2] (any strides: transposed factors are just strides)."""
    N, I1, I2 = x3.shape
    R, O1, _ = A.shape
    O2 = B.shape[1]
    grid = lambda meta: (cdiv(N, meta["TOK"]), cdiv(O2, meta["BO2"]))  # noqa: E731
    launcher(kron_apply_kernel)[grid](
        x3, A, B, out3, N, I1, I2, O1, O2, _key_n(N),
        *x3.stride(), *A.stride(), *B.stride(), *out3.stride(),
        R=R, BI1=_pad(I1), BO1=_pad(O1), BI2=_pad(I2), PRECISION=_precision(x3.dtype),
    )


def kron_factor_grad(G: torch.Tensor, F: torch.Tensor, H: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_n G[n] @ F[j] @ H[n]^T for every j, in fp32: G [N, M, K1], F [r, K1, K2], H [N, P, K2]
    (strided views) -> [r, M, P] (summed into `out`, an fp32 [r, M, P] tensor, if given)."""
    N, M, K1 = G.shape
    R, _, K2 = F.shape
    P = H.shape[1]
    BP = min(_pad(P), 32 if INTERPRET else 128)
    # enough token splits to fill the GPU whatever tile the autotuner picks (BM >= 64 there)
    tiles_min = cdiv(M, 128 if not INTERPRET else 32) * cdiv(P, BP)
    splits = max(1, min(N, _programs_target(G.device) // max(1, R * tiles_min)))
    tok = cdiv(N, splits)
    splits = cdiv(N, tok)
    partial = torch.empty((splits, R, M, P), device=G.device, dtype=torch.float32)
    grid = lambda meta: (splits, R, cdiv(M, meta["BM"]) * cdiv(P, BP))  # noqa: E731
    launcher(kron_factor_grad_kernel)[grid](
        G, F, H, partial, N, M, K1, K2, P, tok, _key_n(N),
        *G.stride(), *F.stride(), *H.stride(), *partial.stride(),
        BP=BP, BK1=_pad(K1), BK2=_pad(K2), PRECISION=_precision(G.dtype),
    )
    return torch.sum(partial, 0, out=out)
