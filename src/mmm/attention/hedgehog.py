"""Fit a learned feature map (Hedgehog, Zhang et al. 2024) so that its linear attention weights mimic
softmax attention's on given queries and keys.

Loss, per sampled query row i over its visible keys j (j <= i when causal):
    p_ij = softmax_j(q_i . k_j / sqrt(d))               (target)
    a_ij = kappa_ij / sum_j kappa_ij, kappa_ij = phi(q_i).phi(k_j)
    loss = mean_i  -sum_j p_ij log a_ij                  (cross-entropy; its minimum over a is at a = p)
Query rows are redrawn every step; all keys are used (so a_ij is normalised as in attention).
The result is still an approximation of softmax attention: check it on held-out inputs with
`mmm.attention_error(..., method="linear", feature_map=trained_map)`.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ._layout import group_kv, group_q
from .api import _check_positive_int, check_qkv, full_precision
from .feature_maps import FeatureMap, HedgehogFeatureMap


def hedgehog_loss(fmap: FeatureMap, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, causal: bool) -> torch.Tensor:
    """Cross-entropy between softmax weights and fmap's normalised linear weights for query rows `rows`
    of fp32 q [B, T, H, D], k [B, T, Hk, D]."""
    hk = k.shape[2]
    qr = q[:, rows]
    logits = group_q(qr, hk) @ group_kv(k).transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, Hk, g, R, T]
    fq, _ = fmap.features(qr, True)  # a per-row factor of phi(q) cancels in a_ij
    fk, _ = fmap.features(k, False)
    kappa = group_q(fq, hk) @ group_kv(fk).transpose(-1, -2)
    if causal:
        hidden = torch.arange(k.shape[1], device=q.device) > rows[:, None]
        logits = logits.masked_fill(hidden, -torch.inf)
        kappa = kappa.masked_fill(hidden, 0.0)
    p = torch.softmax(logits, dim=-1)
    tiny = torch.finfo(kappa.dtype).tiny
    log_a = kappa.clamp_min(tiny).log() - kappa.sum(-1, keepdim=True).clamp_min(tiny).log()
    return -(p * log_a).sum(-1).mean()


def train_hedgehog(
    q: torch.Tensor,
    k: torch.Tensor,
    feature_map: FeatureMap | None = None,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    sample_rows: int = 256,
    causal: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> FeatureMap:
    """Train `feature_map` (default: a new per-head `HedgehogFeatureMap`, F = 2 head_dim) on queries
    q [B, T, H, D] and keys k [B, T, Hk, D] (e.g. collected from a layer on real text; B may hold
    slices of several texts, as the bench's `HedgehogFit` does) with Adam.
    Costs O(sample_rows T F) per step. Returns the map, trained, in eval mode, on q's device."""
    check_qkv(q, k, k)
    for name, val in (("steps", steps), ("sample_rows", sample_rows)):
        _check_positive_int(name, val)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    b, t, h, d = q.shape
    fmap = HedgehogFeatureMap(d, num_heads=h, num_kv_heads=k.shape[2]) if feature_map is None else feature_map
    params = [p for p in fmap.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"feature_map {type(fmap).__name__} has no trainable parameters to fit")
    fmap.to(q.device).train()
    q, k = q.detach().float(), k.detach().float()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    bar = tqdm(range(steps), desc="hedgehog", disable=not progress)
    for _ in bar:
        rows = torch.randperm(t, generator=gen)[: min(sample_rows, t)].to(q.device)
        with full_precision(q):
            loss = hedgehog_loss(fmap, q, k, rows, causal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return fmap.eval()
