"""The "dft" path of fft_conv: single-block circulant and Toeplitz products with the FFT done as
tensor-core GEMMs inside one Triton kernel per direction (dft_kernels.py explains the algorithm).

Which products it takes (`plan`): one block (kernel [1, 1, L//2 + 1]) and
- circulant-like: n_in, n_out <= L = n (one branch), or
- Toeplitz-like: L even, n_in, n_out <= L/2 = n (two branches: the even and odd frequencies of the
  length-2n transform, each a length-n four-step FFT),
with n = N1 * N2 a power of two in [256, 16384] (N1, N2 in {16, 32, 64, 128}; tl.dot needs >= 16).

Ops (torch.library custom ops with fake implementations and autograd, so torch.compile traces them):
  mmm::fft_dft_conv(x, kernel, n_in, L, n_out) -> y
  mmm::fft_dft_conv_backward(dy, x, kernel, n_in, L, need_dx, need_dkernel) -> (dx, dkernel)
The backward recomputes the input's spectrum from x (saved instead of a spectrum: no extra memory).
dx is the same kernel with the conjugate spectrum; the kernel's gradient comes from
S = sum over pairs of W conj(U) (U, W: DFTs of the packed x and dy pairs): the cross terms between
the two tokens of a pair are i times a Hermitian spectrum, so the Hermitian part of S,
P[k] = (S[k] + conj(S[-k])) / 2, is sum_t DY_t conj(X_t), and dkernel = (w_f / L) P (naive.py).
"""

from __future__ import annotations

import functools
import math

import torch

from .naive import hermitian_weights

try:
    import triton

    from . import dft_kernels
    from .kernels import INTERPRET

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
    INTERPRET = False

BOUND = 2.0**14  # ||s z||_2 of a scaled pair: every intermediate stays below it (fp16 max 65504)
SIZES = tuple(1 << k for k in range(8, 15))  # n = N1 * N2


def factor(n: int) -> tuple[int, int] | None:
    """(N1, N2) with N1 * N2 = n, both in [16, 128], N1 >= N2; None when n is not such a size."""
    if n not in SIZES:
        return None
    n1 = 1 << ((n.bit_length()) // 2)
    return n1, n // n1


def plan(p: int, q: int, n_in: int, L: int, n_out: int) -> tuple[int, int, int] | None:
    """(N1, N2, branches) for this product, or None when the dft path cannot take it."""
    if p != 1 or q != 1:
        return None
    # two branches of n = L/2 first where the rows fit: n (N1 + N2) x 2 is less work than L (N1' + N2')
    if L % 2 == 0 and L // 2 in SIZES and n_in <= L // 2 and n_out <= L // 2:
        return (*factor(L // 2), 2)
    if L in SIZES and n_in <= L and n_out <= L:
        return (*factor(L), 1)
    return None


def _config(n1: int, n2: int, nb: int) -> dict:
    """Row blocks (BK: phase 1 of the product, BN: its phase 2, BKC: the kernel's gradient), the chunk
    KC that streams the other operands, warps and persistent programs per SM. Under the interpreter
    one block (its cost grows with loop steps). On the GPU the configs with the fewest register
    spills for sm_90 (scripts/gpu_fft_dft.py --ptxas): at 128 x 128, phase 1 in 32-row blocks
    (mma.sync) and phase 2 whole (wgmma; each of E and F1^H read once): 0-24 B of spills; 64-row
    phase-1 blocks would take wgmma but spill 0.4-1.3 KB. At 64 x 64 the same shape on one warpgroup,
    two programs per SM: no spills (64-row phase-1 blocks: wgmma, 8-270 B). Untimed:
    scripts/gpu_fft_dft.py sweeps alternatives at 128 x 128."""
    if INTERPRET:
        return dict(BK=n1, BN=n1, KC=n2, num_warps=4, progs_per_sm=1, BKC=n1, corr_warps=4)
    if n1 * n2 >= 8192:
        return dict(BK=32, BN=128, KC=32, num_warps=8, progs_per_sm=1, BKC=32, corr_warps=8)
    return dict(BK=min(n1, 32), BN=n1, KC=min(n2, 32), num_warps=4, progs_per_sm=2, BKC=min(n1, 32), corr_warps=4)


CONFIG_OVERRIDE: dict | None = None  # set by scripts/gpu_fft_dft.py to time other configs
# dx and the kernel's gradient in one pass (the dx kernel has DFT(dy) already and recomputes DFT(x)),
# else the gradient by its own kernel (both DFTs again); scripts/gpu_fft_dft.py times both
FUSED_BACKWARD = True


def config(n1: int, n2: int, nb: int) -> dict:
    if CONFIG_OVERRIDE is None:
        return _config(n1, n2, nb)
    # blocks no larger than the tile (larger ones would read and write past the tables); KC chunks
    # both the rows (N1) and the columns (N2)
    cfg = {**_config(n1, n2, nb), **CONFIG_OVERRIDE}
    return {**cfg, **{k: min(cfg[k], n1) for k in ("BK", "BN", "BKC")}, "KC": min(cfg["KC"], n1, n2)}


def _angle(num: torch.Tensor, den: int) -> torch.Tensor:
    """2 pi num / den in fp64 with num reduced mod den first (exact integers, accurate angles)."""
    return (num % den).double() * (2 * math.pi / den)


def _ri(z: torch.Tensor) -> torch.Tensor:
    return torch.stack([z.real, z.imag], dim=-3)


@functools.lru_cache(maxsize=32)
def tables(n1: int, n2: int, nb: int, device: str, dtype: torch.dtype):
    """DFT tables of dft_kernels.py in `dtype`, (re, im) pairs: F1 [nb, 2, n1, n1], F1^H likewise,
    F2 [2, n2, n2], TW [nb, 2, n1, n2]. Branch 1 (Toeplitz odd frequencies) has phi folded in."""
    n = n1 * n2
    k1, k2 = torch.arange(n1), torch.arange(n2)

    def e(num, den):  # exp(-2 pi i num / den)
        return torch.polar(torch.ones(num.shape, dtype=torch.float64), -_angle(num, den))

    f2 = e(k2[:, None] * k2[None, :], n2) / math.sqrt(n2)
    f1, tw = [], []
    for b in range(nb):  # phi[N2 n1 + n2] = exp(-i pi b n1 / N1) exp(-i pi b n2 / n)
        f1.append(e(k1[:, None] * k1[None, :] * 2 + b * k1[None, :], 2 * n1) / math.sqrt(n1))
        tw.append(e(k1[:, None] * k2[None, :] * 2 + b * k2[None, :], 2 * n))
    f1 = torch.stack(f1)
    out = (_ri(f1), _ri(f1.conj_physical().transpose(-1, -2)), _ri(f2), _ri(torch.stack(tw)))
    return tuple(t.to(device=device, dtype=dtype).contiguous() for t in out)


def _full_spectrum(kernel: torch.Tensor, L: int) -> torch.Tensor:
    """kernel [L//2 + 1] complex -> the Hermitian [L] spectrum irfft uses (DC and Nyquist real).
    conj_physical, not conj, here and below: inside a custom op called under a dispatch mode
    (torch.compile, opcheck) torch.cat dropped a lazy conj view's conjugation (torch 2.13, CPU)."""
    k = kernel.to(torch.complex64)
    dc, rest = k[:1].real.to(k.dtype), k[1:]
    if L % 2 == 0:
        mid = rest[-1:].real.to(k.dtype)
        return torch.cat([dc, rest[:-1], mid, rest[:-1].flip(0).conj_physical()])
    return torch.cat([dc, rest, rest.flip(0).conj_physical()])


def _spectrum_table(kernel: torch.Tensor, L: int, n1: int, n2: int, nb: int, conj: bool):
    """The spectrum in the kernels' layout, [nb, 2, n1, n2] fp32 with entry (b, k1, k2) = K[nb j + b] /
    nb (j = k1 + n1 k2; 1/nb: the two Toeplitz branches are halves), scaled by g = 2^k so that
    max |.| <= 1, and 1/g as a [1] tensor (no host sync)."""
    K = _full_spectrum(kernel, L)
    if conj:
        K = K.conj_physical()
    K = K.reshape(n2, n1, nb).permute(2, 1, 0) / nb  # [b, k1, k2] = K[nb (k1 + n1 k2) + b]
    peak = K.abs().amax().clamp_min(1e-30)
    g = torch.exp2(torch.floor(torch.log2(1.0 / peak)).clamp(-100, 100))
    table = torch.stack([K.real, K.imag], dim=1) * g
    return table.float().contiguous(), (1.0 / g).reshape(1).float()


WORK_DTYPE: torch.dtype | None = None  # tests: fp16 GEMM operands under the interpreter as well


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """fp16 GEMM operands for bf16/fp16 x on the GPU; fp32 for fp32 x and under the interpreter (tests
    compare it with fp32 references; WORK_DTYPE there checks the fp16 arithmetic)."""
    if WORK_DTYPE is not None:
        return WORK_DTYPE
    return torch.float32 if INTERPRET or x.dtype == torch.float32 else torch.float16


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def conv(x: torch.Tensor, kernel: torch.Tensor, n_in: int, L: int, n_out: int, conj: bool = False,
         u: torch.Tensor | None = None, n_u: int = 0):
    """y [N, n_out] = first n_out of irfft_L(rfft_L(x padded) * K) for x [N, n_in] (unit stride along
    rows); with `conj`, K conjugated (the adjoint). With `u` [N, n_u] (the backward: x = dy, u = the
    forward's input), also the kernel's gradient from the same pass: returns (y, dkernel)."""
    n1, n2, nb = plan(1, 1, n_in, L, n_out)
    N = x.shape[0]
    n_pairs = (N + 1) // 2
    dt = _work_dtype(x)
    f1, f1h, f2, tw = tables(n1, n2, nb, str(x.device), dt)
    ktab, gain = _spectrum_table(kernel, L, n1, n2, nb, conj)
    cfg = config(n1, n2, nb)
    grid = max(1, min(n_pairs, _num_sms(x.device) * cfg["progs_per_sm"]))
    scratch = torch.empty(grid, nb, 2, n1, n2, device=x.device, dtype=dt)
    corr = u is not None
    part = torch.zeros(grid if corr else 1, nb, 2, n1, n2, device=x.device, dtype=torch.float32)
    stash = torch.empty(grid if corr else 1, 2, cfg["BK"], n2, device=x.device, dtype=torch.float32)
    # the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even): round in torch there
    truncating = INTERPRET and x.dtype == torch.bfloat16
    y = torch.empty(N, n_out, device=x.device, dtype=torch.float32 if truncating else x.dtype)
    dft_kernels.dft_conv_kernel[(grid,)](
        x, y, f1, f1h, f2, tw, ktab, gain, scratch, u if corr else x, part, stash,
        N, n_pairs, n_in, n_out, x.stride(0), y.stride(0), n_u if corr else 0, u.stride(0) if corr else 0,
        N1=n1, N2=n2, NB=nb, BK=cfg["BK"], BN=cfg["BN"], KC=cfg["KC"], CORR=corr, BOUND=BOUND,
        PREC="ieee" if dt == torch.float32 else "tf32", num_warps=cfg["num_warps"])
    y = y.to(x.dtype) if truncating else y
    return (y, _dkernel(part, L, n1, n2, nb)) if corr else y


def _dkernel(part: torch.Tensor, L: int, n1: int, n2: int, nb: int) -> torch.Tensor:
    """dkernel [L//2 + 1] complex64 = (w_f / L) sum_t conj(X_t) DY_t from the kernels' partial sums
    [programs, nb, 2, n1, n2] of the unitary W conj(U) (see the module docstring)."""
    s = part.sum(0)  # a fixed order: deterministic
    S = torch.complex(s[:, 0], s[:, 1])  # [b, k1, k2] = unitary S_b[k1 + n1 k2]
    S = S.permute(2, 1, 0).reshape(L) * (L // nb)  # full length-L order nb j + b, non-unitary
    P = 0.5 * (S + S.roll(-1).flip(0).conj_physical())  # S[-k] = S[(L - k) mod L]
    return P[: L // 2 + 1] * (hermitian_weights(L, part.device) / L)


def corr(x: torch.Tensor, dy: torch.Tensor, n_in: int, L: int, n_out: int) -> torch.Tensor:
    """dkernel [L//2 + 1] complex64 = (w_f / L) sum_t conj(X_t) DY_t (naive.conv_backward), alone."""
    n1, n2, nb = plan(1, 1, n_in, L, n_out)
    N = x.shape[0]
    n_pairs = (N + 1) // 2
    dt = _work_dtype(x)
    f1, _, f2, tw = tables(n1, n2, nb, str(x.device), dt)
    cfg = config(n1, n2, nb)
    blocks = n1 // cfg["BKC"]
    # about 4 programs per SM, each a chunk of pairs; more chunks would only grow the partial sums
    chunks = max(1, min(n_pairs, triton.cdiv(4 * _num_sms(x.device), blocks * nb)))
    per_chunk = triton.cdiv(n_pairs, chunks)
    chunks = triton.cdiv(n_pairs, per_chunk)
    part = torch.zeros(chunks, nb, 2, n1, n2, device=x.device, dtype=torch.float32)
    stash = torch.empty(blocks * chunks * nb, 2, cfg["BKC"], n2, device=x.device, dtype=torch.float32)
    dft_kernels.dft_corr_kernel[(blocks, chunks, nb)](
        x, dy, f1, f2, tw, part, stash, N, n_pairs, n_in, n_out, x.stride(0), dy.stride(0), per_chunk,
        N1=n1, N2=n2, BK=cfg["BKC"], KC=cfg["KC"], BOUND=BOUND, PREC="ieee" if dt == torch.float32 else "tf32",
        num_warps=cfg["corr_warps"])
    return _dkernel(part, L, n1, n2, nb)


# --------------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("mmm::fft_dft_conv", mutates_args=())
def dft_conv_op(x: torch.Tensor, kernel: torch.Tensor, n_in: int, L: int, n_out: int) -> torch.Tensor:
    """x [N, n_in], kernel [1, 1, L//2 + 1] complex -> y [N, n_out] in x's dtype."""
    return conv(x, kernel[0, 0], n_in, L, n_out)


@dft_conv_op.register_fake
def _(x, kernel, n_in, L, n_out):
    return x.new_empty(x.shape[0], n_out)


@torch.library.custom_op("mmm::fft_dft_conv_backward", mutates_args=())
def dft_conv_backward_op(dy: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, n_in: int, L: int,
                         need_dx: bool, need_dkernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [N, n_in] or empty, dkernel like kernel or empty) from dy [N, n_out]."""
    n_out = dy.shape[1]
    if need_dx and need_dkernel and FUSED_BACKWARD:
        dx, dk = conv(dy, kernel[0, 0], n_out, L, n_in, conj=True, u=x, n_u=n_in)
    else:
        dx = conv(dy, kernel[0, 0], n_out, L, n_in, conj=True) if need_dx else dy.new_empty(0)
        dk = corr(x, dy, n_in, L, n_out) if need_dkernel else None
    return dx, (dk.to(kernel.dtype).reshape(kernel.shape) if need_dkernel else kernel.new_empty(0))


@dft_conv_backward_op.register_fake
def _(dy, x, kernel, n_in, L, need_dx, need_dkernel):
    dx = dy.new_empty(dy.shape[0], n_in) if need_dx else dy.new_empty(0)
    return dx, (kernel.new_empty(kernel.shape) if need_dkernel else kernel.new_empty(0))


def _setup(ctx, inputs, output):
    x, kernel, n_in, L, n_out = inputs
    ctx.save_for_backward(x, kernel)
    ctx.n_in, ctx.L = n_in, L


def _backward(ctx, dy):
    x, kernel = ctx.saved_tensors
    need_dx, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dx or need_dk):
        return None, None, None, None, None
    dx, dk = dft_conv_backward_op(dy.contiguous(), x, kernel, ctx.n_in, ctx.L, need_dx, need_dk)
    return (dx if need_dx else None), (dk if need_dk else None), None, None, None


dft_conv_op.register_autograd(_backward, setup_context=_setup)
