"""Small helpers shared by the FFT-based structures (circulant, Toeplitz, LDR)."""

from __future__ import annotations

import math

import torch


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


def complex_fft_flops(n: int) -> float:
    """Real flops of one complex FFT (or inverse) of length n: the usual ~5 n log2 n."""
    return 5.0 * n * math.log2(n) if n > 1 else 0.0


def blocks_of(weight: torch.Tensor, block: int) -> torch.Tensor:
    """[out, in] -> [out/block, in/block, block, block], block (i, j) = weight[i*b:(i+1)*b, j*b:(j+1)*b]."""
    out_features, in_features = weight.shape
    p, q = out_features // block, in_features // block
    return weight.reshape(p, block, q, block).permute(0, 2, 1, 3)


def from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of `blocks_of`."""
    p, q, b, _ = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(p * b, q * b)
