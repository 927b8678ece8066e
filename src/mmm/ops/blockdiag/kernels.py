"""Triton kernels for products with block-structured weights, shared by block-diagonal and Monarch.

Everything is one "block stage": for each block g < G,  out_g[N, P] = in_g[N, Q] @ W[g]^T  with W [G, P, Q].
A block-diagonal layer is one stage; Monarch is two (see ../monarch/kernels.py). Two kernels do all of it:

- `block_gemm_kernel`: C_g = A_g @ B_g for every block g, grid (row tiles x column tiles, G, K-splits),
  fp32 accumulation. Each operand is addressed as `base + g*sg + row*sr + col_offset(col)`, where
  col_offset is either `col*sc` or, for a "split" column index, `(col // split)*sc_hi + (col % split)*sc`.
  The split form is what lets Monarch's shuffle live in the addressing instead of in a permute copy.
  Forward (out = in @ W^T), data gradient (d_in = d_out @ W) and weight gradient (dW = d_out^T @ in,
  a reduction over tokens, split over programs when the blocks alone do not fill the GPU) are three
  launches of it with different strides: no operand is ever transposed in memory.
- `block_bwd_fused_kernel`: when a block of W fits on chip (P, Q <= FUSED_BACKWARD_MAX), one pass over
  the tokens computes d_in = d_out @ W and accumulates dW += d_out^T @ in, so d_out is read once instead
  of twice. For small blocks the stage is memory-bound and this is a third of its bytes.
- `block_bwd_fused_v2_kernel`: the same pass with the Q columns split over QSPLIT programs (autotuned,
  1 included). Why: at P = Q = 128 (Monarch b=128, c=1) a v1 program keeps dW_g (64 KB fp32) and the
  d_in tile (32 KB fp32) in registers and three stages of d_out/x tiles plus W in shared memory: 174
  registers x 256 threads and 144 KB (ptxas for sm_90, scripts/fused_bwd_ptxas.py), so an SM holds one
  program, whose own pipeline must hide every load, the d_in MMA (waited for at once: its result is
  stored) and the layout change of the store. The H200 measured 1.35 TB/s there, a third of the copy
  bandwidth. Splitting Q divides that state by QSPLIT, so 2-4 programs share an SM and overlap each
  other's memory and MMA phases; the QSPLIT programs of one block read the same d_out rows back to back,
  so the repeated reads should come from L2 rather than HBM.
  FUSED_BACKWARD_VARIANT picks v1 or v2 (v1 is kept for the side-by-side comparison).

Precision: tl.dot accumulates in fp32. fp32 inputs use IEEE products unless PyTorch allows tf32
(torch.set_float32_matmul_precision("high")). Under TRITON_INTERPRET bf16 dots are wrong, so operands
are upcast there (UPCAST).
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._eager import cdiv, cuda_sm_count, launcher, next_power_of_2

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Blocks with P and Q up to this size take the fused backward (dW accumulator and W tile in one program).
# Tests set it to 0 to exercise the two-launch path on small shapes.
FUSED_BACKWARD_MAX = 128
# Which fused backward kernel runs: "v2" (Q split over programs, autotuned; its configs include every
# v1 config at QSPLIT=1) or "v1" (the original, kept for comparison). scripts/gpu_block_paths.py times both.
FUSED_BACKWARD_VARIANT = "v2"
# Token ranges handed to separate programs in a token reduction are multiples of this (>= every BK, BM).
TOKEN_CHUNK = 16 if INTERPRET else 256
# Tests set this to fill every kernel output with NaN before the launch, so an unwritten element shows.
POISON_OUTPUTS = False


def new_output(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor that a kernel will fill (NaN-filled when POISON_OUTPUTS is set)."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------

def _gemm_configs():
    if INTERPRET:  # one config; small tiles so tests cover several tiles, K steps and masks
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    # (BM, BN, BK, warps, stages): large tiles for the compute-bound big blocks (Hopper wgmma wants
    # 64-row multiples per warpgroup), smaller ones for narrow blocks and the memory-bound small ones.
    # Six configs: each is compiled once per operand layout, and that compile time is paid at first use.
    shapes = [
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _prune_gemm(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (they only add masked work)."""
    M, NC, K = named_args["M"], named_args["NC"], named_args["K_PER_SPLIT"]
    fits = [
        c for c in configs
        if c.kwargs["BM"] <= max(64, triton.next_power_of_2(M))
        and c.kwargs["BN"] <= max(64, triton.next_power_of_2(NC))
        and c.kwargs["BK"] <= max(64, triton.next_power_of_2(K))
    ]
    return fits or configs[-1:]


def _fused_configs():
    if INTERPRET:
        return [triton.Config({"BM": 16}, num_warps=4, num_stages=1)]
    # The dW accumulator (BP x BQ fp32) and the d_in tile (BM x BQ fp32) both live in registers.
    return [
        triton.Config({"BM": 64}, num_warps=8, num_stages=3),
        triton.Config({"BM": 64}, num_warps=4, num_stages=3),
        triton.Config({"BM": 128}, num_warps=8, num_stages=2),
        triton.Config({"BM": 32}, num_warps=4, num_stages=4),
    ]


def _fused_v2_configs():
    if INTERPRET:  # QSPLIT=2 so the CPU tests cover the split columns
        return [triton.Config({"BM": 16, "QSPLIT": 2}, num_warps=4, num_stages=1)]
    # (QSPLIT, BM, warps, stages): v1's four configs at QSPLIT=1, then column splits small enough in
    # registers and shared memory for 2-4 programs per SM at P = Q = 128 (scripts/fused_bwd_ptxas.py:
    # v1's best, BM=64/8 warps/3 stages, needs 174 registers and 144 KB of shared memory: one per SM).
    shapes = [
        (1, 64, 8, 3), (1, 64, 4, 3), (1, 128, 8, 2), (1, 32, 4, 4),
        (2, 64, 8, 3), (2, 64, 8, 2), (2, 64, 4, 2),  # 2 per SM (3 for the token-minor x layout)
        (4, 64, 4, 2), (4, 64, 4, 3), (4, 128, 8, 2),  # 4, 3 and 2 per SM
    ]
    return [triton.Config({"BM": bm, "QSPLIT": qs}, num_warps=w, num_stages=st) for qs, bm, w, st in shapes]


def _prune_fused_v2(configs, named_args, **kwargs):
    """Each program's column slice BQ // QSPLIT must be >= 16 (the smallest tl.dot side)."""
    bq = max(16, triton.next_power_of_2(named_args["Q"]))
    fits = [c for c in configs if bq // c.kwargs["QSPLIT"] >= 16]
    return fits or configs[:1]


@contextlib.contextmanager
def eager_launches():
    """Launch kernels directly when the stage functions below are called outside the torch.library ops
    (benchmarks of single stages). Outside an op, `wrap_triton` goes through PyTorch's tracing wrapper,
    which for an autotuned kernel with `prune_configs_by` builds a new autotuner on every call: every call
    re-benchmarks all configs (~0.8 s per call at the H200 bench shapes). Inside the ops PyTorch already
    launches directly in eager mode, so the layers never pay this."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # older torch: wrap_triton launched directly outside tracing anyway
        yield
        return
    with set_wrap_triton_enabled(False):
        yield


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _col_offsets(cols, sc, sc_hi, split, SPLIT: tl.constexpr):
    """Memory offsets (int64) of column indices: cols*sc, or (cols // split)*sc_hi + (cols % split)*sc.
    (Column indices are < 2^31; the division is done in int32, the products in int64.)"""
    if SPLIT:
        return (cols // split).to(tl.int64) * sc_hi + (cols % split).to(tl.int64) * sc
    else:
        return cols.to(tl.int64) * sc


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: fp32 operands (bf16 dots are wrong under the interpreter).
    FP32_IEEE: full-precision products for fp32 operands (else tf32, Triton's default)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if FP32_IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.autotune(
    configs=_gemm_configs(),
    key=["KEY_M", "NC", "KEY_K", "LAYOUT"],
    prune_configs_by={"early_config_prune": _prune_gemm},
)
@triton.jit(do_not_specialize=["KEY_M", "KEY_K", "LAYOUT"])
def block_gemm_kernel(
    a_ptr, b_ptr, c_ptr,
    M, NC, K, K_PER_SPLIT,
    a_sg, a_sr, a_sc, a_sc_hi, a_split,
    b_sg, b_sr, b_sc, b_sc_hi, b_split,
    c_sg, c_sr, c_sc, c_sc_hi, c_split, c_ss,
    KEY_M, KEY_K, LAYOUT,  # autotune keys only (token dimension bucketed, operand majorness)
    SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr, SPLIT_C: tl.constexpr,
    UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C_g[M, NC] (slot ks: the ks-th K range) = A_g[M, K] @ B_g[K, NC]. Each operand may split its
    column index (A's column is the K index). SPLIT_A: 0 no split, 1 power-of-two split, 2 any split."""
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    ks = tl.program_id(2)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(NC, BN)
    # Grouped order: GROUP_M row tiles walk the column tiles together, so B tiles are reused from L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < M
    col_ok = cols < NC
    a_rows = a_ptr + g * a_sg + rows.to(tl.int64)[:, None] * a_sr
    b_cols = b_ptr + g * b_sg + _col_offsets(cols, b_sc, b_sc_hi, b_split, SPLIT_B)[None, :]

    k_lo = ks * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    if SPLIT_A == 1:
        # Power-of-two split: every K tile starts at a multiple of BK, so within a tile the offsets are
        # those of the first tile plus one scalar; no per-element division inside the loop.
        a_tab = _col_offsets(tl.arange(0, BK), a_sc, a_sc_hi, a_split, True)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + tl.arange(0, BK)
        k_ok = kk < k_hi
        if SPLIT_A == 1:
            a_cols = (k0 // a_split).to(tl.int64) * a_sc_hi + (k0 % a_split).to(tl.int64) * a_sc + a_tab
        else:
            a_cols = _col_offsets(kk, a_sc, a_sc_hi, a_split, SPLIT_A == 2)
        a = tl.load(a_rows + a_cols[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + kk.to(tl.int64)[:, None] * b_sr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, UPCAST, FP32_IEEE)

    c_ptrs = (c_ptr + ks.to(tl.int64) * c_ss + g * c_sg + rows.to(tl.int64)[:, None] * c_sr
              + _col_offsets(cols, c_sc, c_sc_hi, c_split, SPLIT_C)[None, :])
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_fused_configs(), key=["KEY_N", "P", "Q", "LAYOUT"])
@triton.jit(do_not_specialize=["KEY_N", "LAYOUT"])
def block_bwd_fused_kernel(
    go_ptr, w_ptr, x_ptr, dx_ptr, dw_ptr,
    N, P, Q, TOKENS_PER_PROG,
    go_sg, go_sr, go_sc,
    w_sg, w_sr, w_sc,
    x_sg, x_sr, x_sc, x_sc_hi,
    dx_sg, dx_sr, dx_sc, dx_sc_hi, split,
    dw_ss, dw_sg, dw_sr, dw_sc,
    KEY_N, LAYOUT,  # autotune keys only
    SPLIT_X: tl.constexpr, UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr,
    BP: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr,
):
    """For block g and the token range of program (g, chunk): dx_g = go_g @ W_g  [tokens, Q] and
    the chunk's share of dW_g = go_g^T @ x_g  [P, Q] (written to slot `chunk` of dw)."""
    g = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    p = tl.arange(0, BP)
    q = tl.arange(0, BQ)
    p_ok = p < P
    q_ok = q < Q
    w = tl.load(w_ptr + g * w_sg + p.to(tl.int64)[:, None] * w_sr + q.to(tl.int64)[None, :] * w_sc,
                mask=p_ok[:, None] & q_ok[None, :], other=0.0)
    if UPCAST:
        w = w.to(tl.float32)
    go_base = go_ptr + g * go_sg + p.to(tl.int64)[None, :] * go_sc
    x_base = x_ptr + g * x_sg + _col_offsets(q, x_sc, x_sc_hi, split, SPLIT_X)[None, :]
    dx_base = dx_ptr + g * dx_sg + _col_offsets(q, dx_sc, dx_sc_hi, split, SPLIT_X)[None, :]

    t_lo = chunk * TOKENS_PER_PROG
    t_hi = tl.minimum(N, t_lo + TOKENS_PER_PROG)
    dw = tl.zeros((BP, BQ), dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BM):
        t = t0 + tl.arange(0, BM)
        t_ok = t < t_hi
        t64 = t.to(tl.int64)[:, None]
        go = tl.load(go_base + t64 * go_sr, mask=t_ok[:, None] & p_ok[None, :], other=0.0)
        x = tl.load(x_base + t64 * x_sr, mask=t_ok[:, None] & q_ok[None, :], other=0.0)
        if UPCAST:
            go = go.to(tl.float32)
            x = x.to(tl.float32)
        dx = _dot(go, w, tl.zeros((BM, BQ), dtype=tl.float32), False, FP32_IEEE)
        tl.store(dx_base + t64 * dx_sr, dx.to(dx_ptr.dtype.element_ty), mask=t_ok[:, None] & q_ok[None, :])
        dw = _dot(tl.trans(go), x, dw, False, FP32_IEEE)

    dw_ptrs = (dw_ptr + chunk.to(tl.int64) * dw_ss + g * dw_sg
               + p.to(tl.int64)[:, None] * dw_sr + q.to(tl.int64)[None, :] * dw_sc)
    tl.store(dw_ptrs, dw.to(dw_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


@triton.autotune(configs=_fused_v2_configs(), key=["KEY_N", "P", "Q", "LAYOUT"],
                 prune_configs_by={"early_config_prune": _prune_fused_v2})
@triton.jit(do_not_specialize=["KEY_N", "LAYOUT"])
def block_bwd_fused_v2_kernel(
    go_ptr, w_ptr, x_ptr, dx_ptr, dw_ptr,
    N, P, Q, TOKENS_PER_PROG,
    go_sg, go_sr, go_sc,
    w_sg, w_sr, w_sc,
    x_sg, x_sr, x_sc, x_sc_hi,
    dx_sg, dx_sr, dx_sc, dx_sc_hi, split,
    dw_ss, dw_sg, dw_sr, dw_sc,
    KEY_N, LAYOUT,  # autotune keys only
    SPLIT_X: tl.constexpr, UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr,
    BP: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr, QSPLIT: tl.constexpr,
):
    """block_bwd_fused_kernel with the columns of block g split over QSPLIT programs: program
    (g*QSPLIT + j, chunk) computes columns [j*BQ/QSPLIT, (j+1)*BQ/QSPLIT) of dx_g and of its chunk's
    share of dW_g. The d_out tile (all P columns) is read by each of the QSPLIT programs."""
    pid = tl.program_id(0)
    g = (pid // QSPLIT).to(tl.int64)
    chunk = tl.program_id(1)
    p = tl.arange(0, BP)
    q = (pid % QSPLIT) * (BQ // QSPLIT) + tl.arange(0, BQ // QSPLIT)
    p_ok = p < P
    q_ok = q < Q
    w = tl.load(w_ptr + g * w_sg + p.to(tl.int64)[:, None] * w_sr + q.to(tl.int64)[None, :] * w_sc,
                mask=p_ok[:, None] & q_ok[None, :], other=0.0)
    if UPCAST:
        w = w.to(tl.float32)
    go_base = go_ptr + g * go_sg + p.to(tl.int64)[None, :] * go_sc
    x_base = x_ptr + g * x_sg + _col_offsets(q, x_sc, x_sc_hi, split, SPLIT_X)[None, :]
    dx_base = dx_ptr + g * dx_sg + _col_offsets(q, dx_sc, dx_sc_hi, split, SPLIT_X)[None, :]

    t_lo = chunk * TOKENS_PER_PROG
    t_hi = tl.minimum(N, t_lo + TOKENS_PER_PROG)
    dw = tl.zeros((BP, BQ // QSPLIT), dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BM):
        t = t0 + tl.arange(0, BM)
        t_ok = t < t_hi
        t64 = t.to(tl.int64)[:, None]
        go = tl.load(go_base + t64 * go_sr, mask=t_ok[:, None] & p_ok[None, :], other=0.0)
        x = tl.load(x_base + t64 * x_sr, mask=t_ok[:, None] & q_ok[None, :], other=0.0)
        if UPCAST:
            go = go.to(tl.float32)
            x = x.to(tl.float32)
        dx = _dot(go, w, tl.zeros((BM, BQ // QSPLIT), dtype=tl.float32), False, FP32_IEEE)
        tl.store(dx_base + t64 * dx_sr, dx.to(dx_ptr.dtype.element_ty), mask=t_ok[:, None] & q_ok[None, :])
        dw = _dot(tl.trans(go), x, dw, False, FP32_IEEE)

    dw_ptrs = (dw_ptr + chunk.to(tl.int64) * dw_ss + g * dw_sg
               + p.to(tl.int64)[:, None] * dw_sr + q.to(tl.int64)[None, :] * dw_sc)
    tl.store(dw_ptrs, dw.to(dw_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------

class Operand(NamedTuple):
    """Where element (g, row, col) of a batch of matrices lives:
    data + g*sg + row*sr + col_offset(col), col_offset = col*sc, or with split > 0
    (col // split)*sc_hi + (col % split)*sc. (A NamedTuple: a launch builds several, and a frozen
    dataclass costs three times as much host time to build.)"""

    data: torch.Tensor
    sg: int
    sr: int
    sc: int
    sc_hi: int = 0
    split: int = 0

    @property
    def t(self) -> "Operand":
        """The transposed matrices (rows <-> cols); only defined for an unsplit column index."""
        if self.split:
            raise ValueError("a split column index cannot become a row index")
        return Operand(self.data, self.sg, self.sc, self.sr)

    def _split_args(self):
        return self.sc_hi, max(self.split, 1)


def rows_of(t: torch.Tensor, block: int) -> Operand:
    """Block g of a [N, G*block] matrix (any strides): rows are tokens, columns the block's features."""
    sr, sc = t.stride()
    return Operand(t, block * sc, sr, sc)


def weight_blocks(w: torch.Tensor) -> Operand:
    """W[g] of a [G, P, Q] weight (any strides)."""
    return Operand(w, *w.stride())


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: small, so tiny tests still split token reductions
    return cuda_sm_count(device)


def _token_bucket(n) -> int:
    """Power-of-two bucket of a token count, the autotune key (not every distinct N)."""
    return max(16, next_power_of_2(n))


def _token_splits(work_items: int, n_tokens: int, device: torch.device) -> tuple[int, int]:
    """(programs per work item along the tokens, tokens per program): enough programs to give every
    SM two, in token ranges that are multiples of TOKEN_CHUNK."""
    max_splits = cdiv(n_tokens, TOKEN_CHUNK)
    splits = max(1, min(max_splits, cdiv(2 * _num_sms(device), work_items)))
    per = cdiv(cdiv(n_tokens, splits), TOKEN_CHUNK) * TOKEN_CHUNK
    return cdiv(n_tokens, per), per


def _dot_args(dtype: torch.dtype) -> dict:
    if INTERPRET:
        return dict(UPCAST=dtype != torch.float32, FP32_IEEE=True)
    # Only fp32 operands have a choice: IEEE products unless PyTorch itself allows tf32.
    return dict(UPCAST=False, FP32_IEEE=dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest")


def gemm(a: Operand, b: Operand, c: Operand, G: int, M: int, NC: int, K: int, tokens_are_rows: bool,
         k_splits: int = 1, k_per_split: int | None = None, c_split_stride: int = 0) -> None:
    """C_g = A_g @ B_g for g < G (C_g[M, NC], K the contraction). The token dimension is M when
    tokens_are_rows, else K (a weight gradient); it is bucketed in the autotune key."""
    k_per_split = K if k_per_split is None else k_per_split
    layout = int(a.sr == 1) | int(a.sc == 1) << 1 | int(b.sr == 1) << 2 | int(b.sc == 1) << 3 | int(c.sr == 1) << 4
    a_hi, a_split = a._split_args()
    b_hi, b_split = b._split_args()
    c_hi, c_split = c._split_args()

    def grid(meta):
        return (cdiv(M, meta["BM"]) * cdiv(NC, meta["BN"]), G, k_splits)

    launcher(block_gemm_kernel)[grid](
        a.data, b.data, c.data,
        M, NC, K, k_per_split,
        a.sg, a.sr, a.sc, a_hi, a_split,
        b.sg, b.sr, b.sc, b_hi, b_split,
        c.sg, c.sr, c.sc, c_hi, c_split, c_split_stride,
        _token_bucket(M) if tokens_are_rows else M, K if tokens_are_rows else _token_bucket(K), layout,
        SPLIT_A=0 if not a.split else 1 if a.split & (a.split - 1) == 0 else 2,
        SPLIT_B=b.split > 0, SPLIT_C=c.split > 0,
        **_dot_args(a.data.dtype),
    )


def fused_backward_fits(P: int, Q: int) -> bool:
    return max(P, Q) <= FUSED_BACKWARD_MAX


def stage_forward(inp: Operand, w: torch.Tensor, out: Operand, N: int) -> None:
    """out_g[N, P] = inp_g[N, Q] @ w[g]^T for every block g of w [G, P, Q]."""
    G, P, Q = w.shape
    gemm(inp, weight_blocks(w).t, out, G, N, P, Q, tokens_are_rows=True)


def weight_grad_splits(w: torch.Tensor, N: int) -> tuple[int, int]:
    """(token ranges, tokens per range) of stage_backward's weight-gradient reduction for w [G, P, Q] and
    N tokens: one program per range writes one slot of fp32 partial sums (one range: dW directly)."""
    G, P, Q = w.shape
    if fused_backward_fits(P, Q):
        return _token_splits(G, N, w.device)
    # the weight-gradient GEMM: split when G * tiles alone would leave SMs idle
    return _token_splits(G * cdiv(P, 128) * cdiv(Q, 128), N, w.device)


def stage_backward(grad_out: Operand, inp: Operand, w: torch.Tensor, grad_in: Operand, N: int,
                   slots: torch.Tensor | None = None) -> torch.Tensor | None:
    """For the stage out_g = inp_g @ w[g]^T: writes grad_in_g = grad_out_g @ w[g] and returns
    dw[g] = grad_out_g^T @ inp_g (dtype of w). grad_in must have the same column split as inp.
    slots: where the weight gradient goes instead (then None is returned), e.g. a view of a buffer
    shared with another stage: for splits > 1 (weight_grad_splits) the fp32 partial sums,
    [splits, G, P, Q] with any slot stride, which the caller adds up; for one split dW itself, [G, P, Q]
    of w's dtype. Both with contiguous [P, Q] blocks."""
    G, P, Q = w.shape
    splits, per = weight_grad_splits(w, N)
    own = slots is None
    if own:
        # one range writes dW of w's dtype; several write fp32 slots (added at the end)
        slots = new_output(w.shape, w) if splits == 1 else new_output((splits, *w.shape), w, torch.float32)
    else:
        want = ((G, P, Q), w.dtype) if splits == 1 else ((splits, G, P, Q), torch.float32)
        if (tuple(slots.shape), slots.dtype) != want or slots.stride()[-3:] != (P * Q, Q, 1):
            raise ValueError(f"slots must be {want[1]} {list(want[0])} with contiguous blocks for "
                             f"{splits} token range(s); got {slots.dtype} {list(slots.shape)}, strides {slots.stride()}")
    slot_stride = slots.stride(0) if slots.dim() == 4 else 0
    if fused_backward_fits(P, Q):
        x_hi, split = inp._split_args()
        dx_hi, _ = grad_in._split_args()
        layout = int(grad_out.sr == 1) | int(inp.sr == 1) << 1
        if FUSED_BACKWARD_VARIANT == "v2":
            kernel = block_bwd_fused_v2_kernel

            def grid(meta):
                return (G * meta["QSPLIT"], splits)
        elif FUSED_BACKWARD_VARIANT == "v1":
            kernel, grid = block_bwd_fused_kernel, (G, splits)
        else:
            raise ValueError(f"FUSED_BACKWARD_VARIANT must be 'v1' or 'v2', got {FUSED_BACKWARD_VARIANT!r}")
        launcher(kernel)[grid](
            grad_out.data, w, inp.data, grad_in.data, slots,
            N, P, Q, per,
            grad_out.sg, grad_out.sr, grad_out.sc,
            *w.stride(),
            inp.sg, inp.sr, inp.sc, x_hi,
            grad_in.sg, grad_in.sr, grad_in.sc, dx_hi, split,
            slot_stride, P * Q, Q, 1,
            _token_bucket(N), layout,
            SPLIT_X=inp.split > 0,
            BP=max(16, next_power_of_2(P)), BQ=max(16, next_power_of_2(Q)),
            **_dot_args(w.dtype),
        )
    else:
        # Two launches: the data gradient, then the weight gradient (a token reduction over `splits` ranges).
        gemm(grad_out, weight_blocks(w), grad_in, G, N, Q, P, tokens_are_rows=True)
        gemm(grad_out.t, inp, Operand(slots, P * Q, Q, 1), G, P, Q, N, tokens_are_rows=False,
             k_splits=splits, k_per_split=per, c_split_stride=slot_stride)
    if not own:
        return None
    return slots if splits == 1 else slots.sum(0).to(w.dtype)
