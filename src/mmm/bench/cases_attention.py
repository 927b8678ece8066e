"""Attention paths against cuDNN SDPA, causal, at long sequence lengths, each approximation's error on
real attention inputs beside its speed.

`attn.causal.T{T}`: B=1, H=16, D=128, T in 2048..131072 (quick: H=2, D=32, T in 256, 512), layout
[B, T, H, D] as `mmm.attention` takes it. Baseline: SDPA forced to cuDNN (on CPU the math backend);
then SDPA flash, mmm's linear (elu / relu / FAVOR+ / trained Hedgehog, normalized), window and hybrid paths, and, where
flash-linear-attention (`fla`) imports, its normalized chunk kernel on elu(x)+1 features and its raw
unnormalized fused kernel, called exactly as in ../shared/anchors/probe_baseline2.py. Timing inputs are
Gaussian (speed does not depend on the values). The quality column is `attention_error` (relative error
vs exact softmax on 1024 sampled query rows) on q/k/v captured from a trained model's attention layer
at the case's T (`attention_inputs`: same heads and head dim as the case).

The Hedgehog row's map is fitted (`train_hedgehog` on the output error, F = D features; `HedgehogFit`
says why; once per process) to the same trained layer's q/k/v on its *training* text (`training_qkv`),
then judged on the held-out q/k/v like every other
row, so its error is beside elu+1's and FAVOR+'s on the same inputs; the fit's time and steps are in the
row's info (not in its time). The Hedgehog row runs the fused kernel on features computed in PyTorch
(key width = feature width, D: one kernel call); the FAVOR+ row runs mmm's PyTorch path (its map rescales queries).
The hybrid rows' far keys weigh exp(c_h) kappa, c_h fitted per head by `fit_hybrid` on the same training
slices (`fitted_hybrid_map`): elu+1 with only c_h fitted (its info also holds the error with c_h = 0,
"quality_uncalibrated"), and a Hedgehog map trained inside the hybrid together with c_h (LoLCATs' recipe).
Both at window 256 (the flex path on CUDA), and elu+1 again at window 64 (16 quick), a window the fused
causal hybrid kernel takes (one Triton pass for both parts): faster, and less accurate than 256; and
elu+1 with a block window of that size ("hybrid block=64": each query's own block of 64 positions
near, window_shape='block'), cheaper still and less accurate.

`attn.crossover`: exact (`mmm.attention(method="exact")`, SDPA's own backend choice) and linear (elu,
normalized) at T in 512..4096 (quick: 64, 128). The setup first times forward+backward of both at every
T with the bench's timer and finds where linear becomes faster (log-log interpolation); that crossover
is in every row's info. The rows are then timed as usual, without a baseline (they differ in T).

FLOPs (forward, matmul terms only): softmax 4 D per visible (query, key) pair, i.e. 4 B H D T(T+1)/2
causal (~ 4 B H T^2 D / 2) and ~4 B H T w D for a window w; linear 4 B H T D (D + C): state update and
read-out 2 D^2 each per token, plus the chunk-local quadratic part 4 C D per token (chunk C = 64); a map
with F features (FAVOR+: D ln D, Hedgehog: 2 D) has 4 F D + 2 C (F + D) per token instead.
Backward: 2.5x forward for softmax (flash-style: 5 T x T products to the forward's 2), 2x for linear.
Bytes: read q, k, v and write o (forward); also read o, dO and write dq, dk, dv (forward+backward).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..attention import attention, attention_error, exact_backend
from ..attention.api import attention_path, exact_rows, sample_query_rows
from ..attention.feature_maps import FeatureMap, HedgehogFeatureMap, make_feature_map
from ..attention.fit import fit_hybrid, train_hedgehog
from .attention_inputs import real_qkv, training_qkv
from .graphs import capture, graphed, triton_launched
from .registry import Variant, Workload, bench_case
from .timing import FULL, QUICK, canonical_device, median_ms

QUALITY_KEY = "rel. err vs softmax"
QUALITY_ROWS = 1024  # query rows sampled by attention_error
LINEAR_CHUNK = 64  # chunk length of the FLOP model of chunked linear attention
SOFTMAX_BWD, LINEAR_BWD = 2.5, 2.0  # backward FLOPs / forward FLOPs
MEMORY_HEADROOM = 0.9  # skip a variant whose estimated peak exceeds this share of the free memory


@dataclass(frozen=True)
class Sizes:
    heads: int
    head_dim: int
    lengths: tuple[int, ...]
    windows: tuple[int, ...]
    hybrid_window: int
    fused_hybrid_window: int  # one mmm.attention sends to the fused hybrid kernel (hybrid_op.fused_applies); elu
    crossover: tuple[int, ...]


FULL_SIZES = Sizes(16, 128, (2048, 8192, 32768, 131072), (256, 1024), 256, 64, (1024, 2048, 4096, 8192, 16384))
# quick windows shrink with T so that they still leave keys outside the window (w >= T would be exact)
QUICK_SIZES = Sizes(2, 32, (256, 512), (32, 128), 32, 16, (64, 128))


@dataclass(frozen=True)
class HedgehogFit:
    """How the bench fits its Hedgehog map: Adam for `steps` on `segments` slices of `train_len` tokens
    spread evenly over the first `text_len` tokens of training text (default: one slice at its start).
    Several slices cover several files and positions far past the model's training length, as the
    bench's long T does (on a CPU replica of the full-size layer, 2 x 128 heads: held-out error at
    T = 32768 1.01 with 4 slices vs 1.05 with one 8192-token file; the same at T = 8192).
    `loss`: "output" (train_hedgehog given the layer's v: the error the bench reports) or "weights" (the
    paper's cross-entropy); `num_features` per sign (None: head_dim, F = 2 head_dim). Measured on one
    full-size H100 layer (results/h100/2026-12-07-s23-hedgehog-fit.json, held-out error at 2k / 8k / 32k):
    output loss at F = head_dim 0.546 / 0.570 / 0.561, cross-entropy at F = 2 head_dim (the bench's fit
    before) 0.625 / 0.589 / 0.574, elu+1 0.618 / 0.625 / 0.592; and F = head_dim runs as one kernel call
    of the head dim's width instead of two."""

    train_len: int
    steps: int
    lr: float
    sample_rows: int = 256
    segments: int = 1
    text_len: int | None = None
    loss: str = "output"
    num_features: int | None = None

    def __post_init__(self):
        if self.text_len is not None and self.text_len < self.segments * self.train_len:
            raise ValueError(f"text_len must be at least segments * train_len = {self.segments * self.train_len}, "
                             f"got {self.text_len}")
        if self.loss not in ("output", "weights"):
            raise ValueError(f"loss must be 'output' or 'weights', got {self.loss!r}")


FULL_HEDGEHOG = HedgehogFit(train_len=8192, steps=300, lr=1e-2, sample_rows=128, segments=4, text_len=65536,
                            num_features=64)
QUICK_HEDGEHOG = HedgehogFit(train_len=512, steps=200, lr=2e-2, num_features=16)  # ~1-2 s on a CPU


def hedgehog_fit(quick: bool) -> HedgehogFit:
    return QUICK_HEDGEHOG if quick else FULL_HEDGEHOG


# --- cost model ---------------------------------------------------------------------------------------


def visible_pairs(t: int, window: int | None = None) -> int:
    """(query, key) pairs a causal attention sees: T(T+1)/2, or with a window w sum_i min(w, i + 1)."""
    if window is None or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


def softmax_flops(b: int, h: int, t: int, d: int, window: int | None = None) -> int:
    return 4 * b * h * d * visible_pairs(t, window)  # q.k and p.v: 2 multiply-adds of length d per pair


def linear_flops(b: int, h: int, t: int, d: int, feature_dim: int | None = None) -> int:
    """With F features (default d): state update and read-out 2 F d each per token, chunk-local q.k over
    F and p.v over d, 2 C F + 2 C d per token."""
    f = d if feature_dim is None else feature_dim
    return 2 * b * h * t * (2 * f * d + min(LINEAR_CHUNK, t) * (f + d))


def io_bytes(q: torch.Tensor) -> tuple[int, int]:
    """(forward, forward+backward) bytes: q, k, v, o and their gradients, each the size of q."""
    one = q.numel() * q.element_size()
    return 4 * one, 12 * one


def available_bytes(device: torch.device) -> float:
    """Memory a variant could still get: free + cached-but-unused on CUDA, MemAvailable on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def peak_bytes(kind: str, b: int, h: int, t: int, window: int = 0) -> int:
    """Rough forward+backward peak of the paths that materialise more than O(T H D), fp32 blocks kept
    for autograd: SDPA's math backend (T x T scores, probabilities and their gradients), mmm's blockwise
    window / hybrid paths (query chunks of C = min(w, T) against 2C keys; not their flex paths, which are
    O(T H D): see `banded_bytes`). Other paths: 0 (not the limit)."""
    if kind == "math":
        return 4 * b * h * t * t * 4
    blocks = b * h * t * 2 * min(window, t) * 4
    return {"window": 6, "hybrid": 10}.get(kind, 0) * blocks


def banded_bytes(kind: str, q: torch.Tensor, window: int) -> int:
    """`peak_bytes` of the window or hybrid method on inputs like q, 0 where it runs on flex (CUDA): a
    window of 1024 at 128k tokens would otherwise be skipped as needing ~96 GiB."""
    if attention_path(q, q, q, kind, window=window) != "blockwise":
        return 0
    b, t, h, _ = q.shape
    return peak_bytes(kind, b, h, t, window)


# --- variants ---------------------------------------------------------------------------------------


@torch.no_grad()
def sampled_error(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int = QUALITY_ROWS) -> float:
    """attention_error's measure for an output computed elsewhere (fla): ||O - O_exact|| / ||O_exact||
    on the same sampled query rows (seed 0), causal."""
    r = sample_query_rows(q.shape[1], rows, 0, q.device)
    ref = exact_rows(q, k, v, r, True)
    return float((out[:, r].to(ref.dtype) - ref).norm() / ref.norm())


def attention_variant(label: str, fn: Callable, inputs: tuple, grad: torch.Tensor, flops: int, bwd_factor: float, *,
                      baseline: bool = False, need_bytes: int = 0, info: dict | None = None,
                      error_fn: Callable | None = None, real: Callable | None = None) -> Variant:
    """A variant timing fn(q, k, v) -> o [B, T, H, D] and o.backward(grad). `error_fn(q, k, v) -> float`
    fills the quality column, on the real q/k/v that `real()` returns; a failure there, or a non-finite
    error (NaN in the output), is noted in info and warned about, not fatal to the timing. `need_bytes` >
    free memory skips the variant (recorded)."""
    q, k, v = inputs

    def build() -> Workload:
        have = available_bytes(q.device)
        if need_bytes > MEMORY_HEADROOM * have:
            raise MemoryError(f"skipped: needs about {need_bytes / 2**30:.0f} GiB, {have / 2**30:.0f} GiB free")
        fwd_bytes, fwd_bwd_bytes = io_bytes(q)

        def forward_backward() -> None:
            fn(q, k, v).backward(grad)

        work = Workload(forward=lambda: fn(q, k, v), forward_backward=forward_backward, grad_to_none=(q, k, v),
                        flops=flops, bytes=fwd_bytes, fwd_bwd_flops=round(flops * (1 + bwd_factor)),
                        fwd_bwd_bytes=fwd_bwd_bytes, info={"layout": "[B, T, H, D]", **(info or {})})
        if error_fn is not None:
            try:
                r = real()
                rq, rk, rv = (x.to(q.dtype) for x in (r.q, r.k, r.v))
                err = work.quality[QUALITY_KEY] = error_fn(rq, rk, rv)
                work.info["quality_inputs"] = r.info
                if not math.isfinite(err):  # kept in the table as is, and said loudly
                    work.info["quality_error"] = f"non-finite error ({err}): the output has NaN or inf on these inputs"
                    warnings.warn(f"{label}: {work.info['quality_error']}", stacklevel=2)
            except Exception as exc:  # the timing still stands; the missing quality is said why
                work.info["quality_error"] = f"{type(exc).__name__}: {exc}"[:300]
                warnings.warn(f"{label}: quality not measured: {work.info['quality_error']}", stacklevel=2)
        return work

    return Variant(label, build, baseline)


def sdpa(backend: SDPBackend) -> Callable:
    def run(q, k, v):
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2)

    return run


def mmm_path(method: str, **kwargs) -> Callable:
    return lambda q, k, v: attention(q, k, v, method, causal=True, **kwargs)


def mmm_error(method: str, **kwargs) -> Callable:
    return lambda q, k, v: attention_error(q, k, v, method, sample_rows=QUALITY_ROWS, causal=True, **kwargs)


def fla_paths() -> dict[str, Callable]:
    """flash-linear-attention as the anchors call it, on [B, T, H, D]: the normalized chunk kernel on
    elu(x)+1 features (computed outside, as a user of fla must) and the raw fused kernel (identity map)."""
    from fla.ops.linear_attn import chunk_linear_attn, fused_chunk_linear_attn

    return {
        "normalized": lambda q, k, v: chunk_linear_attn(F.elu(q) + 1, F.elu(k) + 1, v, normalize=True)[0],
        "unnormalized": lambda q, k, v: fused_chunk_linear_attn(q, k, v, normalize=False)[0],
    }


def fla_variant(label: str, which: str, inputs, grad, flops: int, real: Callable) -> Variant:
    def build() -> Workload:
        fn = fla_paths()[which]  # at build time, so a missing or broken fla is recorded as this row's error
        return attention_variant(label, fn, inputs, grad, flops, LINEAR_BWD, info={"impl": f"fla.ops.linear_attn ({which})"},
                                 error_fn=lambda q, k, v: sampled_error(fn(q, k, v), q, k, v), real=real).build()

    return Variant(label, build)


_HEDGEHOG: dict[tuple[bool, str], tuple[FeatureMap, dict]] = {}


def fit_slices(fit: HedgehogFit, quick: bool, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """q, k, v [segments, train_len, H, D]: `fit`'s slices of the real-input layer's training-text
    capture, and a description of that text."""
    data = training_qkv(fit.text_len or fit.segments * fit.train_len, quick, device)
    stride = data.q.shape[1] // fit.segments
    starts = [i * stride for i in range(fit.segments)]
    q, k, v = (torch.cat([x[:, s:s + fit.train_len] for s in starts]) for x in (data.q, data.k, data.v))
    return q, k, v, f"{fit.segments} x {fit.train_len} tokens at positions {starts} of {data.info['text']}"


def trained_hedgehog(quick: bool, device: torch.device) -> tuple[FeatureMap, dict]:
    """A Hedgehog map fitted to the real-input layer's q/k on its training text (first call per process
    and device; later calls return the cache), frozen, and info on the fit."""
    key = (quick, str(canonical_device(device)))
    if key not in _HEDGEHOG:
        fit = hedgehog_fit(quick)
        q, k, v, text = fit_slices(fit, quick, device)
        start = time.perf_counter()
        fmap = HedgehogFeatureMap(q.shape[-1], num_features=fit.num_features, num_heads=q.shape[2],
                                  num_kv_heads=k.shape[2])
        fmap = train_hedgehog(q, k, fmap, v=v if fit.loss == "output" else None, steps=fit.steps, lr=fit.lr,
                              sample_rows=fit.sample_rows, progress=sys.stderr.isatty())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        info = {"hedgehog_train_seconds": round(seconds, 2), "hedgehog_steps": fit.steps, "hedgehog_lr": fit.lr,
                "hedgehog_loss": fit.loss,
                "hedgehog_sample_rows": fit.sample_rows, "hedgehog_train_inputs": text,
                "hedgehog_feature_dim": fmap.feature_dim}
        _HEDGEHOG[key] = (fmap.requires_grad_(False), info)
    return _HEDGEHOG[key]


_HYBRID: dict[tuple[str, bool, str, int, str], tuple[FeatureMap, dict]] = {}
HYBRID_MAPS = {"elu": "elu (calibrated)", "hedgehog": "hedgehog (trained in the hybrid)"}


def fitted_hybrid_map(name: str, quick: bool, device: torch.device, window: int,
                      shape: str = "sliding") -> tuple[FeatureMap, dict]:
    """A map for the hybrid rows, fitted by `fit_hybrid` to the real-input layer's q/k/v on the Hedgehog
    fit's training slices, with that fit's steps: "elu" fits only the calibration c_h; "hedgehog" trains a
    new Hedgehog map inside the hybrid with it (LoLCATs' recipe). First call per (name, device, window,
    window shape); cached. Returns the frozen map and info on the fit."""
    key = (name, quick, str(canonical_device(device)), window, shape)
    if key not in _HYBRID:
        fit = hedgehog_fit(quick)
        q, k, v, text = fit_slices(fit, quick, device)
        fmap = "elu" if name == "elu" else HedgehogFeatureMap(q.shape[-1], num_heads=q.shape[2], num_kv_heads=k.shape[2])
        start = time.perf_counter()
        fmap = fit_hybrid(q, k, v, fmap, window, window_shape=shape, train_map=name == "hedgehog", steps=fit.steps,
                          map_lr=fit.lr, sample_rows=fit.sample_rows, progress=sys.stderr.isatty())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        info = {"calibration_log_scale": [round(c, 3) for c in fmap.hybrid_log_scale.tolist()],
                "fit_seconds": round(time.perf_counter() - start, 2), "fit_steps": fit.steps, "fit_inputs": text}
        _HYBRID[key] = (fmap.requires_grad_(False), info)
    return _HYBRID[key]


def hybrid_label(name: str, window: int, shape: str = "sliding") -> str:
    return f"hybrid {'block' if shape == 'block' else 'w'}={window} {HYBRID_MAPS[name]}"


def hybrid_variant(name: str, inputs, grad, flops: int, bwd_factor: float, window: int, need_bytes: int, quick: bool,
                   real: Callable, shape: str = "sliding") -> Variant:
    """Hybrid attention with a map from `fitted_hybrid_map`; for elu the error without the calibration
    (c_h = 0) goes in the info as well. shape: the window's ('sliding' or 'block')."""
    label = hybrid_label(name, window, shape)
    options = dict(window=window, window_shape=shape)

    def build() -> Workload:
        fmap, fit_info = fitted_hybrid_map(name, quick, inputs[0].device, window, shape)
        extra = {}

        def error(q, k, v):
            if name == "elu":
                extra["quality_uncalibrated"] = mmm_error("hybrid", **options, feature_map="elu")(q, k, v)
            return mmm_error("hybrid", **options, feature_map=fmap)(q, k, v)

        work = attention_variant(label, mmm_path("hybrid", **options, feature_map=fmap), inputs, grad, flops,
                                 bwd_factor, need_bytes=need_bytes, error_fn=error, real=real,
                                 info={"call": f"mmm.attention(method='hybrid', window={window}, "
                                               f"window_shape='{shape}', feature_map=<{type(fmap).__name__} "
                                               f"fitted by fit_hybrid>)",
                                       "path": attention_path(*inputs, "hybrid", **options, feature_map=fmap),
                                       **fit_info}).build()
        work.info.update(extra)
        return work

    return Variant(label, build)


def hedgehog_variant(label: str, inputs, grad, flops: int, quick: bool, real: Callable) -> Variant:
    def build() -> Workload:
        fmap, fit_info = trained_hedgehog(quick, inputs[0].device)  # at build time: a failed fit is this row's error
        return attention_variant(label, mmm_path("linear", feature_map=fmap), inputs, grad, flops, LINEAR_BWD,
                                 info={"call": "mmm.attention(method='linear', feature_map=<trained HedgehogFeatureMap>)",
                                       **fit_info},
                                 error_fn=mmm_error("linear", feature_map=fmap), real=real).build()

    return Variant(label, build)


def _causal_setup(t: int, sizes: Sizes):
    def setup(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Variant]:
        b, h, d = 1, sizes.heads, sizes.head_dim
        q, k, v = (torch.randn(b, t, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(b, t, h, d, device=device, dtype=dtype)
        inputs = (q, k, v)
        real = lambda: real_qkv(t, quick, device)  # noqa: E731  (trained once per process, on first use)
        exact, lin = softmax_flops(b, h, t, d), linear_flops(b, h, t, d)
        cuda = device.type == "cuda"
        base = SDPBackend.CUDNN_ATTENTION if cuda else SDPBackend.MATH
        variants = [
            attention_variant(f"sdpa {'cudnn' if cuda else 'math'}", sdpa(base), inputs, grad, exact, SOFTMAX_BWD,
                              baseline=True, need_bytes=0 if cuda else peak_bytes("math", b, h, t),
                              info={"backend": "cudnn" if cuda else "math"}),
            attention_variant("sdpa flash", sdpa(SDPBackend.FLASH_ATTENTION), inputs, grad, exact, SOFTMAX_BWD,
                              info={"backend": "flash"}),
        ]
        for fmap, label in (("elu", "linear elu (normalized)"), ("relu", "linear relu (normalized)"), ("favor", "linear favor+")):
            features = make_feature_map(fmap, d).feature_dim
            variants.append(attention_variant(
                label, mmm_path("linear", feature_map=fmap), inputs, grad, linear_flops(b, h, t, d, features), LINEAR_BWD,
                info={"call": f"mmm.attention(method='linear', feature_map='{fmap}')"},
                error_fn=mmm_error("linear", feature_map=fmap), real=real))
        hh_features = 2 * (hedgehog_fit(quick).num_features or d)
        variants.append(hedgehog_variant("linear hedgehog (trained)", inputs, grad, linear_flops(b, h, t, d, hh_features),
                                         quick, real))
        for w in sizes.windows:
            variants.append(attention_variant(
                f"window {w}", mmm_path("window", window=w), inputs, grad, softmax_flops(b, h, t, d, w), SOFTMAX_BWD,
                need_bytes=banded_bytes("window", q, w), info={"call": f"mmm.attention(method='window', window={w})"},
                error_fn=mmm_error("window", window=w), real=real))
        w = sizes.hybrid_window
        near = softmax_flops(b, h, t, d, w)  # hybrid = window softmax + linear for the far keys
        for name, far in (("elu", lin), ("hedgehog", linear_flops(b, h, t, d, 2 * d))):
            variants.append(hybrid_variant(name, inputs, grad, near + far, (near * SOFTMAX_BWD + far * LINEAR_BWD) / (near + far),
                                           w, banded_bytes("hybrid", q, w), quick, real))
        fw = sizes.fused_hybrid_window  # the fused kernel's path on CUDA: a narrower window, one pass
        near = softmax_flops(b, h, t, d, fw)
        variants.append(hybrid_variant("elu", inputs, grad, near + lin, (near * SOFTMAX_BWD + lin * LINEAR_BWD) / (near + lin),
                                       fw, banded_bytes("hybrid", q, fw), quick, real))
        near = softmax_flops(b, h, t, d, fw // 2)  # a block window: (w + 1) / 2 near keys a query on average
        variants.append(hybrid_variant("elu", inputs, grad, near + lin,
                                       (near * SOFTMAX_BWD + lin * LINEAR_BWD) / (near + lin), fw,
                                       banded_bytes("hybrid", q, fw), quick, real, shape="block"))
        if cuda:  # without host overhead (the fixed cost that dominates at short T)
            by_label = {v.label: v for v in variants}
            elu = by_label["linear elu (normalized)"]
            # Hedgehog: its features' compiled pass made the row host-bound (2.42 of 2.58 ms f+b at 8k, H100)
            graph_rows = [by_label["sdpa cudnn"], elu, by_label["linear hedgehog (trained)"], by_label[f"window {sizes.windows[0]}"],
                          *(by_label[hybrid_label("elu", *x)] for x in ((w,), (fw,), (fw, "block")))]
            variants += [graphed(v) for v in graph_rows] + [triton_launched(elu)]
        # fla is GPU-only: listed on CUDA always (a missing install shows as an error), on CPU if installed
        if cuda or importlib.util.find_spec("fla") is not None:
            variants.append(fla_variant("fla chunk_linear_attn (normalized, elu+1)", "normalized", inputs, grad, lin, real))
            variants.append(fla_variant("fla fused_chunk_linear_attn (unnormalized)", "unnormalized", inputs, grad, lin, real))
        return variants

    return setup


# --- crossover ----------------------------------------------------------------------------------------


def crossover_length(lengths: tuple[int, ...], exact_ms: list[float], linear_ms: list[float]) -> tuple[int | None, str]:
    """The length from which linear stays faster than exact: log-log interpolation of the time ratio
    between the last length where exact is faster and the next one. (None, why) when not bracketed."""
    ratios = [e / l for e, l in zip(exact_ms, linear_ms)]  # > 1: linear is faster
    first = len(ratios)
    while first > 0 and ratios[first - 1] >= 1.0:
        first -= 1
    if first == len(ratios):
        return None, f"exact is faster at the longest length measured ({lengths[-1]}): crossover above {lengths[-1]}"
    if first == 0:
        return lengths[0], f"linear is faster from the shortest length measured: crossover <= {lengths[0]}"
    lo, hi = first - 1, first
    frac = -math.log(ratios[lo]) / (math.log(ratios[hi]) - math.log(ratios[lo]))
    at = round(math.exp(math.log(lengths[lo]) + frac * (math.log(lengths[hi]) - math.log(lengths[lo]))))
    return at, f"about {at} tokens (linear forward+backward faster from there on; between {lengths[lo]} and {lengths[hi]})"


def _crossover_setup(sizes: Sizes):
    def setup(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Variant]:
        b, h, d = 1, sizes.heads, sizes.head_dim
        settings = QUICK if quick else FULL
        exact, linear = mmm_path("exact"), mmm_path("linear", feature_map="elu")
        graphs = device.type == "cuda"  # also without host overhead: each step replayed from a CUDA graph
        per_length, timed = [], {"T": [], "exact_ms": [], "linear_ms": []}
        if graphs:
            timed.update(exact_graph_ms=[], linear_graph_ms=[])
        for t in sizes.crossover:
            q, k, v = (torch.randn(b, t, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            grad = torch.randn(b, t, h, d, device=device, dtype=dtype)
            per_length.append((t, (q, k, v), grad))
            timed["T"].append(t)
            for name, fn in (("exact", exact), ("linear", linear)):
                step = lambda fn=fn, q=q, k=k, v=v, grad=grad: fn(q, k, v).backward(grad)  # noqa: E731
                timed[f"{name}_ms"].append(median_ms(step, device, settings, (q, k, v)))
                if graphs:
                    replay = capture(step, (q, k, v)).replay
                    timed[f"{name}_graph_ms"].append(median_ms(replay, device, settings))
        at, text = crossover_length(sizes.crossover, timed["exact_ms"], timed["linear_ms"])
        rounded = {name: [float(f"{x:.4g}") for x in xs] if name != "T" else xs for name, xs in timed.items()}
        summary = {"crossover_T": at, "crossover": text, "crossover_fwd_bwd_ms": rounded}
        if graphs:
            at, text = crossover_length(sizes.crossover, timed["exact_graph_ms"], timed["linear_graph_ms"])
            summary.update(crossover_T_cuda_graph=at, crossover_cuda_graph=text)
        variants = []
        for t, inputs, grad in per_length:
            backend = exact_backend(*inputs)
            variants.append(attention_variant(f"exact T={t}", exact, inputs, grad, softmax_flops(b, h, t, d), SOFTMAX_BWD,
                                              info={"T": t, "backend": backend, **summary}))
            variants.append(attention_variant(f"linear elu (normalized) T={t}", linear, inputs, grad,
                                              linear_flops(b, h, t, d), LINEAR_BWD, info={"T": t, **summary}))
            if device.type == "cuda":  # the host cost binds at short T: the same through Triton's launch path
                variants.append(triton_launched(variants[-1]))
        return variants

    return setup


def _register() -> None:
    for sizes, quick in ((QUICK_SIZES, True), (FULL_SIZES, False)):
        shape = f"B=1, H={sizes.heads}, D={sizes.head_dim}, causal"
        lengths = ", ".join(map(str, sizes.crossover))
        bench_case("attn.crossover" + (".quick" if quick else ""), "attention",
                   f"exact vs linear elu (normalized) fwd+bwd, {shape}, T in {lengths}; crossover in the info", quick)(
            _crossover_setup(sizes))
        for t in sizes.lengths:
            bench_case(f"attn.causal.T{t}", "attention",
                       f"{shape}, T={t}; quality: {QUALITY_KEY} on real q/k/v of a trained layer", quick)(
                _causal_setup(t, sizes))


_register()
