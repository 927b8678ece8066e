"""Plain PyTorch reference for causal / non-causal linear attention (the ground truth for the kernels).

Quadratic masked form, computed in the dtype of the inputs end to end, so running it on fp64 inputs
gives the reference and on bf16 inputs gives "what PyTorch itself gets in bf16"."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu", "relu", None)


def feature_map_fn(name: str | None):
    """phi applied elementwise to q and k: elu(x)+1, relu(x) or the identity (None)."""
    if name == "elu":
        return lambda x: F.elu(x) + 1
    if name == "relu":
        return F.relu
    if name is None or name == "identity":
        return lambda x: x
    raise ValueError(f"feature_map must be one of 'elu', 'relu' or None, got {name!r}")


def linear_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str | None = "elu",
    normalize: bool = True,
    causal: bool = True,
    eps: float = 1e-6,
    lag: int = 0,
) -> torch.Tensor:
    """o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps), S_t = sum_{s<=t} phi(k_s)^T v_s, z_t = sum_{s<=t} phi(k_s).

    q, k: [B, T, H, DK], v: [B, T, H, DV] (o is [B, T, H, DV]). Without `causal` the sums run over the whole sequence; without
    `normalize` the division is dropped. lag (causal): the sums stop at s <= t - lag. O(T^2) memory: a
    reference, not a fast path.
    """
    phi = feature_map_fn(feature_map)
    a, b = phi(q), phi(k)
    scores = torch.einsum("bthd,bshd->bhts", a, b)  # [B, H, T, T]
    if causal:
        T = q.shape[1]
        keep = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-lag)
        scores = scores.masked_fill(~keep, 0)
    out = torch.einsum("bhts,bshd->bthd", scores, v)
    if normalize:
        den = scores.sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, T, H, 1]
        out = out / (den + eps)
    return out.to(q.dtype)
