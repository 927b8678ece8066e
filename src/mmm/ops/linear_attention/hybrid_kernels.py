"""Triton kernels of fused hybrid attention (causal): exact softmax weights for the nearest W keys, the
linear-attention kernel for the keys further back, one shared normaliser (semantics: mmm.attention.hybrid).

Why fused: through FlexAttention for the near keys, the lagged linear kernel for the far ones and a
compiled combine, the hybrid took 2.5x linear attention alone at 128k (H200, window 256): three passes
over the sequence forward and more backward. Here the chunk length of the linear kernels is the window W
(16, 32 or 64), so with the key lag W the chunk the lagged kernel reads for the queries of chunk c is the
previous chunk c-1, and query i's near keys (i - W < j <= i) are exactly
  - the keys of chunk c-1 above the diagonal of that block (j - i > 0 in chunk coordinates; the block's
    causal part, on and below the diagonal, is i - j >= W back: far keys, as the lagged kernel has them);
  - the keys of chunk c on and below the diagonal;
and every key of chunks <= c-2 is far, in the lagged state. The forward (hybrid_fwd_kernel) is the
lagged linear forward plus the two [W, W] score blocks, in one pass.

Forward, per query row i (r_i = max(near scores, l), l = c_h the head's calibration; every exponent <= 0):
  num_i = f_i (a_i S + sum_far-in-block kappa_ij v_j) + sum_near exp(s_ij - r_i) v_j,  f_i = exp(l - r_i)
  den_i = f_i (a_i . z + sum_far-in-block kappa_ij) + sum_near exp(s_ij - r_i) + eps exp(-r_i)
  o_i = num_i / den_i.  Saved: rfar_i = f_i / den_i and lse2_i = (r_i + ln den_i) log2(e) (base 2).

Backward, with r the max treated as the constant it is (it cancels):
  - far weights f kappa: exactly the lagged linear backward with o the hybrid's output and rden := rfar
    (g = do rfar, r_row = -(do . o) rfar), so the existing kernels run unchanged (op.py);
  - near weights: flash attention's backward on the band with P_ij = exp2(s_ij log2(e) - lse2_i),
    dS = P (do v^T - delta), delta_i = do_i . o_i: band_bwd_kernel, one pass over the chunks adding into
    the gradients the linear backward wrote (read-modify-write; each program owns its rows).
    s_ij = sm_scale q_i . k_j on the raw inputs, sm_scale = 1 / sqrt(DK).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import INTERPRET, LOG2E, _cast, _chunk_rows, _dot, _exp2, _key_lag, _phi, _program

WINDOWS = (16, 32, 64)  # the chunk lengths W the fused kernels take (== the window)


def _fwd_configs():
    """(BV, num_warps, num_stages); BT is the window, not tuned. 4 warps: kernels.py's docstring says why."""
    options = [(16, 1, 1)] if INTERPRET else [(64, 4, 2), (32, 4, 2), (128, 4, 2)]
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv, w, s in options]


def _prune_bv(configs, named_args, **kwargs):
    dv = kwargs["DV"] if "DV" in kwargs else named_args["DV"]
    keep = [c for c in configs if c.kwargs["BV"] <= dv]
    return keep or [triton.Config({"BV": dv}, num_warps=4, num_stages=2)]


@triton.autotune(configs=_fwd_configs(), key=["DK", "DV", "BT", "TUNE_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_bv})
@triton.jit
def hybrid_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, rfar_ptr, lse_ptr, st_ptr, c_ptr,
    T, H, L, NS, eps, scale, sm_scale, TUNE_BUCKET,
    DK: tl.constexpr, DV: tl.constexpr, FEATURE: tl.constexpr, DOT_MODE: tl.constexpr,
    FULL_CHUNKS: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """o, rfar and lse2 of the module docstring for one V-tile of one segment, chunk by chunk; S, z (the
    lagged prefix state: keys of chunks <= c-2) carried in registers as fwd_kernel carries them."""
    i_v, i_s, i_bh, rowk0, rowv0, trow0, t_len = _program(DV // BV, NS, L, T, H, DK, DV)
    lag_k, lag_v, first = _key_lag(i_s, L, BT, H, DK, DV, True)
    offs_t = tl.arange(0, BT)
    offs_dk = tl.arange(0, DK)
    offs_v = i_v * BV + tl.arange(0, BV)
    tile_dk = offs_t[:, None] * (H * DK) + offs_dk[None, :]
    tile_v = offs_t[:, None] * (H * DV) + offs_v[None, :]
    on_or_below = offs_t[:, None] >= offs_t[None, :]  # chunk c-1: far keys; chunk c: near keys
    base = st_ptr + (i_bh * (NS + 1) + i_s) * (DK * DV + DK)
    S = tl.load(base + offs_dk[:, None] * DV + offs_v[None, :])
    z = tl.load(base + DK * DV + offs_dk)
    l2 = tl.load(c_ptr + i_bh % H).to(tl.float32) * LOG2E
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E  # fp64 when traced (kernels._phi)
    q_base = q_ptr + rowk0
    kc_base = k_ptr + rowk0
    kp_base = k_ptr + rowk0 - lag_k
    vc_base = v_ptr + rowv0
    vp_base = v_ptr + rowv0 - lag_v
    o_base = o_ptr + rowv0
    for t0 in range(0, t_len, BT):
        mt = _chunk_rows(offs_t, t_len - t0, BT, FULL_CHUNKS)
        # the previous chunk's rows that exist (all of them past the sequence's first chunk: that chunk is
        # whole even when this one is not, and its keys above the diagonal are near for every query row)
        mp = offs_t + t0 >= first
        # In the order that keeps the fewest [BT, *] tiles alive (at W = 64 the first order, every block
        # before the max, spilled ~1.5 KB per thread on sm_90): the far part and the previous chunk's block
        # first, with their own row max; then the current chunk's block, rescaling what was summed by
        # alpha = exp2(m_p - r) as flash attention does. r = max(m_p, scores of chunk c) in the end.
        q = tl.load(q_base + tile_dk, mask=mt[:, None], other=0.0)
        a32 = _phi(q, scale, FEATURE)
        den = tl.sum(a32 * z[None, :], axis=1)
        a_c = _cast(a32, q_ptr, DOT_MODE)
        num = _dot(a_c, _cast(S, q_ptr, DOT_MODE), DOT_MODE)
        kp = tl.load(kp_base + tile_dk, mask=mp[:, None], other=0.0)
        b32 = tl.where(mp[:, None], _phi(kp, scale, FEATURE), 0.0)
        b_c = _cast(b32, q_ptr, DOT_MODE)
        vp = _cast(tl.load(vp_base + tile_v, mask=mp[:, None], other=0.0), q_ptr, DOT_MODE)
        kappa = tl.where(on_or_below, _dot(a_c, tl.trans(b_c), DOT_MODE), 0.0)
        S += _dot(tl.trans(b_c), vp, DOT_MODE)  # S was read above: the state for the next chunk
        z += tl.sum(b32, axis=0)
        q_c = _cast(q, q_ptr, DOT_MODE)
        sp = _dot(q_c, tl.trans(_cast(kp, q_ptr, DOT_MODE)), DOT_MODE) * qk_scale
        sp = tl.where((~on_or_below) & mp[None, :], sp, float("-inf"))
        m_p = tl.maximum(tl.max(sp, axis=1), l2)
        f = _exp2(l2 - m_p)
        wp = _exp2(sp - m_p[:, None]) + f[:, None] * kappa
        num = f[:, None] * num + _dot(_cast(wp, q_ptr, DOT_MODE), vp, DOT_MODE)
        den = f * den + tl.sum(wp, axis=1)
        kc = tl.load(kc_base + tile_dk, mask=mt[:, None], other=0.0)
        sc = _dot(q_c, tl.trans(_cast(kc, q_ptr, DOT_MODE)), DOT_MODE) * qk_scale
        sc = tl.where(on_or_below, sc, float("-inf"))
        r2 = tl.maximum(m_p, tl.max(sc, axis=1))
        alpha = _exp2(m_p - r2)
        pc = _exp2(sc - r2[:, None])
        vc = _cast(tl.load(vc_base + tile_v, mask=mt[:, None], other=0.0), q_ptr, DOT_MODE)
        num = alpha[:, None] * num + _dot(_cast(pc, q_ptr, DOT_MODE), vc, DOT_MODE)
        den = alpha * den + tl.sum(pc, axis=1) + tl.cast(eps, tl.float32) * _exp2(-r2)
        rd = 1.0 / den
        tl.store(o_base + tile_v, (num * rd[:, None]).to(o_ptr.dtype.element_ty), mask=mt[:, None])
        if i_v == 0:
            tl.store(rfar_ptr + trow0 + t0 + offs_t, f * alpha * rd, mask=mt)
            tl.store(lse_ptr + trow0 + t0 + offs_t, r2 + tl.log2(den), mask=mt)
        q_base += BT * H * DK
        kc_base += BT * H * DK
        kp_base += BT * H * DK
        vc_base += BT * H * DV
        vp_base += BT * H * DV
        o_base += BT * H * DV


@triton.jit
def _band_block(q_c, k_c, do_c, v_c, lse2, delta, near, qk_scale, DOT_MODE: tl.constexpr):
    """P and dS = P (do v^T - delta) of one [queries, keys] block of the band, zero off `near`."""
    s = _dot(q_c, tl.trans(k_c), DOT_MODE) * qk_scale
    p = tl.where(near, _exp2(s - lse2[:, None]), 0.0)
    dp = _dot(do_c, tl.trans(v_c), DOT_MODE)
    return p, p * (dp - delta[:, None])


@triton.jit
def _band_queries(q_ptr, o_ptr, do_ptr, lse_ptr, row0, tile_dk, tile_dv, offs_t, t0, T, H,
                  DK: tl.constexpr, DV: tl.constexpr, DOT_MODE: tl.constexpr):
    """The queries of the chunk starting at row t0 (rows past T masked): q and do as the dots take them,
    lse2, delta = do . o, and the row mask. row0: the sequence's first row; lse_ptr points at its [T] row."""
    mq = t0 + offs_t < T
    row = row0 + t0
    do = tl.load(do_ptr + row * (H * DV) + tile_dv, mask=mq[:, None], other=0.0)
    o = tl.load(o_ptr + row * (H * DV) + tile_dv, mask=mq[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    lse2 = tl.load(lse_ptr + t0 + offs_t, mask=mq, other=0.0)
    q_c = _cast(tl.load(q_ptr + row * (H * DK) + tile_dk, mask=mq[:, None], other=0.0), q_ptr, DOT_MODE)
    return q_c, _cast(do, q_ptr, DOT_MODE), lse2, delta, mq


@triton.jit
def _add_into(ptr, tile, x, mask):
    """ptr[tile] += x (read-modify-write in fp32, stored in ptr's dtype): the linear backward wrote it."""
    x += tl.load(ptr + tile, mask=mask[:, None], other=0.0).to(tl.float32)
    tl.store(ptr + tile, x.to(ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def band_bwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    T, H, NC, sm_scale,
    DK: tl.constexpr, DV: tl.constexpr, DOT_MODE: tl.constexpr, BT: tl.constexpr,
):
    """The near keys' part of dq, dk and dv, added into what the linear backward wrote, for NC chunks of
    one sequence in order. Chunk c's keys are near for the queries of chunk c (key j <= query i: the
    diagonal block) and of chunk c+1 (j > i: the upper block). A program computes both for each of its
    chunks, and the upper block of the chunk before its first (that block's dS, for dq). So dq, dk, dv are
    each read and written once, and the blocks are computed (NC + 1) / NC times, where the two kernels this
    replaced computed each twice and read q, k, v, do twice. NC = 1 compiles without a loop and spills
    least on sm_90 (hybrid_op.BAND_CHUNKS); the repeated reads of a neighbouring chunk hit L2."""
    pid = tl.program_id(0).to(tl.int64)
    n_chunks = tl.cdiv(T, BT)
    n_prog = tl.cdiv(n_chunks, NC)
    i_bh = pid // n_prog
    c0 = (pid % n_prog) * NC
    c1 = tl.minimum(c0 + NC, n_chunks)
    row0 = (i_bh // H) * T  # the sequence's first row in [B*T]
    offs_t = tl.arange(0, BT)
    tile_dk = offs_t[:, None] * (H * DK) + (i_bh % H) * DK + tl.arange(0, DK)[None, :]
    tile_dv = offs_t[:, None] * (H * DV) + (i_bh % H) * DV + tl.arange(0, DV)[None, :]
    lse_row = lse_ptr + i_bh * T
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E  # fp64 when traced (kernels._phi)
    below = offs_t[:, None] >= offs_t[None, :]  # [query i, key j]: j <= i
    sm_scale32 = tl.cast(sm_scale, tl.float32)
    # dS of the upper block of the chunk before (with the queries of the chunk this iteration starts at),
    # carried to the next iteration, which multiplies it by that block's keys again and reads the queries
    # again (L2 hits): carrying an fp32 [BT, DK] dq and the query tiles instead spilled 2.4 KB per thread
    # at W = 64 on sm_90.
    ds_n = tl.zeros([BT, BT], dtype=tl.float32)
    if c0 > 0:  # chunk c0's share of the upper block of chunk c0-1 (whole: chunk c0 exists)
        q_c, do_c, lse2, delta, mq = _band_queries(q_ptr, o_ptr, do_ptr, lse_row, row0, tile_dk, tile_dv, offs_t,
                                                   c0 * BT, T, H, DK, DV, DOT_MODE)
        t0 = (c0 - 1) * BT
        k_p = _cast(tl.load(k_ptr + (row0 + t0) * (H * DK) + tile_dk), q_ptr, DOT_MODE)
        v_p = _cast(tl.load(v_ptr + (row0 + t0) * (H * DV) + tile_dv), q_ptr, DOT_MODE)
        _, ds_n = _band_block(q_c, k_p, do_c, v_p, lse2, delta, (~below) & mq[:, None], qk_scale, DOT_MODE)
    for c in range(c0, c1):
        t0 = c * BT
        at_k = (row0 + t0) * (H * DK) + tile_dk
        at_v = (row0 + t0) * (H * DV) + tile_dv
        q_c, do_c, lse2, delta, mq = _band_queries(q_ptr, o_ptr, do_ptr, lse_row, row0, tile_dk, tile_dv, offs_t,
                                                   t0, T, H, DK, DV, DOT_MODE)
        k_c = _cast(tl.load(k_ptr + at_k, mask=mq[:, None], other=0.0), q_ptr, DOT_MODE)
        v_c = _cast(tl.load(v_ptr + at_v, mask=mq[:, None], other=0.0), q_ptr, DOT_MODE)
        # the diagonal block: queries and keys of chunk c
        p, ds = _band_block(q_c, k_c, do_c, v_c, lse2, delta, below & mq[:, None], qk_scale, DOT_MODE)
        ds_c = _cast(ds, q_ptr, DOT_MODE)
        dq = _dot(ds_c, k_c, DOT_MODE)
        k_p = _cast(tl.load(k_ptr + at_k - BT * H * DK, mask=(t0 > 0) & (offs_t >= 0)[:, None], other=0.0), q_ptr,
                    DOT_MODE)
        _add_into(dq_ptr, at_k, (dq + _dot(_cast(ds_n, q_ptr, DOT_MODE), k_p, DOT_MODE)) * sm_scale32, mq)
        dv = _dot(tl.trans(_cast(p, q_ptr, DOT_MODE)), do_c, DOT_MODE)
        dk = _dot(tl.trans(ds_c), q_c, DOT_MODE)
        # the upper block: queries of chunk c+1 (none past the sequence's end), keys of chunk c
        q_c, do_c, lse2, delta, mq_n = _band_queries(q_ptr, o_ptr, do_ptr, lse_row, row0, tile_dk, tile_dv, offs_t,
                                                     t0 + BT, T, H, DK, DV, DOT_MODE)
        p, ds_n = _band_block(q_c, k_c, do_c, v_c, lse2, delta, (~below) & mq_n[:, None], qk_scale, DOT_MODE)
        dv += _dot(tl.trans(_cast(p, q_ptr, DOT_MODE)), do_c, DOT_MODE)
        _add_into(dv_ptr, at_v, dv, mq)
        dk += _dot(tl.trans(_cast(ds_n, q_ptr, DOT_MODE)), q_c, DOT_MODE)
        _add_into(dk_ptr, at_k, dk * sm_scale32, mq)
