"""Triton kernels of the "dft" path: the FFT of a circulant / Toeplitz product done as tensor-core GEMMs,
the whole product for a pair of tokens in one kernel (x read once, y written once).

Four-step FFT of length n = N1 * N2. A row viewed as the matrix Z[n1, n2] = z[N2 n1 + n2] (row-major,
no copy) has the unitary DFT  Zhat[k1 + N1 k2] = C[k1, k2]  with
    A = F1 @ Z        (F1 [k1, n1] = exp(-2 pi i k1 n1 / N1) / sqrt(N1))
    B = A * TW        (TW [k1, n2] = exp(-2 pi i k1 n2 / n), elementwise)
    C = B @ F2        (F2 [n2, k2] = exp(-2 pi i n2 k2 / N2) / sqrt(N2)).
The inverse runs the same steps backwards with the adjoints (D = Y @ conj(F2), E = D * conj(TW),
G = F1^H @ E) and lands in the row's natural order again, so neither end needs a transpose. The
spectrum of the kernel is stored in the [k1, k2] order of C.

Two real tokens ride as one complex row z = x_a + i x_b: the product is real-linear and maps real rows
to real rows, so Re / Im of the result are y_a / y_b. Toeplitz (circular length 2n, first n outputs)
is a sum of NB = 2 "branches" of length n: even frequencies are DFT_n(x), odd ones DFT_n(phi x) with
phi[m] = exp(-i pi m / n); phi's factors fold into F1's columns and TW's columns (tables per branch),
and the inverse of the odd branch is the adjoint of its forward. Circulant is NB = 1.

Precision: the GEMM operands are the tables' dtype DT (fp16 on the GPU, fp32 under the interpreter),
accumulation and the elementwise steps are fp32. Every stage is unitary, so no entry of any
intermediate exceeds the L2 norm of the row: each token is scaled by s = 2^k so that the packed row
has ||z||_2 <= BOUND (< fp16 max), the kernel's spectrum by g = 2^k with max |g K| <= 1, and each
output row is divided by its s g.

Kernels (register pressure is what shapes them: every tile beyond C's accumulators is streamed in
chunks of KC rows or columns, and whatever must wait goes to L2, not registers):
- `dft_conv_kernel`: y = the product (forward, or the adjoint with conj(K) for dx). Persistent
  programs loop over pairs. Phase 1 walks row blocks of k1 (everything up to E is row-local): stage 1,
  the twiddle and stage 2 streamed over column chunks of Z (`_forward_rows`), the spectrum's product,
  then D and E one chunk of output columns at a time into a per-program scratch (L2-resident).
  Phase 2: G = F1^H @ E one block of output rows at a time, E read back in chunks of rows.
  With CORR (the backward, x = dy): also the kernel's gradient, sum over the program's pairs of
  W conj(U) with U = DFT of the forward's x pair recomputed (W's rows are C, already there), into a
  per-program partial sum (L2), reduced afterwards. Offsets along tokens are int64.
- `dft_corr_kernel`: the kernel's gradient alone (when dx is not needed): sum over pairs of W conj(U)
  for one row block of the spectrum and one chunk of pairs per program, U waiting in L2 while W is
  computed; the chunks' partial sums are added afterwards (deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _cdot(ar, ai, br, bi, acc_r, acc_i, CONJ_B: tl.constexpr, PREC: tl.constexpr):
    """acc + (ar + i ai) @ (br + i bi), or @ (br - i bi) with CONJ_B. The left operands are registers
    (negating them is free), the right ones tables (so no table needs a negated copy)."""
    if CONJ_B:
        acc_r = tl.dot(ar, br, acc_r, input_precision=PREC)
        acc_r = tl.dot(ai, bi, acc_r, input_precision=PREC)
        acc_i = tl.dot(ai, br, acc_i, input_precision=PREC)
        acc_i = tl.dot(-ar, bi, acc_i, input_precision=PREC)
    else:
        acc_r = tl.dot(ar, br, acc_r, input_precision=PREC)
        acc_r = tl.dot(-ai, bi, acc_r, input_precision=PREC)
        acc_i = tl.dot(ar, bi, acc_i, input_precision=PREC)
        acc_i = tl.dot(ai, br, acc_i, input_precision=PREC)
    return acc_r, acc_i


@triton.jit
def _load_chunk(ptr, row_a, n_rows, row_stride, n_valid, k, KC: tl.constexpr, N2: tl.constexpr):
    """Rows k..k+KC of the [N1, N2] tiles of tokens row_a and row_a + 1 (zero past n_rows tokens or
    past n_valid entries)."""
    m = (k + tl.arange(0, KC))[:, None] * N2 + tl.arange(0, N2)[None, :]
    valid = m < n_valid
    xa = tl.load(ptr + row_a * row_stride + m, mask=valid, other=0.0)
    xb = tl.load(ptr + (row_a + 1) * row_stride + m, mask=valid & (row_a + 1 < n_rows), other=0.0)
    return xa, xb


@triton.jit
def _scale(m, BOUND: tl.constexpr, NUMEL: tl.constexpr):
    """s = 2^k with sqrt(NUMEL) m s <= BOUND / sqrt(2) for a row's largest magnitude m, so the packed
    pair has ||z||_2 <= BOUND. The max, not the L2 norm: it cannot overflow (the norm would give up to
    ~2 more bits of headroom, which fp16's exponent range does not need)."""
    e = tl.floor(tl.log2(BOUND * 0.7071 / tl.sqrt(NUMEL * 1.0))) - tl.ceil(tl.log2(tl.maximum(m, 1e-37)))
    return tl.exp2(tl.minimum(tl.maximum(e, -126.0), 126.0))  # an all-zero row: a large, harmless s


@triton.jit
def _pair_scales(ptr, row_a, n_rows, row_stride, n_valid, BOUND: tl.constexpr,
                 N1: tl.constexpr, N2: tl.constexpr, KC: tl.constexpr):
    """The scales s_a, s_b of tokens row_a and row_a + 1, each its own: the product is real-linear, so
    Re and Im never mix, and a small row beside a large one keeps its relative precision."""
    ma = 0.0
    mb = 0.0
    for k in range(0, N1, KC):
        xa, xb = _load_chunk(ptr, row_a, n_rows, row_stride, n_valid, k, KC, N2)
        ma = tl.maximum(ma, tl.max(tl.max(tl.abs(xa), axis=1), axis=0).to(tl.float32))
        mb = tl.maximum(mb, tl.max(tl.max(tl.abs(xb), axis=1), axis=0).to(tl.float32))
    return _scale(ma, BOUND, N1 * N2), _scale(mb, BOUND, N1 * N2)


@triton.jit
def _forward_rows(ptr, row_a, n_rows, row_stride, n_valid, sa, sb, f1_ptr, tw_ptr, f2_ptr, b, k0,
                  N1: tl.constexpr, N2: tl.constexpr, BK: tl.constexpr, KC: tl.constexpr, PREC: tl.constexpr):
    """Rows k1 in [k0, k0 + BK) of C (branch b) in fp32 for Z = s_a x_a + i s_b x_b, x_a and x_b the
    rows row_a and row_a + 1 at `ptr`. Streamed over chunks of KC columns n2 (stage 2's K dimension):
    per chunk, stage 1 on those columns of Z, their twiddles and their share of stage 2, so that only
    C's accumulators are whole in registers."""
    DT = f1_ptr.dtype.element_ty
    rk = k0 + tl.arange(0, BK)
    r1 = tl.arange(0, N1)
    r2 = tl.arange(0, N2)
    f1 = f1_ptr + b * 2 * N1 * N1 + rk[:, None] * N1 + r1[None, :]
    f1r = tl.load(f1)
    f1i = tl.load(f1 + N1 * N1)
    zero = tl.zeros([BK, KC], dtype=tl.float32)
    cr = tl.zeros([BK, N2], dtype=tl.float32)
    ci = tl.zeros([BK, N2], dtype=tl.float32)
    for c0 in range(0, N2, KC):
        cols = c0 + tl.arange(0, KC)
        m = r1[:, None] * N2 + cols[None, :]
        valid = m < n_valid
        xa = tl.load(ptr + row_a * row_stride + m, mask=valid, other=0.0).to(tl.float32)
        xb = tl.load(ptr + (row_a + 1) * row_stride + m, mask=valid & (row_a + 1 < n_rows), other=0.0).to(tl.float32)
        ar, ai = _cdot(f1r, f1i, (xa * sa).to(DT), (xb * sb).to(DT), zero, zero, False, PREC)
        tw = tw_ptr + b * 2 * N1 * N2 + rk[:, None] * N2 + cols[None, :]
        twr = tl.load(tw).to(tl.float32)
        twi = tl.load(tw + N1 * N2).to(tl.float32)
        f2 = f2_ptr + cols[:, None] * N2 + r2[None, :]  # rows c0.. of F2
        cr, ci = _cdot((ar * twr - ai * twi).to(DT), (ar * twi + ai * twr).to(DT), tl.load(f2), tl.load(f2 + N2 * N2),
                       cr, ci, False, PREC)
    return cr, ci


@triton.jit
def dft_conv_kernel(x_ptr, y_ptr, f1_ptr, f1h_ptr, f2_ptr, tw_ptr, k_ptr, gain_ptr, scratch_ptr,
                    u_ptr, part_ptr, stash_ptr,
                    N, N_PAIRS, N_IN, N_OUT, x_stride, y_stride, N_U, u_stride,
                    N1: tl.constexpr, N2: tl.constexpr, NB: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                    KC: tl.constexpr, CORR: tl.constexpr, BOUND: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    DT = f1_ptr.dtype.element_ty
    TILE: tl.constexpr = N1 * N2
    r2 = tl.arange(0, N2)
    gain = tl.load(gain_ptr)
    scratch = scratch_ptr + pid.to(tl.int64) * (NB * 2 * TILE)
    part = part_ptr + pid.to(tl.int64) * (NB * 2 * TILE)
    stash = stash_ptr + pid.to(tl.int64) * (2 * BK * N2) + tl.arange(0, BK)[:, None] * N2 + r2[None, :]
    for pair in range(pid, N_PAIRS, tl.num_programs(0)):
        row_a = 2 * tl.cast(pair, tl.int64)
        sa, sb = _pair_scales(x_ptr, row_a, N, x_stride, N_IN, BOUND, N1, N2, KC)
        if CORR:
            # U = DFT(x pair) scaled so that both tokens' products W conj(U) carry one factor
            # c = s_a t_a = s_b t_b (t: dy's scales, sa / sb here; each s <= its own bound)
            ua, ub = _pair_scales(u_ptr, row_a, N, u_stride, N_U, BOUND, N1, N2, KC)
            c = tl.minimum(ua * sa, ub * sb)
        # phase 1: up to E = (Y @ conj(F2)) * conj(TW), one block of rows k1 at a time, into the scratch
        for b in tl.static_range(NB):
            for k0 in tl.static_range(0, N1, BK):
                cr, ci = _forward_rows(x_ptr, row_a, N, x_stride, N_IN, sa, sb, f1_ptr, tw_ptr, f2_ptr, b, k0,
                                       N1, N2, BK, KC, PREC)
                blk = b * 2 * TILE + (k0 + tl.arange(0, BK))[:, None] * N2 + r2[None, :]
                if CORR:  # these rows of W = DFT(dy pair) wait in L2 for U's
                    tl.store(stash, cr)
                    tl.store(stash + BK * N2, ci)
                kr = tl.load(k_ptr + blk)
                ki = tl.load(k_ptr + blk + TILE)
                yr = (cr * kr - ci * ki).to(DT)
                yi = (cr * ki + ci * kr).to(DT)
                # D = Y @ conj(F2) and E = D * conj(TW), KC output columns at a time
                for c0 in range(0, N2, KC):
                    cols = c0 + tl.arange(0, KC)
                    f2 = f2_ptr + r2[:, None] * N2 + cols[None, :]  # columns c0.. of F2
                    zero = tl.zeros([BK, KC], dtype=tl.float32)
                    dr, di = _cdot(yr, yi, tl.load(f2), tl.load(f2 + N2 * N2), zero, zero, True, PREC)
                    chunk = b * 2 * TILE + (k0 + tl.arange(0, BK))[:, None] * N2 + cols[None, :]
                    twr = tl.load(tw_ptr + chunk).to(tl.float32)
                    twi = tl.load(tw_ptr + chunk + TILE).to(tl.float32)
                    tl.store(scratch + chunk, (dr * twr + di * twi).to(DT))
                    tl.store(scratch + chunk + TILE, (di * twr - dr * twi).to(DT))
                if CORR:
                    ur, ui = _forward_rows(u_ptr, row_a, N, u_stride, N_U, c / sa, c / sb, f1_ptr, tw_ptr, f2_ptr, b, k0,
                                           N1, N2, BK, KC, PREC)
                    tl.debug_barrier()
                    wr = tl.load(stash)
                    wi = tl.load(stash + BK * N2)
                    tl.store(part + blk, tl.load(part + blk) + (wr * ur + wi * ui) / c)  # W conj(U)
                    tl.store(part + blk + TILE, tl.load(part + blk + TILE) + (wi * ur - wr * ui) / c)
                    tl.debug_barrier()  # the next block overwrites the stash
        tl.debug_barrier()
        # phase 2: G = sum_b F1_b^H @ E_b, one block of output rows n1 at a time
        for n0 in tl.static_range(0, N1, BN):
            rn = n0 + tl.arange(0, BN)
            gr = tl.zeros([BN, N2], dtype=tl.float32)
            gi = tl.zeros([BN, N2], dtype=tl.float32)
            for b in tl.static_range(NB):
                for k in range(0, N1, KC):  # E in chunks of KC rows (the K dimension)
                    rows = (k + tl.arange(0, KC))[:, None] * N2 + r2[None, :]
                    er = tl.load(scratch + b * 2 * TILE + rows)
                    ei = tl.load(scratch + b * 2 * TILE + TILE + rows)
                    fh = f1h_ptr + b * 2 * N1 * N1 + rn[:, None] * N1 + (k + tl.arange(0, KC))[None, :]
                    gr, gi = _cdot(tl.load(fh), tl.load(fh + N1 * N1), er, ei, gr, gi, False, PREC)
            out = rn[:, None] * N2 + r2[None, :]
            ok = out < N_OUT
            tl.store(y_ptr + row_a * y_stride + out, (gr * (gain / sa)).to(y_ptr.dtype.element_ty), mask=ok)
            tl.store(y_ptr + (row_a + 1) * y_stride + out, (gi * (gain / sb)).to(y_ptr.dtype.element_ty),
                     mask=ok & (row_a + 1 < N))
        tl.debug_barrier()  # the next pair's phase 1 overwrites the scratch


@triton.jit
def dft_corr_kernel(x_ptr, dy_ptr, f1_ptr, f2_ptr, tw_ptr, part_ptr, stash_ptr,
                    N, N_PAIRS, N_IN, N_DY, x_stride, dy_stride, PAIRS_PER_CHUNK,
                    N1: tl.constexpr, N2: tl.constexpr, BK: tl.constexpr, KC: tl.constexpr, BOUND: tl.constexpr,
                    PREC: tl.constexpr):
    k0 = tl.program_id(0) * BK
    chunk = tl.program_id(1)
    b = tl.program_id(2)
    DT = f1_ptr.dtype.element_ty
    TILE: tl.constexpr = N1 * N2
    rows = (k0 + tl.arange(0, BK))[:, None] * N2 + tl.arange(0, N2)[None, :]
    # this program's partial sum (zero-filled) and a stash for U, both in L2: one transform's tiles
    # in registers at a time
    part = part_ptr + (chunk.to(tl.int64) * tl.num_programs(2) + b) * 2 * TILE + rows
    pid = (chunk * tl.num_programs(2) + b) * tl.num_programs(0) + tl.program_id(0)
    stash = stash_ptr + pid.to(tl.int64) * 2 * BK * N2 + tl.arange(0, BK)[:, None] * N2 + tl.arange(0, N2)[None, :]
    first = chunk * PAIRS_PER_CHUNK
    for pair in range(first, tl.minimum(first + PAIRS_PER_CHUNK, N_PAIRS)):
        row_a = 2 * tl.cast(pair, tl.int64)
        # one scale per pair for x and one for dy: the sum over the pair needs s_a t_a = s_b t_b
        sa, sb = _pair_scales(x_ptr, row_a, N, x_stride, N_IN, BOUND, N1, N2, KC)
        su = tl.minimum(sa, sb)
        ur, ui = _forward_rows(x_ptr, row_a, N, x_stride, N_IN, su, su, f1_ptr, tw_ptr, f2_ptr, b, k0, N1, N2, BK, KC, PREC)
        tl.store(stash, ur)
        tl.store(stash + BK * N2, ui)
        sa, sb = _pair_scales(dy_ptr, row_a, N, dy_stride, N_DY, BOUND, N1, N2, KC)
        sw = tl.minimum(sa, sb)
        wr, wi = _forward_rows(dy_ptr, row_a, N, dy_stride, N_DY, sw, sw, f1_ptr, tw_ptr, f2_ptr, b, k0, N1, N2, BK, KC, PREC)
        tl.debug_barrier()
        ur = tl.load(stash)
        ui = tl.load(stash + BK * N2)
        inv = 1.0 / (su * sw)
        tl.store(part, tl.load(part) + (wr * ur + wi * ui) * inv)  # W conj(U)
        tl.store(part + TILE, tl.load(part + TILE) + (wi * ur - wr * ui) * inv)
        tl.debug_barrier()  # the next pair overwrites the stash
