"""Sliding-window softmax attention: exact softmax restricted to a band of keys.

    causal:     o_i = sum_{j in W(i)} softmax_j(q_i . k_j / sqrt(d)) v_j,  W(i) = {j : 0 <= i - j < w}
    two-sided:  W(i) = {j : |i - j| < w}

This is exactly softmax attention on a banded mask, but as a stand-in for full softmax attention it is an
approximation, lossless only when the band covers every visible key (w >= T); `mmm.attention_error`
measures what it loses on your inputs.

Blockwise, O(T w) time and memory: the sequence is cut into chunks of C = min(w, T) rows; chunk c attends
to chunks c-1, c (and c+1 when two-sided), which hold every key of its band. No T x T mask is built;
chunks are processed in groups (`_layout.GROUP_BUDGET`) so that inference memory stays bounded.

On CUDA (fp16 / bf16 / fp32, head dims and lengths that `flex.flex_applies` accepts) the same band runs
through torch's FlexAttention instead (flex.py): block-sparse and fused, with no per-chunk tensors in
memory. The blockwise path stays for CPU, fp64 and the shapes flex does not take; `window_path` says which
one a call takes.
"""

from __future__ import annotations

import torch

from . import flex
from ._layout import chunk, chunk_groups, compute_dtype, group_kv, group_q, ungroup, unchunk

# The near keys of hybrid attention (hybrid.py): a band around each query ('sliding', |i - j| < w) or the
# query's own block of w positions ('block', i // w == j // w; causal: its keys up to the query).
WINDOW_SHAPES = ("sliding", "block")


def near_mask(i: torch.Tensor, j: torch.Tensor, window: int, shape: str = "sliding") -> torch.Tensor:
    """Whether key position j is near query position i (broadcasting index tensors), before causality."""
    if shape == "block":
        return i // window == j // window
    return (i - j).abs() < window


def band_blocks(x: torch.Tensor, size: int, causal: bool) -> torch.Tensor:
    """[..., T, X] -> [..., N, K, X]: for each chunk of `size` rows, the rows of chunks c-1, c (and c+1
    when two-sided), K = 2 or 3 times `size`, zero rows outside the sequence."""
    n = -(-x.shape[-2] // size)
    padded = chunk(x, size, front=1, back=0 if causal else 1)
    return torch.cat([padded[..., i : i + n, :, :] for i in range(padded.shape[-3] - n + 1)], dim=-2)


def band_masks(t: int, size: int, window: int, causal: bool, device,
               shape: str = "sliding") -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [N, C, K] masks over the keys of `band_blocks`: `near` = in the window (`near_mask`; for
    'block' the chunks must be the blocks: size = window, or one chunk when T <= window), `far` = in the
    sequence, visible (j <= i when causal) and not near."""
    n = -(-t // size)
    idx = torch.arange(n, device=device)
    q_pos = idx[:, None] * size + torch.arange(size, device=device)  # [N, C]
    key_pos = (idx[:, None] - 1) * size + torch.arange((2 if causal else 3) * size, device=device)  # [N, K]
    rel = q_pos[:, :, None] - key_pos[:, None, :]  # i - j
    visible = ((key_pos >= 0) & (key_pos < t))[:, None, :] & (rel >= 0 if causal else True)
    near = near_mask(q_pos[:, :, None], key_pos[:, None, :], window, shape)
    return visible & near, visible & ~near


def band_scores(qc: torch.Tensor, kblk: torch.Tensor) -> torch.Tensor:
    """q . k / sqrt(d) between chunks of queries [.., G, C, D] and their band blocks of keys [.., G, K, D]."""
    return (qc @ kblk.transpose(-1, -2)) * qc.shape[-1] ** -0.5


def window_path(q: torch.Tensor, v: torch.Tensor) -> str:
    """'flex' or 'blockwise': the implementation `window_attention` runs for inputs like these."""
    return "flex" if flex.flex_applies_to(q, v) else "blockwise"


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    """[B, T, H, D] in and out (inputs already checked by `mmm.attention`)."""
    if window_path(q, v) == "flex":
        return flex.flex_window(q, k, v, window, causal)
    return blockwise_window(q, k, v, window, causal)


def blockwise_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    """The PyTorch path of the module docstring, computed in fp32 (fp64 for fp64 inputs)."""
    dt = compute_dtype(q)
    (b, t, h, _), hk = q.shape, k.shape[2]
    size = min(window, t)
    qc = chunk(group_q(q.to(dt), hk), size)  # [B, Hk, g, N, C, D]
    kblk = band_blocks(group_kv(k.to(dt)), size, causal)  # [B, Hk, 1, N, K, D]
    vblk = band_blocks(group_kv(v.to(dt)), size, causal)
    near, _ = band_masks(t, size, window, causal, q.device)
    outs = []
    for sl in chunk_groups(qc.shape[-3], b * h * size * kblk.shape[-2]):
        logits = band_scores(qc[..., sl, :, :], kblk[..., sl, :, :])
        # A finite fill (not -inf) keeps the padding rows past T, which see no key, free of NaN.
        p = torch.softmax(logits.masked_fill(~near[sl], torch.finfo(dt).min), dim=-1)
        outs.append(p @ vblk[..., sl, :, :])
    return ungroup(unchunk(torch.cat(outs, dim=-3), t)).to(q.dtype)
