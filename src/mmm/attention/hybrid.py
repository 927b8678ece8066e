"""Hybrid attention: exact softmax weights for the nearest `window` keys, a linear-attention kernel for
the keys further away, and ONE normaliser over both (as in Based / LoLCATs).

An approximation of softmax attention (exact only where every visible key is in the window, i.e. T <= w
when causal); never lossless. Measure it with `mmm.attention_error`.

Semantics. s_ij = q_i.k_j / sqrt(d), kappa_ij = phi(q_i).phi(k_j) (the feature map's stand-in for
exp(s_ij)), near N(i) = {j : 0 <= i - j < w} (causal) or {j : |i - j| < w} (two-sided), far F(i) = the
other visible keys (j <= i - w when causal):

    o_i = (sum_{N(i)} exp(s_ij) v_j + sum_{F(i)} kappa_ij v_j) / (sum_{N(i)} exp(s_ij) + sum_{F(i)} kappa_ij + eps)

Block windows (window_shape='block', as Infini-attention's segments): near N(i) = {j : j // w == i // w}
(and j <= i when causal), the query's own block of w positions: between 1 and w near keys, and every
earlier block far. Less accurate than a sliding window of the same w (the bench's trained layer, H100:
error 0.342 at block 64 vs 0.271 sliding 64 at 8k, 0.53 vs 0.50 at 128k; elu+1 alone 0.70 / 0.72), and
cheaper: the far part is the linear-attention state at the block's start, with no masked far block, and
the near part one [w, w] block per block instead of two. Causal block windows of 16, 32 or 64 take the
fused kernel below (its chunks are the blocks); other block windows, and two-sided ones, the blockwise
path.

Near keys get weight exp(s) and far keys kappa: both stand for exp(s), so the shared normaliser weighs
near against far consistently only for maps whose kappa is calibrated to exp(s): favor (unbiased) and
taylor (1 + s + s^2/2). elu, relu and hedgehog kernels have their own scale, so every map carries a
per-head calibration c_h (`FeatureMap.hybrid_log_scale`, 0 until fitted) and far keys weigh
exp(c_h) kappa_ij. `fit_hybrid` (fit.py) fits c_h to a layer's q/k/v: on a CPU replica (2 heads x 128)
of the trained layer behind the bench's quality column it takes elu+1's hybrid error from 0.58 to 0.23
at 2k tokens (window 256 alone: 0.37); the fitted c_h were -2.4 and -4.6 there.

Computation. Numerator and denominator are multiplied by exp(-r_i), r_i = max(m_i, l_i + log far_i)
(`shared_max`), m_i = max_{N(i)} s_ij, l_i = c_h + the log of the feature map's per-query factor
(phi(q) = phi_s(q) exp(l), 0 for maps without one), far_i = phi_s(q_i) . z_i^far:

    num_i = sum_N exp(s_ij - r_i) v_j + exp(l_i - r_i) (phi_s(q_i) S_i^far)
    den_i = sum_N exp(s_ij - r_i)     + exp(l_i - r_i) (phi_s(q_i) . z_i^far) + eps exp(-r_i)
    o_i   = num_i / den_i                     (identical to the formula above; r_i cancels exactly)

Every weight is <= 1 and the largest is 1, so nothing overflows and den_i >= 1. S^far, z^far are the
linear-attention sums over far keys: keys in chunks <= c-2 through the running fp32 state, far keys of
chunk c-1 (and c+1) through the masked block (chunks of size C = min(w, T)). Costs O(T w d) for the
window plus O(T F Dv) for the far part.

On CUDA, where FlexAttention takes the inputs (`flex.flex_applies`), the near part comes from flex
instead, as its normalised output o^w_i and log-sum-exp lse_i (so sum_N exp(s_ij) v_j = exp(lse_i) o^w_i),
and the two parts meet in the same shared normaliser with r_i = max(lse_i, l_i + log far_i)
(`combine_lse`). The far sums are a causal linear attention whose state at row i holds the keys
j <= i - w: queries from row w on against the keys and values up to row T - 1 - w, i.e. the sequence
shifted by w (`prefix_far_sums`; two-sided adds the same on the reversed sequence for the keys
j >= i + w). For elu / relu maps that is
the Triton op mmm.ops.linear_attention with a key lag of w (it reads the shifted rows in place), which
returns its normalised output and its fp32 rden = 1 / (den + eps), both differentiable, so num = o / rden
and den = 1 / rden - eps come back without another pass over the features; the combination is one compiled elementwise pass (`kernel_far_part`, `_combine`). For
other maps, the chunked PyTorch sums of linear.py. O(T w d + T F Dv), no T x T tensor. `hybrid_path` says
which runs.

Causal, elu / relu, window 16, 32 or 64 and c_h without a gradient: one fused Triton pass does both parts
instead ('fused': mmm.ops.linear_attention.hybrid_op; its kernels' docstring has the formulas), the
linear kernel with chunk length = window and key lag = window, so the near keys of a chunk's queries are
two [w, w] blocks it already reads. The flex path's three passes (flex, the lagged linear op, the
combine) took 2.5x linear attention alone at 128k (H200, window 256); the fused pass 1.7-1.8x at window
64 (H100). The kernels also take windows that are multiples of 64 up to 512 (chunks of 64), but
mmm.attention sends them only up to hybrid_op.DISPATCH_MAX_WINDOW until they are timed against flex.
"""

from __future__ import annotations

import math

import torch

from . import flex
from ._compiled import compiled_on_cuda
from . import linear as linear_mod
from ._layout import chunk, chunk_groups, compute_dtype, group_kv, group_q, ungroup, unchunk
from .feature_maps import FeatureMap
from .linear import causal_sums, exclusive_cumsum, linear_features
from .window import band_blocks, band_masks, band_scores


# log(far_den) enters the shared max clamped to at least this: the far scale exp(l - r) <= 1 / max(far_den,
# e^FAR_LOG_FLOOR) stays far from fp32's overflow (e^88), and far sums that small weigh nothing beside it.
FAR_LOG_FLOOR = -60.0


def shared_max(m, log_scale, far_den):
    """The shift r of the shared normaliser and the far part's scale exp(l - r), 0 where there is no far
    mass. r = max(m, l + log far_den), the larger of the near part's largest log weight and the far
    part's log mass: every scaled weight is <= 1 and the denominator >= 1 (with far_den >=
    e^FAR_LOG_FLOOR), so nothing overflows or leaves 0 / 0. m: the near
    part's max score or log-sum-exp, l = log_scale, far_den >= 0 (rounding may leave it slightly below).
    Why not r = max(m, l): a large calibration (fit_hybrid gives c_h ~ 75-135 on the bench's trained
    layer) then made every near weight exp(s - l) underflow fp32 in rows whose far mass is 0 (the first
    `window` rows, or relu features that are all 0): 0 / 0. r is detached: it cancels exactly."""
    has_far = far_den > 0
    far_log = torch.where(has_far, far_den.detach().clamp_min(math.exp(FAR_LOG_FLOOR)).log(), -torch.inf)
    r = torch.maximum(m, log_scale + far_log).detach()
    # exp of -inf where there is no far mass (not exp(l - r) masked afterwards: that can overflow to inf
    # and give 0 * inf = nan in the backward)
    return r, torch.exp(torch.where(has_far, log_scale - r, -torch.inf))


def combine(logits, near, v_near, far_num, far_den, log_scale, eps: float) -> torch.Tensor:
    """The shared normaliser. For rows of queries: logits [.., R, K] and near mask [R, K] over near-key
    candidates with values v_near [.., K, Dv]; far_num [.., R, Dv] = phi_s(q).sum_far phi(k) v^T and
    far_den [.., R] = phi_s(q).sum_far phi(k); log_scale [.., R] (zeros for maps without one)."""
    m = logits.detach().masked_fill(~near, torch.finfo(logits.dtype).min).amax(-1)
    r, far_scale = shared_max(m, log_scale, far_den)
    p = torch.exp((logits - r.unsqueeze(-1)).masked_fill(~near, -torch.inf))
    num = p @ v_near + far_scale.unsqueeze(-1) * far_num
    den = p.sum(-1) + far_scale * far_den + eps * torch.exp(-r)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)


def block_far_sums(fq, fk_blk, v_blk, far, s_far, z_far):
    """Far sums for chunks: far keys inside the block (mask `far` [G, C, K]) plus the state of the far
    keys outside it (s_far [.., G, F, Dv], z_far [.., G, F]); fq [.., G, C, F]."""
    kappa = (fq @ fk_blk.transpose(-1, -2)).masked_fill(~far, 0.0)
    return fq @ s_far + kappa @ v_blk, (fq @ z_far.unsqueeze(-1)).squeeze(-1) + kappa.sum(-1)


def far_log_scale(fmap: FeatureMap, log_scale, kv_heads: int, groups: int, dtype) -> torch.Tensor:
    """l_i of the module docstring: c_h plus the map's per-query log factor (grouped [B, Hk, g, T], or
    None), as [B, Hk, g, T] or, without a per-query factor, [Hk, g, 1] (broadcasts)."""
    c = fmap.hybrid_log_scale_for(kv_heads * groups).to(dtype).reshape(kv_heads, groups, 1)
    return c if log_scale is None else log_scale + c


def hybrid_path(q: torch.Tensor, v: torch.Tensor, fmap: FeatureMap, window: int = 0, causal: bool = False,
                window_shape: str = "sliding") -> str:
    """The implementation `hybrid_attention` runs for inputs like these: 'fused' (one Triton kernel for
    both parts, `fused_hybrid`), 'blockwise', or 'flex+triton' / 'flex+chunked' (flex for the near keys,
    the Triton op or chunked PyTorch sums for the far ones; sliding windows only)."""
    if fused_applies(q, v, fmap, window, causal, window_shape):
        return "fused"
    if window_shape == "block" or not flex.flex_applies_to(q, v):
        return "blockwise"
    return "flex+triton" if linear_mod.triton_applies(q, v, fmap) else "flex+chunked"


def hybrid_attention(q, k, v, fmap: FeatureMap, window: int, causal: bool, eps: float,
                     chunk_size: int = linear_mod.DEFAULT_CHUNK, window_shape: str = "sliding") -> torch.Tensor:
    """[B, T, H, D] in and out (inputs already checked by `mmm.attention`)."""
    path = hybrid_path(q, v, fmap, window, causal, window_shape)
    if path == "fused":
        return fused_hybrid(q, k, v, fmap, window, eps, window_shape)
    if path != "blockwise":
        return flex_hybrid(q, k, v, fmap, window, causal, eps, chunk_size)
    return blockwise_hybrid(q, k, v, fmap, window, causal, eps, window_shape)


def fused_applies(q: torch.Tensor, v: torch.Tensor, fmap: FeatureMap, window: int, causal: bool,
                  window_shape: str = "sliding") -> bool:
    """Whether the fused kernel (mmm.ops.linear_attention.hybrid_op) runs these inputs: causal, a window
    it is sent (hybrid_op.fused_applies: 16, 32 or 64 today, either shape), elu or relu (maps the kernel
    applies itself), on the linear kernel's path, and a calibration c_h without a gradient (the kernel
    returns none for it)."""
    if not (isinstance(fmap, linear_mod._NATIVE_MAPS) and linear_mod.triton_applies(q, v, fmap)
            and not fmap.hybrid_log_scale.requires_grad):
        return False
    from mmm.ops.linear_attention import hybrid_op

    return hybrid_op.fused_applies(q, v, window, causal, window_shape)


def fused_hybrid(q, k, v, fmap: FeatureMap, window: int, eps: float, window_shape: str = "sliding") -> torch.Tensor:
    """The causal hybrid in one fused kernel (`fused_applies`): the Triton op with the map's c_h per
    query head (GQA keys and values repeated to q's heads). [B, T, H, D] in and out."""
    from mmm.ops.linear_attention.hybrid_op import hybrid_attention_fused

    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    c = fmap.hybrid_log_scale_for(q.shape[2]).detach().float()
    return hybrid_attention_fused(q, k, v, c, fmap.name, window, eps, window_shape)


def combine_lse(o_w, lse, far_num, far_den, log_scale, eps: float) -> torch.Tensor:
    """The shared normaliser of the module docstring, for a near part given as flex gives it: o_w
    [.., T, Dv] normalised over the near keys with log-sum-exp lse [.., T]; far_num [.., T, Dv], far_den
    [.., T] as in `combine`, log_scale (l, broadcastable to [.., T]); r from `shared_max`."""
    r, far_scale = shared_max(lse, log_scale, far_den)
    near_scale = torch.exp(lse - r)
    num = near_scale.unsqueeze(-1) * o_w + far_scale.unsqueeze(-1) * far_num
    den = near_scale + far_scale * far_den + eps * torch.exp(-r)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)


def prefix_far_sums(q, k, v, fq, fk, window: int, chunk_size: int):
    """Far sums over the keys j <= i - window, grouped like `linear_features` (fq [B, Hk, g, T, F], fk
    [B, Hk, 1, T, F]; q, k, v the inputs [B, T, H, D]): num [B, Hk, g, T, Dv], den [B, Hk, g, T], zero
    for the rows i < window, which have no far key. Causal linear attention of the queries from row
    `window` on against the keys and values up to row T - 1 - window, in chunked PyTorch sums."""
    t = q.shape[1]
    shifted = t - window
    if shifted <= 0:
        return fq.new_zeros(*fq.shape[:-1], v.shape[-1]), fq.new_zeros(fq.shape[:-1])
    num, den = causal_sums(fq[..., window:, :], fk[..., :shifted, :], group_kv(v[:, :shifted].to(fq.dtype)), chunk_size)
    pad = torch.nn.functional.pad
    return pad(num, (0, 0, window, 0)), pad(den, (window, 0))


def kernel_far_part(q, k, v, fmap: FeatureMap, window: int, eps: float):
    """The far sums of `prefix_far_sums` through the Triton op with a key lag of `window` (query i sees
    the keys j <= i - window; q, k, v whole, so their gradients need no slice or pad): its normalized
    output o = num / (den + eps) [B, T, H, Dv] and rden = 1 / (den + eps) [B, T, H] fp32, both
    differentiable (q's heads, GQA keys repeated). Rows i < window have no far key: o = 0, rden = 1 / eps.
    None if T <= window."""
    if q.shape[1] <= window:
        return None
    return linear_mod._triton_linear(q, k, v, fmap, True, True, eps, with_rden=True, lag=window)


def combine_kernel_far(o_w, lse, parts, log_scale, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """`combine_lse` for maps without a query scale (l = c_h, log_scale [H]), in the output's order: near
    part o_w [B, T, H, Dv] and lse [B, T, H] from flex (transposed), far parts as `kernel_far_part`
    returns them: [(o, rden, reversed)], one causal, a second computed on the reversed sequence when
    two-sided (flipped back here). A row without far keys has o = 0, rden = 1 / eps: num = 0 and den = 0
    (up to rounding). Returns [B, T, H, Dv] in out_dtype. Elementwise: on CUDA the combination and the
    cast compile into one pass (`_combine`), and so does their backward. Every input should be stored in
    [B, T, H, .] order (flex keeps q's layout for o_w; lse and rden are copied into it, see
    `linear._rows_first`), so that the pass reads and writes memory in order."""
    far = []
    for o, rden, reverse in parts:
        if reverse:
            o, rden = o.flip(1), rden.flip(1)
        far.append((o.float(), rden))
    far_den = sum(1.0 / rden - eps for _, rden in far) if far else torch.zeros_like(lse)
    r, far_scale = shared_max(lse, log_scale, far_den)
    near_scale = torch.exp(lse - r)
    num = near_scale.unsqueeze(-1) * o_w.float()
    den = near_scale + far_scale * far_den + eps * torch.exp(-r)
    for o, rden in far:
        num = num + (far_scale / rden).unsqueeze(-1) * o
    out = num / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)
    return out.to(out_dtype)


_combine = compiled_on_cuda(combine_kernel_far)


def flex_hybrid(q, k, v, fmap: FeatureMap, window: int, causal: bool, eps: float, chunk_size: int) -> torch.Tensor:
    """The hybrid path with flex for the near keys (module docstring). [B, T, H, D] in and out."""
    dt = compute_dtype(q)
    (b, t, h, _), hk = q.shape, k.shape[2]
    o_w, lse = flex.flex_band(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, causal, return_lse=True)
    if linear_mod.triton_applies(q, v, fmap):  # no query scale then (triton_applies' condition)
        parts = [(kernel_far_part(q, k, v, fmap, window, eps), False)]
        if not causal:  # keys j >= i + window: the same on the reversed sequence
            parts.append((kernel_far_part(q.flip(1), k.flip(1), v.flip(1), fmap, window, eps), True))
        c = far_log_scale(fmap, None, hk, h // hk, lse.dtype).reshape(h)
        far_parts = [(*far, rev) for far, rev in parts if far is not None]
        return _combine(o_w.transpose(1, 2), linear_mod._rows_first(lse), far_parts, c, eps, q.dtype)
    o_w = o_w.to(dt).reshape(b, hk, h // hk, t, -1)  # [B, H, T, Dv] -> grouped [B, Hk, g, T, Dv]
    lse = lse.to(dt).reshape(b, hk, h // hk, t)
    fq, log_scale, fk, _ = linear_features(q, k, None, fmap)
    far_num, far_den = prefix_far_sums(q, k, v, fq, fk, window, chunk_size)
    if not causal:
        # Keys j >= i + window: the same sums on the reversed sequence.
        rq, rk, rv = q.flip(1), k.flip(1), v.flip(1)
        num_r, den_r = prefix_far_sums(rq, rk, rv, fq.flip(-2), fk.flip(-2), window, chunk_size)
        far_num, far_den = far_num + num_r.flip(-2), far_den + den_r.flip(-1)
    o = combine_lse(o_w, lse, far_num, far_den, far_log_scale(fmap, log_scale, hk, h // hk, dt), eps)
    return ungroup(o).to(q.dtype)


def blockwise_hybrid(q, k, v, fmap: FeatureMap, window: int, causal: bool, eps: float,
                     window_shape: str = "sliding") -> torch.Tensor:
    """The blockwise PyTorch path of the module docstring (CPU, fp64, shapes flex does not take, block
    windows outside the fused kernel). Its chunks are the blocks of a block window."""
    dt = compute_dtype(q)
    (b, t, h, _), hk = q.shape, k.shape[2]
    size = min(window, t)
    fq, log_scale, fk, vg = linear_features(q, k, v, fmap)
    qc = chunk(group_q(q.to(dt), hk), size)  # [B, Hk, g, N, C, D]
    kblk = band_blocks(group_kv(k.to(dt)), size, causal)  # [B, Hk, 1, N, K, D]
    near, far = band_masks(t, size, window, causal, q.device, window_shape)
    fq_c = chunk(fq, size)
    ls = far_log_scale(fmap, log_scale, hk, h // hk, dt) + torch.zeros_like(fq[..., 0])  # [B, Hk, g, T]
    ls_c = chunk(ls.unsqueeze(-1), size).squeeze(-1)
    fk_blk, v_blk = band_blocks(fk, size, causal), band_blocks(vg, size, causal)  # [B, Hk, 1, N, K, X]
    n, f, dv = qc.shape[-3], fq.shape[-1], vg.shape[-1]

    def block_state(rows: slice, chunks: slice):
        """Per chunk, the linear-attention state of the given rows of its block (rows :C are chunk c-1,
        rows -C: are chunk c+1): ([B, Hk, 1, G, F, Dv], [B, Hk, 1, G, F])."""
        fk_ = fk_blk[..., chunks, rows, :]
        return fk_.transpose(-1, -2) @ v_blk[..., chunks, rows, :], fk_.sum(-2)

    s, z = fq.new_zeros(b, hk, 1, f, dv), fq.new_zeros(b, hk, 1, f)
    prev = slice(0, size)
    if not causal:
        # Two-sided (no decoding, so all chunk states at once): far keys outside the block are chunks
        # <= c-2, an exclusive prefix over chunk c-1's states, and chunks >= c+2, an exclusive suffix
        # over chunk c+1's.
        everything = slice(0, n)
        (kv_prev, z_prev), (kv_next, z_next) = block_state(prev, everything), block_state(slice(-size, None), everything)
        s_all = exclusive_cumsum(kv_prev, s, -3)[0] + exclusive_cumsum(kv_next.flip(-3), s, -3)[0].flip(-3)
        z_all = exclusive_cumsum(z_prev, z, -2)[0] + exclusive_cumsum(z_next.flip(-2), z, -2)[0].flip(-2)
    outs = []
    for sl in chunk_groups(n, max(b * hk * f * dv, b * h * size * (kblk.shape[-2] + f))):
        if causal:
            # Far keys outside the block are chunks <= c-2: an exclusive prefix over chunk c-1's
            # states, carried from group to group.
            kv_prev, z_prev = block_state(prev, sl)
            s_far, s = exclusive_cumsum(kv_prev, s, dim=-3)
            z_far, z = exclusive_cumsum(z_prev, z, dim=-2)
        else:
            s_far, z_far = s_all[..., sl, :, :], z_all[..., sl, :]
        far_num, far_den = block_far_sums(fq_c[..., sl, :, :], fk_blk[..., sl, :, :], v_blk[..., sl, :, :], far[sl], s_far, z_far)
        logits = band_scores(qc[..., sl, :, :], kblk[..., sl, :, :])
        outs.append(combine(logits, near[sl], v_blk[..., sl, :, :], far_num, far_den, ls_c[..., sl, :], eps))
    return ungroup(unchunk(torch.cat(outs, dim=-3), t)).to(q.dtype)
