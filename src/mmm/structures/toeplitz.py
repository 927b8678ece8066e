"""Toeplitz weights: W[i, j] = t[i - j + in - 1], in + out - 1 parameters, any rectangular shape.

y = W x is a slice of the linear convolution t * x: y[i] = (t * x)[i + in - 1]. The convolution is
computed as a circular one of length L >= in + out - 1 (so nothing wraps onto the entries kept),
with L a 2,3,5-smooth size that FFT libraries transform fast, or a power of two where the input takes
the fp16 path (`product_length`): O(L log L) per row.

Rectangular layers whose sides are multiples of a power of two b = gcd(in, out) >= 8 (FFN shapes:
d -> 4d, 4d -> d) are instead a grid of b x b Toeplitz blocks, block (i, j) the window of 2b - 1
diagonals starting at (i - j + in/b - 1) b, and go through fft_conv with L = 2b: q = in/b forward and
p = out/b inverse transforms of length 2b, the same work as two of length ~in + out, but at a power of
two (the fp16 cuFFT path takes only those) and without transforming the out-of-window part of a
length-(in + out) row: for d -> 4d in bf16 about half the bytes (fp16 against fp32 transforms).

Projection: the diagonal indicator matrices are an orthogonal basis of the Toeplitz subspace, so
the Frobenius-nearest Toeplitz matrix has t[d] = mean of W's d-th diagonal.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..configs import ToeplitzConfig
from ..ops import kernels_enabled
from ..ops.fft import fft_conv
from ..ops.fft.op import pick_mode
from ._fft import cached_spectrum, fast_len, real_fft_flops, work_dtype
from .base import Structure, register


@register(ToeplitzConfig)
class Toeplitz(Structure):
    def __init__(self, in_features, out_features, config=ToeplitzConfig(), *, device=None, dtype=None):
        super().__init__(in_features, out_features, config, device=device, dtype=dtype)
        self.fft_size = fast_len(in_features + out_features - 1)  # the single product's L (reference)
        self.block = _block(in_features, out_features)
        self.t = nn.Parameter(torch.empty(in_features + out_features - 1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Every entry of W is one entry of t, so nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) carries over.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.t, -bound, bound)

    def spectrum(self, dtype: torch.dtype) -> torch.Tensor:
        """rfft of t zero-padded to fft_size: [fft_size//2 + 1] complex, computed in `dtype`.
        The only place the parameters enter the forward, so a cached spectrum can replace it."""
        return torch.fft.rfft(self.t.to(dtype), n=self.fft_size)

    def window_spectrum(self, t: torch.Tensor, dtype: torch.dtype, L: int | None = None) -> torch.Tensor:
        """[1, 1, L//2 + 1] (L: fft_size unless given, >= in + out - 1): the spectrum of t times the phase
        that moves the kept window [in - 1, in - 1 + out) of the convolution to its start, so that
        y = irfft(rfft(x) K)[:out]."""
        return _shifted_spectrum(t, L or self.fft_size, self.in_features - 1, dtype).reshape(1, 1, -1)

    def product_length(self, x: torch.Tensor) -> int:
        """The L of the fused path's fft_conv for input x: 2b for a grid of blocks; else in + out - 1
        rounded up to a power of two where x takes the fp16 path at that length (it moves fewer bytes
        than any fp32 length: 2 bytes times < 2n against 4 bytes times >= n), and fft_size otherwise."""
        if self.block:
            return 2 * self.block
        pow2 = 1 << (self.in_features + self.out_features - 2).bit_length()
        return pow2 if pick_mode(x, pow2) == "packed16" else self.fft_size

    def block_spectra(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[out/b, in/b, b + 1]: block (i, j)'s window spectrum (module docstring), one per block
        diagonal i - j, computed in `dtype`."""
        b, p, q = self.block, self.out_features // self.block, self.in_features // self.block
        windows = t.unfold(0, 2 * b - 1, b)  # [p + q - 1, 2b - 1]: window k starts at k b
        K = _shifted_spectrum(windows, 2 * b, b - 1, dtype)
        diagonal = torch.arange(p, device=t.device)[:, None] - torch.arange(q, device=t.device)[None, :] + (q - 1)
        return K[diagonal]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # MKL's FFT rejects empty batches
            return x.new_zeros(*x.shape[:-1], self.out_features)
        if not kernels_enabled():
            return self.reference_forward(x)
        # mmm::fft_conv: frequency-domain backward, fused cuFFT path on CUDA (see mmm/ops/fft); the
        # spectrum is cached between calls while t is unchanged.
        work = work_dtype(x.dtype)
        if self.block:
            kernel = cached_spectrum(self, f"blocks-{work}", lambda t: self.block_spectra(t, work), self.t)
            return fft_conv(x, kernel, self.block, 2 * self.block, self.block)
        L = self.product_length(x)
        kernel = cached_spectrum(self, f"window-{work}-{L}", lambda t: self.window_spectrum(t, work, L), self.t)
        return fft_conv(x, kernel, self.in_features, L, self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The product in plain PyTorch ops, differentiated by autograd."""
        L, n = self.fft_size, self.in_features
        work = work_dtype(x.dtype)
        xf = torch.fft.rfft(x.to(work), n=L, dim=-1)
        y = torch.fft.irfft(xf * self.spectrum(work), n=L, dim=-1)
        return y[..., n - 1 : n - 1 + self.out_features].to(x.dtype)

    def _diagonal_index(self) -> torch.Tensor:
        """[out, in] index into t: entry (i, j) lies on diagonal i - j + in - 1."""
        i = torch.arange(self.out_features, device=self.t.device)
        j = torch.arange(self.in_features, device=self.t.device)
        return i[:, None] - j[None, :] + (self.in_features - 1)

    def to_dense(self) -> torch.Tensor:
        return self.t[self._diagonal_index()]

    @torch.no_grad()
    def _project(self, weight: torch.Tensor) -> None:
        idx = self._diagonal_index().flatten()
        sums = torch.zeros(self.t.numel(), device=weight.device, dtype=weight.dtype).index_add_(0, idx, weight.flatten())
        counts = torch.bincount(idx, minlength=self.t.numel())
        self.t.copy_(sums / counts)

    def flops(self, num_tokens: int) -> int:
        # Per row: an rfft of x, a complex product (6 real flops) per frequency, an irfft; for a grid of
        # blocks one rfft per input block, a complex multiply-add (8) per block and frequency, one irfft
        # per output block. The parameters' spectrum does not grow with the number of rows (and is
        # cached on the GPU path).
        if self.block:
            L, p, q = 2 * self.block, self.out_features // self.block, self.in_features // self.block
            per_row = (p + q) * real_fft_flops(L) + 8 * p * q * (L // 2 + 1)
        else:
            L = self.fft_size
            per_row = 2 * real_fft_flops(L) + 6 * (L // 2 + 1)
        return num_tokens * round(per_row)


def _block(in_features: int, out_features: int) -> int | None:
    """b of the module docstring's grid of blocks, or None for one product."""
    b = math.gcd(in_features, out_features)
    blocks = (in_features // b) * (out_features // b)
    return b if b >= 8 and b & (b - 1) == 0 and 2 <= blocks <= 16 else None


def _shifted_spectrum(t: torch.Tensor, L: int, shift: int, dtype: torch.dtype) -> torch.Tensor:
    """rfft_L of t (zero-padded, last dim) times the phase that moves the entries [shift, shift + n) of
    its circular convolution with x to the start: irfft(rfft(x) K)[:n] = (t * x)[shift : shift + n]."""
    f = torch.arange(L // 2 + 1, device=t.device, dtype=torch.float64)
    angle = (f * shift).remainder(L) * (2 * math.pi / L)  # exact integers before the division
    phase = torch.polar(torch.ones_like(angle), angle).to(torch.complex128 if dtype == torch.float64 else torch.complex64)
    return torch.fft.rfft(t.to(dtype), n=L) * phase
