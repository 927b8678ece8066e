"""Linear attention: softmax's exp(q.k/sqrt(d)) replaced by a kernel phi(q).phi(k).

This is a different operator from softmax attention, an approximation of it at best; it is never
lossless. Measure what it costs on your inputs with `mmm.attention_error`.

With phi from `feature_maps` (F features), for query i and its visible keys J(i) (j <= i when causal,
all j otherwise):

    normalised:    o_i = sum_{j in J(i)} (phi(q_i).phi(k_j)) v_j / (sum_{j in J(i)} phi(q_i).phi(k_j) + eps)
    unnormalised:  o_i = sum_{j in J(i)} (phi(q_i).phi(k_j)) v_j

computed as phi(q_i) S / (phi(q_i).z + eps) with S = sum_j phi(k_j)^T v_j [F, Dv], z = sum_j phi(k_j) [F],
features, states and the normaliser in fp32 (fp64 for fp64 inputs), output cast to the input dtype.
Causal: chunked, O(T (C + F) Dv + T C F) for chunk size C: within a chunk the masked quadratic form, across
chunks the running state.
"""

from __future__ import annotations

import torch

from ._compiled import compiled_on_cuda
from ._layout import chunk, chunk_groups, compute_dtype, group_kv, group_q, ungroup, unchunk
from .feature_maps import EluFeatureMap, FeatureMap, ReluFeatureMap

DEFAULT_CHUNK = 64
# Switch for the Triton kernel in mmm.ops.linear_attention (used only where `triton_applies` says).
USE_TRITON_KERNEL = True
# The kernel also runs on CPU tensors under TRITON_INTERPRET=1 (slowly): tests set this to route them there.
KERNEL_ON_CPU_INTERPRETER = False
_NATIVE_MAPS = (EluFeatureMap, ReluFeatureMap)  # maps the kernel applies itself, elementwise
# Key widths over this (head dim 256 with elu / relu, Hedgehog's 2 x 128 features) go through the kernel as
# slices of this width, one call each, combined through their normalisers (`_finish`). At 128k tokens
# the kernel took 37 ms forward+backward at key width 256 (its 256-wide tiles spill registers) against
# 10 ms at 128 (H200, results/h200/2026-12-04-la-tune.md). Normalised only for maps whose features are
# non-negative (`FeatureMap.nonnegative`: no partial denominator cancels). None: one call, any width.
KEY_SPLIT: int | None = 128
# Maps with a query scale (FAVOR+), normalised, through the kernel. It failed on the H100 (rel. error 0.54
# vs PyTorch's 0.027, 2026-12-06): the rescaled denominators (~1e-9 to 1e-17) sat far below the kernel's
# eps = 1e-6, and putting the query scale back cancelled (1 - eps rden). Fixed with RESCALED_KERNEL_EPS
# (CPU test test_query_scale_put_back_survives_denominators_far_below_eps reproduces both); its bf16 GPU
# test passed on the H100 on 2026-12-07 (128k f+b 117 ms here vs 975 on the PyTorch path).
RESCALED_NORMALIZED_ON_KERNEL = True
# The kernel's eps for maps with a query scale (see _triton_linear): far below any denominator they give.
RESCALED_KERNEL_EPS = 1e-30
# Computed features (maps the kernel does not apply itself) run at a key width the kernel takes: the
# feature count padded with zero features (they add nothing to phi(q).phi(k)) up to the next supported
# head dim, or for non-negative maps to a multiple of KEY_SPLIT up to this many features (FAVOR+'s
# default 622 at head dim 128: five 128-wide calls).
MAX_SPLIT_FEATURES = 1024


def _triton_linear(q, k, v, fmap: FeatureMap, causal: bool, normalize: bool, eps: float, with_rden: bool = False,
                   lag: int = 0):
    """The one dispatch point to the Triton kernel `mmm.ops.linear_attention.linear_attention`; None means
    "use the PyTorch path" (see `triton_applies`). with_rden: (o, 1 / (den + eps) [B, T, H]) instead of o. lag
    (causal): query t sees the keys s <= t - lag (the kernel's `lag`).

    The kernel takes q, k [B, T, H, DK] and v [B, T, H, DV] (GQA heads are repeated here) with DK and DV
    each in its SUPPORTED_HEAD_DIMS and fp32 state, and computes this module's formulas. elu+1 and relu it
    applies itself, elementwise inside its loops, input scaling included. Any other map (Hedgehog,
    FAVOR+, ...) has its features computed here (`_kernel_features`: one compiled pass each over q and k
    on CUDA), zero-padded to `_kernel_key_width`, and the kernel runs with identity features on them:
    DK = that width, DV = v's own width. Key widths over KEY_SPLIT run as slices. A query log scale l
    (FAVOR+: phi(q) = phi_s(q) exp(l)) is put back afterwards (`_finish`); with_rden is then not offered
    (hybrid attention needs no such map here)."""
    if not triton_applies(q, v, fmap, query_scale=not with_rden, normalize=normalize):
        return None
    from mmm.ops.linear_attention import linear_attention as kernel

    groups = q.shape[2] // k.shape[2]
    log_scale, scale = None, 1.0
    native = isinstance(fmap, _NATIVE_MAPS)
    width = q.shape[-1] if native else _kernel_key_width(fmap)
    # the maps act elementwise (elu, relu) or are computed here: phi(q).phi(k) is a sum over the slices
    piece = KEY_SPLIT if KEY_SPLIT and width > KEY_SPLIT and width % KEY_SPLIT == 0 and (
        fmap.nonnegative or not normalize) else width
    if native:  # the maps' input scaling d^-1/4 the kernel applies as it reads q, k
        kq, kk, name, scale = _slices(q, piece), _slices(k, piece), fmap.name, q.shape[-1] ** -0.25
    else:
        kq, log_scale = _kernel_features(fmap, q, True, width, piece)
        kk = _kernel_features(fmap, k, False, width, piece)[0]
        name = None
    if groups > 1:
        kk, v = [x.repeat_interleave(groups, dim=2) for x in kk], v.repeat_interleave(groups, dim=2)

    # A query scale's eps (eps exp(-l)) goes in afterwards (`_finish`): the kernel runs with a negligible
    # one, since the rescaled denominators (~1e-9 to 1e-17 for FAVOR+ at head dim 128) are far below eps,
    # and a kernel eps of 1e-6 would leave only cancellation to recover them from.
    kernel_eps = RESCALED_KERNEL_EPS if log_scale is not None else eps

    def run(a, b, rden: bool):
        out = kernel(a, b, v, feature_map=name, normalize=normalize, causal=causal, eps=kernel_eps,
                     with_rden=rden, scale=scale, lag=lag)
        return (out[0], _rows_first(out[1])) if rden else out

    if len(kq) == 1 and log_scale is None:  # the kernel's output is the answer
        out = run(kq[0], kk[0], with_rden)
        return (out[0].to(q.dtype), out[1]) if with_rden else out.to(q.dtype)
    parts = [run(a, b, normalize) for a, b in zip(kq, kk)]
    o, rden = _finish(parts, normalize, log_scale, eps, kernel_eps, q.dtype, with_rden)
    return (o, rden) if with_rden else o


def _rows_first(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T] -> [B, T, H], stored in that order: the layout of the outputs the compiled elementwise
    passes combine x with. Given as a transposed view, x made Inductor's pass read in x's order and
    [B, T, H, D] tensors across their rows (the hybrid's combine took 9 ms at 128k on an H100, 2026-12-07);
    this copy is 4 bytes per row and head."""
    return x.transpose(1, 2).contiguous()


def _kernel_features(fmap: FeatureMap, x: torch.Tensor, is_query: bool, width: int, piece: int):
    """fmap's (features in x's dtype, zero-padded to `width`, as contiguous slices of `piece` features; log
    scale or None) of x, computed in compute_dtype(x). On CUDA in one compiled pass (per map class and role,
    whatever the instance) for maps written as `apply_features`; eagerly for maps that override `features`."""
    if type(fmap).features is FeatureMap.features:
        fmap.check_input(x, is_query)
        return _padded_features(type(fmap).apply_features, x, is_query, width, piece, *fmap.feature_params(is_query))
    return _pad_features(fmap.features, x, is_query, width, piece)


def _pad_features(apply, x, is_query: bool, width: int, piece: int, *params):
    """apply(x in compute_dtype(x), is_query, *params) = (features, log scale), the features zero-padded to
    `width`, cast to x's dtype and cut into width / piece slices along the features, each stored on its own
    (the kernel takes contiguous keys: slices of one tensor would each be copied, and their gradients
    gathered back, a pass over every feature each way; compiled, the pass writes the slices directly)."""
    phi, log_scale = apply(x.to(compute_dtype(x)), is_query, *params)
    phi = torch.nn.functional.pad(phi, (0, width - phi.shape[-1])).to(x.dtype)
    return tuple(p.contiguous() for p in _slices(phi, piece)), log_scale


def _slices(x: torch.Tensor, piece: int) -> tuple:
    """x cut into slices of `piece` along its last dim; (x,) when that is one slice, so that autograd gets
    no split node (its backward concatenates the gradients: a copy of x's gradient)."""
    return (x,) if x.shape[-1] == piece else x.split(piece, -1)


_padded_features = compiled_on_cuda(_pad_features)  # called with a map class's pure apply_features


@compiled_on_cuda
def _finish(parts: list, normalized: bool, log_scale, eps: float, kernel_eps: float, out_dtype: torch.dtype,
            want_rden: bool):
    """The kernel calls' outputs as one output in out_dtype, in one elementwise pass (compiled on CUDA).
    parts: one per slice of the features; normalized, (o [B, T, H, Dv], rden = 1 / (den_p + e_k) [B, T, H]
    fp32) with e_k = kernel_eps, else the numerators o. log_scale: l [B, T, H] (FAVOR+: phi(q) = phi_s(q)
    exp(l), the kernel ran on phi_s) or None.
    Normalized: num = sum o / rden, den = sum (1 / rden - e_k), output num / (den + E) with E = eps, or
    eps exp(-l) under a query scale (exp(l) cancels between num and den except against eps). No term
    cancels where den is far below eps (1 / rden >= e_k, and e_k is far below any den: RESCALED_KERNEL_EPS).
    Returns (output, 1 / (den + E) fp32 if want_rden else None).
    Unnormalized: (sum o in fp32, times exp(l) under a query scale, None)."""
    if not normalized:
        o = sum(p.float() for p in parts)
        if log_scale is not None:
            o = o * log_scale.exp().unsqueeze(-1)
        return o.to(out_dtype), None
    num = sum(o.float() / rden.unsqueeze(-1) for o, rden in parts)
    den = sum(1.0 / rden - kernel_eps for _, rden in parts)
    den = (den + (eps if log_scale is None else eps * torch.exp(-log_scale))).clamp_min(torch.finfo(torch.float32).tiny)
    return (num / den.unsqueeze(-1)).to(out_dtype), (1.0 / den if want_rden else None)


def _kernel_key_width(fmap: FeatureMap) -> int | None:
    """The key width the kernel runs `fmap`'s computed features at (see MAX_SPLIT_FEATURES), None if
    none: the smallest supported head dim >= its feature count, else for non-negative maps (whose slices
    combine through their normalisers) the next multiple of KEY_SPLIT."""
    from mmm.ops.linear_attention import SUPPORTED_HEAD_DIMS

    f = fmap.feature_dim
    width = next((d for d in SUPPORTED_HEAD_DIMS if d >= f), None)
    if width is None and KEY_SPLIT and fmap.nonnegative and f <= MAX_SPLIT_FEATURES:
        width = -(-f // KEY_SPLIT) * KEY_SPLIT
    return width


def triton_applies(q: torch.Tensor, v: torch.Tensor, fmap: FeatureMap, query_scale: bool = False,
                   normalize: bool = False) -> bool:
    """Whether `_triton_linear` sends inputs like these to the Triton kernel (see its docstring).
    query_scale: whether the caller takes maps with a query log scale (FAVOR+); not in fp16, where key
    features up to exp(60) (FeatureMap docstring) would overflow the fp16 copy the kernel reads, and
    not normalised unless RESCALED_NORMALIZED_ON_KERNEL."""
    if not USE_TRITON_KERNEL or q.dtype == torch.float64:
        return False
    try:
        from mmm.ops.linear_attention import SUPPORTED_HEAD_DIMS
        from mmm.ops.linear_attention.kernels import INTERPRET
    except ImportError:
        return False
    if not (q.is_cuda or (KERNEL_ON_CPU_INTERPRETER and INTERPRET and q.device.type == "cpu")):
        return False
    if v.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return False
    if isinstance(fmap, _NATIVE_MAPS):
        return q.shape[-1] in SUPPORTED_HEAD_DIMS
    if fmap.rescales_queries and not (query_scale and q.dtype != torch.float16
                                      and (RESCALED_NORMALIZED_ON_KERNEL or not normalize)):
        return False
    return _kernel_key_width(fmap) is not None


def exclusive_cumsum(x: torch.Tensor, start: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start + sum of the entries before each one along `dim`, start + sum of all)."""
    inclusive = x.cumsum(dim) + start.unsqueeze(dim)
    before = torch.cat([start.unsqueeze(dim), inclusive.narrow(dim, 0, x.shape[dim] - 1)], dim)
    return before, inclusive.select(dim, -1)


def causal_sums(fq, fk, v, chunk_size: int):
    """Causal numerator and denominator of grouped features fq [B, Hk, g, T, F], fk [B, Hk, 1, T, F] and
    v [B, Hk, 1, T, Dv]: num_i = sum_{j<=i} (fq_i.fk_j) v_j [.., T, Dv], den_i = sum_{j<=i} fq_i.fk_j [.., T]."""
    (b, hk, g, t, f), dv = fq.shape, v.shape[-1]
    size = min(chunk_size, t)
    qc, kc, vc = chunk(fq, size), chunk(fk, size), chunk(v, size)  # [..., N, C, X]; padding features are 0
    s, z = fk.new_zeros(b, hk, 1, f, dv), fk.new_zeros(b, hk, 1, f)  # sums over the chunks before
    tril = torch.ones(size, size, dtype=torch.bool, device=fq.device).tril()
    nums, dens = [], []
    for sl in chunk_groups(qc.shape[-3], max(b * hk * f * dv, b * hk * g * size * (size + f))):
        q_, k_, v_ = qc[..., sl, :, :], kc[..., sl, :, :], vc[..., sl, :, :]
        s_before, s = exclusive_cumsum(k_.transpose(-1, -2) @ v_, s, dim=-3)
        z_before, z = exclusive_cumsum(k_.sum(-2), z, dim=-2)
        a = (q_ @ k_.transpose(-1, -2)).masked_fill(~tril, 0.0)  # [B, Hk, g, G, C, C] within the chunk
        nums.append(q_ @ s_before + a @ v_)
        dens.append((q_ @ z_before.unsqueeze(-1)).squeeze(-1) + a.sum(-1))
    num = unchunk(torch.cat(nums, dim=-3), t)
    den = torch.cat(dens, dim=-2).flatten(-2)[..., :t]
    return num, den


def finish(num, den, log_scale, normalize: bool, eps: float) -> torch.Tensor:
    """o = num / (den + eps) or num, for features phi(q) = phi_s(q) exp(log_scale) given as phi_s: in
    the normalised form exp(log_scale) cancels except against eps, which is scaled to match."""
    if normalize:
        eps_s = eps if log_scale is None else eps * torch.exp(-log_scale)
        return num / (den + eps_s).clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)
    return num if log_scale is None else num * log_scale.exp().unsqueeze(-1)


def linear_features(q, k, v, fmap: FeatureMap):
    """Grouped fp32/fp64 features: fq [B, Hk, g, T, F], log_scale [B, Hk, g, T] or None,
    fk [B, Hk, 1, T, F], v [B, Hk, 1, T, Dv] (None for v=None)."""
    dt = compute_dtype(q)
    hk = k.shape[2]
    fq, log_scale = fmap.features(q.to(dt), True)
    fk, key_log_scale = fmap.features(k.to(dt), False)
    if key_log_scale is not None:
        raise ValueError(f"{type(fmap).__name__} returned a log scale for keys; key features must be returned unscaled")
    log_scale = None if log_scale is None else group_q(log_scale, hk)
    return group_q(fq, hk), log_scale, group_kv(fk), None if v is None else group_kv(v.to(dt))


def linear_attention(q, k, v, fmap: FeatureMap, causal: bool, normalize: bool, eps: float, chunk_size: int) -> torch.Tensor:
    """[B, T, H, D] in and out (inputs already checked by `mmm.attention`)."""
    out = _triton_linear(q, k, v, fmap, causal, normalize, eps)
    if out is not None:
        return out
    fq, log_scale, fk, vg = linear_features(q, k, v, fmap)
    if causal:
        num, den = causal_sums(fq, fk, vg, chunk_size)
    else:
        num = fq @ (fk.transpose(-1, -2) @ vg)
        den = (fq @ fk.sum(-2).unsqueeze(-1)).squeeze(-1)
    return ungroup(finish(num, den, log_scale, normalize, eps)).to(q.dtype)
