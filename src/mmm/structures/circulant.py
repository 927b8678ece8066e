"""Circulant and block-circulant weights.

W is a grid of (out/g) x (in/g) circulant blocks of size g; block (i, j) is defined by its first
column c[i, j] and has entries C[r, s] = c[i, j, (r - s) mod g]. A circulant is diagonalised by the
DFT, so the product costs one real FFT per input block, a pointwise product with the blocks'
spectra summed over input blocks, and one inverse FFT per output block: O(n log n) per row, the
dense matrix is never built.

Projection: the circulant matrices of one block form a linear subspace with an orthogonal basis
(the wrapped-diagonal indicator matrices), so the Frobenius-nearest block is the one whose c[k] is
the mean of the block's k-th wrapped diagonal.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..configs import CirculantConfig
from ..ops import kernels_enabled
from ..ops.fft import fft_conv
from ._fft import blocks_of, cached_spectrum, from_blocks, real_fft_flops, work_dtype
from .base import Structure, register


def _wrapped_diagonal_index(g: int, device) -> torch.Tensor:
    """[g, g] index: entry (r, s) lies on wrapped diagonal (r - s) mod g."""
    k = torch.arange(g, device=device)
    return (k[:, None] - k[None, :]) % g


@register(CirculantConfig)
class Circulant(Structure):
    def __init__(self, in_features, out_features, config=CirculantConfig(), *, device=None, dtype=None):
        super().__init__(in_features, out_features, config, device=device, dtype=dtype)
        g = config.resolved_block_size(in_features, out_features)
        self.block_size = g
        self.c = nn.Parameter(torch.empty(out_features // g, in_features // g, g, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Every entry of W is one entry of c, so nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) carries over.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.c, -bound, bound)

    def spectrum(self, dtype: torch.dtype) -> torch.Tensor:
        """The blocks' eigenvalues, rfft(c): [out/g, in/g, g//2 + 1] complex, computed in `dtype`.
        The only place the parameters enter the forward, so a cached spectrum can replace it."""
        return torch.fft.rfft(self.c.to(dtype), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # MKL's FFT rejects empty batches
            return x.new_zeros(*x.shape[:-1], self.out_features)
        if not kernels_enabled():
            return self.reference_forward(x)
        # mmm::fft_conv: frequency-domain backward, fused cuFFT path on CUDA (see mmm/ops/fft); the
        # spectrum is cached between calls while c is unchanged.
        g, work = self.block_size, work_dtype(x.dtype)
        kernel = cached_spectrum(self, f"rfft-{work}", lambda c: torch.fft.rfft(c.to(work), dim=-1), self.c)
        return fft_conv(x, kernel, g, g, g)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The product in plain PyTorch ops, differentiated by autograd."""
        g = self.block_size
        work = work_dtype(x.dtype)
        lead = x.shape[:-1]
        xf = torch.fft.rfft(x.to(work).reshape(*lead, self.in_features // g, g), dim=-1)
        yf = torch.einsum("...jf,ijf->...if", xf, self.spectrum(work))
        y = torch.fft.irfft(yf, n=g, dim=-1)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def to_dense(self) -> torch.Tensor:
        return from_blocks(self.c[:, :, _wrapped_diagonal_index(self.block_size, self.c.device)])

    @torch.no_grad()
    def _project(self, weight: torch.Tensor) -> None:
        g = self.block_size
        k = torch.arange(g, device=weight.device)
        rows = k[None, :].expand(g, g)  # [diagonal k, row r]: entry (r, (r - k) mod g)
        cols = (k[None, :] - k[:, None]) % g
        self.c.copy_(blocks_of(weight, g)[:, :, rows, cols].mean(dim=-1))

    def flops(self, num_tokens: int) -> int:
        # Per row: an rfft per input block, a complex multiply-add (8 real flops) per block and
        # frequency, an irfft per output block. The parameters' spectrum does not grow with the
        # number of rows (and is cached on the GPU path), so it is left out.
        g = self.block_size
        p, q = self.out_features // g, self.in_features // g
        per_row = (p + q) * real_fft_flops(g) + 8 * p * q * (g // 2 + 1)
        return num_tokens * round(per_row)
