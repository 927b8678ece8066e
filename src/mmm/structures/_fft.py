"""Small helpers shared by the FFT-based structures (circulant, Toeplitz, LDR)."""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype an FFT product is computed in: torch.fft has no bf16 (and fp16 only for powers
    of two on CUDA), so half precisions are computed in fp32; fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fast_len(n: int) -> int:
    """Smallest 2,3,5-smooth integer >= n: a length that pocketfft and cuFFT both transform fast."""
    best = 1 << max(0, (n - 1).bit_length())  # a power of two always qualifies
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def real_fft_flops(n: int) -> float:
    """Real flops of one real FFT (or inverse) of length n: the usual ~2.5 n log2 n."""
    return 2.5 * n * math.log2(n) if n > 1 else 0.0


def blocks_of(weight: torch.Tensor, block: int) -> torch.Tensor:
    """[out, in] -> [out/block, in/block, block, block], block (i, j) = weight[i*b:(i+1)*b, j*b:(j+1)*b]."""
    out_features, in_features = weight.shape
    p, q = out_features // block, in_features // block
    return weight.reshape(p, block, q, block).permute(0, 2, 1, 3)


def from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of `blocks_of`."""
    p, q, b, _ = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(p * b, q * b)


# --------------------------------------------------------------------------------------------------
# The parameters' spectra, cached between calls
# --------------------------------------------------------------------------------------------------
# The spectrum of a layer's parameters changes only when the parameters do, so it is kept on the
# module and reused while every parameter it came from is the same tensor object, at the same address,
# with the same version counter, and no torch.optim optimizer has stepped since. In-place changes made
# through the parameter (load_state_dict, `with torch.no_grad(): p.mul_(...)`, most optimizers) bump the
# version; fused optimizers do not (torch 2.11 on CUDA: Adam(fused=True) left it unchanged and served a
# stale spectrum), so a global optimizer-step hook counts steps too. Assigning p.data or a new Parameter
# changes the address or the object. A change made through `p.data.<op>_()` does not (PyTorch
# gives `.data` its own version counter, the same blind spot autograd's own checks have): after one,
# call `clear_spectrum_cache(module)`. Eager FSDP2 wraps each unsharded parameter in a new Parameter
# per all-gather (a miss each step); under compiled autograd it keeps the version counter on purpose,
# so turn the cache off there (`spectrum_cache(False)`). Under torch.compile the spectrum is computed in
# the graph. The saving is small for circulant / Toeplitz (one parameter-sized FFT and a few launches
# per call) and larger for LDR (2 r transforms per block).

_cache_enabled = True
_optimizer_steps = 0  # bumped after every torch.optim step, by any optimizer


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


@contextlib.contextmanager
def spectrum_cache(enabled: bool):
    """Turn the cache of the parameters' spectra off (or on) inside the block (benchmarks, debugging)."""
    global _cache_enabled
    previous, _cache_enabled = _cache_enabled, enabled
    try:
        yield
    finally:
        _cache_enabled = previous


def clear_spectrum_cache(module: torch.nn.Module) -> None:
    for m in module.modules():
        m.__dict__.pop("_spectrum_cache", None)


class _CachedSpectrum(torch.autograd.Function):
    """Hands out a cached spectrum, with a backward to the parameters it was computed from (by
    recomputing the small parameter-side transform under autograd)."""

    @staticmethod
    def forward(ctx, fn, spectra, *weights):
        ctx.fn = fn
        ctx.save_for_backward(*weights)
        return tuple(s.view_as(s) for s in spectra)  # fresh views: each call gets its own grad_fn

    @staticmethod
    def backward(ctx, *grads):
        weights = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [w.detach().requires_grad_(True) for w in weights]
            outs = _as_tuple(ctx.fn(*leaves))
            used = [(o, g) for o, g in zip(outs, grads) if g is not None]
            dw = torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used], allow_unused=True)
        return (None, None, *dw)


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def _key(weights):
    try:
        return (_optimizer_steps, *((w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape), w.stride()) for w in weights))
    except RuntimeError:  # inference tensors have no version counter: never cached
        return None


def cached_spectrum(module: torch.nn.Module, name: str, fn, *weights: torch.Tensor):
    """fn(*weights) (a tensor or a tuple of tensors), differentiable with respect to the weights,
    reused from the last call while the weights are unchanged (see above)."""
    if not _cache_enabled or torch.compiler.is_compiling():
        return fn(*weights)
    key = _key(weights)
    cache = module.__dict__.setdefault("_spectrum_cache", {})
    entry = cache.get(name)
    hit = (
        key is not None and entry is not None and entry[0] == key
        and all(ref() is w for ref, w in zip(entry[1], weights))
        and all(torch.is_inference(s) == torch.is_inference_mode_enabled() for s in entry[2])
    )
    if not hit:
        with torch.no_grad():
            spectra = _as_tuple(fn(*weights))
        if key is None:
            entry = None
            cache.pop(name, None)
        else:
            entry = (key, tuple(weakref.ref(w) for w in weights), spectra)
            cache[name] = entry
    else:
        spectra = entry[2]
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        out = _CachedSpectrum.apply(fn, spectra, *weights)
    else:
        out = spectra
    return out if isinstance(out, tuple) and len(out) > 1 else out[0]
