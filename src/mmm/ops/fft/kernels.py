"""Triton kernels around cuFFT for the circulant / Toeplitz product: everything that is not an FFT,
each done in one pass over the data.

The real FFTs of length L are done as complex FFTs of length H = L/2 on the rows viewed as complex
pairs, z[m] = x[2m] + i x[2m+1] (no copy), because torch's complex-to-real inverse clones its input
first (one more pass) and the half-length complex transforms are what cuFFT runs inside rfft anyway.
The kernels do the two small fix-ups that turn one into the other, fused with the product:

  unpack  (after the forward FFT Z = fft_H(z)), for k in [0, H/2] and its partner m = H - k:
      S = Z[k] + conj(Z[m mod H]),  T = w^k (Z[k] - conj(Z[m mod H])),  w = exp(-2 pi i / L)
      2 X[k] = S - i T,  2 X[m] = conj(S + i T)                    (X = rfft_L of the row)
  pack    (before the inverse FFT), from Y[k], Y[m]:
      U = Y[k] + conj(Y[m]),  V = conj(w^k) (Y[k] - conj(Y[m]))
      Zin[k] = U + i V,  Zin[m] = conj(U) + i conj(V)
  and the unnormalised inverse fft_H^{-1}(Zin), read as real pairs, is 2 L y when Y = 2 X K
  (so the product is scaled by `gain` = 1/(2L) to give y itself).

Each program owns the frequency pairs (k, H - k) for a range of k, so nothing is shared between
programs. ODD / twist (fft_conv(odd=True), a skew-circular product of length n = 2H): the rows are
twisted, z[m] = (x[2m] + i x[2m+1]) exp(-i pi m / H), and the same unpack and pack formulas give the
odd frequencies X[k + 1/2] of the length-2n transform from Z[k] and Z[H - 1 - k], with w^(k + 1/2) in
place of w^k: every pair is two distinct frequencies, and cast_out untwists.
Kernels:
- `cast_in_kernel`: x rows (any float dtype) -> fp32/fp16 rows zero-padded to L per block; for the
  fp16 FFT also a per-row power-of-two scale that bounds the row's largest entry (see op.py).
- `spectral_mix_kernel`: Zin_o = pack(gain * sum_u unpack(Z_u) * K[o, u]) (K conjugated and its block
  indices swapped through strides for the adjoint). Grid (frequency tiles x token chunks, out blocks).
  In the backward with one block of dy (CORR) it also sums the kernel's gradient, as the next one does.
- `spectral_corr_kernel`: partial sums over a chunk of tokens of conj(X_j) DY_i (the kernel's
  gradient), per frequency; the chunks' partials are added up afterwards (deterministic). Grid
  (frequency tiles x token chunks, block pairs).
- `cast_out_kernel`: the inverse FFT's rows, first n_out of each block, times a gain (and the row's
  inverse scale), cast to the output dtype.
All arithmetic is fp32; offsets along tokens are int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._eager import cdiv, fast_launch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PI = tl.constexpr(3.141592653589793)  # kernels may read only constexpr globals (plain ones fail to compile)

# Tiles of the two spectral kernels: BT rows x BF frequencies, rows per program, warps. Memory-bound:
# BF = 32 gives each warp 32 frequencies, one (re, im) pair a thread, i.e. whole 128-byte lines of
# fp16 pairs per access, and the warps take the rows, so a thread's twiddles and kernel values serve
# all its rows (few registers: many programs per SM, many loads in flight). Timed against
# alternatives by scripts/gpu_fft_kernels.py. The interpreter gets large tiles because its cost grows
# with the number of programs.
GPU_MIX_TILES = (32, 32, 128, 4)
GPU_CORR_TILES = (16, 32, 128, 4)
BT_MIX, BF_MIX, MIX_ROWS, WARPS_MIX = (16, 64, 32, 4) if INTERPRET else GPU_MIX_TILES
BT_CORR, BF_CORR, CORR_ROWS, WARPS_CORR = (16, 64, 64, 4) if INTERPRET else GPU_CORR_TILES
CAST_BLOCK = 1024 if INTERPRET else 2048
GAIN_BLOCK = 256 if INTERPRET else 1024


@triton.jit
def cast_in_kernel(x_ptr, out_ptr, scale_ptr, x_row_stride, Q, N_IN, L, bound,
                   SCALE: tl.constexpr, TWIST: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + t * x_row_stride
    out_row = out_ptr + t * Q * L
    s = 1.0
    if SCALE:
        # s = 2^floor(log2(bound / max|x|)): exact to apply and to undo, and max|s x| <= bound.
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, Q * N_IN, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < Q * N_IN, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        a = tl.maximum(tl.max(amax, axis=0), 1e-30)  # an all-zero row gets a large, harmless scale
        e = tl.minimum(tl.maximum(tl.floor(tl.log2(bound / a)), -120.0), 120.0)
        s = tl.exp2(e)
        tl.store(scale_ptr + t, s)
    for start in range(0, Q * L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        j = offs // L
        pos = offs - j * L
        v = tl.load(x_row + j * N_IN + pos, mask=(offs < Q * L) & (pos < N_IN), other=0.0).to(tl.float32)
        if TWIST:  # pair m = pos // 2 (re, im) times exp(-i pi m / H), H = L / 2 (L even: no pair straddles)
            re, im = tl.split(tl.reshape(v, [BLOCK // 2, 2]))
            theta = (((start + 2 * tl.arange(0, BLOCK // 2)) % L) // 2).to(tl.float32) * (2.0 * PI / L)
            c, sn = tl.cos(theta), tl.sin(theta)
            v = tl.reshape(tl.join(re * c + im * sn, im * c - re * sn), [BLOCK])
        tl.store(out_row + offs, (v * s).to(out_ptr.dtype.element_ty), mask=offs < Q * L)


@triton.jit
def _pairs(pid_f, H, BF: tl.constexpr, ODD: tl.constexpr):
    """This program's frequencies k and w^k = c - i sn, as [BF] vectors, and, for each of the 2 BF parts
    (re, im) of a tile row, its frequency `kp` and its offset in a row of pairs at k and at the partner
    m: m = H - k for k <= H/2 (whole frequencies), or with ODD (odd_frequencies: the half-integer
    frequencies k + 1/2 of a twisted row) m = H - 1 - k for k < H/2 and w^(k + 1/2)."""
    k = pid_f * BF + tl.arange(0, BF)
    part = tl.arange(0, 2 * BF)
    kp = pid_f * BF + part // 2
    if ODD:
        theta = (k.to(tl.float32) + 0.5) * (PI / H)
        mo = 2 * (H - 1 - kp) + part % 2
    else:
        theta = k.to(tl.float32) * (PI / H)
        mo = 2 * (H - kp) + part % 2
    return k, tl.cos(theta), tl.sin(theta), kp, 2 * kp + part % 2, mo


@triton.jit
def _n_pairs(H, ODD: tl.constexpr):
    """How many frequencies k the pairs (k, m) start from: H/2 + 1, or H/2 with ODD (every pair distinct)."""
    if ODD:
        return H // 2
    else:
        return H // 2 + 1


@triton.jit
def _partner_stored(kp, H, ODD: tl.constexpr):
    """Whether the partner m of kp is a frequency of its own: not for k = 0 (m = H is not an index of a
    row of H) nor k = H/2 (m = k); with ODD every pair is two distinct frequencies."""
    if ODD:
        return kp >= 0
    else:
        return (kp > 0) & (2 * kp != H)


@triton.jit
def _load_complex(ptr, mask):
    """(re, im) [BT, BF] in fp32 from a [BT, 2 BF] tile of pointers to (re, im) pairs. A pair is
    one vector access of one thread (the m run is read backwards, pair by pair), and the tile is
    laid out with threads along frequencies because its pointers are contiguous in pairs there."""
    v = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(v, [v.shape[0], v.shape[1] // 2, 2]))


@triton.jit
def _store_complex(ptr, re, im, mask):
    """The counterpart of _load_complex, cast to ptr's dtype."""
    v = tl.reshape(tl.join(re, im), ptr.shape)
    tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpack(row, k, c, sn, kp, ko, mo, mask, ODD: tl.constexpr):
    """2 X[k] and 2 X[m] (re, im) from Z[k] and Z[m mod H], `row` [BT, 1] pointers to row blocks of
    Z (real pairs); `mask` [BT, 2 BF] in the loads' tiling. With ODD, X at the odd frequencies
    (the same formulas with _pairs' partner and twiddle)."""
    a_re, a_im = _load_complex(row + ko[None, :], mask)
    if ODD:
        b_re, b_im = _load_complex(row + mo[None, :], mask)
        b_im = -b_im
    else:
        b_re, b_im = _load_complex(row + mo[None, :], mask & (kp > 0)[None, :])
        first = (k == 0)[None, :]  # its partner m = H is Z[0] itself: taken from a, not loaded
        b_re = tl.where(first, a_re, b_re)
        b_im = -tl.where(first, a_im, b_im)  # conj(Z[m])
    s_re = a_re + b_re
    s_im = a_im + b_im
    d_re = a_re - b_re
    d_im = a_im - b_im
    t_re = c[None, :] * d_re + sn[None, :] * d_im  # T = w^k D, w^k = c - i sn
    t_im = c[None, :] * d_im - sn[None, :] * d_re
    return s_re + t_im, s_im - t_re, s_re - t_im, -(s_im + t_re)


@triton.jit
def _kernel_at(kb, offs, kmask, CONJ: tl.constexpr):
    """K (or conj K) at the pairs `offs` [2 BF] of kb, as [1, BF] rows (re, im)."""
    v = tl.load(kb + offs, mask=kmask, other=0.0)
    re, im = tl.split(tl.reshape(v, [v.shape[0] // 2, 2]))
    if CONJ:
        im = -im
    return re[None, :], im[None, :]


@triton.jit
def spectral_mix_kernel(z_ptr, k_ptr, gain_ptr, out_ptr, zx_ptr, sx_ptr, sdy_ptr, part_ptr, N, H, U_BLOCKS, ROWS,
                        z_st, z_sb, k_so, k_su, out_st, out_sb, zx_st, zx_sb, part_sc, part_sj,  # strides in (re, im) pairs
                        CONJ: tl.constexpr, CORR: tl.constexpr, HAS_SCALE: tl.constexpr, ODD: tl.constexpr,
                        BT: tl.constexpr, BF: tl.constexpr):
    # Frequency tiles vary fastest in the grid, so the last, nearly empty one (k = H/2 alone) is
    # spread over the whole launch instead of forming its tail.
    n_f = tl.cdiv(_n_pairs(H, ODD), BF)
    chunk = tl.program_id(0) // n_f
    k, c, sn, kp, ko, mo = _pairs(tl.program_id(0) - chunk * n_f, H, BF, ODD)
    o = tl.program_id(1)
    kmask = kp < _n_pairs(H, ODD)
    mstore = _partner_stored(kp, H, ODD)
    gain = tl.load(gain_ptr)
    # CORR (the adjoint with one block of dy, U_BLOCKS = 1): also the kernel's gradient, as
    # spectral_corr_kernel does, while dy's spectrum is loaded anyway (x's spectrum: block o of zx)
    pk_re = tl.zeros([BT, BF], dtype=tl.float32)
    pk_im = tl.zeros([BT, BF], dtype=tl.float32)
    pm_re = tl.zeros([BT, BF], dtype=tl.float32)
    pm_im = tl.zeros([BT, BF], dtype=tl.float32)
    # several row tiles per program, so the twiddles are computed once for many rows
    for t0 in range(0, ROWS, BT):
        rows = (chunk * ROWS + t0 + tl.arange(0, BT)).to(tl.int64)
        mask = (rows < N)[:, None] & kmask[None, :]
        yk_re = tl.zeros([BT, BF], dtype=tl.float32)
        yk_im = tl.zeros([BT, BF], dtype=tl.float32)
        ym_re = tl.zeros([BT, BF], dtype=tl.float32)
        ym_im = tl.zeros([BT, BF], dtype=tl.float32)
        for u in range(U_BLOCKS):
            xk_re, xk_im, xm_re, xm_im = _unpack(z_ptr + rows[:, None] * (2 * z_st) + u * (2 * z_sb), k, c, sn, kp, ko, mo, mask,
                                                 ODD)
            if CORR:
                qk_re, qk_im, qm_re, qm_im = _corr_terms(zx_ptr + rows[:, None] * (2 * zx_st) + o * (2 * zx_sb), sx_ptr,
                                                         sdy_ptr, rows, rows < N, xk_re, xk_im, xm_re, xm_im, k, c, sn, kp, ko,
                                                         mo, mask, HAS_SCALE, ODD)
                pk_re += qk_re
                pk_im += qk_im
                pm_re += qm_re
                pm_im += qm_im
            kb = k_ptr + o * (2 * k_so) + u * (2 * k_su)
            kk_re, kk_im = _kernel_at(kb, ko, kmask, CONJ)
            km_re, km_im = _kernel_at(kb, mo, kmask, CONJ)
            yk_re += xk_re * kk_re - xk_im * kk_im
            yk_im += xk_re * kk_im + xk_im * kk_re
            ym_re += xm_re * km_re - xm_im * km_im
            ym_im += xm_re * km_im + xm_im * km_re
        yk_re *= gain
        yk_im *= gain
        ym_re *= gain
        ym_im *= gain
        u_re = yk_re + ym_re  # U = Y[k] + conj(Y[m])
        u_im = yk_im - ym_im
        e_re = yk_re - ym_re  # Y[k] - conj(Y[m])
        e_im = yk_im + ym_im
        v_re = c[None, :] * e_re - sn[None, :] * e_im  # V = conj(w^k) (Y[k] - conj(Y[m]))
        v_im = c[None, :] * e_im + sn[None, :] * e_re
        out = out_ptr + rows[:, None] * (2 * out_st) + o * (2 * out_sb)
        _store_complex(out + ko[None, :], u_re - v_im, u_im + v_re, mask)
        _store_complex(out + mo[None, :], u_re + v_im, v_re - u_im, mask & mstore[None, :])
    if CORR:
        _store_partials(part_ptr + chunk * (2 * part_sc) + o * (2 * part_sj), pk_re, pk_im, pm_re, pm_im, kp, ko, mo, H, ODD)


@triton.jit
def spectral_corr_kernel(zx_ptr, zdy_ptr, sx_ptr, sdy_ptr, part_ptr, N, H, Q, ROWS,
                         zx_st, zx_sb, zdy_st, zdy_sb, part_sc, part_si, part_sj,  # strides in (re, im) pairs
                         HAS_SCALE: tl.constexpr, ODD: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    n_f = tl.cdiv(_n_pairs(H, ODD), BF)
    chunk = tl.program_id(0) // n_f
    k, c, sn, kp, ko, mo = _pairs(tl.program_id(0) - chunk * n_f, H, BF, ODD)
    ij = tl.program_id(1)
    i = ij // Q
    j = ij - i * Q
    kmask = kp < _n_pairs(H, ODD)
    # Per-element partial sums, reduced over the rows once at the end (not once per row tile).
    pk_re = tl.zeros([BT, BF], dtype=tl.float32)
    pk_im = tl.zeros([BT, BF], dtype=tl.float32)
    pm_re = tl.zeros([BT, BF], dtype=tl.float32)
    pm_im = tl.zeros([BT, BF], dtype=tl.float32)
    for t0 in range(0, ROWS, BT):
        rows = (chunk * ROWS + t0 + tl.arange(0, BT)).to(tl.int64)
        rmask = rows < N
        mask = rmask[:, None] & kmask[None, :]
        dk_re, dk_im, dm_re, dm_im = _unpack(zdy_ptr + rows[:, None] * (2 * zdy_st) + i * (2 * zdy_sb), k, c, sn, kp, ko, mo, mask,
                                             ODD)
        qk_re, qk_im, qm_re, qm_im = _corr_terms(zx_ptr + rows[:, None] * (2 * zx_st) + j * (2 * zx_sb), sx_ptr, sdy_ptr,
                                                 rows, rmask, dk_re, dk_im, dm_re, dm_im, k, c, sn, kp, ko, mo, mask, HAS_SCALE,
                                                 ODD)
        pk_re += qk_re
        pk_im += qk_im
        pm_re += qm_re
        pm_im += qm_im
    _store_partials(part_ptr + chunk * (2 * part_sc) + i * (2 * part_si) + j * (2 * part_sj), pk_re, pk_im, pm_re, pm_im,
                    kp, ko, mo, H, ODD)


@triton.jit
def _corr_terms(zx_row, sx_ptr, sdy_ptr, rows, rmask, dk_re, dk_im, dm_re, dm_im, k, c, sn, kp, ko, mo, mask,
                HAS_SCALE: tl.constexpr, ODD: tl.constexpr):
    """conj(2 X[k]) (2 DY[k]) and the same at m, per row, from 2 DY (unpacked) and X's packed spectrum
    (row pointers `zx_row`), the rows' scales of x and dy undone (HAS_SCALE)."""
    xk_re, xk_im, xm_re, xm_im = _unpack(zx_row, k, c, sn, kp, ko, mo, mask, ODD)
    qk_re = xk_re * dk_re + xk_im * dk_im
    qk_im = xk_re * dk_im - xk_im * dk_re
    qm_re = xm_re * dm_re + xm_im * dm_im
    qm_im = xm_re * dm_im - xm_im * dm_re
    if HAS_SCALE:
        r = (1.0 / (tl.load(sx_ptr + rows, mask=rmask, other=1.0) * tl.load(sdy_ptr + rows, mask=rmask, other=1.0)))[:, None]
        qk_re *= r
        qk_im *= r
        qm_re *= r
        qm_im *= r
    return qk_re, qk_im, qm_re, qm_im


@triton.jit
def _store_partials(out, pk_re, pk_im, pm_re, pm_im, kp, ko, mo, H, ODD: tl.constexpr):
    """The row sums of the partial tiles at frequencies k and m of a part row (pointer `out`)."""
    kmask = kp < _n_pairs(H, ODD)
    _store_complex(out + ko[None, :], tl.sum(pk_re, axis=0)[None, :], tl.sum(pk_im, axis=0)[None, :], kmask[None, :])
    # Here m = H (Nyquist) is a frequency of its own (the part rows have H + 1); k = H/2 has m = k,
    # stored once. With ODD every pair is two distinct frequencies.
    mmask = kmask if ODD else kmask & (2 * kp != H)
    _store_complex(out + mo[None, :], tl.sum(pm_re, axis=0)[None, :], tl.sum(pm_im, axis=0)[None, :], mmask[None, :])


@triton.jit
def gains_kernel(k_ptr, gains_ptr, OUTER, INNER, F, k_so, k_si, c, two_l, BLOCK: tl.constexpr):
    """One program: R = max_a sum_b max_f |K[a, b, f]| (a, b = out, in block; swapped through the strides
    for the adjoint), then gain = 2^floor(log2(2^11 / (R c))) clamped to 2^+-60 and 1 / (2 L gain)."""
    r = 0.0
    for a in range(OUTER):
        row = 0.0
        for b in range(INNER):
            base = k_ptr + a * k_so + b * k_si
            m = tl.zeros([BLOCK], dtype=tl.float32)
            for f0 in range(0, F, BLOCK):
                offs = f0 + tl.arange(0, BLOCK)
                re = tl.load(base + 2 * offs, mask=offs < F, other=0.0)
                im = tl.load(base + 2 * offs + 1, mask=offs < F, other=0.0)
                m = tl.maximum(m, tl.sqrt(re * re + im * im))
            row += tl.max(m, axis=0)
        r = tl.maximum(r, row)
    r = tl.maximum(r, 1e-30)
    gain = tl.exp2(tl.minimum(tl.maximum(tl.floor(tl.log2(2048.0 / (r * c))), -60.0), 60.0))
    tl.store(gains_ptr, gain)
    tl.store(gains_ptr + 1, 1.0 / (two_l * gain))


@triton.jit
def corr_finish_kernel(part_ptr, out_ptr, CHUNKS, F, chunk_stride, L, ODD: tl.constexpr, BLOCK: tl.constexpr):
    """out[f] = (w_f / (4 L)) sum_c part[c, f] per (re, im) value (f counts values of the [p, q, H+1, 2]
    block), w_f = 1 at DC and Nyquist, 2 elsewhere (naive.hermitian_weights); with ODD (odd frequencies
    only, [p, q, H, 2]) w_f = 2 throughout."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for ch in range(CHUNKS):
        acc += tl.load(part_ptr + ch * chunk_stride + offs, mask=mask, other=0.0)
    if ODD:
        w = 2.0
    else:
        freq = (offs // 2) % (L // 2 + 1)
        w = tl.where((freq == 0) | (2 * freq == L), 1.0, 2.0)
    tl.store(out_ptr + offs, acc * (w / (4.0 * L)), mask=mask)


@triton.jit
def cast_out_kernel(y_ptr, out_ptr, gain_ptr, scale_ptr, P, L, N_OUT,
                    ROWSCALE: tl.constexpr, TWIST: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    i = offs // N_OUT
    r = offs - i * N_OUT
    mask = offs < P * N_OUT
    v = tl.load(y_ptr + t * P * L + i * L + r, mask=mask, other=0.0).to(tl.float32)
    if TWIST:  # cast_in's twist undone: pair m = r // 2 times exp(+i pi m / H), H = L / 2
        odd = r % 2
        w = tl.load(y_ptr + t * P * L + i * L + r + 1 - 2 * odd, mask=mask, other=0.0).to(tl.float32)
        theta = (r // 2).to(tl.float32) * (2.0 * PI / L)
        c, sn = tl.cos(theta), tl.sin(theta)
        # (re + i im)(c + i sn): re' = re c - im sn, im' = im c + re sn
        v = tl.where(odd == 0, v * c - w * sn, v * c + w * sn)
    g = tl.load(gain_ptr)
    if ROWSCALE:
        g = g / tl.load(scale_ptr + t)
    tl.store(out_ptr + t * P * N_OUT + offs, (v * g).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------

def cast_in(x: torch.Tensor, q: int, n_in: int, L: int, dtype: torch.dtype, bound: float | None, twist: bool = False):
    """x [N, q*n_in] (unit stride along rows) -> ([N, q*L] in `dtype`, zero-padded per block, row
    scales [N] fp32 or None). With `bound`, each row is scaled by a power of two to max|.| <= bound.
    With `twist`, each block's pair m (entries 2m, 2m+1 as re, im) is multiplied by exp(-2 pi i m / L)
    (the odd-frequency transform, op.py)."""
    N = x.shape[0]
    out = torch.empty(N, q * L, device=x.device, dtype=dtype)
    scale = torch.empty(N, device=x.device, dtype=torch.float32) if bound is not None else None
    fast_launch(cast_in_kernel)[(N,)](x, out, scale if scale is not None else out, x.stride(0), q, n_in, L,
                                      float(bound or 1.0), SCALE=bound is not None, TWIST=twist, BLOCK=CAST_BLOCK)
    return out, scale


def _check_tiles(bt, bf, rows):
    if rows % bt or bt & (bt - 1) or bf & (bf - 1):  # a partial last row tile would overlap the next chunk
        raise ValueError(f"tiles need powers of two BT and BF and rows per program a multiple of BT, got {bt}, {bf}, {rows}")


def _pairs_of(*strides):
    """Strides in (re, im) pairs. The spectral kernels take them so, and double them inside: the compiler
    then knows that every pair starts at an even element, and loads and stores it as one vector."""
    assert all(s % 2 == 0 for s in strides), strides  # [..., 2] views of complex tensors
    return [s // 2 for s in strides]


def spectral_mix(z: torch.Tensor, kernel_ri: torch.Tensor, gain: torch.Tensor, transpose: bool,
                 corr_of: tuple | None = None, odd: bool = False):
    """z [N, u_blocks, H, 2] (FFT of the packed rows), kernel_ri [p, q, H+1, 2] fp32 ->
    Zin [N, o_blocks, H, 2] in z's dtype: pack(gain * sum_u unpack(z_u) K[o, u]); with `transpose`,
    K is conjugated and indexed K[u, o] (the adjoint). corr_of = (zx, sx, sdy, L), for the adjoint with
    one block of dy (z = dy's spectrum): also returns the kernel's gradient, spectral_corr(zx, z, sx,
    sdy, L, odd), from the same pass (dy's spectrum is read once for both). With `odd`, z holds FFTs of
    twisted rows (cast_in's `twist`) and kernel_ri [p, q, H, 2] the kernel at the odd frequencies."""
    N, u_blocks, H, _ = z.shape
    so, su = kernel_ri.stride(0), kernel_ri.stride(1)
    o_blocks = kernel_ri.shape[1] if transpose else kernel_ri.shape[0]
    if transpose:
        so, su = su, so
    out = torch.empty(N, o_blocks, H, 2, device=z.device, dtype=z.dtype)
    _check_tiles(BT_MIX, BF_MIX, MIX_ROWS)
    chunks = cdiv(N, MIX_ROWS)
    grid = (cdiv(H // 2 + (0 if odd else 1), BF_MIX) * chunks, o_blocks)
    corr = corr_of is not None
    if corr:
        zx, sx, sdy, L = corr_of
        if not transpose or u_blocks != 1:
            raise ValueError(f"the fused kernel gradient needs the adjoint with one block of dy, got "
                             f"transpose={transpose}, {u_blocks} blocks")
        part = torch.empty(chunks, 1, o_blocks, H + (0 if odd else 1), 2, device=z.device, dtype=torch.float32)
        zx_strides = _pairs_of(zx.stride(0), zx.stride(1), part.stride(0), part.stride(2))
    else:
        zx, sx, sdy, part = out, None, None, out
        zx_strides = [0, 0, 0, 0]
    has_scale = sx is not None
    strides = _pairs_of(z.stride(0), z.stride(1), so, su, out.stride(0), out.stride(1))
    # CORR holds twice the [BT, BF] tiles: half the rows per tile keep the registers where the plain
    # product has them (sm_90, ptxas: 125 vs 220 registers at BT = 16 vs 32, no spills; the plain one 128)
    bt = max(1, BT_MIX // 2) if corr else BT_MIX
    fast_launch(spectral_mix_kernel)[grid](z, kernel_ri, gain, out, zx, sx if has_scale else gain,
                                           sdy if has_scale else gain, part, N, H, u_blocks, MIX_ROWS,
                                           *strides, *zx_strides, CONJ=transpose, CORR=corr, HAS_SCALE=has_scale,
                                           ODD=odd, BT=bt, BF=BF_MIX, num_warps=WARPS_MIX)
    return (out, _finish_corr(part, L, odd)) if corr else out


def fp16_gains(kernel_ri: torch.Tensor, transpose: bool, c: float, L: int) -> torch.Tensor:
    """[gain, 1 / (2 L gain)] fp32 on the kernel's device, in one launch: the power-of-two gain of op.py's
    fp16 range argument, R = max_o sum_u max_f |K[o, u, f]| ((u, o) for the adjoint), c the rest of
    the bound. kernel_ri [p, q, F, 2] fp32, unit stride along the last two dims."""
    so, si = kernel_ri.stride(0), kernel_ri.stride(1)
    outer, inner = kernel_ri.shape[0], kernel_ri.shape[1]
    if transpose:
        so, si, outer, inner = si, so, inner, outer
    gains = torch.empty(2, device=kernel_ri.device, dtype=torch.float32)
    fast_launch(gains_kernel)[(1,)](kernel_ri, gains, outer, inner, kernel_ri.shape[2], so, si, float(c),
                                    float(2 * L), BLOCK=GAIN_BLOCK)
    return gains


def spectral_corr(zx: torch.Tensor, zdy: torch.Tensor, sx: torch.Tensor | None, sdy: torch.Tensor | None,
                  L: int, odd: bool = False) -> torch.Tensor:
    """(w_f / (4 L)) sum over tokens of conj(2 X_j) (2 DY_i) / (sx sdy) = the kernel's gradient,
    [p, q, H+1] complex64, from the packed spectra zx [N, q, H, 2] and zdy [N, p, H, 2]; with `odd`
    (spectra of twisted rows) at the odd frequencies of length L: [p, q, H]."""
    N, q, H, _ = zx.shape
    p = zdy.shape[1]
    _check_tiles(BT_CORR, BF_CORR, CORR_ROWS)
    chunks = cdiv(N, CORR_ROWS)
    part = torch.empty(chunks, p, q, H + (0 if odd else 1), 2, device=zx.device, dtype=torch.float32)
    grid = (cdiv(H // 2 + (0 if odd else 1), BF_CORR) * chunks, p * q)
    has_scale = sx is not None
    strides = _pairs_of(zx.stride(0), zx.stride(1), zdy.stride(0), zdy.stride(1),
                        part.stride(0), part.stride(1), part.stride(2))
    fast_launch(spectral_corr_kernel)[grid](zx, zdy, sx if has_scale else part, sdy if has_scale else part, part,
                                            N, H, q, CORR_ROWS, *strides,
                                            HAS_SCALE=has_scale, ODD=odd, BT=BT_CORR, BF=BF_CORR, num_warps=WARPS_CORR)
    return _finish_corr(part, L, odd)


def _finish_corr(part: torch.Tensor, L: int, odd: bool) -> torch.Tensor:
    """The kernel's gradient [p, q, F] complex64 from the chunks' partial sums [chunks, p, q, F, 2]."""
    chunks, p, q, F, _ = part.shape
    out = torch.empty(p, q, F, 2, device=part.device, dtype=torch.float32)
    values = p * q * F * 2
    fast_launch(corr_finish_kernel)[(cdiv(values, CAST_BLOCK),)](part, out, chunks, values, part.stride(0), L,
                                                                 ODD=odd, BLOCK=CAST_BLOCK)
    return torch.view_as_complex(out)


def cast_out(y: torch.Tensor, p: int, L: int, n_out: int, gain: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype,
             twist: bool = False):
    """y [N, p*L] -> [N, p*n_out] in `dtype`: the first n_out of each block times gain / scale[row];
    with `twist`, cast_in's twist undone first (pair m times exp(+2 pi i m / L))."""
    N = y.shape[0]
    # The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even): round in torch there.
    truncating = INTERPRET and dtype == torch.bfloat16
    out = torch.empty(N, p * n_out, device=y.device, dtype=torch.float32 if truncating else dtype)
    block = CAST_BLOCK // 4 if twist else CAST_BLOCK  # (its two loads and rotation per element: registers)
    grid = (N, cdiv(p * n_out, block))
    fast_launch(cast_out_kernel)[grid](y, out, gain, scale if scale is not None else gain, p, L, n_out,
                                       ROWSCALE=scale is not None, TWIST=twist, BLOCK=block)
    return out.to(dtype) if truncating else out
