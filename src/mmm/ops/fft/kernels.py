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
programs. Kernels:
- `cast_in_kernel`: x rows (any float dtype) -> fp32/fp16 rows zero-padded to L per block; for the
  fp16 FFT also a per-row power-of-two scale that bounds the row's largest entry (see op.py).
- `spectral_mix_kernel`: Zin_o = pack(gain * sum_u unpack(Z_u) * K[o, u]) (K conjugated and its block
  indices swapped through strides for the adjoint). Grid (token tiles, frequency tiles, out blocks).
- `spectral_corr_kernel`: partial sums over a chunk of tokens of conj(X_j) DY_i (the kernel's
  gradient), per frequency; the chunks' partials are added up afterwards (deterministic).
- `cast_out_kernel`: the inverse FFT's rows, first n_out of each block, times a gain (and the row's
  inverse scale), cast to the output dtype.
All arithmetic is fp32; offsets along tokens are int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PI = tl.constexpr(3.141592653589793)  # kernels may read only constexpr globals (plain ones fail to compile)

# Tiles: memory-bound kernels, so any tile wide enough for coalesced rows will do; the interpreter
# gets large tiles because its cost grows with the number of programs.
BT_MIX, BF_MIX = (16, 64) if INTERPRET else (8, 128)
BT_CORR, BF_CORR, CORR_ROWS = (16, 64, 64) if INTERPRET else (16, 64, 256)
CAST_BLOCK = 1024 if INTERPRET else 2048


@triton.jit
def cast_in_kernel(x_ptr, out_ptr, scale_ptr, x_row_stride, Q, N_IN, L, bound,
                   SCALE: tl.constexpr, BLOCK: tl.constexpr):
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
        tl.store(out_row + offs, (v * s).to(out_ptr.dtype.element_ty), mask=offs < Q * L)


@triton.jit
def _unpack(base, k, mm, mask, c, sn):
    """2 X[k] and 2 X[m] (re, im) from Z[k] and Z[m mod H] at `base` (a row block of Z as real pairs)."""
    a_re = tl.load(base + 2 * k[None, :], mask=mask, other=0.0).to(tl.float32)
    a_im = tl.load(base + 2 * k[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
    b_re = tl.load(base + 2 * mm[None, :], mask=mask, other=0.0).to(tl.float32)
    b_im = -tl.load(base + 2 * mm[None, :] + 1, mask=mask, other=0.0).to(tl.float32)  # conj(Z[m])
    s_re = a_re + b_re
    s_im = a_im + b_im
    d_re = a_re - b_re
    d_im = a_im - b_im
    t_re = c[None, :] * d_re + sn[None, :] * d_im  # T = w^k D, w^k = c - i sn
    t_im = c[None, :] * d_im - sn[None, :] * d_re
    return s_re + t_im, s_im - t_re, s_re - t_im, -(s_im + t_re)


@triton.jit
def _pairs(pid_f, H, BF: tl.constexpr):
    """Frequencies k of this program (k <= H/2), partners m = H - k, m mod H, and w^k = c - i sn."""
    k = pid_f * BF + tl.arange(0, BF)
    m = H - k
    mm = tl.where(k == 0, 0, m)
    theta = k.to(tl.float32) * (PI / H)
    return k, m, mm, tl.cos(theta), tl.sin(theta)


@triton.jit
def spectral_mix_kernel(z_ptr, k_ptr, gain_ptr, out_ptr, N, H, U_BLOCKS,
                        z_st, z_sb, k_so, k_su, out_st, out_sb,
                        CONJ: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    pid_t = tl.program_id(0)
    o = tl.program_id(2)
    k, m, mm, c, sn = _pairs(tl.program_id(1), H, BF)
    rows = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
    kmask = k <= H // 2
    mask = (rows < N)[:, None] & kmask[None, :]
    yk_re = tl.zeros([BT, BF], dtype=tl.float32)
    yk_im = tl.zeros([BT, BF], dtype=tl.float32)
    ym_re = tl.zeros([BT, BF], dtype=tl.float32)
    ym_im = tl.zeros([BT, BF], dtype=tl.float32)
    for u in range(U_BLOCKS):
        xk_re, xk_im, xm_re, xm_im = _unpack(z_ptr + rows[:, None] * z_st + u * z_sb, k, mm, mask, c, sn)
        kb = k_ptr + o * k_so + u * k_su
        kk_re = tl.load(kb + 2 * k, mask=kmask, other=0.0)[None, :]
        kk_im = tl.load(kb + 2 * k + 1, mask=kmask, other=0.0)[None, :]
        km_re = tl.load(kb + 2 * m, mask=kmask, other=0.0)[None, :]
        km_im = tl.load(kb + 2 * m + 1, mask=kmask, other=0.0)[None, :]
        if CONJ:
            kk_im = -kk_im
            km_im = -km_im
        yk_re += xk_re * kk_re - xk_im * kk_im
        yk_im += xk_re * kk_im + xk_im * kk_re
        ym_re += xm_re * km_re - xm_im * km_im
        ym_im += xm_re * km_im + xm_im * km_re
    gain = tl.load(gain_ptr)
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
    out = out_ptr + rows[:, None] * out_st + o * out_sb
    ty = out_ptr.dtype.element_ty
    tl.store(out + 2 * k[None, :], (u_re - v_im).to(ty), mask=mask)
    tl.store(out + 2 * k[None, :] + 1, (u_im + v_re).to(ty), mask=mask)
    # The partner m: skipped for k = 0 (m = H is not an index of Zin) and k = H/2 (m = k).
    mmask = mask & ((m != k) & (m != H))[None, :]
    tl.store(out + 2 * mm[None, :], (u_re + v_im).to(ty), mask=mmask)
    tl.store(out + 2 * mm[None, :] + 1, (v_re - u_im).to(ty), mask=mmask)


@triton.jit
def spectral_corr_kernel(zx_ptr, zdy_ptr, sx_ptr, sdy_ptr, part_ptr, N, H, Q, ROWS,
                         zx_st, zx_sb, zdy_st, zdy_sb, part_sc, part_si, part_sj,
                         HAS_SCALE: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    ij = tl.program_id(1)
    chunk = tl.program_id(2)
    i = ij // Q
    j = ij - i * Q
    k, m, mm, c, sn = _pairs(tl.program_id(0), H, BF)
    kmask = k <= H // 2
    pk_re = tl.zeros([BF], dtype=tl.float32)
    pk_im = tl.zeros([BF], dtype=tl.float32)
    pm_re = tl.zeros([BF], dtype=tl.float32)
    pm_im = tl.zeros([BF], dtype=tl.float32)
    for t0 in range(0, ROWS, BT):
        rows = (chunk * ROWS + t0 + tl.arange(0, BT)).to(tl.int64)
        rmask = rows < N
        mask = rmask[:, None] & kmask[None, :]
        xk_re, xk_im, xm_re, xm_im = _unpack(zx_ptr + rows[:, None] * zx_st + j * zx_sb, k, mm, mask, c, sn)
        dk_re, dk_im, dm_re, dm_im = _unpack(zdy_ptr + rows[:, None] * zdy_st + i * zdy_sb, k, mm, mask, c, sn)
        qk_re = xk_re * dk_re + xk_im * dk_im  # conj(X) DY
        qk_im = xk_re * dk_im - xk_im * dk_re
        qm_re = xm_re * dm_re + xm_im * dm_im
        qm_im = xm_re * dm_im - xm_im * dm_re
        if HAS_SCALE:  # undo the rows' scales of x and dy
            r = (1.0 / (tl.load(sx_ptr + rows, mask=rmask, other=1.0) * tl.load(sdy_ptr + rows, mask=rmask, other=1.0)))[:, None]
            qk_re *= r
            qk_im *= r
            qm_re *= r
            qm_im *= r
        pk_re += tl.sum(qk_re, axis=0)
        pk_im += tl.sum(qk_im, axis=0)
        pm_re += tl.sum(qm_re, axis=0)
        pm_im += tl.sum(qm_im, axis=0)
    out = part_ptr + chunk * part_sc + i * part_si + j * part_sj
    tl.store(out + 2 * k, pk_re, mask=kmask)
    tl.store(out + 2 * k + 1, pk_im, mask=kmask)
    mmask = kmask & (m != k)  # here m = H (Nyquist) is a frequency of its own
    tl.store(out + 2 * m, pm_re, mask=mmask)
    tl.store(out + 2 * m + 1, pm_im, mask=mmask)


@triton.jit
def cast_out_kernel(y_ptr, out_ptr, gain_ptr, scale_ptr, P, L, N_OUT,
                    ROWSCALE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    i = offs // N_OUT
    r = offs - i * N_OUT
    mask = offs < P * N_OUT
    v = tl.load(y_ptr + t * P * L + i * L + r, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gain_ptr)
    if ROWSCALE:
        g = g / tl.load(scale_ptr + t)
    tl.store(out_ptr + t * P * N_OUT + offs, (v * g).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------

def cast_in(x: torch.Tensor, q: int, n_in: int, L: int, dtype: torch.dtype, bound: float | None):
    """x [N, q*n_in] (unit stride along rows) -> ([N, q*L] in `dtype`, zero-padded per block, row
    scales [N] fp32 or None). With `bound`, each row is scaled by a power of two to max|.| <= bound."""
    N = x.shape[0]
    out = torch.empty(N, q * L, device=x.device, dtype=dtype)
    scale = torch.empty(N, device=x.device, dtype=torch.float32) if bound is not None else None
    cast_in_kernel[(N,)](x, out, scale if scale is not None else out, x.stride(0), q, n_in, L,
                         float(bound or 1.0), SCALE=bound is not None, BLOCK=CAST_BLOCK)
    return out, scale


def spectral_mix(z: torch.Tensor, kernel_ri: torch.Tensor, gain: torch.Tensor, transpose: bool) -> torch.Tensor:
    """z [N, u_blocks, H, 2] (FFT of the packed rows), kernel_ri [p, q, H+1, 2] fp32 ->
    Zin [N, o_blocks, H, 2] in z's dtype: pack(gain * sum_u unpack(z_u) K[o, u]); with `transpose`,
    K is conjugated and indexed K[u, o] (the adjoint)."""
    N, u_blocks, H, _ = z.shape
    so, su = kernel_ri.stride(0), kernel_ri.stride(1)
    o_blocks = kernel_ri.shape[1] if transpose else kernel_ri.shape[0]
    if transpose:
        so, su = su, so
    out = torch.empty(N, o_blocks, H, 2, device=z.device, dtype=z.dtype)
    grid = (triton.cdiv(N, BT_MIX), triton.cdiv(H // 2 + 1, BF_MIX), o_blocks)
    spectral_mix_kernel[grid](z, kernel_ri, gain, out, N, H, u_blocks, z.stride(0), z.stride(1), so, su,
                              out.stride(0), out.stride(1), CONJ=transpose, BT=BT_MIX, BF=BF_MIX)
    return out


def spectral_corr(zx: torch.Tensor, zdy: torch.Tensor, sx: torch.Tensor | None, sdy: torch.Tensor | None) -> torch.Tensor:
    """sum over tokens of conj(2 X_j) (2 DY_i) / (sx sdy): [p, q, H+1] complex64, from the packed
    spectra zx [N, q, H, 2] and zdy [N, p, H, 2]."""
    N, q, H, _ = zx.shape
    p = zdy.shape[1]
    chunks = triton.cdiv(N, CORR_ROWS)
    part = torch.empty(chunks, p, q, H + 1, 2, device=zx.device, dtype=torch.float32)
    grid = (triton.cdiv(H // 2 + 1, BF_CORR), p * q, chunks)
    has_scale = sx is not None
    spectral_corr_kernel[grid](zx, zdy, sx if has_scale else part, sdy if has_scale else part, part, N, H, q, CORR_ROWS,
                               zx.stride(0), zx.stride(1), zdy.stride(0), zdy.stride(1),
                               part.stride(0), part.stride(1), part.stride(2),
                               HAS_SCALE=has_scale, BT=BT_CORR, BF=BF_CORR)
    return torch.view_as_complex(part.sum(0))


def cast_out(y: torch.Tensor, p: int, L: int, n_out: int, gain: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype):
    """y [N, p*L] -> [N, p*n_out] in `dtype`: the first n_out of each block times gain / scale[row]."""
    N = y.shape[0]
    # The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even): round in torch there.
    truncating = INTERPRET and dtype == torch.bfloat16
    out = torch.empty(N, p * n_out, device=y.device, dtype=torch.float32 if truncating else dtype)
    grid = (N, triton.cdiv(p * n_out, CAST_BLOCK))
    cast_out_kernel[grid](y, out, gain, scale if scale is not None else gain, p, L, n_out,
                          ROWSCALE=scale is not None, BLOCK=CAST_BLOCK)
    return out.to(dtype) if truncating else out
