"""The FFT product of the circulant and Toeplitz layers in plain PyTorch: the ground truth for the
fused path, and the path taken on CPU, in fp64 and for odd FFT lengths.

One operation covers both structures. x [N, q * n_in] is read as q input blocks of length n_in; each
is zero-padded to length L; output block i is the first n_out entries of the circular convolution

    y_i = irfft_L( sum_j rfft_L(x_j) * K[i, j] )[:n_out],        K [p, q, L//2 + 1] complex.

Circulant: L = n_in = n_out = block size, K = rfft(c). Toeplitz: p = q = 1, L >= in + out - 1, and K
is rfft of the padded diagonals times the phase that shifts the kept window to the start.

Backward (all in the frequency domain, X = rfft_L(x_j) saved from the forward, DY = rfft_L(dy_i)):
  dx_j = irfft_L( sum_i DY_i * conj(K[i, j]) )[:n_in]          (the adjoint: kernel conj(K)^T)
  dK[i, j] = (w_f / L) sum_tokens conj(X_j) * DY_i           (one reduction over tokens)
with w_f = 2 for the frequencies that stand for a conjugate pair and 1 for DC and Nyquist, which is
what the gradient of irfft gives in PyTorch's convention for complex gradients.
"""

from __future__ import annotations

import torch


def hermitian_weights(L: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """w_f of the docstring: [L//2 + 1]; 2 except at DC and (for even L) Nyquist. Built by device ops
    only: item assignments (w[0] = 1.0) copy from the host and synchronize with a CUDA device."""
    f = torch.arange(L // 2 + 1, device=device)
    return torch.where((f == 0) | (2 * f == L), 1.0, 2.0).to(dtype)


def odd_frequencies(kernel: torch.Tensor) -> torch.Tensor:
    """The kernel with its even frequencies zeroed (fft_conv's odd=True): with L = 2n, the product is
    then the skew-circular convolution of length n (anti-periodic: y[a] = sum_b k[a - b] x[b] with
    k[m - n] = -k[m]) for n_in, n_out <= n."""
    f = torch.arange(kernel.shape[-1], device=kernel.device)
    return kernel * (f % 2 == 1).to(kernel.real.dtype)


def mix(X: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """sum_j X[:, j] * K[i, j] per frequency: X [N, q, F], K [p, q, F] -> [N, p, F]. A loop over the
    input blocks of broadcast products: einsum's batched complex matmul (one per frequency) ran up to
    7x slower on CPU (as fast with one input block and many tokens)."""
    out = X[:, :1] * K[:, 0]
    for j in range(1, X.shape[1]):
        out = out + X[:, j : j + 1] * K[:, j]
    return out


def correlate(X: torch.Tensor, DY: torch.Tensor) -> torch.Tensor:
    """sum over tokens of conj(X_j) DY_i per frequency: X [N, q, F], DY [N, p, F] -> [p, q, F] (a loop over
    j, as `mix`: einsum's batched complex matmul was 4-12x slower on CPU)."""
    Xc = X.conj_physical()
    return torch.stack([(Xc[:, j : j + 1] * DY).sum(0) for j in range(X.shape[1])], dim=1)


def conv_forward(x: torch.Tensor, kernel: torch.Tensor, n_in: int, L: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y [N, p * n_out] (x's dtype) and the input spectrum X [N, q, L//2 + 1] (kept for backward)."""
    N = x.shape[0]
    p, q, _ = kernel.shape
    work = kernel.real.dtype
    X = torch.fft.rfft(x.to(work).reshape(N, q, n_in), n=L, dim=-1)
    y = torch.fft.irfft(mix(X, kernel), n=L, dim=-1)[..., :n_out]
    return y.reshape(N, p * n_out).to(x.dtype).contiguous(), X


def conv_backward(dy: torch.Tensor, X: torch.Tensor, kernel: torch.Tensor, n_in: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [N, q * n_in] in dy's dtype, dK [p, q, L//2 + 1] complex) from dy [N, p * n_out]."""
    N = dy.shape[0]
    p, q, _ = kernel.shape
    work = kernel.real.dtype
    DY = torch.fft.rfft(dy.to(work).reshape(N, p, -1), n=L, dim=-1)
    # conj_physical, not conj: inside the custom op run under a dispatch mode (FlopCounterMode, op
    # loggers) torch 2.13 on CPU lost the lazy conjugate bit and returned a wrong dx
    dx = torch.fft.irfft(mix(DY, kernel.conj_physical().transpose(0, 1)), n=L, dim=-1)[..., :n_in]
    dK = correlate(X, DY) * (hermitian_weights(L, DY.device, work) / L)
    return dx.reshape(N, q * n_in).to(dy.dtype).contiguous(), dK
