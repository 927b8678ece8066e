"""Banded softmax attention through torch's FlexAttention: the fast window path on CUDA, and the near
part of the hybrid path (with its log-sum-exp).

    o_i = sum_{j in W(i)} softmax_j(q_i . k_j / sqrt(d)) v_j,   lse_i = log sum_{j in W(i)} exp(q_i . k_j / sqrt(d))
    W(i) = {j : 0 <= i - j < w} (causal) or {j : |i - j| < w} (two-sided)

`flex_applies` is the one place that decides whether a call can take this path (CUDA, fp16/bf16/fp32,
head dims flex compiles well, T >= FLEX_MIN_SEQ); everything else stays on the blockwise PyTorch paths
of window.py / hybrid.py. On CPU, flex_attention runs eagerly (forward only, dense T x T scores): that is
what the CPU tests use, never the dispatch.

Block masks are built from the band's geometry (no T x T mask is ever evaluated, so 128k tokens and more
fit) and cached per (T, window, causal, device). The compiled flex_attention is cached per
(causal, window, dtype, GQA, lse, grad) with its own compile cache (`_compiled_flex`): within an entry,
the first sequence length compiles a static graph and a second distinct length one shape-generic graph
(torch's automatic dynamic shapes), so an entry holds at most a few graphs.
"""

from __future__ import annotations

import functools

import torch

from ._compiled import code_copy

FLEX_ENABLED = True  # switch for the flex path (tests and benchmarks compare against the blockwise path)
FLEX_HEAD_DIMS = (16, 32, 64, 128)  # q/k and v head dims sent to flex; 256 stays blockwise (untested there)
FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLEX_MIN_SEQ = 128  # below one flex block the blockwise path is cheap; no kernel compiles for tiny inputs
BLOCK = 128  # flex's sparse block size (its default)


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention  # noqa: F401
    except ImportError:  # torch without FlexAttention or without AuxRequest (< 2.9)
        return False
    return True


def flex_applies(device_type: str, dtype: torch.dtype, head_dim: int, v_dim: int, seq_len: int) -> bool:
    """Whether the flex path takes inputs of this kind (the dispatch of window.py and hybrid.py)."""
    return (
        FLEX_ENABLED
        and device_type == "cuda"
        and dtype in FLEX_DTYPES
        and head_dim in FLEX_HEAD_DIMS
        and v_dim in FLEX_HEAD_DIMS
        and seq_len >= FLEX_MIN_SEQ
        and flex_available()
    )


def flex_applies_to(q: torch.Tensor, v: torch.Tensor) -> bool:
    return flex_applies(q.device.type, q.dtype, q.shape[-1], v.shape[-1], q.shape[1])


@functools.lru_cache(maxsize=64)
def band_mask_mod(window: int, causal: bool):
    """The band as a flex mask_mod: causal 0 <= i - j < w, two-sided |i - j| < w (one function object
    per band, so that compiled graphs guarding on it are reused across sequence lengths)."""
    if causal:
        def causal_band(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        return causal_band

    def two_sided_band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx < window) & (kv_idx - q_idx < window)

    return two_sided_band


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [Nq, Nkv] block matrix -> (count per row [1, 1, Nq], column indices with the set ones
    first in ascending order [1, 1, Nq, Nkv]), int32: flex's sparse layout."""
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    return blocks.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]


@functools.lru_cache(maxsize=32)
def band_block_mask(t: int, window: int, causal: bool, device: torch.device, block: int = BLOCK):
    """The flex BlockMask of the band for sequence length t, from the geometry of the band: a block pair
    holds every i - j between its extremes, so comparing those with the band classifies it as full,
    partial or empty. O((t / block)^2) small integers; equal to create_block_mask's result (tested),
    which evaluates the mask over all t x t pairs. Blocks that reach past t are never full (flex's own
    convention: create_block_mask pads them with masked-out pairs)."""
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-t // block)
    start = torch.arange(n, device=device, dtype=torch.int64) * block
    end = torch.clamp_max(start + block, t) - 1  # last index inside each block
    rel_min = start[:, None] - end[None, :]  # smallest i - j over the block pair
    rel_max = end[:, None] - start[None, :]
    if causal:
        touches = (rel_max >= 0) & (rel_min < window)
        inside = (rel_min >= 0) & (rel_max < window)
    else:
        touches = (rel_max > -window) & (rel_min < window)
        inside = (rel_min > -window) & (rel_max < window)
    whole = (start + block <= t)
    full = inside & whole[:, None] & whole[None, :]
    kv_num, kv_idx = _ordered(touches & ~full)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=band_mask_mod(window, causal), seq_lengths=(t, t)
    )


def _call_flex(q, k, v, block_mask, enable_gqa: bool, return_lse: bool):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    if not return_lse:
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa), None
    o, aux = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa, return_aux=AuxRequest(lse=True))
    return o, aux.lse


@functools.lru_cache(maxsize=64)
def _compiled_flex(causal: bool, window: int, dtype: torch.dtype, enable_gqa: bool, return_lse: bool, grad: bool):
    """torch.compile of `_call_flex` for one kind of call. Dynamo keeps compiled graphs per code object
    with a limit of 8 recompiles, after which it silently runs the function eagerly, and eager flex
    builds T x T scores (out of memory at long T). Each entry therefore compiles its own copy of the
    code, so that its graphs count against its own limit; the key holds what would force a recompile
    other than shapes."""
    return torch.compile(code_copy(_call_flex, f"{'causal' if causal else 'two_sided'}_{window}"), fullgraph=True)


def flex_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool, return_lse: bool = False):
    """Banded softmax attention of q [B, H, T, D], k [B, Hk, T, D], v [B, Hk, T, Dv] (heads first, any
    strides) -> (o [B, H, T, Dv] in q's dtype, lse [B, H, T] fp32 natural log or None). Compiled on
    CUDA (unless already inside torch.compile, which traces flex itself); eager elsewhere."""
    t = q.shape[2]
    block_mask = band_block_mask(t, window, causal, q.device)
    gqa = q.shape[1] != k.shape[1]
    fn = _call_flex
    if q.is_cuda and not torch.compiler.is_compiling():
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        fn = _compiled_flex(causal, window, q.dtype, gqa, return_lse, grad)
    return fn(q, k, v, block_mask, gqa, return_lse)


def flex_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    """Window attention in the public layout [B, T, H, D] -> [B, T, H, Dv] through flex."""
    o, _ = flex_band(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, causal)
    return o.transpose(1, 2)
