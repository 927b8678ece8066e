"""Triton kernels of fused hybrid attention (causal): exact softmax weights for the nearest W keys, the
linear-attention kernel for the keys further back, one shared normaliser (semantics: mmm.attention.hybrid).

Why fused: through FlexAttention for the near keys, the lagged linear kernel for the far ones and a
compiled combine, the hybrid took 2.5x linear attention alone at 128k (H200, window 256): three passes
over the sequence forward and more backward. Here the chunk length BT of the linear kernels is the
window W (16, 32 or 64; a longer window, a multiple of 64, takes chunks of 64), so with the key lag W the
chunk the lagged kernel reads for the queries of chunk c is chunk c - W/BT, and query i's near keys
(i - W < j <= i) are exactly
  - the keys of chunk c - W/BT above the diagonal of that block (j - i > 0 in chunk coordinates; the
    block's causal part, on and below the diagonal, is i - j >= W back: far keys, as the lagged kernel
    has them);
  - every key of the chunks between (none when W = BT);
  - the keys of chunk c on and below the diagonal;
and every key of the chunks before c - W/BT is far, in the lagged state. The forward (hybrid_fwd_kernel)
is the lagged linear forward plus the W/BT + 1 [BT, BT] score blocks, in one pass.

Block windows (BLOCK, W = BT: mmm.attention.hybrid's window_shape='block'): a query's near keys are its
own chunk's on and below the diagonal, every earlier chunk far. No lag and no masked far block: the
forward is the unlagged linear forward with the diagonal block's kernel weights replaced by softmax
weights; the backward is the linear backward without its within-chunk terms (kernels.py's INTRA off,
its chunks set to the blocks by kernels.with_chunk) plus band_diag_kernel for the diagonal block.

Forward, per query row i (r_i = max(near scores, l + log far_i), l = c_h the head's calibration, far_i the
row's far mass a_i . z_i + sum_far-in-block kappa_ij, as hybrid.shared_max; every weight <= 1):
  num_i = f_i (a_i S + sum_far-in-block kappa_ij v_j) + sum_near exp(s_ij - r_i) v_j,  f_i = exp(l - r_i)
  den_i = f_i (a_i . z + sum_far-in-block kappa_ij) + sum_near exp(s_ij - r_i) + eps exp(-r_i)
  o_i = num_i / den_i.  Saved: rfar_i = f_i / den_i and lse2_i = (r_i + ln den_i) log2(e) (base 2).

Backward, with r the max treated as the constant it is (it cancels):
  - far weights f kappa: exactly the lagged linear backward with o the hybrid's output and rden := rfar
    (g = do rfar, r_row = -(do . o) rfar), so the existing kernels run unchanged (op.py);
  - near weights: flash attention's backward on the band with P_ij = exp2(s_ij log2(e) - lse2_i),
    dS = P (do v^T - delta), delta_i = do_i . o_i (written by the linear backward's chunk_state pass, which
    reads do and o anyway): band_dq_kernel (query chunks) then band_dkdv_kernel
    (key chunks), each adding into the gradients the linear backward wrote (read-modify-write; each program
    owns its rows). A merged kernel that swept the chunks and computed each block once was slower (H100,
    session 20: 15.95 vs 15.16 ms f+b at 128k, W = 16) and ran out of shared memory at W = 64.
    s_ij = sm_scale q_i . k_j on the raw inputs, sm_scale = 1 / sqrt(DK).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import INTERPRET, LOG2E, _cast, _chunk_rows, _dot, _exp2, _key_lag, _phi, _program

FAR_LOG2_FLOOR = tl.constexpr(-60.0 * 1.4426950408889634)  # hybrid.FAR_LOG_FLOOR in base 2
NO_MASS = tl.constexpr(-1e30)  # the shared max's floor (log2 units): rows without any weight


def _fwd_configs():
    """(BV, num_warps, num_stages); BT is the window, not tuned. 4 warps: kernels.py's docstring says why."""
    options = [(16, 1, 1)] if INTERPRET else [(64, 4, 2), (32, 4, 2), (128, 4, 2)]
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv, w, s in options]


def _prune_bv(configs, named_args, **kwargs):
    dv = kwargs["DV"] if "DV" in kwargs else named_args["DV"]
    keep = [c for c in configs if c.kwargs["BV"] <= dv]
    return keep or [triton.Config({"BV": dv}, num_warps=4, num_stages=2)]


@triton.autotune(configs=_fwd_configs(), key=["DK", "DV", "BT", "BLOCK", "TUNE_BUCKET"],  # (block: its own tiles)
                 prune_configs_by={"early_config_prune": _prune_bv})
@triton.jit
def hybrid_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, rfar_ptr, lse_ptr, st_ptr, c_ptr,
    T, H, L, NS, eps, scale, sm_scale, TUNE_BUCKET,
    DK: tl.constexpr, DV: tl.constexpr, FEATURE: tl.constexpr, DOT_MODE: tl.constexpr,
    FULL_CHUNKS: tl.constexpr, BLOCK: tl.constexpr, BT: tl.constexpr, W: tl.constexpr, BV: tl.constexpr,
):
    """o, rfar and lse2 of the module docstring for one V-tile of one segment, chunk by chunk; S, z (the
    lagged prefix state: keys of chunks <= c-1-W/BT) carried in registers as fwd_kernel carries them.
    BLOCK (a block window, W = BT): the unlagged state (keys of chunks <= c-1) and the block's own keys."""
    i_v, i_s, i_bh, rowk0, rowv0, trow0, t_len = _program(DV // BV, NS, L, T, H, DK, DV)
    lag_k, lag_v, first = _key_lag(i_s, L, W, H, DK, DV, not BLOCK)
    offs_t = tl.arange(0, BT)
    offs_dk = tl.arange(0, DK)
    offs_v = i_v * BV + tl.arange(0, BV)
    tile_dk = offs_t[:, None] * (H * DK) + offs_dk[None, :]
    tile_v = offs_t[:, None] * (H * DV) + offs_v[None, :]
    on_or_below = offs_t[:, None] >= offs_t[None, :]  # chunk c-W/BT: far keys; chunk c: near keys
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
        # In the order that keeps the fewest [BT, *] tiles alive (at W = 64 the first order, every block
        # before the max, spilled ~1.5 KB per thread on sm_90): the far part and the previous chunk's block
        # first, with their own row max; then the current chunk's block, rescaling what was summed by
        # alpha = exp2(m_p - r) as flash attention does. r = max(m_p, scores of chunk c) in the end.
        q = tl.load(q_base + tile_dk, mask=mt[:, None], other=0.0)
        a32 = _phi(q, scale, FEATURE)
        den = tl.sum(a32 * z[None, :], axis=1)
        a_c = _cast(a32, q_ptr, DOT_MODE)
        num = _dot(a_c, _cast(S, q_ptr, DOT_MODE), DOT_MODE)
        q_c = _cast(q, q_ptr, DOT_MODE)
        if BLOCK:  # the far part is the state alone, its log mass the max so far
            far = den
            # this block's keys join the state for the next one, here (not after the output: S was read
            # above, and the dot then overlaps the softmax work instead of stalling the next chunk's a S)
            kc = tl.load(kc_base + tile_dk, mask=mt[:, None], other=0.0)
            vc = _cast(tl.load(vc_base + tile_v, mask=mt[:, None], other=0.0), q_ptr, DOT_MODE)
            b32 = tl.where(mt[:, None], _phi(kc, scale, FEATURE), 0.0)
            S += _dot(tl.trans(_cast(b32, q_ptr, DOT_MODE)), vc, DOT_MODE)
            z += tl.sum(b32, axis=0)
        else:
            # the previous chunk's rows that exist (all of them past the sequence's first chunk: that chunk
            # is whole even when this one is not, and its keys above the diagonal are near for every row)
            mp = offs_t + t0 >= first
            kp = tl.load(kp_base + tile_dk, mask=mp[:, None], other=0.0)
            b32 = tl.where(mp[:, None], _phi(kp, scale, FEATURE), 0.0)
            b_c = _cast(b32, q_ptr, DOT_MODE)
            vp = _cast(tl.load(vp_base + tile_v, mask=mp[:, None], other=0.0), q_ptr, DOT_MODE)
            kappa = tl.where(on_or_below, _dot(a_c, tl.trans(b_c), DOT_MODE), 0.0)
            S += _dot(tl.trans(b_c), vp, DOT_MODE)  # S was read above: the state for the next chunk
            z += tl.sum(b32, axis=0)
            sp = _dot(q_c, tl.trans(_cast(kp, q_ptr, DOT_MODE)), DOT_MODE) * qk_scale
            sp = tl.where((~on_or_below) & mp[None, :], sp, float("-inf"))
            far = den + tl.sum(kappa, axis=1)
        # the far part's log2 mass l2 + log2(far) in the max, not l2 alone (hybrid.shared_max says why);
        # -inf without far mass, and m_p >= NO_MASS, a finite floor, so no exponent below is -inf - -inf
        far_l2 = tl.where(far > 0, l2 + tl.maximum(tl.log2(far), FAR_LOG2_FLOOR), float("-inf"))
        if BLOCK:
            m_p = tl.maximum(far_l2, NO_MASS)
            f = _exp2(tl.where(far > 0, l2 - m_p, float("-inf")))
            num = f[:, None] * num
            den = f * den
        else:
            m_p = tl.maximum(tl.maximum(tl.max(sp, axis=1), far_l2), NO_MASS)
            f = _exp2(tl.where(far > 0, l2 - m_p, float("-inf")))
            wp = _exp2(sp - m_p[:, None]) + f[:, None] * kappa
            num = f[:, None] * num + _dot(_cast(wp, q_ptr, DOT_MODE), vp, DOT_MODE)
            den = f * den + tl.sum(wp, axis=1)
        if W > BT:  # (a constexpr test: W = BT compiles without the loop)
            # not software-pipelined (a guess that did not stop the H100's fault at W = 256: see
            # hybrid_op.LONG_WINDOWS_ON_CUDA)
            for j in tl.range(1, W // BT, num_stages=1):  # windows over one chunk: the chunks between, every key near
                mj = offs_t + t0 >= first - j * BT  # keys at or after the sequence's start
                kj = _cast(tl.load(kp_base + j * BT * H * DK + tile_dk, mask=mj[:, None], other=0.0), q_ptr, DOT_MODE)
                sj = tl.where(mj[None, :], _dot(q_c, tl.trans(kj), DOT_MODE) * qk_scale, float("-inf"))
                m_j = tl.maximum(m_p, tl.max(sj, axis=1))
                alpha = _exp2(m_p - m_j)
                pj = _exp2(sj - m_j[:, None])
                vj = _cast(tl.load(vp_base + j * BT * H * DV + tile_v, mask=mj[:, None], other=0.0), q_ptr, DOT_MODE)
                num = alpha[:, None] * num + _dot(_cast(pj, q_ptr, DOT_MODE), vj, DOT_MODE)
                den = alpha * den + tl.sum(pj, axis=1)
                m_p = m_j
        if not BLOCK:
            kc = tl.load(kc_base + tile_dk, mask=mt[:, None], other=0.0)
        sc = _dot(q_c, tl.trans(_cast(kc, q_ptr, DOT_MODE)), DOT_MODE) * qk_scale
        sc = tl.where(on_or_below, sc, float("-inf"))
        r2 = tl.maximum(m_p, tl.max(sc, axis=1))
        alpha = _exp2(m_p - r2)
        pc = _exp2(sc - r2[:, None])
        if not BLOCK:
            vc = _cast(tl.load(vc_base + tile_v, mask=mt[:, None], other=0.0), q_ptr, DOT_MODE)
        num = alpha[:, None] * num + _dot(_cast(pc, q_ptr, DOT_MODE), vc, DOT_MODE)
        den = alpha * den + tl.sum(pc, axis=1) + tl.cast(eps, tl.float32) * _exp2(-r2)
        rd = 1.0 / den
        tl.store(o_base + tile_v, (num * rd[:, None]).to(o_ptr.dtype.element_ty), mask=mt[:, None])
        if i_v == 0:  # the far weights' factor exp(l - r) / den, 0 without far mass
            rfar = _exp2(tl.where(far > 0, l2 - r2, float("-inf"))) * rd
            tl.store(rfar_ptr + trow0 + t0 + offs_t, rfar, mask=mt)
            tl.store(lse_ptr + trow0 + t0 + offs_t, r2 + tl.log2(den), mask=mt)
        q_base += BT * H * DK
        kc_base += BT * H * DK
        kp_base += BT * H * DK
        vc_base += BT * H * DV
        vp_base += BT * H * DV
        o_base += BT * H * DV


@triton.jit
def _band_program(T, H, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr):
    """One chunk of one sequence: its first row, the int64 element offsets of that row in the key
    [B, T, H, DK] and value [B, T, H, DV] tensors and in [B, H, T], the row offsets in a chunk, and the
    element offsets of a chunk's [BT, DK] key and [BT, DV] value tiles from its first row."""
    pid = tl.program_id(0).to(tl.int64)
    n_chunks = tl.cdiv(T, BT)
    i_bh = pid // n_chunks
    t0 = (pid % n_chunks) * BT
    row = (i_bh // H) * T + t0
    offs_t = tl.arange(0, BT)
    tile_dk = offs_t[:, None] * (H * DK) + tl.arange(0, DK)[None, :]
    tile_dv = offs_t[:, None] * (H * DV) + tl.arange(0, DV)[None, :]
    return (t0, row * (H * DK) + (i_bh % H) * DK, row * (H * DV) + (i_bh % H) * DV, i_bh * T + t0,
            offs_t, tile_dk, tile_dv)


@triton.jit
def _band_block(x_c, y_c, u_c, w_c, lse2, delta, near, qk_scale, DOT_MODE: tl.constexpr):
    """P and dS = P (dP - delta) of one block of the band, zero off `near`: s = x y^T and dP = u w^T, lse2
    and delta shaped to broadcast over the block. [queries, keys]: x, y, u, w = q, k, do, v with lse2,
    delta as [BT, 1]; transposed ([keys, queries]): k, q, v, do with [1, BT]."""
    s = _dot(x_c, tl.trans(y_c), DOT_MODE) * qk_scale
    p = tl.where(near, _exp2(s - lse2), 0.0)
    dp = _dot(u_c, tl.trans(w_c), DOT_MODE)
    return p, p * (dp - delta)


@triton.jit
def band_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    T, H, sm_scale,
    DK: tl.constexpr, DV: tl.constexpr, DOT_MODE: tl.constexpr, BT: tl.constexpr, W: tl.constexpr,
):
    """The near keys' part of dq for one query chunk c (keys of chunks c-W/BT to c), added to dq. delta =
    do . o per row comes from the linear backward's chunk_state pass (it reads do and o anyway)."""
    t0, rowk0, rowv0, trow0, offs_t, tile_dk, tile_dv = _band_program(T, H, DK, DV, BT)
    mq = t0 + offs_t < T
    delta = tl.load(delta_ptr + trow0 + offs_t, mask=mq, other=0.0)
    lse2 = tl.load(lse_ptr + trow0 + offs_t, mask=mq, other=0.0)
    q_c = _cast(tl.load(q_ptr + rowk0 + tile_dk, mask=mq[:, None], other=0.0), q_ptr, DOT_MODE)
    do_c = _cast(tl.load(do_ptr + rowv0 + tile_dv, mask=mq[:, None], other=0.0), q_ptr, DOT_MODE)
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E  # fp64 when traced (kernels._phi)
    below = offs_t[:, None] >= offs_t[None, :]
    k_c = _cast(tl.load(k_ptr + rowk0 + tile_dk, mask=mq[:, None], other=0.0), q_ptr, DOT_MODE)
    v_c = _cast(tl.load(v_ptr + rowv0 + tile_dv, mask=mq[:, None], other=0.0), q_ptr, DOT_MODE)
    _, ds = _band_block(q_c, k_c, do_c, v_c, lse2[:, None], delta[:, None], below & mq[:, None], qk_scale, DOT_MODE)
    dq = _dot(_cast(ds, q_ptr, DOT_MODE), k_c, DOT_MODE)
    for j in tl.static_range(1, W // BT + 1):  # chunk c-j: every key near, but above the diagonal at c-W/BT
        mp = t0 - j * BT + offs_t >= 0  # chunk c-j exists
        k_p = _cast(tl.load(k_ptr + rowk0 - j * BT * H * DK + tile_dk, mask=mp[:, None], other=0.0), q_ptr, DOT_MODE)
        v_p = _cast(tl.load(v_ptr + rowv0 - j * BT * H * DV + tile_dv, mask=mp[:, None], other=0.0), q_ptr, DOT_MODE)
        near_p = mq[:, None] & mp[None, :]
        if j == W // BT:
            near_p = near_p & (~below)
        _, ds = _band_block(q_c, k_p, do_c, v_p, lse2[:, None], delta[:, None], near_p, qk_scale, DOT_MODE)
        dq += _dot(_cast(ds, q_ptr, DOT_MODE), k_p, DOT_MODE)
    _add_into(dq_ptr + rowk0 + tile_dk, dq * tl.cast(sm_scale, tl.float32), mq)


@triton.jit
def band_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    T, H, sm_scale,
    DK: tl.constexpr, DV: tl.constexpr, DOT_MODE: tl.constexpr, BT: tl.constexpr, W: tl.constexpr,
):
    """The near queries' part of dk and dv for one key chunk c (queries of chunks c to c+W/BT), added to
    dk and dv. Blocks are computed transposed ([keys, queries]) so the sums over queries are row sums."""
    t0, rowk0, rowv0, trow0, offs_t, tile_dk, tile_dv = _band_program(T, H, DK, DV, BT)
    mk = t0 + offs_t < T
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E  # fp64 when traced (kernels._phi)
    k_c = _cast(tl.load(k_ptr + rowk0 + tile_dk, mask=mk[:, None], other=0.0), q_ptr, DOT_MODE)
    v_c = _cast(tl.load(v_ptr + rowv0 + tile_dv, mask=mk[:, None], other=0.0), q_ptr, DOT_MODE)
    key_at_or_before = offs_t[:, None] <= offs_t[None, :]  # [key j, query i]: j <= i
    dk = tl.zeros([BT, DK], dtype=tl.float32)
    dv = tl.zeros([BT, DV], dtype=tl.float32)
    # the queries of chunk c (keys j <= i near), of the chunks up to c+W/BT-1 (all near), then of chunk
    # c+W/BT (keys j > i)
    for step in tl.static_range(W // BT + 1):
        qrow = t0 + step * BT
        mq = qrow + offs_t < T
        q_c = _cast(tl.load(q_ptr + rowk0 + step * BT * H * DK + tile_dk, mask=mq[:, None], other=0.0),
                    q_ptr, DOT_MODE)
        do_c = _cast(tl.load(do_ptr + rowv0 + step * BT * H * DV + tile_dv, mask=mq[:, None], other=0.0),
                     q_ptr, DOT_MODE)
        lse2 = tl.load(lse_ptr + trow0 + step * BT + offs_t, mask=mq, other=0.0)
        delta = tl.load(delta_ptr + trow0 + step * BT + offs_t, mask=mq, other=0.0)
        if step == 0:
            near = key_at_or_before
        elif step == W // BT:
            near = ~key_at_or_before
        else:
            near = tl.full([BT, BT], 1, tl.int1)
        pt, dst = _band_block(k_c, q_c, v_c, do_c, lse2[None, :], delta[None, :], near & mq[None, :], qk_scale,
                              DOT_MODE)
        dv += _dot(_cast(pt, q_ptr, DOT_MODE), do_c, DOT_MODE)
        dk += _dot(_cast(dst, q_ptr, DOT_MODE), q_c, DOT_MODE)
    _add_into(dk_ptr + rowk0 + tile_dk, dk * tl.cast(sm_scale, tl.float32), mk)
    _add_into(dv_ptr + rowv0 + tile_dv, dv, mk)


@triton.jit
def band_diag_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    T, H, sm_scale,
    DK: tl.constexpr, DV: tl.constexpr, DOT_MODE: tl.constexpr, BT: tl.constexpr,
):
    """Block windows (each chunk a block, its near keys the block's own): the near part of dq, dk and dv
    from the chunk's diagonal block, added to the gradients the linear backward wrote. One program per
    chunk computes the block once and reads q, k, v, do once, where band_dq_kernel and band_dkdv_kernel
    at W = 0 would each compute it and read them. delta: as in band_dq_kernel."""
    t0, rowk0, rowv0, trow0, offs_t, tile_dk, tile_dv = _band_program(T, H, DK, DV, BT)
    mt = t0 + offs_t < T
    delta = tl.load(delta_ptr + trow0 + offs_t, mask=mt, other=0.0)
    lse2 = tl.load(lse_ptr + trow0 + offs_t, mask=mt, other=0.0)
    q_c = _cast(tl.load(q_ptr + rowk0 + tile_dk, mask=mt[:, None], other=0.0), q_ptr, DOT_MODE)
    k_c = _cast(tl.load(k_ptr + rowk0 + tile_dk, mask=mt[:, None], other=0.0), q_ptr, DOT_MODE)
    v_c = _cast(tl.load(v_ptr + rowv0 + tile_dv, mask=mt[:, None], other=0.0), q_ptr, DOT_MODE)
    do_c = _cast(tl.load(do_ptr + rowv0 + tile_dv, mask=mt[:, None], other=0.0), q_ptr, DOT_MODE)
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E  # fp64 when traced (kernels._phi)
    near = (offs_t[:, None] >= offs_t[None, :]) & mt[:, None]
    p, ds = _band_block(q_c, k_c, do_c, v_c, lse2[:, None], delta[:, None], near, qk_scale, DOT_MODE)
    ds_c = _cast(ds, q_ptr, DOT_MODE)
    s_scale = tl.cast(sm_scale, tl.float32)
    # one gradient at a time (each a [BT, D] fp32 tile: three alive would spill)
    _add_into(dq_ptr + rowk0 + tile_dk, _dot(ds_c, k_c, DOT_MODE) * s_scale, mt)
    _add_into(dk_ptr + rowk0 + tile_dk, _dot(tl.trans(ds_c), q_c, DOT_MODE) * s_scale, mt)
    _add_into(dv_ptr + rowv0 + tile_dv, _dot(tl.trans(_cast(p, q_ptr, DOT_MODE)), do_c, DOT_MODE), mt)


@triton.jit
def _add_into(at, x, rows):
    """Adds the fp32 tile x to the gradient rows stored at `at` (those of mask `rows`)."""
    x += tl.load(at, mask=rows[:, None], other=0.0).to(tl.float32)
    tl.store(at, x.to(at.dtype.element_ty), mask=rows[:, None])
