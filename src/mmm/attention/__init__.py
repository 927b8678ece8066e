"""Attention paths, each labelled for what it is, and the measurement of what an approximation costs.

    o = mmm.attention(q, k, v, method="exact" | "window" | "linear" | "hybrid" | "auto", causal=True, ...)
    err = mmm.attention_error(q, k, v, method=..., sample_rows=1024)

q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads, ...] (kv_heads divides heads: GQA).
'exact' is softmax attention (PyTorch SDPA); 'window' is exact softmax on a band (equal to full
attention only when the band covers every key); 'linear' and 'hybrid' replace exp(q.k/sqrt(d)) by a
feature-map kernel: approximations, never lossless. See api.py for the arguments, window.py,
linear.py and hybrid.py for the exact formulas, decode.py for token-by-token generation, fit.py
for fitting a learned feature map and the hybrid's calibration, naive.py for fp64 reference implementations. The length at
which 'auto' switches from exact to the approximation is `mmm.attention.api.AUTO_CROSSOVER`.

This package is itself callable: `mmm.attention(q, k, v, ...)` is `mmm.attention.attention(q, k, v, ...)`,
while `mmm.attention.decode`, `mmm.attention.fit` etc. stay reachable as submodules.
"""

import sys
import types

from .api import METHODS, attention, attention_error, attention_path
from .exact import exact_backend, exact_backends_available
from .feature_maps import (
    FEATURE_MAPS,
    EluFeatureMap,
    FavorFeatureMap,
    FeatureMap,
    HedgehogFeatureMap,
    ReluFeatureMap,
    TaylorFeatureMap,
    make_feature_map,
)
from . import decode
from .fit import fit_hybrid, train_hedgehog

__all__ = [
    "attention",
    "attention_error",
    "attention_path",
    "exact_backend",
    "exact_backends_available",
    "METHODS",
    "FEATURE_MAPS",
    "FeatureMap",
    "EluFeatureMap",
    "ReluFeatureMap",
    "FavorFeatureMap",
    "TaylorFeatureMap",
    "HedgehogFeatureMap",
    "make_feature_map",
    "train_hedgehog",
    "fit_hybrid",
    "decode",
]


class _CallableModule(types.ModuleType):
    """Lets `mmm.attention` be both this package and the `attention` function (see the docstring)."""

    def __call__(self, *args, **kwargs):
        return attention(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
