"""Token-by-token (recurrent) form of causal linear and hybrid attention, for generation.

The state after tokens 0..t-1 holds
    S [B, Hk, F, Dv] = sum_j phi(k_j)^T v_j and z [B, Hk, F] = sum_j phi(k_j)   (fp32; fp64 for fp64)
over every token so far (linear) or over tokens j <= t-1-window (hybrid), plus for hybrid a ring buffer
of the last `window` keys and values (token j in slot j % window). With window_shape='block' the far
sums hold the blocks before the current one, and the buffer the current block's tokens (j in slot
j % window again); a block's keys join the far sums when the next block starts. `step` gives exactly
the output of the parallel causal form of `mmm.attention` at position t (same formulas; see linear.py / hybrid.py),
so these are the same approximations of softmax attention; measure them with `mmm.attention_error`.

    state = init_state(batch, kv_heads, head_dim, method="hybrid", window=64)   # empty prompt, or
    out, state = prefill(q, k, v, method="hybrid", window=64)                  # from a prompt
    o_t, state = step(q_t, k_t, v_t, state)   # q_t [B, H, D], k_t / v_t [B, Hk, D] -> o_t [B, H, Dv]

`step` returns a new state and leaves the old one as it was (so a state can be branched, e.g. for beam
search).
"""

from __future__ import annotations

import dataclasses

import torch

from .._checks import check_finite_activations
from .api import (DEFAULT_EPS, DEFAULT_WINDOW, _check_positive_int, attention, check_qkv, check_window_shape,
                  full_precision, resolve_feature_map)
from .feature_maps import FeatureMap
from .hybrid import combine, far_log_scale
from .linear import finish

DECODE_METHODS = ("linear", "hybrid")


@dataclasses.dataclass(frozen=True)
class DecodeState:
    method: str
    feature_map: FeatureMap
    normalize: bool
    eps: float
    window: int
    window_shape: str
    s: torch.Tensor  # [B, Hk, F, Dv]
    z: torch.Tensor  # [B, Hk, F]
    k_buf: torch.Tensor | None  # [B, Hk, window, D] (hybrid)
    v_buf: torch.Tensor | None  # [B, Hk, window, Dv] (hybrid)
    pos: int  # tokens seen


def _check_options(method: object, window: object, normalize: object, window_shape: object = "sliding") -> None:
    if method not in DECODE_METHODS:
        raise ValueError(f"decoding supports method in {list(DECODE_METHODS)}, got {method!r}")
    _check_positive_int("window", window)
    check_window_shape(window_shape, method)
    if method == "hybrid" and normalize is not True:
        raise ValueError("method='hybrid' is always normalised (one shared normaliser); pass normalize=True")


def init_state(
    batch: int,
    kv_heads: int,
    head_dim: int,
    v_dim: int | None = None,
    *,
    method: str = "linear",
    feature_map: str | FeatureMap = "elu",
    window: int = DEFAULT_WINDOW,
    window_shape: str = "sliding",
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> DecodeState:
    """The state before any token. `dtype` is the state's (fp32, or fp64 for fp64 inputs)."""
    _check_options(method, window, normalize, window_shape)
    for name, val in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        _check_positive_int(name, val)
    v_dim = head_dim if v_dim is None else v_dim
    _check_positive_int("v_dim", v_dim)
    fmap = resolve_feature_map(feature_map, head_dim, torch.device(device or "cpu"))
    f = fmap.feature_dim
    hybrid = method == "hybrid"
    zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
    return DecodeState(
        method, fmap, normalize, float(eps), window, window_shape,
        zeros(batch, kv_heads, f, v_dim), zeros(batch, kv_heads, f),
        zeros(batch, kv_heads, window, head_dim) if hybrid else None,
        zeros(batch, kv_heads, window, v_dim) if hybrid else None,
        0,
    )


def prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    method: str = "linear",
    feature_map: str | FeatureMap = "elu",
    window: int = DEFAULT_WINDOW,
    window_shape: str = "sliding",
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, DecodeState]:
    """Causal attention over a prompt ([B, T, H, D] layout, as `mmm.attention`) and the state after it."""
    check_qkv(q, k, v)
    _check_options(method, window, normalize, window_shape)
    b, t, hk, d = k.shape
    state = init_state(b, hk, d, v.shape[-1], method=method, feature_map=feature_map, window=window,
                       window_shape=window_shape, normalize=normalize, eps=eps, device=q.device,
                       dtype=_state_dtype(q))
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    if method == "hybrid":
        extra["window_shape"] = window_shape
    out = attention(q, k, v, method, causal=True, window=window, feature_map=state.feature_map,
                    normalize=normalize, eps=eps, **extra)
    with full_precision(q):
        return out, _prefill_state(state, k, v)


def _prefill_state(state: DecodeState, k: torch.Tensor, v: torch.Tensor) -> DecodeState:
    """The state after the keys and values of a prompt."""
    dt, method, t, window = state.s.dtype, state.method, k.shape[1], state.window
    if method == "linear":
        n_far = t  # tokens already in S
    else:
        # block: the blocks before the last token's (its block stays in the buffer until the next starts)
        n_far = max(0, t - 1) // window * window if state.window_shape == "block" else max(0, t - window)
    fk, _ = state.feature_map.features(k[:, :n_far].to(dt), False)  # [B, n_far, Hk, F]
    s = torch.einsum("bthf,bthe->bhfe", fk, v[:, :n_far].to(dt))
    z = fk.sum(1)
    k_buf, v_buf = state.k_buf, state.v_buf
    if method == "hybrid":
        slots = torch.arange(n_far, t, device=k.device) % window
        k_buf, v_buf = k_buf.clone(), v_buf.clone()
        k_buf[:, :, slots] = k[:, n_far:].to(dt).transpose(1, 2)
        v_buf[:, :, slots] = v[:, n_far:].to(dt).transpose(1, 2)
    return dataclasses.replace(state, s=s, z=z, k_buf=k_buf, v_buf=v_buf, pos=t)


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
    """One token: q_t [B, H, D], k_t [B, Hk, D], v_t [B, Hk, Dv] -> (o_t [B, H, Dv], new state)."""
    with full_precision(state.s):
        return _step(q_t, k_t, v_t, state)


def _step(q_t, k_t, v_t, state: DecodeState):
    b, hk, f, dv = state.s.shape
    d = state.feature_map.head_dim
    for name, t, shape in (("k_t", k_t, (b, hk, d)), ("v_t", v_t, (b, hk, dv))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} [batch, kv_heads, dim] for this state, got {getattr(t, 'shape', t)}")
    if not isinstance(q_t, torch.Tensor) or q_t.dim() != 3 or q_t.shape[0] != b or q_t.shape[1] % hk or q_t.shape[2] != d:
        raise ValueError(f"q_t must be [batch={b}, heads (a multiple of {hk}), head_dim={d}], got {getattr(q_t, 'shape', q_t)}")
    check_finite_activations(q_t=q_t, k_t=k_t, v_t=v_t)
    dt, fmap = state.s.dtype, state.feature_map
    g = q_t.shape[1] // hk
    fq, log_scale = fmap.features(q_t.to(dt), True)  # [B, H, F], [B, H] or None
    fq = fq.reshape(b, hk, g, f)
    log_scale = None if log_scale is None else log_scale.reshape(b, hk, g)
    k_t, v_t = k_t.to(dt), v_t.to(dt)

    def absorb(s, z, k, v):  # add one token (k [B, Hk, D], v [B, Hk, Dv]) to the linear state
        fk, _ = fmap.features(k, False)
        return s + fk.unsqueeze(-1) * v.unsqueeze(-2), z + fk

    if state.method == "linear":
        s, z = absorb(state.s, state.z, k_t, v_t)
        o = finish(fq @ s, (fq @ z.unsqueeze(-1)).squeeze(-1), log_scale, state.normalize, state.eps)
        return o.reshape(b, hk * g, dv).to(q_t.dtype), dataclasses.replace(state, s=s, z=z, pos=state.pos + 1)

    w, t, slot = state.window, state.pos, state.pos % state.window
    s, z = state.s, state.z
    block = state.window_shape == "block"
    if block and t >= w and slot == 0:  # a new block: the previous one joins the far sums
        fk, _ = fmap.features(state.k_buf.transpose(1, 2), False)  # [B, w, Hk, F]
        s = s + torch.einsum("bwhf,bhwe->bhfe", fk, state.v_buf)
        z = z + fk.sum(1)
    elif not block and t >= w:  # token t - w leaves the window (its slot is token t's) and joins the far sums
        s, z = absorb(s, z, state.k_buf[:, :, slot], state.v_buf[:, :, slot])
    k_buf, v_buf = state.k_buf.clone(), state.v_buf.clone()
    k_buf[:, :, slot], v_buf[:, :, slot] = k_t, v_t
    qg = q_t.to(dt).reshape(b, hk, g, 1, -1)
    logits = (qg @ k_buf.unsqueeze(2).transpose(-1, -2)) * q_t.shape[-1] ** -0.5  # [B, Hk, g, 1, w]
    # [1, w]: the slots filled so far (sliding), of this block so far (block)
    near = (torch.arange(w, device=q_t.device) <= (slot if block else t)).unsqueeze(0)
    ls = far_log_scale(fmap, None if log_scale is None else log_scale.unsqueeze(-1), hk, g, dt)  # [B, Hk, g, 1] or [Hk, g, 1]
    fq1 = fq.unsqueeze(-2)  # [B, Hk, g, 1, F]
    o = combine(logits, near, v_buf.unsqueeze(2), fq1 @ s.unsqueeze(2), (fq1 @ z.unsqueeze(2).unsqueeze(-1)).squeeze(-1), ls, state.eps)
    new = dataclasses.replace(state, s=s, z=z, k_buf=k_buf, v_buf=v_buf, pos=t + 1)
    return o.reshape(b, hk * g, dv).to(q_t.dtype), new
