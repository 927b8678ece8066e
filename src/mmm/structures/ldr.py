"""Low displacement rank (Toeplitz-like) weights, after Sindhwani, Sainath & Kumar (2015),
"Structured transforms for small-footprint deep learning", and Pan's displacement-structure theory.

W is a grid of square g x g blocks. With Z_f the unit down-shift with f in the top-right corner and
Z_f(v) = sum_k v[k] Z_f^k the f-circulant with first column v, each block is

    M = sum_{i < r} Z_1(g_i) Z_{-1}(h_i),        parameters G, H: [out/g, in/g, r, g].

Why this family is "displacement rank <= r": Z_1 commutes with Z_1(g), Z_{-1} with Z_{-1}(h), and
Z_1 - Z_{-1} = 2 e_0 e_{g-1}^T, so

    Z_1 M - M Z_{-1} = sum_i Z_1(g_i) (Z_1 - Z_{-1}) Z_{-1}(h_i) = 2 sum_i g_i (J h_i)^T,

J the reversal (the last row of Z_{-1}(h) is J h). The operator M -> Z_1 M - M Z_{-1} is invertible
(the eigenvalues of Z_1 and Z_{-1}, the g-th roots of 1 and of -1, are disjoint), so every block
whose displacement has rank <= r is of this form: Toeplitz matrices and inverses of Toeplitz
matrices (rank 2), circulant and skew-circulant ones (rank 1), and sums of such (ranks add).

Forward, O(r g log g) per block and row, as two products of `mmm.ops.fft.fft_conv` (the circulant
and Toeplitz layers' op: fused cuFFT path on CUDA, frequency-domain backward, nothing recomputed):
 1. u_{o,j,i} = Z_{-1}(h_{o,j,i}) x_j for every block (o, j) and rank term i. A skew-circulant is a
    Toeplitz matrix (entry (a, b) is h[a - b] for a >= b, -h[a - b + g] below), so u is the first g
    entries of the circular convolution of length 2g of x_j, zero-padded, with [h, -h]. That kernel
    is anti-periodic, so its even frequencies are zero, and fft_conv(odd=True) transforms rows of g,
    not 2g (the odd frequencies only);
 2. y_o = sum_{j,i} Z_1(g_{o,j,i}) u_{o,j,i}: block circulants of length g, summed over the
    intermediate blocks in the frequency domain.
u is [tokens, out/g * in/g * r * g] in x's dtype (one more rounding for bf16/fp16: y and dx stay
within 1.1x and G, H's gradients within 1.3x of PyTorch's own bf16 error for the dense product, CPU
emulation of the fp16 FFTs). The backward keeps the two ops' saved spectra, x's at length 2g and u's:
r + 2 times x's size on the fp16 path of a square layer.
Blocks that do not meet (o != o' or j != j') get zero kernels: with several input blocks step 1's
spectral products do in/g times the needed work, with several output blocks step 2's out/g times
(square layers have one block, the default). The plain PyTorch reference (`_product`, used by
`reference_forward`) computes the same product per term instead: Z_{-1}(h) x is a skew-circular
convolution, a circular one after scaling by w^k, w = exp(i pi / g) a 2g-th root of unity:
Z_{-1}(h) x = w^-k * ifft(fft(w^k h) fft(w^k x)), then each Z_1(g) term through rfft / irfft.

to_dense, O(r g^2) per block without building either factor: the displacement equation read column
by column, M[:, b+1] = Z_1 M[:, b] - D[:, b], unrolls (see `_dense_blocks`) into a cumulative sum.

Projection. The Frobenius-nearest LDR matrix has no closed form: in the Fourier bases that
diagonalise Z_1 and Z_{-1} (a unitary change of basis, so norms are kept) a block becomes
P o (A^T B), a fixed matrix P times, entrywise, a rank-r matrix built from the parameters' spectra,
so the fit is a weighted low-rank approximation, a problem without a closed form in general. Hence:
 1. per block, the displacement D = Z_1 W - W Z_{-1} truncated to rank r by SVD, D_r = U S V^T,
    gives g_i = u_i sqrt(s_i / 2), h_i = J v_i sqrt(s_i / 2). This is exact when W already has
    displacement rank <= r; for other W it is only a start (it is the unweighted version of the
    weighted problem, and can be far from optimal: worse than the zero matrix on random W);
 2. from it, a deterministic L-BFGS (strong Wolfe line search) fit of ||W - M(G, H)||_F over all
    parameters, in fp64, run in chunks of 50 iterations until a chunk lowers the loss by less than
    1e-12 relative (a stationary point), at most 1000 iterations. The better of 1 and 2 is kept.
    The result is a local optimum, not a certified global one. Each iteration costs O(r in out)
    (see `_dense_blocks`), so large layers on a CPU take a while.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .._checks import check_last_dim
from ..configs import LDRConfig
from ..ops import kernels_enabled
from ..ops.fft import fft_conv
from ._fft import blocks_of, cached_spectrum, from_blocks, real_fft_flops, work_dtype
from .base import Structure, register

# The projection's L-BFGS refinement runs in chunks of _REFINE_CHUNK iterations until a chunk lowers
# the relative loss by less than _REFINE_STALL (relative), or _REFINE_ITERS iterations in all.
_REFINE_ITERS = 1000
_REFINE_CHUNK = 50
_REFINE_STALL = 1e-12


def _twiddle(g: int, dtype: torch.dtype, device) -> torch.Tensor:
    """w^k = exp(i pi k / g), k < g, as a complex tensor matching the real `dtype`."""
    angle = torch.arange(g, device=device, dtype=torch.float64) * (math.pi / g)
    w = torch.polar(torch.ones_like(angle), angle)
    return w.to(torch.complex128 if dtype == torch.float64 else torch.complex64)


def _spectra(G: torch.Tensor, H: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    w = _twiddle(G.shape[-1], dtype, G.device)
    return torch.fft.rfft(G.to(dtype), dim=-1), torch.fft.fft(H.to(dtype) * w, dim=-1)


def _product(x: torch.Tensor, gf: torch.Tensor, hf: torch.Tensor, out_features: int) -> torch.Tensor:
    """y [N, out] = sum over blocks and rank terms of Z_1(g) Z_{-1}(h) x_j, from x [N, in] in the
    spectra's real dtype and the spectra of `_spectra`."""
    g = hf.shape[-1]
    N = x.shape[0]
    w = _twiddle(g, x.dtype, x.device)
    xf = torch.fft.fft(x.reshape(N, -1, g) * w, dim=-1)  # [N, q, g]
    # Skew-circulant products Z_{-1}(h) x_j for every block and rank term: [N, p, q, r, g].
    u = (torch.fft.ifft(hf * xf.unsqueeze(-2).unsqueeze(-4), dim=-1) * w.conj()).real
    # Circulant products Z_1(g) u, summed over input blocks and rank terms in frequency space.
    yf = (gf * torch.fft.rfft(u, dim=-1)).sum(dim=(-3, -2))  # [N, p, g//2 + 1]
    return torch.fft.irfft(yf, n=g, dim=-1).reshape(N, out_features)


def _factor_kernels(G: torch.Tensor, H: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two fft_conv kernels of the forward (module docstring), from G, H [p, q, r, g]:
    step 1's [p q r, q, g + 1] (length 2g: rfft of [h, -h], placed at the block's own input j) and
    step 2's [p, p q r, g//2 + 1] (length g: rfft of g, placed at the block's own output o)."""
    p, q, r, g = G.shape
    skew = torch.fft.rfft(torch.cat([H, -H], dim=-1).to(dtype), dim=-1)  # [p, q, r, g + 1]
    eye_q = torch.eye(q, device=G.device, dtype=dtype)
    k1 = skew[:, :, :, None, :] * eye_q[None, :, None, :, None]  # [p, q, r, q', F]
    circ = torch.fft.rfft(G.to(dtype), dim=-1)  # [p, q, r, g//2 + 1]
    eye_p = torch.eye(p, device=G.device, dtype=dtype)
    k2 = eye_p[:, :, None, None, None] * circ[None]  # [p, p', q, r, F]
    return k1.reshape(p * q * r, q, g + 1), k2.reshape(p, p * q * r, g // 2 + 1)


def _dense_blocks(G: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The blocks sum_i Z_1(G[..., i, :]) Z_{-1}(H[..., i, :]) of G, H [..., r, g]: [..., g, g].

    With D = Z_1 M - M Z_{-1} = 2 sum_i g_i (J h_i)^T, the columns satisfy M[:, b+1] = roll(M[:, b], 1)
    - D[:, b]. In unrolled coordinates N[a, b] = M[(a + b) mod g, b] this is
    N[:, b+1] = N[:, b] - E[:, b] with E[a, c] = D[(a + c + 1) mod g, c], and the first column is
    M e_0 = sum_i Z_1(g_i) h_i = (1/2) sum_c E[:, c]. Hence, with F = E / 2,
    N[:, b] = sum_{c >= b} F[:, c] - sum_{c < b} F[:, c].
    """
    g = G.shape[-1]
    # F[a, c] = sum_i g_i[(a + c + 1) mod g] h_i[g - 1 - c]; row a of the Hankel factor is a window
    # of [g_i, g_i] starting at a + 1 (a strided view, nothing copied).
    hankel = torch.cat([G, G], dim=-1).unfold(-1, g, 1)[..., 1 : g + 1, :]  # [..., r, g, g]
    F = (hankel * H.flip(-1)[..., None, :]).sum(dim=-3)
    before = F.cumsum(-1) - F  # sum_{c < b}
    N = F.sum(-1, keepdim=True) - 2 * before
    k = torch.arange(g, device=G.device)
    return N.gather(-2, ((k[:, None] - k[None, :]) % g).expand(N.shape))  # M[x, b] = N[(x - b) mod g, b]


@register(LDRConfig)
class LDR(Structure):
    def __init__(self, in_features, out_features, config=LDRConfig(), *, device=None, dtype=None):
        super().__init__(in_features, out_features, config, device=device, dtype=dtype)
        g = config.resolved_block_size(in_features, out_features)
        self.block_size = g
        self.rank = config.rank
        shape = (out_features // g, in_features // g, config.rank, g)
        self.G = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.H = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # An entry of W is a sum of r * g products G[., i, .] * H[., i, .] of distinct independent
        # entries, so its variance is r g var(G) var(H); both get the same std so that it is 1/(3 in).
        std = (3.0 * self.in_features * self.rank * self.block_size) ** -0.25
        nn.init.normal_(self.G, std=std)
        nn.init.normal_(self.H, std=std)

    def spectrum(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(rfft(G) [out/g, in/g, r, g//2 + 1], fft(w^k H) [out/g, in/g, r, g]), complex, computed in
        `dtype`: the circulant and the (scaled) skew-circulant factors' eigenvalues, as the plain
        reference (`reference_forward`) takes them."""
        return _spectra(self.G, self.H, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # MKL's FFT rejects empty batches
            return x.new_zeros(*x.shape[:-1], self.out_features)
        if not kernels_enabled():
            return self.reference_forward(x)
        # Two mmm::fft_conv products (module docstring); their kernels are cached between calls while
        # G and H are unchanged.
        g, work = self.block_size, work_dtype(x.dtype)
        skew, circ = cached_spectrum(self, f"ldr-{work}", lambda G, H: _factor_kernels(G, H, work), self.G, self.H)
        u = fft_conv(x, skew, g, 2 * g, g, odd=True)
        return fft_conv(u, circ, g, g, g)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The product in one piece in plain PyTorch ops, differentiated by autograd: it holds
        [tokens, out/g, in/g, r, g] complex intermediates."""
        check_last_dim("x", x, self.in_features)
        gf, hf = self.spectrum(work_dtype(x.dtype))
        lead = x.shape[:-1]
        y = _product(x.reshape(-1, self.in_features).to(gf.real.dtype), gf, hf, self.out_features)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def to_dense(self) -> torch.Tensor:
        # Half precisions are summed in fp32 (the cumulative sum would lose too much) and cast back.
        work = work_dtype(self.G.dtype)
        return from_blocks(_dense_blocks(self.G.to(work), self.H.to(work))).to(self.G.dtype)

    @torch.no_grad()
    def _project(self, weight: torch.Tensor) -> None:
        r = self.rank
        # fp64 throughout: the refinement's stopping tests sit far below fp32's resolution.
        blocks = blocks_of(weight.double(), self.block_size)
        # Displacement Z_1 W - W Z_{-1}: rows rolled down by one; columns shifted left, -first last.
        shifted = torch.cat([blocks[..., 1:], -blocks[..., :1]], dim=-1)
        U, S, Vh = torch.linalg.svd(blocks.roll(1, dims=-2) - shifted)
        root = (S[..., :r] / 2).sqrt()
        G0 = (U[..., :r] * root[..., None, :]).transpose(-1, -2).contiguous()
        H0 = (Vh[..., :r, :] * root[..., :, None]).flip(-1).contiguous()
        G, H = _refine(blocks, G0, H0)
        self.G.copy_(G)
        self.H.copy_(H)

    def flops(self, num_tokens: int) -> int:
        # Per row, the forward's two fft_conv products: a transform of length g per input block (the
        # twisted one of the skew step: a real FFT's cost); per block and rank term a complex product
        # (8 real flops with the sum) per frequency of each product (g/2 odd ones, then g/2 + 1), an
        # inverse transform of length g (skew) and a real FFT of length g; an inverse real FFT of length
        # g per output block. The zero kernels of blocks that do not meet are left out (they cost
        # bandwidth, not arithmetic worth counting), and so are the parameters' spectra (cached).
        g, r = self.block_size, self.rank
        p, q = self.out_features // g, self.in_features // g
        per_term = 8 * (g // 2) + 2 * real_fft_flops(g) + 8 * (g // 2 + 1)
        per_row = q * real_fft_flops(g) + p * q * r * per_term + p * real_fft_flops(g)
        return num_tokens * round(per_row)


def _refine(blocks: torch.Tensor, G0: torch.Tensor, H0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS on ||blocks - M(G, H)||_F^2 / ||blocks||_F^2 from (G0, H0); returns the better of start
    and result."""
    scale = blocks.pow(2).sum().clamp_min(torch.finfo(blocks.dtype).tiny)

    def loss_of(G, H):
        return (_dense_blocks(G, H) - blocks).pow(2).sum() / scale

    G = G0.clone().requires_grad_(True)
    H = H0.clone().requires_grad_(True)
    with torch.enable_grad():
        opt = torch.optim.LBFGS(
            [G, H], lr=1.0, max_iter=_REFINE_CHUNK, history_size=50,
            tolerance_grad=1e-12, tolerance_change=1e-16, line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = loss_of(G, H)
            loss.backward()
            return loss

        previous = math.inf
        # minutes for a 1024 x 1024 layer on a 2-core CPU: shown on a terminal (tqdm's disable=None)
        bar = tqdm(total=_REFINE_ITERS, desc="LDR projection (L-BFGS)", unit="it", leave=False, disable=None)
        for _ in range(_REFINE_ITERS // _REFINE_CHUNK):
            start = float(opt.step(closure).detach())  # the loss where this chunk starts (the last one ended)
            bar.update(_REFINE_CHUNK)
            bar.set_postfix(rel_err=f"{math.sqrt(start):.4g}", refresh=False)
            if previous - start <= _REFINE_STALL * start:
                break
            previous = start
        bar.close()
    G, H = G.detach(), H.detach()
    if loss_of(G, H) <= loss_of(G0, H0):
        return G, H
    return G0, H0
