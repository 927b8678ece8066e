"""`attention` (one entry point for every path) and `attention_error` (what an approximation costs).

Layout everywhere: q [batch, seq, heads, head_dim], k [batch, seq, kv_heads, head_dim],
v [batch, seq, kv_heads, v_dim]; output [batch, seq, heads, v_dim]. kv_heads must divide heads
(grouped-query attention: query head h reads kv head h // (heads // kv_heads)). q and k have the same
sequence length (self-attention; for decoding token by token see `mmm.attention.decode`).
"""

from __future__ import annotations

import functools
import math

import torch

from .._checks import check_finite_activations, check_float_tensor
from ._layout import compute_dtype, group_kv, group_q, ungroup
from .exact import exact_attention, exact_backend
from .feature_maps import FEATURE_MAPS, FeatureMap, HedgehogFeatureMap, make_feature_map
from .hybrid import hybrid_attention, hybrid_path
from .linear import DEFAULT_CHUNK, linear_attention, triton_applies
from .window import WINDOW_SHAPES, window_attention, window_path

METHODS = ("exact", "window", "linear", "hybrid", "auto")
APPROXIMATIONS = ("window", "linear", "hybrid")
# method="auto" runs exact attention below this sequence length and the approximation at or above it.
# Measured for eager calls (bf16, 16 heads x 128, causal, fwd+bwd, `mmm bench --cases attn.crossover`):
# linear elu+1 is faster than cuDNN SDPA from ~4.5k tokens on an H100 (results/h100/2026-12-07-s16-
# crossover.md) and ~5.5k on an H200 (results/h200/2026-12-07-s17-crossover.md; 0.99 vs 0.58 ms at 4096,
# 0.89 vs 1.86 at 8192). Below that the host's time to issue linear's launches (~0.9 ms per f+b there)
# decides; replayed from CUDA graphs the crossover is ~1.6-2.1k. Other GPUs, hosts and shapes move it:
# pass `crossover=` or measure.
AUTO_CROSSOVER = 6144
DEFAULT_WINDOW = 512
DEFAULT_EPS = 1e-6
ERROR_ROW_BLOCK = 2**25  # elements of exact-attention scores alive at once in attention_error


def check_qkv(q: object, k: object, v: object) -> None:
    """Raise a clear error unless q, k, v fit the layout of this module's docstring."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (b, t, h, d), (bk, tk, hk, dk), (bv, tv, hv, dv) = q.shape, k.shape, v.shape
    if not (b == bk == bv):
        raise ValueError(f"q, k, v must have the same batch size (dim 0), got {b}, {bk}, {bv}")
    if not (t == tk == tv):
        raise ValueError(f"q, k, v must have the same sequence length (dim 1), got {t}, {tk}, {tv}")
    if t < 1 or b < 1:
        raise ValueError(f"batch and sequence length must be at least 1, got q of shape {tuple(q.shape)}")
    if hk != hv:
        raise ValueError(f"k and v must have the same number of heads (dim 2), got {hk} and {hv}")
    if hk < 1 or h % hk != 0:
        raise ValueError(
            f"k/v heads ({hk}) must divide q heads ({h}) (grouped-query attention), got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if d != dk or d < 1 or dv < 1:
        raise ValueError(f"q and k must have the same head_dim (dim 3) >= 1, got {d} and {dk} (v: {dv})")
    check_finite_activations(q=q, k=k, v=v)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_window_shape(window_shape: object, method: str) -> None:
    """'sliding' for any method (only the windowed ones read it); 'block' (hybrid.py's block-local near
    keys) for the hybrid alone ('auto': its long_method)."""
    if window_shape not in WINDOW_SHAPES:
        raise ValueError(f"window_shape must be one of {list(WINDOW_SHAPES)}, got {window_shape!r}")
    if window_shape == "block" and method != "hybrid":
        raise ValueError(f"window_shape='block' is for method='hybrid' only, got method={method!r}")


def check_method(method: object, long_method: object = "hybrid") -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    if method == "auto" and long_method not in APPROXIMATIONS:
        raise ValueError(f"long_method must be one of {list(APPROXIMATIONS)} (what 'auto' runs at long lengths), got {long_method!r}")


@functools.lru_cache(maxsize=32)
def _fixed_map(name: str, head_dim: int, device: torch.device) -> FeatureMap:
    """Maps without learned parameters, built once (FAVOR+ draws its features from seed 0)."""
    return make_feature_map(name, head_dim).to(device)


def resolve_feature_map(feature_map: str | FeatureMap, head_dim: int, device: torch.device) -> FeatureMap:
    """A FeatureMap module for a name or a module. The name 'hedgehog' gives an untrained map (shared
    across heads); pass a trained `HedgehogFeatureMap` (see `train_hedgehog`) to use a learned one."""
    if isinstance(feature_map, FeatureMap):
        for t in list(feature_map.parameters()) + list(feature_map.buffers()):
            if t.device != device:
                raise ValueError(f"feature_map is on {t.device} but q is on {device}; move it with .to({str(device)!r})")
        return make_feature_map(feature_map, head_dim)
    if feature_map == "hedgehog":
        return HedgehogFeatureMap(head_dim).to(device)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {sorted(FEATURE_MAPS)} or a FeatureMap module")
    return _fixed_map(feature_map, head_dim, device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str = "exact",
    *,
    causal: bool = True,
    window: int = DEFAULT_WINDOW,
    window_shape: str = "sliding",
    feature_map: str | FeatureMap = "elu",
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
    chunk_size: int = DEFAULT_CHUNK,
    long_method: str = "hybrid",
    crossover: int | None = None,
) -> torch.Tensor:
    """Attention of q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv] -> [B, T, H, Dv].

    method:
      'exact'  softmax attention (PyTorch SDPA; `exact_backend` says which kernel).
      'window' softmax over the last `window` keys incl. the query's own (causal) or |i - j| < window:
               exact softmax on a banded mask, an approximation of full attention. O(T window).
      'linear' kernel attention with `feature_map` (elu, relu, favor, taylor, hedgehog or a FeatureMap
               module), `normalize`d or not: a different operator, an approximation of softmax
               attention, never lossless. O(T F Dv).
      'hybrid' softmax for the nearest `window` keys, the feature-map kernel for the rest, one shared
               normaliser: an approximation of softmax attention, never lossless. window_shape='block'
               makes the near keys the query's own block of `window` positions (i // window ==
               j // window) instead of the last `window` keys: cheaper, less accurate (hybrid.py).
      'auto'   'exact' when T < crossover (default AUTO_CROSSOVER), else `long_method`.
    Measure any approximation on your own inputs with `attention_error`. The formulas are in the
    docstrings of mmm.attention.window / linear / hybrid.
    eps: added to the linear / hybrid normaliser. chunk_size: chunk of the causal linear path.
    """
    check_qkv(q, k, v)
    check_method(method, long_method)
    check_window_shape(window_shape, long_method if method == "auto" else method)
    if not isinstance(causal, bool) or not isinstance(normalize, bool):
        raise TypeError(f"causal and normalize must be bool, got {causal!r} and {normalize!r}")
    if method == "auto":
        crossover = AUTO_CROSSOVER if crossover is None else crossover
        _check_positive_int("crossover", crossover)
        method = "exact" if q.shape[1] < crossover else long_method
    if method == "exact":
        return exact_attention(q, k, v, causal)
    _check_positive_int("window", window)
    _check_positive_int("chunk_size", chunk_size)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if method == "hybrid" and not normalize:
        raise ValueError("method='hybrid' is always normalised (one shared normaliser); pass normalize=True")
    fmap = None if method == "window" else resolve_feature_map(feature_map, q.shape[-1], q.device)
    with full_precision(q):
        if method == "window":
            return window_attention(q, k, v, window, causal)
        if method == "linear":
            return linear_attention(q, k, v, fmap, causal, normalize, float(eps), chunk_size)
        return hybrid_attention(q, k, v, fmap, window, causal, float(eps), chunk_size, window_shape)


def attention_path(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str = "exact",
    *,
    causal: bool = True,
    feature_map: str | FeatureMap = "elu",
    long_method: str = "hybrid",
    crossover: int | None = None,
    normalize: bool = True,
    window: int = DEFAULT_WINDOW,
    window_shape: str = "sliding",
) -> str:
    """Which implementation `attention(q, k, v, method, ...)` runs on these inputs, for reports:
    'sdpa:<backend>' for exact; 'flex' or 'blockwise' for window; 'triton' or 'pytorch' for linear;
    'fused', 'flex+triton', 'flex+chunked' or 'blockwise' for hybrid (see window.py / hybrid.py)."""
    check_qkv(q, k, v)
    check_method(method, long_method)
    check_window_shape(window_shape, long_method if method == "auto" else method)
    if method == "auto":
        method = "exact" if q.shape[1] < (AUTO_CROSSOVER if crossover is None else crossover) else long_method
    if method == "exact":
        return f"sdpa:{exact_backend(q, k, v, causal)}"
    if method == "window":
        return window_path(q, v)
    fmap = resolve_feature_map(feature_map, q.shape[-1], q.device)
    if method == "linear":
        return "triton" if triton_applies(q, v, fmap, query_scale=True, normalize=normalize) else "pytorch"
    return hybrid_path(q, v, fmap, window, causal, window_shape)


def full_precision(t: torch.Tensor):
    """Autocast off: the approximate paths cast to fp32 themselves and must keep their sums, states
    and normalisers in fp32 under mixed-precision training too."""
    return torch.autocast(t.device.type, enabled=False)


def sample_query_rows(seq_len: int, sample_rows: int | None, seed: int, device) -> torch.Tensor:
    """Sorted distinct query rows, one drawn uniformly from each of `sample_rows` equal strata of
    positions (all rows if sample_rows is None or >= seq_len). Stratified because causal attention's
    early rows weigh most in the norm: spreading the sample over positions halves the spread of the
    estimate compared with rows drawn uniformly at random."""
    if sample_rows is None or sample_rows >= seq_len:
        return torch.arange(seq_len, device=device)
    _check_positive_int("sample_rows", sample_rows)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(sample_rows, generator=gen, dtype=torch.float64)
    rows = ((torch.arange(sample_rows, dtype=torch.float64) + u) * (seq_len / sample_rows)).long()
    return rows.clamp_max(seq_len - 1).to(device)


def exact_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, causal: bool) -> torch.Tensor:
    """Exact softmax attention for the query rows `rows` only, [B, R, H, Dv], in fp32 (fp64 for fp64
    inputs): O(R T d) time, scores built for a block of rows at a time."""
    dt = compute_dtype(q)
    hk, t = k.shape[2], k.shape[1]
    kg, vg = group_kv(k.to(dt)), group_kv(v.to(dt))
    step = max(1, ERROR_ROW_BLOCK // (q.shape[0] * q.shape[2] * t))
    outs = []
    for start in range(0, rows.numel(), step):
        r = rows[start : start + step]
        qg = group_q(q[:, r].to(dt), hk)  # [B, Hk, g, R, D]
        logits = (qg @ kg.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if causal:
            logits = logits.masked_fill(torch.arange(t, device=q.device) > r[:, None], -torch.inf)
        outs.append(ungroup(torch.softmax(logits, dim=-1) @ vg))
    return torch.cat(outs, dim=1)


@torch.no_grad()
def attention_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str = "exact",
    *,
    sample_rows: int | None = 1024,
    seed: int = 0,
    **kwargs,
) -> float:
    """Relative error ||O - O_exact|| / ||O_exact|| (Frobenius, over batch, heads and the sampled query
    rows) of `attention(q, k, v, method, **kwargs)` against exact softmax attention.

    O is computed by the method in the inputs' dtype, as it would run; O_exact only for `sample_rows`
    query rows spread over the positions (`sample_query_rows`, from `seed`), in fp32 (fp64 for fp64 inputs), so it
    stays cheap at long T (O(sample_rows T d)). sample_rows=None uses every row. Near 0 for 'exact'
    (rounding only); > 0 for every approximation.
    """
    out = attention(q, k, v, method, **kwargs)
    rows = sample_query_rows(q.shape[1], sample_rows, seed, q.device)
    with full_precision(q):
        ref = exact_rows(q, k, v, rows, kwargs.get("causal", True))
    diff = (out[:, rows].to(ref.dtype) - ref).norm()
    norm = ref.norm()
    if float(norm) == 0.0:
        return 0.0 if float(diff) == 0.0 else math.inf
    return float(diff / norm)
