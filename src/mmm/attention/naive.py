"""Plain PyTorch ground truth for every attention path: full T x T matrices in fp64, the formulas of
the module docstrings written out directly. For tests and for kernel authors; quadratic, slow."""

from __future__ import annotations

import torch

from .feature_maps import FeatureMap
from .window import near_mask


def _scores(q, k):
    """fp64 logits [B, H, T, T] with k's heads repeated for GQA."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return torch.einsum("bihd,bjhd->bhij", q, k) / q.shape[-1] ** 0.5


def _values(v, heads):
    return v.double().repeat_interleave(heads // v.shape[2], dim=2)


def _visible(t, causal, device):
    i, j = torch.arange(t, device=device)[:, None], torch.arange(t, device=device)[None, :]
    return (j <= i) if causal else torch.ones(t, t, dtype=torch.bool, device=device)


def _near(t, window, device, shape="sliding"):
    i, j = torch.arange(t, device=device)[:, None], torch.arange(t, device=device)[None, :]
    return near_mask(i, j, window, shape)


def _apply(weights, v, heads, eps=None):
    """o = W v / (row sums of W + eps), or W v when eps is None; W [B, H, T, T] -> [B, T, H, Dv]."""
    num = torch.einsum("bhij,bjhe->bihe", weights, _values(v, heads))
    if eps is None:
        return num
    return num / (weights.sum(-1).transpose(1, 2) + eps).unsqueeze(-1)


def naive_exact(q, k, v, causal=True):
    s = _scores(q, k).masked_fill(~_visible(q.shape[1], causal, q.device), -torch.inf)
    return _apply(torch.softmax(s, dim=-1), v, q.shape[2])


def naive_window(q, k, v, window, causal=True):
    t = q.shape[1]
    mask = _visible(t, causal, q.device) & _near(t, window, q.device)
    return _apply(torch.softmax(_scores(q, k).masked_fill(~mask, -torch.inf), dim=-1), v, q.shape[2])


def naive_kernel(q, k, fmap: FeatureMap):
    """kappa_ij = phi(q_i).phi(k_j) in fp64, [B, H, T, T] (the map's unscaled features)."""
    fq, fk = fmap(q.double(), is_query=True), fmap(k.double(), is_query=False)
    fk = fk.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return torch.einsum("bihf,bjhf->bhij", fq, fk)


def naive_linear(q, k, v, fmap: FeatureMap, causal=True, normalize=True, eps=1e-6):
    kappa = naive_kernel(q, k, fmap).masked_fill(~_visible(q.shape[1], causal, q.device), 0.0)
    return _apply(kappa, v, q.shape[2], eps if normalize else None)


def naive_hybrid(q, k, v, fmap: FeatureMap, window, causal=True, eps=1e-6, window_shape="sliding"):
    t = q.shape[1]
    visible, near = _visible(t, causal, q.device), _near(t, window, q.device, window_shape)
    far = naive_kernel(q, k, fmap) * fmap.hybrid_log_scale_for(q.shape[2]).double().exp()[:, None, None]
    w = torch.where(near, _scores(q, k).exp(), far).masked_fill(~visible, 0.0)
    return _apply(w, v, q.shape[2], eps)
