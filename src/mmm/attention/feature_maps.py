"""Feature maps phi for linear attention: kernel(q, k) = phi(q) . phi(k) stands in for exp(q.k / sqrt(d)).

Every map is an `nn.Module` with one signature:

    phi = fmap(x, is_query)                  # x: [batch, seq, heads, head_dim] -> [batch, seq, heads, F]
    phi_s, log_scale = fmap.features(x, is_query)   # phi = phi_s * exp(log_scale[..., None])

`features` is what the attention code calls: a map whose values can overflow (FAVOR+ queries) returns
them divided by a per-row factor and that factor's log (`log_scale`, [batch, seq, heads]); the others
return `log_scale=None`. Normalised linear attention ignores a per-query factor (it cancels), the
unnormalised and hybrid forms put it back in (see linear.py / hybrid.py).

The built-in maps write `features` as a pure function of x and their tensors: the static
`apply_features(x, is_query, *feature_params(is_query))`. On CUDA the kernel path compiles that
function once per map class (linear.py `_kernel_features`), whichever map instance (layer) calls it. A
subclass may override `features` instead; it then runs eagerly.

Every map first scales its input by d^-1/4 (d = head_dim), so that x'_q . x'_k = q.k / sqrt(d), the
logit of softmax attention. Maps compute in the dtype of `x` (callers pass fp32 or fp64) and cast their
own parameters to it.

    elu      phi(x) = elu(x') + 1                                         F = d
    relu     phi(x) = relu(x')                                            F = d
    favor    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m), W: m orthogonal   F = m
             random features; E[phi(q).phi(k)] = exp(q.k / sqrt(d)) (Choromanski et al. 2020)
    taylor   phi(x) = [1, x', vec(x' x'^T) / sqrt(2)]                     F = 1 + d + d^2
             phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d) (2nd-order Taylor of exp, as in Based)
    hedgehog phi(x) = [softmax(h), softmax(-h)], h = x' W + b per head,   F = 2 m
             learned so that its attention weights mimic softmax (Zhang et al. 2024); train with
             `mmm.attention.fit.train_hedgehog`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FeatureMap",
    "EluFeatureMap",
    "ReluFeatureMap",
    "FavorFeatureMap",
    "TaylorFeatureMap",
    "HedgehogFeatureMap",
    "FEATURE_MAPS",
    "make_feature_map",
]


def _scaled(x: torch.Tensor) -> torch.Tensor:
    """x d^-1/4 (d = head dim): x'_q . x'_k = q.k / sqrt(d)."""
    return x * x.shape[-1] ** -0.25


class FeatureMap(nn.Module):
    """Base class. Subclasses implement `apply_features` (and `feature_params` when they have tensors), or
    override `features`; `forward` returns the unscaled features."""

    name = ""
    # whether `features` may return a query log scale (then phi(q) is not the features as returned)
    rescales_queries = False
    # every feature >= 0 (so every partial denominator phi(q).z is too): lets linear.py combine
    # kernel runs over slices of the features through their normalisers without cancellation
    nonnegative = False

    def __init__(self, head_dim: int):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        self.head_dim = head_dim
        # c_h, per query head ([heads]) or shared ([1]): hybrid attention weighs a far key by
        # exp(c_h) phi(q).phi(k) against exp(q.k / sqrt(d)) for a near one. Only the hybrid's shared
        # normaliser sees it (in linear attention alone it cancels). 0 until fitted: `fit_hybrid`.
        self.register_buffer("hybrid_log_scale", torch.zeros(1))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "hybrid_log_scale"
        saved = state_dict.get(key)
        if saved is not None and saved.dim() == 1 and saved.shape != self.hybrid_log_scale.shape:
            # a fitted scale has one entry per head where a fresh map has one: take the saved shape
            self.hybrid_log_scale = torch.zeros_like(saved, device=self.hybrid_log_scale.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if saved is None and key in missing_keys:  # saved before the calibration existed: c_h = 0, as then
            missing_keys.remove(key)

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def check_input(self, x: torch.Tensor, is_query: bool) -> None:
        """Raises on inputs this map cannot take (checked outside `apply_features`, which stays free of
        data-dependent branches for torch.compile)."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"{type(self).__name__} was built for head_dim={self.head_dim}, got input of shape {tuple(x.shape)}"
            )

    def feature_params(self, is_query: bool) -> tuple[torch.Tensor, ...]:
        """The tensors (parameters, buffers) `apply_features` reads for queries or keys."""
        return ()

    @staticmethod
    def apply_features(x: torch.Tensor, is_query: bool, *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(phi_s, log_scale) of x [batch, seq, heads, head_dim] computed in x's dtype from `params`
        (`feature_params`), a pure function: nothing read from the module."""
        raise NotImplementedError

    def features(self, x: torch.Tensor, is_query: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.check_input(x, is_query)
        return self.apply_features(x, is_query, *self.feature_params(is_query))

    def forward(self, x: torch.Tensor, is_query: bool = False) -> torch.Tensor:
        phi, log_scale = self.features(x, is_query)
        return phi if log_scale is None else phi * log_scale.exp().unsqueeze(-1)

    def hybrid_log_scale_for(self, heads: int) -> torch.Tensor:
        """c_h as [heads] (a shared entry repeated); a clear error when it was fitted to another head count."""
        c = self.hybrid_log_scale
        if c.dim() != 1 or c.numel() not in (1, heads):
            raise ValueError(f"{type(self).__name__}.hybrid_log_scale has shape {tuple(c.shape)}, fitted for "
                             f"{c.numel()} heads, but the input has {heads} query heads (expected [1] or [{heads}])")
        return c.expand(heads)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, feature_dim={self.feature_dim}"


class EluFeatureMap(FeatureMap):
    """phi(x) = elu(x d^-1/4) + 1 (Katharopoulos et al. 2020, with the softmax logit scaling)."""

    name = "elu"
    nonnegative = True  # elu(x) + 1 > 0

    @property
    def feature_dim(self) -> int:
        return self.head_dim

    @staticmethod
    def apply_features(x, is_query):
        return F.elu(_scaled(x)) + 1.0, None


class ReluFeatureMap(FeatureMap):
    """phi(x) = relu(x d^-1/4). Rows whose features are all zero get output 0 when normalised (eps)."""

    name = "relu"
    nonnegative = True  # relu(x) >= 0

    @property
    def feature_dim(self) -> int:
        return self.head_dim

    @staticmethod
    def apply_features(x, is_query):
        return F.relu(_scaled(x)), None


def orthogonal_gaussian(num_features: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[num_features, dim] rows orthogonal within each block of `dim` rows, each row's norm drawn from
    the chi distribution of a d-dim Gaussian (so rows are marginally Gaussian, as FAVOR+ needs)."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        qmat, rmat = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        blocks.append((qmat * rmat.diagonal().sign()).T)  # the sign fix makes Q uniform (Haar) on O(d)
    w = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).float()


class FavorFeatureMap(FeatureMap):
    """FAVOR+ positive orthogonal random features (Choromanski et al. 2020).

    phi(x) = exp(W x' - |x'|^2/2) / sqrt(m), so phi(q).phi(k) is an unbiased estimate of exp(q.k/sqrt(d)).
    For range, feature i of a key is divided by exp(c_i), c_i = max(0, |w_i|^2/2 - 60), so that it is
    at most exp(60) (w.k' - |k'|^2/2 <= |w|^2/2); this factor depends on nothing but W, so keys can be
    mapped token by token in decoding. Queries are multiplied by exp(c_i) instead and then divided by
    their row maximum, which is returned as `log_scale`. phi(q).phi(k) is unchanged by all this.
    Limit: keys with |k|^2 / (2 sqrt(d)) beyond ~87 underflow to all-zero features in fp32 (a query
    that sees only such keys outputs 0); Performer's data-dependent key stabiliser would avoid that but needs the whole
    sequence, which token-by-token decoding does not have. attention_error shows it (error 1.0).
    `redraw(seed)` draws new random features (Performers redraw them now and then during training).
    """

    name = "favor"
    rescales_queries = True
    nonnegative = True  # exp(.) >= 0
    KEY_LOG_BOUND = 60.0  # key features stay below exp(60): sums over 1e8 tokens fit in fp32

    def __init__(self, head_dim: int, num_features: int | None = None, seed: int = 0):
        super().__init__(head_dim)
        if num_features is None:
            num_features = math.ceil(head_dim * max(1.0, math.log(head_dim)))
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.register_buffer("projection", torch.empty(num_features, head_dim))
        self.redraw(seed)

    @property
    def feature_dim(self) -> int:
        return self.num_features

    @torch.no_grad()
    def redraw(self, seed: int | None = None) -> None:
        """Draw new random features (from `seed`, or from torch's global RNG when None)."""
        gen = torch.Generator()
        gen.manual_seed(int(torch.randint(0, 2**62, (1,))) if seed is None else seed)
        w = orthogonal_gaussian(self.num_features, self.head_dim, gen)
        self.projection.copy_(w.to(self.projection.device))

    def feature_params(self, is_query):
        return (self.projection,)

    @staticmethod
    def apply_features(x, is_query, projection):
        xs = _scaled(x)
        w = projection.to(xs.dtype)
        shift = (0.5 * (w * w).sum(-1) - FavorFeatureMap.KEY_LOG_BOUND).clamp_min(0.0)  # c_i, [m]
        logits = xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True) - 0.5 * math.log(w.shape[0])
        if not is_query:
            return torch.exp(logits - shift), None
        logits = logits + shift
        row_max = logits.detach().amax(-1)  # detached: phi = exp(logits) does not depend on it
        return torch.exp(logits - row_max.unsqueeze(-1)), row_max

    def extra_repr(self) -> str:
        return super().extra_repr() + ", orthogonal random features"


class TaylorFeatureMap(FeatureMap):
    """phi(x) = [1, x', vec(x' x'^T)/sqrt(2)]: phi(q).phi(k) = 1 + s + s^2/2, s = q.k/sqrt(d) (Based).

    Always positive (>= 1/2) but grows like s^2 where exp(s) is small (s << 0). F = 1 + d + d^2.
    """

    name = "taylor"

    @property
    def feature_dim(self) -> int:
        return 1 + self.head_dim + self.head_dim**2

    @staticmethod
    def apply_features(x, is_query):
        xs = _scaled(x)
        outer = (xs.unsqueeze(-1) * xs.unsqueeze(-2)).flatten(-2) * math.sqrt(0.5)
        return torch.cat([torch.ones_like(xs[..., :1]), xs, outer], dim=-1), None


class HedgehogFeatureMap(FeatureMap):
    """Learned map (Zhang et al. 2024, "The Hedgehog & the Porcupine"): h = x' W + b,
    phi(x) = [softmax(h), softmax(-h)] over the feature axis, F = 2 * num_features.

    Queries and keys have their own W, b. `num_heads` = 1 shares one map across heads; otherwise one
    map per head (`num_kv_heads` for keys, default `num_heads`). W starts as the identity (when
    num_features == head_dim), as in the paper. Untrained it is just another fixed map: fit it with
    `train_hedgehog`.
    """

    name = "hedgehog"
    nonnegative = True  # softmax outputs

    def __init__(self, head_dim: int, num_features: int | None = None, num_heads: int = 1, num_kv_heads: int | None = None):
        super().__init__(head_dim)
        num_features = head_dim if num_features is None else num_features
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for arg, val in (("num_features", num_features), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        self.num_features, self.num_heads, self.num_kv_heads = num_features, num_heads, num_kv_heads
        init = torch.eye(head_dim, num_features)
        self.weight_q = nn.Parameter(init.expand(num_heads, -1, -1).clone())
        self.weight_k = nn.Parameter(init.expand(num_kv_heads, -1, -1).clone())
        self.bias_q = nn.Parameter(torch.zeros(num_heads, num_features))
        self.bias_k = nn.Parameter(torch.zeros(num_kv_heads, num_features))

    @property
    def feature_dim(self) -> int:
        return 2 * self.num_features

    def feature_params(self, is_query):
        return (self.weight_q, self.bias_q) if is_query else (self.weight_k, self.bias_k)

    def check_input(self, x, is_query):
        super().check_input(x, is_query)
        maps, heads = self.feature_params(is_query)[0].shape[0], x.shape[-2]
        if maps not in (1, heads):
            role = "query" if is_query else "key"
            raise ValueError(f"HedgehogFeatureMap has {maps} {role} head map(s) but the input has {heads} heads")

    @staticmethod
    def apply_features(x, is_query, w, b):
        xs = _scaled(x)
        h = torch.einsum("...hd,hdf->...hf", xs, w.to(xs.dtype)) + b.to(xs.dtype)
        return torch.cat([torch.softmax(h, -1), torch.softmax(-h, -1)], dim=-1), None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    cls.name: cls for cls in (EluFeatureMap, ReluFeatureMap, FavorFeatureMap, TaylorFeatureMap, HedgehogFeatureMap)
}


def make_feature_map(feature_map: str | FeatureMap, head_dim: int, **kwargs) -> FeatureMap:
    """A feature map from its registry name (built with `kwargs`), or the given module after checking
    that it fits `head_dim`."""
    if isinstance(feature_map, FeatureMap):
        if feature_map.head_dim != head_dim:
            raise ValueError(f"feature_map was built for head_dim={feature_map.head_dim}, but head_dim is {head_dim}")
        return feature_map
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {sorted(FEATURE_MAPS)} or a FeatureMap module")
    return FEATURE_MAPS[feature_map](head_dim, **kwargs)
