"""Shared shape plumbing for the attention paths.

Public layout: q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim / v_dim].
Inside, heads are grouped for GQA: q -> [B, Hk, g, T, D], k/v -> [B, Hk, 1, T, D], g = heads // kv_heads,
query head h uses kv head h // g (the convention of SDPA's enable_gqa and of repeat_interleave).
Matmul broadcasting over the size-1 group axis then shares each kv head with its g query heads
without copying k or v.
"""

from __future__ import annotations

import torch

# The chunked paths process chunks in groups, keeping about this many elements of per-chunk tensors
# (window logits, chunk states) alive at once, so inference at 128k tokens stays in memory even with
# big feature maps (taylor: F = 1 + d + d^2). Under autograd every group's tensors are kept anyway.
GROUP_BUDGET = 2**26


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (tests); everything else is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def group_q(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, T, H, X] -> [B, Hk, g, T, X] (also works for [B, T, H] -> [B, Hk, g, T])."""
    b, t, h = x.shape[:3]
    return x.reshape(b, t, kv_heads, h // kv_heads, *x.shape[3:]).movedim(1, 3)


def group_kv(x: torch.Tensor) -> torch.Tensor:
    """[B, T, Hk, X] -> [B, Hk, 1, T, X]."""
    return x.movedim(1, 2).unsqueeze(2)


def ungroup(o: torch.Tensor) -> torch.Tensor:
    """[B, Hk, g, T, X] -> [B, T, Hk * g, X]."""
    b, hk, g, t = o.shape[:4]
    return o.movedim(3, 1).reshape(b, t, hk * g, *o.shape[4:])


def chunk(x: torch.Tensor, size: int, front: int = 0, back: int = 0) -> torch.Tensor:
    """Split axis -2 (time) of [..., T, X] into [..., N, size, X] after `front` zero chunks before and
    enough zero rows after to fill the last chunk plus `back` zero chunks."""
    t = x.shape[-2]
    n = -(-t // size)
    x = torch.nn.functional.pad(x, (0, 0, front * size, n * size - t + back * size))
    return x.reshape(*x.shape[:-2], n + front + back, size, x.shape[-1])


def unchunk(x: torch.Tensor, t: int) -> torch.Tensor:
    """[..., N, size, X] -> [..., T, X] (drops the padding rows)."""
    return x.flatten(-3, -2)[..., :t, :]


def chunk_groups(n_chunks: int, elements_per_chunk: int) -> list[slice]:
    """Consecutive slices of chunk indices, each holding about GROUP_BUDGET elements or one chunk."""
    size = max(1, GROUP_BUDGET // max(1, elements_per_chunk))
    return [slice(s, min(s + size, n_chunks)) for s in range(0, n_chunks, size)]
