"""Fit what an approximate path learns from a layer's queries and keys (and values) so that it mimics
softmax attention there: a learned feature map for linear attention (Hedgehog, Zhang et al. 2024), and
the calibration c_h that hybrid attention weighs far keys by (as LoLCATs learns its window/linear balance).

Per sampled query row i over its visible keys j (j <= i when causal), p_ij = softmax_j(s_ij) with
s_ij = q_i . k_j / sqrt(d), and an approximation's weights a_ij = w_ij / sum_j w_ij:
- `train_hedgehog`: w_ij = kappa_ij = phi(q_i).phi(k_j); loss = mean_i -sum_j p_ij log a_ij (the
  paper's cross-entropy, minimal at a = p; needs no values), or given values, ||a v - p v||^2 / ||p v||^2
  (the output error, as below; on the bench's quick layer it gave 0.22 / 0.21 / 0.26 held-out at 512 /
  1k / 2k tokens against the cross-entropy's 0.26 / 0.24 / 0.25, fitted at 512).
- `fit_hybrid`: w_ij = exp(s_ij) for near keys (i - j < window; |i - j| < window two-sided), exp(c_h)
  kappa_ij for far ones (hybrid.py); loss = ||a v - p v||^2 / ||p v||^2 over the rows, the square of what
  `mmm.attention_error` reports. The output error, not the cross-entropy: on the bench's quick layer
  (2 x 32) the cross-entropy's c_h left the hybrid worse than its window alone (held-out error 0.68 vs
  0.49 at 2k tokens), the output error's beat it (0.39); on the 2 x 128 replica both gave ~0.23.
Query rows are redrawn every step; all keys are used. The results are still approximations of softmax
attention: check them on held-out inputs with `mmm.attention_error`.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ._layout import group_kv, group_q
from .api import _check_positive_int, check_qkv, check_window_shape, full_precision
from .feature_maps import FeatureMap, HedgehogFeatureMap, make_feature_map
from .window import near_mask


def _logits_and_kernel(fmap: FeatureMap, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor):
    """For query rows `rows` of fp32 q [B, T, H, D] against all of k [B, T, Hk, D]: the softmax logits
    s and kappa = phi_s(q).phi(k), grouped [B, Hk, g, R, T], and the map's per-query log factor
    (grouped [B, Hk, g, R], or None)."""
    hk = k.shape[2]
    qr = q[:, rows]
    logits = group_q(qr, hk) @ group_kv(k).transpose(-1, -2) * q.shape[-1] ** -0.5
    fq, lq = fmap.features(qr, True)
    fk, _ = fmap.features(k, False)
    kappa = group_q(fq, hk) @ group_kv(fk).transpose(-1, -2)
    return logits, kappa, None if lq is None else group_q(lq, hk)


def hedgehog_loss(fmap: FeatureMap, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, causal: bool,
                  v: torch.Tensor | None = None) -> torch.Tensor:
    """For query rows `rows` of fp32 q [B, T, H, D], k [B, T, Hk, D]: the cross-entropy between softmax
    weights p and fmap's normalised linear weights a (module docstring), or with values v [B, T, Hk, Dv]
    the output error ||a v - p v||^2 / ||p v||^2."""
    logits, kappa, _ = _logits_and_kernel(fmap, q, k, rows)  # a per-row factor of phi(q) cancels in a_ij
    if causal:
        hidden = torch.arange(k.shape[1], device=q.device) > rows[:, None]
        logits = logits.masked_fill(hidden, -torch.inf)
        kappa = kappa.masked_fill(hidden, 0.0)
    p = torch.softmax(logits, dim=-1)
    tiny = torch.finfo(kappa.dtype).tiny
    total = kappa.sum(-1, keepdim=True).clamp_min(tiny)
    if v is not None:
        vg = group_kv(v)
        exact = p @ vg
        return ((kappa / total) @ vg - exact).pow(2).sum() / exact.pow(2).sum()
    log_a = kappa.clamp_min(tiny).log() - total.log()
    return -(p * log_a).sum(-1).mean()


def hybrid_output_loss(fmap: FeatureMap, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                       causal: bool, window: int, log_scale: torch.Tensor, per_head: bool = False,
                       window_shape: str = "sliding") -> torch.Tensor:
    """||O - O_exact||^2 / ||O_exact||^2 over query rows `rows` (the square of `attention_error`'s
    measure) for hybrid attention with `window`, far keys weighed by exp(log_scale) ([H]); fp32 q
    [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv]. per_head: the ratio per query head, [H]."""
    logits, kappa, lq = _logits_and_kernel(fmap, q, k, rows)
    log_kappa = kappa.clamp_min(torch.finfo(kappa.dtype).tiny).log()
    keys = torch.arange(k.shape[1], device=q.device)
    far = log_scale.reshape(k.shape[2], -1, 1, 1) + (0.0 if lq is None else lq.unsqueeze(-1)) + log_kappa
    hidden = keys > rows[:, None] if causal else torch.zeros(len(rows), len(keys), dtype=torch.bool, device=q.device)
    near = near_mask(rows[:, None], keys, window, window_shape)
    log_w = torch.where(near, logits, far).masked_fill(hidden, -torch.inf)
    vg = group_kv(v)
    approx = torch.softmax(log_w, -1) @ vg
    exact = torch.softmax(logits.masked_fill(hidden, -torch.inf), -1) @ vg
    if per_head:  # [B, Hk, g, R, Dv] -> [Hk * g], in the order of log_scale's heads
        return ((approx - exact).pow(2).sum((0, 3, 4)) / exact.pow(2).sum((0, 3, 4))).reshape(-1)
    return (approx - exact).pow(2).sum() / exact.pow(2).sum()


# Starting values tried for each head's c_h before Adam refines it. Where the near logits are large, far
# weights start ~exp(-90) or more below the near ones at c_h = 0: their gradient underflows to 0 in fp32
# and Adam never moves c_h (the H100 bench of 2026-12-06 fitted 16 heads of a trained layer: 8-12 stayed
# at exactly 0, and the calibrated hybrid's error equalled the uncalibrated one's, 0.357 at 8k).
CALIBRATION_GRID = tuple(range(-20, 101, 5))


def _calibration_start(loss_per_head, c: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per head, the best of its current c_h and CALIBRATION_GRID on query rows `rows`."""
    with torch.no_grad():
        starts = torch.stack([c] + [torch.full_like(c, g) for g in CALIBRATION_GRID])  # [n, H]
        losses = torch.stack([loss_per_head(rows, start) for start in starts]).nan_to_num(nan=torch.inf)
        return starts.gather(0, losses.argmin(0, keepdim=True)).squeeze(0)


def _fit(loss_of, params: list, q: torch.Tensor, steps: int, lr: float, sample_rows: int, seed: int,
         progress: bool, desc: str) -> None:
    """Adam on loss_of(rows) for `steps` steps, `sample_rows` query rows redrawn each step."""
    t = q.shape[1]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        rows = torch.randperm(t, generator=gen)[: min(sample_rows, t)].to(q.device)
        with full_precision(q):
            loss = loss_of(rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)


def _check_fit_args(q, k, v, steps, sample_rows, lr) -> None:
    check_qkv(q, k, v)
    for name, val in (("steps", steps), ("sample_rows", sample_rows)):
        _check_positive_int(name, val)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")


def train_hedgehog(
    q: torch.Tensor,
    k: torch.Tensor,
    feature_map: FeatureMap | None = None,
    *,
    v: torch.Tensor | None = None,
    steps: int = 300,
    lr: float = 1e-2,
    sample_rows: int = 256,
    causal: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> FeatureMap:
    """Train `feature_map` (default: a new per-head `HedgehogFeatureMap`, F = 2 head_dim) on queries
    q [B, T, H, D] and keys k [B, T, Hk, D] (e.g. collected from a layer on real text; B may hold
    slices of several texts, as the bench's `HedgehogFit` does) with Adam, for linear attention: on the
    cross-entropy of the attention weights, or with the layer's values v [B, T, Hk, Dv] on the output
    error (module docstring). Costs O(sample_rows T F) per step. Returns the map, trained, in eval mode,
    on q's device."""
    _check_fit_args(q, k, k if v is None else v, steps, sample_rows, lr)
    qf, kf = q.detach().float(), k.detach().float()
    vf = None if v is None else v.detach().float()
    h, d = q.shape[2], q.shape[3]
    fmap = HedgehogFeatureMap(d, num_heads=h, num_kv_heads=k.shape[2]) if feature_map is None else feature_map
    params = [p for p in fmap.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"feature_map {type(fmap).__name__} has no trainable parameters to fit")
    fmap.to(q.device).train()
    _fit(lambda rows: hedgehog_loss(fmap, qf, kf, rows, causal, vf), params, qf, steps, lr, sample_rows, seed,
         progress, "hedgehog")
    return fmap.eval()


def fit_hybrid(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str | FeatureMap = "elu",
    window: int = 256,
    *,
    window_shape: str = "sliding",
    train_map: bool = False,
    steps: int = 100,
    lr: float = 0.1,
    map_lr: float = 1e-2,
    sample_rows: int = 256,
    causal: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> FeatureMap:
    """Fit the calibration c_h of hybrid attention with `window` (one per query head: far keys weigh
    exp(c_h) phi(q).phi(k) against exp(q.k / sqrt(d)) for near ones) to a layer's queries q [B, T, H, D],
    keys k [B, T, Hk, D] and values v [B, T, Hk, Dv], with Adam from, per head, the best of the map's
    current c_h and a grid of starts (CALIBRATION_GRID). With
    `train_map`, the map's own parameters (Hedgehog's) train with it at `map_lr`, as LoLCATs trains its
    map inside the hybrid. Returns the map (`feature_map` itself when a module is given) with its
    `hybrid_log_scale` set, in eval mode, on q's device: pass it as
    `mmm.attention(..., method="hybrid", window=window, window_shape=window_shape, feature_map=map)`: the
    calibration fits the window it was fitted for ('sliding' or 'block', see mmm.attention.hybrid).
    O(sample_rows T (F + Dv)) a step."""
    _check_fit_args(q, k, v, steps, sample_rows, lr)
    qf, kf, vf = (x.detach().float() for x in (q, k, v))
    _check_positive_int("window", window)
    check_window_shape(window_shape, "hybrid")
    fmap = make_feature_map(feature_map, q.shape[3]).to(q.device)
    c = nn.Parameter(fmap.hybrid_log_scale_for(q.shape[2]).detach().float().clone())
    groups = [{"params": [c], "lr": lr}]
    if train_map:
        own = [p for p in fmap.parameters() if p.requires_grad]
        if not own:
            raise ValueError(f"train_map=True but feature_map {type(fmap).__name__} has no trainable parameters")
        groups.append({"params": own, "lr": map_lr})
    fmap.train()
    first_rows = torch.randperm(qf.shape[1], generator=torch.Generator().manual_seed(seed))[:sample_rows].to(q.device)
    with full_precision(qf):
        c.data = _calibration_start(
            lambda rows, start: hybrid_output_loss(fmap, qf, kf, vf, rows, causal, window, start, per_head=True,
                                                   window_shape=window_shape),
            c.detach(), first_rows)
    _fit(lambda rows: hybrid_output_loss(fmap, qf, kf, vf, rows, causal, window, c, window_shape=window_shape),
         groups, qf, steps, lr, sample_rows, seed, progress, "hybrid calibration")
    fmap.hybrid_log_scale = c.detach().to(fmap.hybrid_log_scale)
    return fmap.eval()
