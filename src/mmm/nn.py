"""Neural-network modules built on mmm's structured layers and attention paths."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention.api import (DEFAULT_EPS, DEFAULT_WINDOW, _check_positive_int, attention, attention_error, check_method,
                            check_window_shape)
from .attention.feature_maps import FeatureMap, HedgehogFeatureMap, make_feature_map
from .attention.linear import DEFAULT_CHUNK
from .configs import StructureConfig
from .linear import StructuredLinear

__all__ = ["Attention"]

Rotary = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention: x [B, T, d_model] -> [B, T, d_model].

    q/k/v/o projections are `mmm.StructuredLinear(proj_config)` (None = dense). `method` and the
    options after it are those of `mmm.attention`; with 'linear', 'hybrid' or 'auto' the feature map is
    a submodule (a FAVOR+ map's random features are a buffer; a 'hedgehog' map, one per head, trains
    with the layer). Every method but 'exact' approximates softmax attention: `attention_error(x)`
    measures by how much on your inputs.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        method: str = "exact",
        causal: bool = True,
        window: int = DEFAULT_WINDOW,
        window_shape: str = "sliding",
        feature_map: str | FeatureMap = "elu",
        normalize: bool = True,
        eps: float = DEFAULT_EPS,
        chunk_size: int = DEFAULT_CHUNK,
        long_method: str = "hybrid",
        crossover: int | None = None,
        proj_config: StructureConfig | None = None,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        for name, val in (("d_model", d_model), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
            _check_positive_int(name, val)
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model}), or pass head_dim")
            head_dim = d_model // n_heads
        _check_positive_int("head_dim", head_dim)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        check_method(method, long_method)
        check_window_shape(window_shape, long_method if method == "auto" else method)
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = StructuredLinear(d_model, n_heads * head_dim, proj_config, **kw)
        self.k_proj = StructuredLinear(d_model, n_kv_heads * head_dim, proj_config, **kw)
        self.v_proj = StructuredLinear(d_model, n_kv_heads * head_dim, proj_config, **kw)
        self.o_proj = StructuredLinear(n_heads * head_dim, d_model, proj_config, **kw)
        uses_map = method in ("linear", "hybrid") or (method == "auto" and long_method in ("linear", "hybrid"))
        if not uses_map:
            self.feature_map = None
        elif feature_map == "hedgehog":
            self.feature_map = HedgehogFeatureMap(head_dim, num_heads=n_heads, num_kv_heads=n_kv_heads).to(device)
        else:
            self.feature_map = make_feature_map(feature_map, head_dim).to(device)
        self.options = dict(method=method, causal=causal, window=window, window_shape=window_shape,
                            normalize=normalize, eps=eps,
                            chunk_size=chunk_size, long_method=long_method, crossover=crossover)

    def qkv(self, x: torch.Tensor, rotary: Rotary | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected q [B, T, H, D], k and v [B, T, Hk, D]; `rotary(q, k)` (e.g. RoPE) applied if given."""
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D [batch, seq, d_model={self.d_model}], got shape {tuple(x.shape)}")
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if rotary is not None:
            q, k = rotary(q, k)
        return q, k, v

    def _kwargs(self) -> dict:
        return dict(self.options, feature_map=self.feature_map if self.feature_map is not None else "elu")

    def forward(self, x: torch.Tensor, rotary: Rotary | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, rotary)
        o = attention(q, k, v, **self._kwargs())
        return self.o_proj(o.reshape(x.shape[0], x.shape[1], self.n_heads * self.head_dim))

    @torch.no_grad()
    def attention_error(self, x: torch.Tensor, sample_rows: int | None = 1024, rotary: Rotary | None = None) -> float:
        """`mmm.attention_error` of this layer's attention on the q, k, v it makes from x."""
        q, k, v = self.qkv(x, rotary)
        return attention_error(q, k, v, sample_rows=sample_rows, **self._kwargs())

    def extra_repr(self) -> str:
        o = self.options
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, method={o['method']!r}, causal={o['causal']}")
