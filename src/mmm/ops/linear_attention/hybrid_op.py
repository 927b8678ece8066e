"""Fused causal hybrid attention as torch.library ops (mmm::hybrid_attention_fwd / _bwd) over the kernels
of hybrid_kernels.py (their docstring has the formulas), with autograd, and `hybrid_attention_fused`, the
entry point mmm.attention's hybrid path calls (it checks the inputs; this checks what only the kernels
need). The window: `kernel_takes`; the kernels' chunk length: `chunk_len`."""

from __future__ import annotations

import math
import os

import torch

from .._eager import cdiv, eager_twin, plain_eager
from . import op

if op.HAVE_TRITON:
    from torch.library import triton_op

    from .._eager import launcher
    from . import hybrid_kernels, kernels

    def _segment_len(T: int, batch_heads: int, chunk: int) -> int:
        """op.segment_len, rounded up to a multiple of the kernels' chunk length."""
        return cdiv(op.segment_len(T, batch_heads), chunk) * chunk

    def _forward_launches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_scale: torch.Tensor,
                          feature: int, window: int, block: bool, eps: float, scale: float,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k [B,T,H,DK], v [B,T,H,DV], log_scale [H] fp32 (c_h); block: a block window (the chunks are
        the blocks). Returns o [B,T,H,DV], rfar and lse2 [B,H,T] fp32 and the prefix states, lagged by the
        window unless block (kept for the backward)."""
        B, T, H, DK = q.shape
        chunk = chunk_len(window)
        seg_len = _segment_len(T, B * H, chunk)
        o = torch.empty_like(v)
        rfar = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
        lse2 = torch.empty_like(rfar)
        common = op._shared_args(q, v, seg_len, scale, feature, True)
        lag = 0 if block else window
        states = op.prefix_states(k, v, common, dict(LAG=lag, HAS_LAG=lag > 0))
        del common["NORMALIZE"]  # the hybrid kernel always normalises: it takes no such argument
        launcher(hybrid_kernels.hybrid_fwd_kernel)[op._grid(v.shape[-1], common["NS"] * B * H, "BV")](
            q, k, v, o, rfar, lse2, states, log_scale, eps=eps, sm_scale=DK ** -0.5, BLOCK=block, BT=chunk, W=window,
            **common)
        return o, rfar, lse2, states

    def _backward_launches(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           o: torch.Tensor, rfar: torch.Tensor, lse2: torch.Tensor, states: torch.Tensor,
                           feature: int, window: int, block: bool, scale: float,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dq, dk, dv: the far weights' part from the lagged linear backward (rden := rfar, o the hybrid's
        output; for a block window the unlagged one over earlier blocks), then the near keys' part added
        by the band kernels (a block window: band_diag_kernel, the diagonal block alone)."""
        B, T, H, DK = q.shape
        chunk = chunk_len(window)
        seg_len = _segment_len(T, B * H, chunk)
        delta = torch.empty_like(rfar)  # do . o per row, from the linear backward's chunk_state pass
        dq, dk, dv = op.backward_kernels(do, q, k, v, o, rfar, states, feature, True, True, seg_len, scale,
                                         0 if block else window, block=chunk if block else 0, delta=delta)
        band = dict(T=T, H=H, sm_scale=DK ** -0.5, DK=DK, DV=v.shape[-1], DOT_MODE=op._dot_mode(q.dtype),
                    BT=chunk, num_warps=1 if kernels.INTERPRET else 4)
        grid = (cdiv(T, chunk) * B * H,)
        if block:
            launcher(hybrid_kernels.band_diag_kernel)[grid](q, k, v, do, lse2, delta, dq, dk, dv, **band)
        else:
            launcher(hybrid_kernels.band_dq_kernel)[grid](q, k, v, do, lse2, delta, dq, W=window, **band)
            launcher(hybrid_kernels.band_dkdv_kernel)[grid](q, k, v, do, lse2, delta, dk, dv, W=window, **band)
        return dq, dk, dv

    def _setup_context(ctx, inputs, output):
        q, k, v, log_scale, feature, window, block, eps, scale = inputs
        o, rfar, lse2, states = output
        ctx.save_for_backward(q, k, v, o, rfar, lse2, states)
        ctx.config = (feature, window, block, scale)
        ctx.mark_non_differentiable(rfar, lse2, states)
        ctx.set_materialize_grads(False)

    def _gradients(backward_launches):
        def backward(ctx, do, *_):
            q, k, v, o, rfar, lse2, states = ctx.saved_tensors
            do = torch.zeros_like(o) if do is None else do.contiguous()
            dq, dk, dv = backward_launches(do, q, k, v, o, rfar, lse2, states, *ctx.config)
            return dq, dk, dv, None, None, None, None, None, None

        return backward

    hybrid_attention_fwd = triton_op("mmm::hybrid_attention_fwd", mutates_args=())(_forward_launches)
    hybrid_attention_bwd = triton_op("mmm::hybrid_attention_bwd", mutates_args=())(_backward_launches)
    hybrid_attention_fwd.register_autograd(_gradients(hybrid_attention_bwd), setup_context=_setup_context)
    _EagerHybridAttention = eager_twin(
        "_EagerHybridAttention", _forward_launches, _setup_context, _gradients(_backward_launches))

# The kernels' chunk length is the window up to MAX_CHUNK; a longer window takes chunks of MAX_CHUNK (it
# must be a multiple), the near keys of a chunk's queries then spanning W / MAX_CHUNK + 1 chunks.
MAX_CHUNK = 64
MAX_WINDOW = 512  # the forward and band kernels unroll or loop over W / MAX_CHUNK blocks per chunk
# Windows mmm.attention sends to the fused kernels. Over 64 they are correct (tests) but not yet timed
# against the flex path on a GPU (scripts/gpu_hybrid_fused.py times both): until then flex keeps them.
DISPATCH_MAX_WINDOW = 64


# Windows over MAX_CHUNK on CUDA: the forward (its loop over the chunks between, nested in the chunk
# loop) faulted on an H100 at W = 256 (illegal address, session 20), while every interpreter test passes.
# Not software-pipelining that loop did not help (session 21, compute-sanitizer: "Out-of-range shared or
# local address" in a tl.sum of hybrid_fwd_kernel, one program, the symptom of the 2026-11-28 8-warp
# fault in kernels.py's docstring). Off on CUDA (unrolling that loop instead needs 250-280 KB of shared
# memory on sm_90; it was also slower than flex at 32k); MMM_HYBRID_LONG_WINDOWS=1 turns them on for a
# diagnosis (gpu_single.sh hylong).
LONG_WINDOWS_ON_CUDA = os.environ.get("MMM_HYBRID_LONG_WINDOWS") == "1"


def chunk_len(window: int) -> int:
    return min(window, MAX_CHUNK)


def kernel_takes(window: int, window_shape: str = "sliding") -> bool:
    """Whether the fused kernels take this window: 16 or 32 (and any power of two from 16 up to
    MAX_CHUNK: the chunk is the window), or a sliding one that is a multiple of MAX_CHUNK up to MAX_WINDOW."""
    if window <= MAX_CHUNK:
        return window >= 16 and window & (window - 1) == 0
    return window_shape == "sliding" and window % MAX_CHUNK == 0 and window <= MAX_WINDOW


# Head widths the fused kernels take: at 256 the forward spills 1.1 KB per thread at W = 16 and 3 KB at
# W = 64, where it also takes 224 of the 227 KB of shared memory (ptxas, sm_90), and none of it has run on
# a GPU; such heads keep the flex path, whose far part splits keys into 128-wide slices.
HEAD_DIMS = tuple(d for d in op.SUPPORTED_HEAD_DIMS if d <= 128)


def fused_applies(q: torch.Tensor, v: torch.Tensor, window: int, causal: bool, window_shape: str = "sliding") -> bool:
    """Whether mmm.attention sends these inputs to `hybrid_attention_fused`: causal, a window the kernels
    take up to DISPATCH_MAX_WINDOW, head widths in HEAD_DIMS, the kernel's dtypes, on CUDA (or CPU under
    TRITON_INTERPRET=1)."""
    return causal and window <= DISPATCH_MAX_WINDOW and _kernel_applies(q, v, window, window_shape)


def _kernel_applies(q: torch.Tensor, v: torch.Tensor, window: int, window_shape: str = "sliding") -> bool:
    long_ok = window <= MAX_CHUNK or LONG_WINDOWS_ON_CUDA or not q.is_cuda
    return (op.HAVE_TRITON and kernel_takes(window, window_shape) and long_ok and op._uses_kernel(q)
            and q.shape[-1] in HEAD_DIMS and v.shape[-1] in HEAD_DIMS)


def hybrid_attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_scale: torch.Tensor,
                           feature_map: str, window: int, eps: float = 1e-6, window_shape: str = "sliding",
                           ) -> torch.Tensor:
    """Causal hybrid attention of mmm.attention.hybrid in one fused forward pass: q, k [B, T, H, D] (GQA
    heads already repeated), v [B, T, H, Dv]; log_scale [H] (c_h, no gradient); feature_map 'elu' or
    'relu', applied to d^-1/4 q and k as mmm's maps do; window and window_shape ('sliding' or 'block'):
    see `kernel_takes`. Output like v, differentiable in q, k and v."""
    if window_shape not in ("sliding", "block"):
        raise ValueError(f"window_shape must be 'sliding' or 'block', got {window_shape!r}")
    if not _kernel_applies(q, v, window, window_shape):
        raise ValueError(f"hybrid_attention_fused takes inputs the Triton kernel takes (CUDA, or CPU under "
                         f"TRITON_INTERPRET=1; head dims in {HEAD_DIMS}) and a window of 16, 32, 64 or (sliding) "
                         f"a multiple of {MAX_CHUNK} up to {MAX_WINDOW} (on CUDA only up to {MAX_CHUNK} for now: "
                         f"see LONG_WINDOWS_ON_CUDA), got {window_shape} window={window}, head dims "
                         f"{q.shape[-1]}/{v.shape[-1]} on {q.device}")
    if feature_map not in ("elu", "relu"):
        raise ValueError(f"feature_map must be 'elu' or 'relu' for the fused hybrid kernel, got {feature_map!r}")
    if log_scale.shape != (q.shape[2],) or log_scale.requires_grad:
        raise ValueError(f"log_scale must be [heads] = [{q.shape[2]}] without a gradient, got "
                         f"{tuple(log_scale.shape)} (requires_grad={log_scale.requires_grad})")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    args = (q, k, v, log_scale.to(device=q.device, dtype=torch.float32).contiguous(),
            kernels.FEATURE_CODES[feature_map], int(window), window_shape == "block", float(eps), q.shape[-1] ** -0.25)
    return (_EagerHybridAttention.apply if plain_eager(q, k, v) else hybrid_attention_fwd)(*args)[0]
