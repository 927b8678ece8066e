"""A GPT-style causal language model whose every projection can be structured.

One short file in the spirit of nanoGPT: token embedding -> n_layers x [RMSNorm -> attention -> residual,
RMSNorm -> FFN -> residual] -> RMSNorm -> tied output head. Positions are rotary (applied to q and k
before attention), which works for every attention method: softmax attention sees relative positions,
and linear attention gets position information through phi(RoPE(q)) . phi(RoPE(k)) on top of the order
that causality already gives it.

Per-role choices: `ffn_config` structures both FFN matrices, `attn_proj_config` the q/k/v/o projections
(any `mmm` StructureConfig; default dense) and `attention` picks exact / window / linear / hybrid.
A dense Transformer is `GPTConfig()` with the defaults: dense layers and exact attention.

Generation keeps a per-layer cache: keys and values for exact and window attention (window keeps only
the last `window` of them), the recurrent state of `mmm.attention.decode` for linear and hybrid.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import FEATURE_MAPS, attention, decode
from ..attention import make_feature_map as build_feature_map
from ..configs import DenseConfig, StructureConfig, config_from_dict
from ..linear import StructuredLinear

ATTENTION_METHODS = ("exact", "window", "linear", "hybrid")


@dataclass
class GPTConfig:
    vocab_size: int = 256
    d_model: int = 256  # width
    n_layers: int = 4  # depth
    n_heads: int = 4
    max_seq_len: int = 1024  # longest sequence rotary positions are set up for
    ffn_mult: int = 4  # FFN hidden width = ffn_mult * d_model
    ffn_config: StructureConfig = field(default_factory=DenseConfig)
    attn_proj_config: StructureConfig = field(default_factory=DenseConfig)
    attention: str = "exact"
    window: int = 256  # used by "window" and "hybrid"
    feature_map: str = "elu"  # used by "linear" and "hybrid"
    tie_weights: bool = True  # output head shares the token embedding
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "ffn_mult", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"GPTConfig: d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"GPTConfig: head dim d_model / n_heads = {self.d_model // self.n_heads} must be even (rotary positions rotate pairs)"
            )
        if self.attention not in ATTENTION_METHODS:
            raise ValueError(f"GPTConfig.attention must be one of {ATTENTION_METHODS}, got {self.attention!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"GPTConfig.feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        for name in ("ffn_config", "attn_proj_config"):
            value = getattr(self, name)
            if isinstance(value, dict):  # from JSON
                setattr(self, name, config_from_dict(value))
            elif not isinstance(value, StructureConfig):
                raise TypeError(f"GPTConfig.{name} must be a StructureConfig (e.g. mmm.MonarchConfig(nblocks=4)), got {value!r}")
        # Fail here, not deep inside layer construction, if a structure cannot take the model's sizes.
        d, h = self.d_model, self.ffn_mult * self.d_model
        try:
            self.attn_proj_config.check_shape(d, d)
            self.ffn_config.check_shape(d, h)
            self.ffn_config.check_shape(h, d)
        except ValueError as exc:
            raise ValueError(f"GPTConfig (d_model={d}, FFN hidden={h}): {exc}") from None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["ffn_config"] = self.ffn_config.to_dict()
        d["attn_proj_config"] = self.attn_proj_config.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)


# --- attention and its caches ---------------------------------------------------------------------------


def make_feature_map(cfg: GPTConfig) -> nn.Module | None:
    """The layer's own feature map for linear/hybrid attention (a module: hedgehog's weights are learned
    with the model, favor's random projection is saved with it); None for exact/window."""
    if cfg.attention not in ("linear", "hybrid"):
        return None
    extra = {"num_heads": cfg.n_heads} if cfg.feature_map == "hedgehog" else {}  # one learned map per head
    return build_feature_map(cfg.feature_map, cfg.head_dim, **extra)


def attend(q, k, v, cfg: GPTConfig, feature_map: nn.Module | None) -> torch.Tensor:
    """Causal attention over a whole sequence; q, k, v and the result are [batch, seq, heads, head_dim]."""
    if cfg.attention in ("exact", "window"):
        return attention(q, k, v, cfg.attention, causal=True, window=cfg.window)
    return attention(q, k, v, cfg.attention, causal=True, window=cfg.window, feature_map=feature_map)


class KVCache:
    """Keys and values seen so far for one layer (exact attention), or the last `window` of them."""

    def __init__(self, window: int | None = None):
        self.window = window
        self.k: torch.Tensor | None = None  # [batch, past, heads, head_dim]
        self.v: torch.Tensor | None = None
        self.pos = 0  # tokens seen so far (for rotary positions)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map=None) -> torch.Tensor:
        T = q.shape[1]
        past = 0 if self.k is None else self.k.shape[1]
        keys = k if self.k is None else torch.cat([self.k, k], dim=1)
        values = v if self.v is None else torch.cat([self.v, v], dim=1)
        # Query i (absolute position pos+i) sees keys at absolute positions <= pos+i, and within the
        # window: pos+i - window < position. Cached key j has absolute position pos - past + j.
        qpos = torch.arange(T, device=q.device)[:, None] + self.pos
        kpos = torch.arange(past + T, device=q.device)[None, :] + self.pos - past
        mask = kpos <= qpos
        if self.window is not None:
            mask &= kpos > qpos - self.window
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)
        if self.window is not None:  # keys older than the window can never be seen again
            keys, values = keys[:, -self.window :], values[:, -self.window :]
        self.k, self.v = keys, values
        self.pos += T
        return y


class RecurrentCache:
    """Recurrent state of linear / hybrid attention for one layer (`mmm.attention.decode`): the prompt
    goes through the parallel form once (`prefill`), every later token through one `step`."""

    def __init__(self, cfg: GPTConfig):
        self.cfg = cfg
        self.state = None
        self.pos = 0

    def attend(self, q, k, v, feature_map) -> torch.Tensor:
        if self.state is None:
            y, self.state = decode.prefill(q, k, v, method=self.cfg.attention, feature_map=feature_map, window=self.cfg.window)
        else:
            outs = []
            for t in range(q.shape[1]):
                o, self.state = decode.step(q[:, t], k[:, t], v[:, t], self.state)
                outs.append(o)
            y = torch.stack(outs, dim=1)
        self.pos += q.shape[1]
        return y


def new_cache(cfg: GPTConfig) -> list:
    """One cache per layer for `GPT.forward(..., cache=...)`."""
    if cfg.attention in ("linear", "hybrid"):
        return [RecurrentCache(cfg) for _ in range(cfg.n_layers)]
    window = cfg.window if cfg.attention == "window" else None
    return [KVCache(window) for _ in range(cfg.n_layers)]


# --- the model ----------------------------------------------------------------------------------------


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + D/2]) by position-dependent angles; x: [B, T, H, D]."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1, x2 = x.to(dt).chunk(2, dim=-1)
    cos, sin = cos.to(dt), sin.to(dt)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        d, c = cfg.d_model, cfg.attn_proj_config
        self.q = StructuredLinear(d, d, c, bias=False)
        self.k = StructuredLinear(d, d, c, bias=False)
        self.v = StructuredLinear(d, d, c, bias=False)
        self.o = StructuredLinear(d, d, c, bias=False)
        self.feature_map = make_feature_map(cfg)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        shape = (B, T, self.cfg.n_heads, self.cfg.head_dim)
        q = rotary(self.q(x).view(shape), cos, sin)
        k = rotary(self.k(x).view(shape), cos, sin)
        v = self.v(x).view(shape)
        if cache is None:
            y = attend(q, k, v, self.cfg, self.feature_map)
        else:
            y = cache.attend(q, k, v, self.feature_map)
        return self.o(y.reshape(B, T, -1))


class FFN(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.ffn_mult * cfg.d_model
        self.up = StructuredLinear(d, h, cfg.ffn_config, bias=False)
        self.down = StructuredLinear(h, d, cfg.ffn_config, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FFN(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.ffn(self.ffn_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # Tied: the head *is* the embedding matrix (no second parameter, so checkpoints hold it once).
        self.head = None if cfg.tie_weights else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def rotary_angles(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [length, 1, D/2] for positions start..start+length-1 (computed on the fly:
        cheap, and nothing to keep in sync when the model moves device or is loaded)."""
        end = start + length
        if end > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {end} tokens is longer than max_seq_len={self.cfg.max_seq_len}, the longest this "
                f"model's rotary positions are set up for; use a shorter sequence or build the model with "
                f"GPTConfig(max_seq_len>={end})"
            )
        D = self.cfg.head_dim
        # fp64 angles: exact enough at any position; the rotation itself runs in fp32 (fp64 for fp64 models).
        inv_freq = self.cfg.rope_base ** (-torch.arange(0, D, 2, device=device, dtype=torch.float64) / D)
        angles = torch.arange(start, end, device=device, dtype=torch.float64)[:, None] * inv_freq
        return angles.cos()[:, None, :], angles.sin()[:, None, :]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: list | None = None):
        """Logits [B, T, vocab] for token ids idx [B, T]; with `targets` also the mean cross-entropy.
        With `cache` (from `new_cache`), idx continues the sequence the cache has seen."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"idx must be a [batch, seq] int64 tensor of token ids, got "
                f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}"
                f"{' ' + str(idx.dtype) if isinstance(idx, torch.Tensor) else ''}"
            )
        if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got values in [{lo}, {hi}]")
        start = 0 if cache is None else cache[0].pos
        cos, sin = self.rotary_angles(start, idx.shape[1], idx.device)
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if cache is None else cache[i])
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx [B, T] by max_new_tokens tokens; greedy when temperature == 0. The prompt is run
        once through the cache (KV cache, or the recurrent state for linear/hybrid), then one token per step."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        total = idx.shape[1] + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(
                f"prompt ({idx.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} is longer than "
                f"max_seq_len={self.cfg.max_seq_len}"
            )
        cache = new_cache(self.cfg)
        logits = self(idx, cache=cache)[:, -1]
        out = [idx]
        for i in range(max_new_tokens):
            if temperature == 0.0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self(nxt, cache=cache)[:, -1]
        return torch.cat(out, dim=1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | Path) -> None:
        """Weights (safetensors) with the config as JSON in the header; written atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(tmp), metadata={"mmm_gpt_config": json.dumps(self.cfg.to_dict())})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, device=None) -> "GPT":
        """A model saved by `save`, or the model of an `mmm train` checkpoint."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "mmm_gpt_config" in meta:
                cfg, prefix = json.loads(meta["mmm_gpt_config"]), ""
            elif "mmm" in meta:  # training checkpoint: model tensors are under "model."
                cfg, prefix = json.loads(meta["mmm"])["trajectory"]["model"], "model."
            else:
                raise ValueError(f"{path} holds no mmm GPT config (not written by GPT.save or mmm train)")
            state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        model = cls(GPTConfig.from_dict(cfg))
        model.load_state_dict(state, strict=True)
        return model.to(device) if device is not None else model
