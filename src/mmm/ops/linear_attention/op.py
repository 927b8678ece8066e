"""Linear attention as torch.library ops (mmm::linear_attention_fwd / _bwd) backed by the Triton kernels,
with autograd, and the public `linear_attention` that checks its inputs and dispatches.

Dispatch: the Triton op on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; the naive PyTorch
reference otherwise (CPU, float64 inputs, empty sequences, or Triton not installed).
"""

from __future__ import annotations

import math
import os

import torch

from ..._checks import check_float_tensor
from .._eager import cdiv, eager_twin, plain_eager
from .naive import linear_attention_naive

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
FEATURE_MAPS = ("elu", "relu", None, "identity")

# How many (batch*head, segment) pairs the sweep kernels aim for, and the shortest segment. Timed from
# CUDA graphs at 16 heads of 128 (bf16, elu+1 normalized, H100, results/h100/2026-12-06-s13-segsweep.log):
# T/8 tokens per segment was fastest at every length, 256 at 2k (0.236 ms f+b vs 0.256 at 512), 1024 at
# 8k (0.778 vs 0.865 at 512, 0.935 at 2048), 16384 at 128k (11.19 vs 11.34 at 4096); shorter segments
# move more fp32 state (64 KB per segment at D=128, ~8 times), longer ones make a longer serial sweep.
# Untimed at other batch*head counts.
_TARGET_SEGMENTS = 128
_MIN_SEGMENT = 256
# MMM_LA_WRITE_FEATURES=0 (read at import; diagnosis and A/Bs only): every kernel computes the map's
# features itself again, as before session 25 (`map_costs`).
_WRITE = os.environ.get("MMM_LA_WRITE_FEATURES", "1").strip()
if _WRITE not in ("0", "1"):
    raise ValueError(f"MMM_LA_WRITE_FEATURES must be 0 or 1 (the default), got {_WRITE!r}")
WRITE_FEATURES = _WRITE == "1"

try:
    from torch.library import triton_op

    from .._eager import launcher

    from . import kernels

    HAVE_TRITON = True
except ImportError:  # CPU installs without triton (or a torch without triton_op) use the reference
    HAVE_TRITON = False


def segment_len(T: int, batch_heads: int) -> int:
    """Tokens per segment: enough segments to fill the GPU, each a multiple of every kernel's chunk."""
    mult = kernels.SEGMENT_MULTIPLE
    per_seq = max(1, _TARGET_SEGMENTS // batch_heads)
    L = cdiv(cdiv(T, per_seq), mult) * mult
    return max(L, mult if kernels.INTERPRET else _MIN_SEGMENT)


def full_chunks(T: int, seg_len: int) -> bool:
    """Whether every chunk of every segment is whole, whatever the tile config (T and the segment length
    multiples of kernels.MAX_BT): the kernels then drop their row masks."""
    return T % kernels.MAX_BT == 0 and seg_len % kernels.MAX_BT == 0


def _dot_mode(dtype: torch.dtype) -> int:
    if kernels.INTERPRET:
        return 2  # fp32 operands, IEEE: bf16 dots are wrong under the interpreter
    if dtype == torch.bfloat16:
        return 0  # bf16 operands, fp32 accumulation
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        # PyTorch's default for fp32 matmuls: IEEE. Correct, but these dots spill registers on sm_90:
        # torch.set_float32_matmul_precision("high") selects the faster tf32 mode below.
        return 2
    # fp16 (an fp16 copy of the state could overflow on long sequences) and fp32 when PyTorch allows
    # tf32: fp32 operands in tf32 (about 3e-4 relative error).
    return 1


if HAVE_TRITON:

    def _grid(D: int, n_seq_segments: int, tile: str):
        """Programs of a kernel split over `tile` tiles of a head width D: BK tiles of the key width DK,
        BV tiles of the value width DV. A tile that does not divide D would leave rows of the state (or of
        the outputs) unwritten: the pruner never keeps one, but a config forced with MMM_LA_CONFIG skips
        the pruner, hence the check."""

        def grid(meta):
            if D % meta[tile]:
                role = "key width DK" if tile == "BK" else "value width DV"
                raise ValueError(f"linear attention config {tile}={meta[tile]} does not divide head_dim {D} (the {role})")
            return (D // meta[tile] * n_seq_segments,)

        return grid

    def _shared_args(q: torch.Tensor, v: torch.Tensor, seg_len: int, scale: float, feature: int,
                     normalize: bool) -> dict:
        """The arguments every chunk_state / fwd / dq-dk / dv launch takes, forward and backward alike."""
        B, T, H, DK = q.shape
        NS = cdiv(T, seg_len)
        return dict(T=T, H=H, L=seg_len, NS=NS, scale=scale, DK=DK, DV=v.shape[-1], FEATURE=feature,
                    NORMALIZE=normalize, DOT_MODE=_dot_mode(q.dtype), FULL_CHUNKS=full_chunks(T, seg_len),
                    TUNE_BUCKET=kernels.tune_bucket(NS * B * H, seg_len))

    def _forward_launches(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        feature: int, normalize: bool, causal: bool, eps: float, seg_len: int, scale: float, lag: int,
        write_features: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k [B,T,H,DK], v [B,T,H,DV]; the features are phi(scale * q), phi(scale * k); query t sees the
        keys s <= t - lag (causal; lag 0: s <= t). Returns o
        [B,T,H,DV], rden = 1/(den+eps) [B,H,T] fp32 (zeros when not normalizing), the exclusive
        per-segment prefix states [B*H, NS+1, DK*DV+DK] fp32 (entry NS = total), kept for backward, and
        the keys' features b = phi(s k) as the dots take them (`write_features`, see `features_written`:
        shaped like k; empty otherwise). Every element of o, rden, states and b is written: states
        0..NS-1 and b by chunk_state_kernel (all DK/BK row tiles of every segment), entry NS by the scan,
        rden by fwd_kernel when normalizing."""
        B, T, H, _ = q.shape
        o = torch.empty_like(v)
        alloc = torch.empty if normalize else torch.zeros
        rden = alloc((B, H, T), dtype=torch.float32, device=q.device)
        common = _shared_args(q, v, seg_len, scale, feature, normalize)
        lagged = dict(LAG=lag, HAS_LAG=lag > 0)  # for the launches that read keys
        fk = torch.empty_like(k) if write_features else k.new_empty(0)
        states = prefix_states(k, v, common, lagged, fk if write_features else None)
        # with the keys' features written, fwd_kernel reads them instead of computing them again; its ZDOT
        # keeps 64-row chunks (kernels._pruner), which at DK = 256 leave only its slowest config
        launcher(kernels.fwd_kernel)[_grid(v.shape[-1], common["NS"] * B * H, "BV")](
            q, fk if write_features else k, v, o, rden, states, eps=eps, CAUSAL=causal,
            ZDOT=kernels.zdot("fwd") and q.shape[-1] <= 128, PHI_K=kernels.FEATURE_GIVEN if write_features else feature,
            **lagged, **common)
        return o, rden, states, fk

    def map_costs(feature: int, dtype: torch.dtype) -> bool:
        """Whether the kernel that first computes this map's features should write them (as the dots take
        them, in the inputs' dtype) for the later kernels to read in place of q or k: elu and relu cost ~5
        instructions an element, in every kernel, and the kernels are issue-bound. Static sm_90 SASS per
        chunk (elu+1, bf16, D = 128, default configs), each map computed once: fwd 1691 -> 1358, dq 878
        -> 781, dk 990 -> 899, dv 1251 -> 476, the backward chunk_state 1389 -> 1520, the forward's 646
        -> 704; one more tensor write each way. Not for fp16 inputs: fp16's range would flush elu's small
        features (exp(s x) < 6e-8) to zero, where the kernels keep them in fp32."""
        return WRITE_FEATURES and dtype != torch.float16 and feature in (kernels.FEATURE_CODES["elu"], kernels.FEATURE_CODES["relu"])

    def features_written(feature: int, dtype: torch.dtype, causal: bool, lag: int, needs_grad: bool) -> bool:
        """Whether the forward's chunk_state_kernel writes b = phi(s k) (`map_costs`) for fwd_kernel
        (causal) and the backward (needs_grad) to read in place of k; not with a key lag (the hybrid's
        far part: its backward writes b itself)."""
        return (causal or needs_grad) and lag == 0 and map_costs(feature, dtype)

    def prefix_states(k: torch.Tensor, v: torch.Tensor, common: dict, lagged: dict,
                      features: torch.Tensor | None = None) -> torch.Tensor:
        """The exclusive per-segment prefix states [B*H, NS+1, DK*DV+DK] fp32 (entry NS = the total) of the
        (lagged) keys and values: chunk_state_kernel writes every segment's local sums, the scan turns
        them into prefixes. common: `_shared_args`; lagged: the LAG / HAS_LAG launch arguments. features
        (no lag): a tensor like k that receives phi(s k) as the dots take it."""
        B, _, H, DK = k.shape
        NS, M = common["NS"], DK * v.shape[-1] + DK
        states = torch.empty((B * H, NS + 1, M), dtype=torch.float32, device=k.device)
        launcher(kernels.chunk_state_kernel)[_grid(DK, NS * B * H, "BK")](
            k, v, v, states, states, states, v, states, states, k if features is None else features, BWD=False,
            HAS_DRDEN=False, HAS_DELTA=False, ZDOT=kernels.zdot("chunk_state"), WRITE_F=features is not None,
            **lagged, **common)
        launcher(kernels.scan_kernel)[(cdiv(M, kernels.SCAN_BLOCK) * B * H,)](
            states, NS, M, REVERSE=False, BLOCK=kernels.SCAN_BLOCK)
        return states

    def _backward_launches(
        do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
        rden: torch.Tensor, states: torch.Tensor,
        feature: int, normalize: bool, causal: bool, seg_len: int, scale: float, lag: int,
        drden: torch.Tensor | None = None, given: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dq, dk, dv from the forward's saved o, rden and prefix states (`backward_kernels`); given: k is
        the forward's keys' features."""
        return backward_kernels(do, q, k, v, o, rden, states, feature, normalize, causal, seg_len, scale, lag, drden,
                                given=given)

    def backward_kernels(
        do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
        rden: torch.Tensor, states: torch.Tensor,
        feature: int, normalize: bool, causal: bool, seg_len: int, scale: float, lag: int,
        drden: torch.Tensor | None = None, block: int = 0, delta: torch.Tensor | None = None, given: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dq, dk, dv from the forward's saved o, rden and prefix states. r (the normalizer's gradient) is
        written by chunk_state_kernel and read only when normalizing; zeros otherwise. drden: the gradient
        of the rden output, when something used it (None otherwise). With a lag, the kernels store dk and
        dv for the key rows some query sees (s <= T - 1 - lag); the last `lag` rows are zeroed here.
        For hybrid_op (not arguments of the registered op): block > 0 (causal, lag 0): query t saw only the
        keys of the blocks of `block` rows before its own (the kernels' chunks set to the blocks, without
        their within-chunk terms); delta ([B, H, T] fp32, normalizing): filled with do . o per row, which
        chunk_state_kernel computes anyway. given (no lag): k holds the forward's features b.
        With elu or relu the first kernel to compute each map's features writes them and the later ones
        read them as they are (`map_costs`): chunk_state writes a = phi(s q); unless given, the dk launch
        (first) writes b. dq and dk still take phi' (read off a and b) and the scale."""
        B, T, H, DK = q.shape
        DV = v.shape[-1]
        NS = cdiv(T, seg_len)
        M = DK * DV + DK
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        r = (torch.empty if normalize else torch.zeros)((B, H, T), dtype=torch.float32, device=q.device)
        dstates = torch.empty_like(states)
        common = _shared_args(q, v, seg_len, scale, feature, normalize)
        write = map_costs(feature, q.dtype)
        phi = kernels.FEATURE_GIVEN if write else feature  # the map applied once features are written
        fq = torch.empty_like(q) if write else q  # a, written by chunk_state
        fk = torch.empty_like(k) if write and not given else k  # b, written by the first dq/dk launch
        dot_mode = common["DOT_MODE"]
        lagged = dict(LAG=lag, HAS_LAG=lag > 0)  # for the launches that read keys (not chunk_state's: q, do)
        # normalizing: g = do * rden in the dots' dtype, written once by chunk_state for the later kernels
        g = torch.empty(do.shape, dtype=do.dtype if dot_mode == 0 else torch.float32, device=do.device) if normalize else do
        launcher(kernels.chunk_state_kernel)[_grid(DK, NS * B * H, "BK")](
            q, do, o, rden, r, rden if drden is None else drden, g, r if delta is None else delta, dstates, fq, LAG=0,
            HAS_LAG=False, BWD=True, HAS_DRDEN=normalize and drden is not None, HAS_DELTA=delta is not None,
            ZDOT=kernels.zdot("chunk_state"), WRITE_F=write, **common)
        launcher(kernels.scan_kernel)[(cdiv(M, kernels.SCAN_BLOCK) * B * H,)](
            dstates, NS, M, REVERSE=True, BLOCK=kernels.SCAN_BLOCK)
        dqdk_kernel, dv_kernel = kernels.bwd_dqdk_kernel, kernels.bwd_dv_kernel
        if block:
            dqdk_kernel, dv_kernel = kernels.with_chunk(dqdk_kernel, block), kernels.with_chunk(dv_kernel, block)
        for i, part in enumerate((2, 1) if kernels.SPLIT_DQDK else (0,)):  # dk first: it may write b for dq
            first_writes = write and not given and i == 0
            launcher(dqdk_kernel)[_grid(DK, NS * B * H, "BK")](
                fq, k if first_writes else fk, v, g, r, states, dstates, dq, dk, fk, CAUSAL=causal, PART=part,
                ZDOT=kernels.zdot("dqdk"), INTRA=not block, PHI_Q=phi, PHI_K=feature if first_writes else phi,
                WRITE_F=first_writes, **lagged, **common)
        launcher(dv_kernel)[_grid(DV, NS * B * H, "BV")](
            fq, fk, g, dstates, dv, CAUSAL=causal, INTRA=not block, **lagged, **{**common, "FEATURE": phi})
        if lag:  # (every row when lag >= T: no query sees a key)
            dk[:, max(T - lag, 0):].zero_()
            dv[:, max(T - lag, 0):].zero_()
        return dq, dk, dv

    def _setup_context(ctx, inputs, output):
        q, k, v, feature, normalize, causal, eps, seg_len, scale, lag, write_features = inputs
        o, rden, states, fk = output
        # with the keys' features written the backward reads them in place of k (which it then never needs)
        ctx.save_for_backward(q, fk if write_features else k, v, o, rden, states)
        ctx.config = (feature, normalize, causal, seg_len, scale, lag)
        ctx.given = write_features
        # rden = 1 / (den + eps) is differentiable: hybrid attention reads the denominator off it.
        ctx.mark_non_differentiable(states, fk)
        # Without this, autograd allocates and zero-fills gradients for rden and states (states is
        # [B*H, NS+1, DK*DV+DK] fp32) on every backward, only for _backward to ignore them.
        ctx.set_materialize_grads(False)

    def _gradients(backward_launches):
        def backward(ctx, do, drden, _dstates, _dfk):
            q, k, v, o, rden, states = ctx.saved_tensors
            do = torch.zeros_like(o) if do is None else do.contiguous()
            drden = None if drden is None else drden.contiguous()
            dq, dk, dv = backward_launches(do, q, k, v, o, rden, states, *ctx.config, drden, ctx.given)
            return dq, dk, dv, None, None, None, None, None, None, None, None

        return backward

    # The ops torch.compile traces (and opcheck checks) ...
    linear_attention_fwd = triton_op("mmm::linear_attention_fwd", mutates_args=())(_forward_launches)
    linear_attention_bwd = triton_op("mmm::linear_attention_bwd", mutates_args=())(_backward_launches)
    linear_attention_fwd.register_autograd(_gradients(linear_attention_bwd), setup_context=_setup_context)

    # ... and the same launches for plain eager calls: 460 -> 366 us of host time per forward+backward
    # on the CI CPU with the launches stubbed out (scripts/la_host_overhead.py)
    _EagerLinearAttention = eager_twin(
        "_EagerLinearAttention", _forward_launches, _setup_context, _gradients(_backward_launches))


def _check_inputs(q, k, v, feature_map, normalize, causal, eps) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t)
    if q.dim() != 4:
        raise ValueError(f"q must have 4 dimensions [batch, seq_len, heads, head_dim], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the same shape as q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must have shape [batch, seq_len, heads, v_dim] with batch, seq_len, heads as q's "
            f"{tuple(q.shape[:3])} (v_dim may differ from q's head_dim), got {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the same dtype as q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; put q, k and v on one device")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be 'elu', 'relu' or None (identity), got {feature_map!r}")
    if not isinstance(normalize, bool) or not isinstance(causal, bool):
        raise TypeError(f"normalize and causal must be bools, got {normalize!r} and {causal!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _uses_kernel(q: torch.Tensor) -> bool:
    return (
        HAVE_TRITON
        and q.dtype != torch.float64
        and q.shape[1] > 0
        and (q.is_cuda or (kernels.INTERPRET and q.device.type == "cpu"))
    )


def _kernel_forward(q, k, v, feature_map="elu", normalize=True, causal=True, eps=1e-6, seg_len=None, with_rden=False,
                    scale=1.0, lag=0):
    """The Triton path without dispatch; seg_len (a multiple of kernels.SEGMENT_MULTIPLE) picks the
    segment length, which tests and the benchmark vary. with_rden: return (o, rden) with rden = 1 / (den
    + eps) [B, H, T] fp32, differentiable (normalized only). lag: see `linear_attention`."""
    for width, role, where in ((q.shape[-1], "key", "q and k"), (v.shape[-1], "value", "v")):
        if width not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"{role} head_dim (last dimension of {where}) must be one of {SUPPORTED_HEAD_DIMS} for the Triton "
                f"kernel (the key and value widths are chosen independently), got {width}; pad it or use "
                f"linear_attention_naive")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, T, H, _ = q.shape
    if seg_len is None:
        seg_len = segment_len(T, B * H)
    elif seg_len <= 0 or seg_len % kernels.SEGMENT_MULTIPLE:
        raise ValueError(f"seg_len must be a positive multiple of {kernels.SEGMENT_MULTIPLE}, got {seg_len}")
    feature, lag = kernels.FEATURE_CODES[feature_map], min(int(lag), T)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    args = (q, k, v, feature, normalize, causal, float(eps), seg_len, float(scale), lag,
            features_written(feature, q.dtype, causal, lag, needs_grad))
    o, rden, *_ = (_EagerLinearAttention.apply if plain_eager(q, k, v) else linear_attention_fwd)(*args)
    return (o, rden) if with_rden else o


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str | None = "elu",
    normalize: bool = True,
    causal: bool = True,
    eps: float = 1e-6,
    with_rden: bool = False,
    scale: float = 1.0,
    lag: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Linear attention o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps) with S_t = sum_{s<=t} phi(k_s)^T v_s,
    z_t = sum_{s<=t} phi(k_s) (sums over the whole sequence when causal=False; no division when
    normalize=False). q, k: [batch, seq_len, heads, head_dim], v: [batch, seq_len, heads, v_dim] (o is
    shaped like v), one float dtype, one device. phi: 'elu' (elu(x)+1), 'relu' or None (identity), applied
    to scale * q and scale * k (scale: a finite float, 1 by default; the kernel applies it in fp32 as it
    reads q and k, saving the passes of a separate q * scale). Output in the input dtype; state and
    accumulation in fp32. The Triton kernel takes head_dim and v_dim each in SUPPORTED_HEAD_DIMS
    (independently).
    with_rden=True (normalized, Triton kernel only) returns (o, rden) with rden = 1 / (den + eps)
    [batch, heads, seq_len] fp32, differentiable: the denominator without a second pass over the sequence.
    lag (causal only): query t sees only the keys s <= t - lag, as if k and v were shifted down by `lag`
    rows (hybrid attention's far keys); rows t < lag see none (o = 0, rden = 1 / eps). Gradients come back
    full-size: no slice or pad of q, k, v or of their gradients.
    """
    _check_inputs(q, k, v, feature_map, normalize, causal, eps)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if with_rden and not (normalize and _uses_kernel(q)):
        raise ValueError("with_rden=True needs normalize=True and the Triton kernel (CUDA, or CPU under "
                         "TRITON_INTERPRET=1, a float dtype other than float64, seq_len > 0)")
    if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
        raise ValueError(f"lag must be an int >= 0, got {lag!r}")
    if lag and not causal:
        raise ValueError("lag needs causal=True (it drops the last `lag` keys each query would see causally)")
    if not _uses_kernel(q):
        if scale != 1:
            q, k = q * scale, k * scale
        return linear_attention_naive(q, k, v, feature_map, normalize, causal, eps, lag=lag)
    return _kernel_forward(q, k, v, feature_map, normalize, causal, eps, with_rden=with_rden, scale=scale, lag=lag)
