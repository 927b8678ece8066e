"""The FFT product of the circulant and Toeplitz layers as torch.library ops with a frequency-domain
backward, and `fft_conv`, which checks its inputs and picks a path.

Ops (custom ops with fake implementations, so torch.compile(fullgraph=True) traces through them):
  mmm::fft_conv(x, kernel, n_in, L, n_out, mode) -> (y, saved spectrum, row scales)
  mmm::fft_conv_backward(dy, saved, row scales, kernel, n_in, L, mode, need_dx, need_dkernel) -> (dx, dkernel)
The forward's input spectrum is kept for the backward instead of x: recomputing it would cost a cast
and an FFT pass over x (~14 bytes per element in fp32) to save 2 bytes per element of memory.

Paths (`mode`), see naive.py for the operation itself:
- "torch": rfft / irfft and PyTorch pointwise ops (CPU, fp64, odd L, Triton missing or turned off);
- "packed": fp32 cuFFT on the rows viewed as complex pairs, with the casts, the spectral product (and
  sum over blocks), the pack/unpack fix-ups and the token reduction of the backward in Triton kernels
  (kernels.py). Passes over [N, d] per forward: cast in, FFT, product, inverse FFT, cast out.
- "packed16": the same with the FFTs and the stored spectra in fp16 (half the bytes), the default for
  bf16/fp16 inputs on CUDA when L is a power of two (cuFFT's half precision takes only those);
  `with fft_precision("fp32"):` turns it off. Its error, with cuFFT's half transform emulated on CPU
  (every radix-2 stage rounded to fp16), is 1.02-1.12x PyTorch's own bf16 error for the same dense
  product at d = 256..16384 (tests/test_fft_structures.py); scripts/gpu_fft_structures.py measures it.
- odd=True (LDR's skew-circulant factors): the kernel's even frequencies are zero, so y is a
  skew-circular convolution of length n = L/2 and only the L/4 odd frequencies of the length-L
  transform are needed. The packed path twists each row, pair m (x[2m] + i x[2m+1]) times
  exp(-i pi m / H), H = n/2, takes a length-H complex FFT and unpacks the odd frequencies with the
  partner m = H - 1 - k and w^(k + 1/2) (kernels.py), so its transforms and spectra are half the size
  of the length-L product's. That pairs H/2 distinct frequencies, so it needs L % 8 == 0; other L, and
  the torch path, run the length-L product with the even frequencies zeroed.
- "dft": single-block circulant / Toeplitz products with the FFT as tensor-core GEMMs in one Triton
  kernel per direction (dft.py, dft_kernels.py); its own ops mmm::fft_dft_conv(_backward). Taken for
  bf16/fp16 x on CUDA where dft.plan accepts the sizes, only while DFT_PATH is True (off until timed
  on the GPU: scripts/gpu_fft_dft.py); `force_mode("dft")` takes it anywhere it applies.

fp16 range. Each row of x is scaled by a power of two s_t with max|s_t x_t| <= b = min(1, 2^15/n_in)
(exact, undone at the end), so every partial sum inside the forward FFT, bounded by the row block's
L1 norm n_in b, stays <= 2^15 < 65504. The product is scaled by a power of two `gain` chosen from the
kernel so that the L1 norm of each packed spectrum row entering the inverse FFT, which bounds every
value inside and out of that FFT, is <= 2^15:
  ||Zin||_1 <= 8 ||2 gain Y||_1 <= 16 gain R sqrt(H+1) sqrt(L n_in) b,   R = max_o sum_u max_f |K[o, u, f]|
(Cauchy-Schwarz and Parseval on X). No overflow is possible, whatever the data, and nothing is read
back to the host; rows whose entries span many orders of magnitude lose relative precision in their
small entries instead (the fp16 subnormal range starts at 6e-5 of the row's scaled maximum).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import torch

from ..._checks import check_float_tensor, check_last_dim
from .. import kernels_enabled
from .._eager import eager_twin, plain_eager
from . import naive

try:
    from . import dft, kernels

    HAVE_TRITON = True
except ImportError:  # CPU installs without triton use the reference
    HAVE_TRITON = False

MODES = ("torch", "packed", "packed16", "dft")
DFT_PATH = False  # the "dft" path for bf16/fp16 on CUDA where it applies; off until timed on the GPU
# The kernel's gradient summed in the backward's spectral pass when dy has one block (one read of dy's
# spectrum and one launch fewer; H100, d = 16384, f+b: circulant 2.514 -> 2.399 ms, Toeplitz 5.674 ->
# 5.455, results/h100/2026-12-07-s23-fftab-*): MMM_FFT_FUSED_GRAD=0 takes spectral_corr's own pass instead
# (scripts/gpu_single.sh fftab times both).
FUSED_KERNEL_GRADIENT = os.environ.get("MMM_FFT_FUSED_GRAD", "1") != "0"
_precision = "fp16"
_half_fft_works: dict[str, bool] = {}
_forced_mode: str | None = None
# CPU stand-in for cuFFT's fp16 transform (tests): round each butterfly stage to fp16 when True,
# else only the transform's input and output.
HALF_FFT_STAGE_ROUNDING = False


@contextlib.contextmanager
def fft_precision(precision: str):
    """`with fft_precision("fp32"):` bf16/fp16 products on CUDA use fp32 FFTs inside the block; the
    default, "fp16", uses fp16 FFTs for them where L is a power of two."""
    global _precision
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    previous, _precision = _precision, precision
    try:
        yield
    finally:
        _precision = previous


@contextlib.contextmanager
def force_mode(mode: str | None):
    """Run every fft_conv on one path (tests and benchmarks; e.g. the Triton path on CPU under
    TRITON_INTERPRET=1, with the fp16 FFT emulated there)."""
    global _forced_mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    previous, _forced_mode = _forced_mode, mode
    try:
        yield
    finally:
        _forced_mode = previous


def pick_mode(x: torch.Tensor, L: int) -> str:
    if _forced_mode is not None:
        return _forced_mode
    if not (HAVE_TRITON and x.is_cuda and L % 2 == 0 and x.dtype != torch.float64):
        return "torch"
    if _precision == "fp16" and x.dtype in (torch.float16, torch.bfloat16) and L & (L - 1) == 0 and _half_fft_available(x.device):
        return "packed16"
    return "packed"


def _half_fft_available(device: torch.device) -> bool:
    """Whether this torch / cuFFT runs complex32 FFTs on `device` (tried once, on a tiny tensor)."""
    key = str(device)
    if key not in _half_fft_works:
        if torch.compiler.is_compiling():
            return True  # decided in eager mode before compiling, in practice; cuFFT has it since sm_53
        try:
            torch.fft.fft(torch.zeros(1, 8, dtype=torch.complex32, device=device))
            _half_fft_works[key] = True
        except RuntimeError as e:
            warnings.warn(f"fp16 FFTs are not available on {device} ({e}); the FFT structures use fp32 FFTs")
            _half_fft_works[key] = False
    return _half_fft_works[key]


# --------------------------------------------------------------------------------------------------
# the packed path
# --------------------------------------------------------------------------------------------------

def emulated_half_fft(z: torch.Tensor, inverse: bool, stage_rounding: bool) -> torch.Tensor:
    """A complex32 FFT of the last dim (unnormalised both ways) computed on CPU: in complex64 with the
    input and output rounded to fp16, or, with stage_rounding, as radix-2 butterflies with the twiddles
    and every stage's output rounded to fp16 (a pessimistic model of a half-precision FFT)."""
    z = z.to(torch.complex64)
    n = z.shape[-1]
    if not stage_rounding:
        out = torch.fft.ifft(z, norm="forward") if inverse else torch.fft.fft(z)
        return out.to(torch.complex32)
    if n & (n - 1):
        raise ValueError(f"stage rounding emulates a radix-2 FFT: length must be a power of two, got {n}")
    bits = n.bit_length() - 1
    rev = torch.tensor([int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(n)])
    z = z[..., rev]
    size = 2
    while size <= n:
        half = size // 2
        angle = torch.arange(half, dtype=torch.float64) * ((2 if inverse else -2) * math.pi / size)
        tw = torch.polar(torch.ones_like(angle), angle).to(torch.complex32).to(torch.complex64)
        grp = z.reshape(*z.shape[:-1], n // size, 2, half)
        a, b = grp[..., 0, :], grp[..., 1, :] * tw
        z = torch.stack([a + b, a - b], dim=-2).reshape(z.shape).to(torch.complex32).to(torch.complex64)
        size *= 2
    return z.to(torch.complex32)


def _c2c(z: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Unnormalised complex FFT of the last dim, forward or inverse."""
    if z.dtype == torch.complex32 and not z.is_cuda:
        return emulated_half_fft(z, inverse, HALF_FFT_STAGE_ROUNDING)
    return torch.fft.ifft(z, dim=-1, norm="forward") if inverse else torch.fft.fft(z, dim=-1)


def _packed_conv(x, q, n_in, kernel_ri, transpose, L, n_out, half, out_dtype, corr_with=None, odd=False):
    """y [N, o_blocks*n_out] = the operation of naive.py on the packed path (`transpose`: the adjoint,
    kernel conj(K)^T), plus the packed input spectrum [N, q, H, 2] and the row scales (or None).
    corr_with = (the forward's saved spectrum, its row scales or None), for the adjoint with q = 1: the
    kernel's gradient comes out of the same spectral pass, as a fourth result. With `odd`, kernel_ri
    holds the kernel's odd frequencies [p, q, L/4, 2] and the rows are L/2 long, twisted (module
    docstring)."""
    row = L // 2 if odd else L
    N, H = x.shape[0], row // 2
    o_blocks = kernel_ri.shape[1] if transpose else kernel_ri.shape[0]
    work = torch.float16 if half else torch.float32
    bound = min(1.0, 2.0**15 / n_in) if half else None
    if not half and not odd and x.dtype == torch.float32 and n_in == L and x.is_contiguous():
        xr, scale = x, None  # already fp32 rows of length L: the FFT reads x itself
    else:
        xr, scale = kernels.cast_in(x, q, n_in, row, work, bound, twist=odd)
    z = torch.view_as_real(_c2c(torch.view_as_complex(xr.view(N, q, H, 2)), inverse=False))
    if half:  # one launch for both (a chain of small torch ops cost ~10 launches per call)
        # (odd: the bound of the whole-frequency product, which holds for its odd half too)
        gains = kernels.fp16_gains(kernel_ri, transpose, math.sqrt((L // 2 + 1) * L * n_in) * bound, L)
        gain, gain_out = gains[:1], gains[1:]
    else:
        gain = torch.full((1,), 1.0 / (2 * L), device=x.device, dtype=torch.float32)
        gain_out = torch.ones(1, device=x.device, dtype=torch.float32)
    dK = None
    if corr_with is None:
        zin = kernels.spectral_mix(z, kernel_ri, gain, transpose, odd=odd)
    else:
        zin, dK = kernels.spectral_mix(z, kernel_ri, gain, transpose, corr_of=(*corr_with, scale, L), odd=odd)
    y = torch.view_as_real(_c2c(torch.view_as_complex(zin), inverse=True)).reshape(N, o_blocks * row)
    if half or odd or n_out != L or out_dtype != torch.float32:
        y = kernels.cast_out(y, o_blocks, row, n_out, gain_out, scale, out_dtype, twist=odd)
    return (y, z, scale) if corr_with is None else (y, z, scale, dK)


def _kernel_ri(kernel: torch.Tensor, odd: bool) -> torch.Tensor:
    """The packed path's kernel: [p, q, F, 2] fp32 (F = L/2 + 1, or the L/4 odd frequencies)."""
    return torch.view_as_real((kernel[..., 1::2] if odd else kernel).to(torch.complex64).contiguous())


def _full_gradient(dK_odd: torch.Tensor, F: int) -> torch.Tensor:
    """The kernel's gradient at all F frequencies from its odd ones (zero at the even ones: the
    product ignores them)."""
    dK = dK_odd.new_zeros(*dK_odd.shape[:-1], F)
    dK[..., 1::2] = dK_odd
    return dK


# --------------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------------

def _saved_like(x, kernel, L, mode, odd):
    N, q = x.shape[0], kernel.shape[1]
    if mode == "torch":
        return kernel.new_empty(N, q, L // 2 + 1)
    return x.new_empty(N, q, L // 4 if odd else L // 2, 2, dtype=torch.float16 if mode == "packed16" else torch.float32)


def _fft_conv_forward(x: torch.Tensor, kernel: torch.Tensor, n_in: int, L: int, n_out: int, mode: str,
                      odd: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, q*n_in], kernel [p, q, L//2+1] complex -> (y [N, p*n_out], saved spectrum, row scales)."""
    if mode == "torch":
        y, X = naive.conv_forward(x, naive.odd_frequencies(kernel) if odd else kernel, n_in, L, n_out)
        return y, X, x.new_empty(0, dtype=torch.float32)
    y, z, scale = _packed_conv(x, kernel.shape[1], n_in, _kernel_ri(kernel, odd), False, L, n_out, mode == "packed16",
                               x.dtype, odd=odd)
    return y, z, scale if scale is not None else x.new_empty(0, dtype=torch.float32)


fft_conv_op = torch.library.custom_op("mmm::fft_conv", mutates_args=())(_fft_conv_forward)


@fft_conv_op.register_fake
def _(x, kernel, n_in, L, n_out, mode, odd=False):
    rows = x.shape[0] if mode == "packed16" else 0
    return (x.new_empty(x.shape[0], kernel.shape[0] * n_out), _saved_like(x, kernel, L, mode, odd),
            x.new_empty(rows, dtype=torch.float32))


def _fft_conv_backward(dy: torch.Tensor, saved: torch.Tensor, scale: torch.Tensor, kernel: torch.Tensor, n_in: int, L: int,
                       mode: str, need_dx: bool, need_dkernel: bool, odd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [N, q*n_in] or empty, dkernel like kernel or empty) from dy [N, p*n_out]."""
    N = dy.shape[0]
    p, q, F = kernel.shape
    if mode == "torch":
        dx, dK = naive.conv_backward(dy, saved, naive.odd_frequencies(kernel) if odd else kernel, n_in, L)
        dK = naive.odd_frequencies(dK) if odd else dK
        return (dx if need_dx else dx.new_empty(0)), (dK if need_dkernel else dK.new_empty(0))
    half = mode == "packed16"
    kernel_ri = _kernel_ri(kernel, odd)
    n_out = dy.shape[1] // p
    if need_dx and need_dkernel and p == 1 and FUSED_KERNEL_GRADIENT:  # one pass over dy's spectrum for both
        dx, _, _, dK = _packed_conv(dy, p, n_out, kernel_ri, True, L, n_in, half, dy.dtype,
                                    corr_with=(saved, scale if half else None), odd=odd)
    else:
        if need_dx:
            dx, zdy, sdy = _packed_conv(dy, p, n_out, kernel_ri, True, L, n_in, half, dy.dtype, odd=odd)
        else:  # only the spectrum of dy, for the kernel's gradient
            dx = dy.new_empty(0)
            row = L // 2 if odd else L
            dyr, sdy = kernels.cast_in(dy, p, n_out, row, torch.float16 if half else torch.float32,
                                       min(1.0, 2.0**15 / n_out) if half else None, twist=odd)
            zdy = torch.view_as_real(_c2c(torch.view_as_complex(dyr.view(N, p, row // 2, 2)), inverse=False))
        if not need_dkernel:
            return dx, kernel.new_empty(0)
        # sum conj(2X)(2DY) = 4 sum conj(X) DY; the gradient is (w_f / L) sum conj(X) DY.
        dK = kernels.spectral_corr(saved, zdy, scale if half else None, sdy if half else None, L, odd)
    return dx, (_full_gradient(dK, F) if odd else dK).to(kernel.dtype)


fft_conv_backward_op = torch.library.custom_op("mmm::fft_conv_backward", mutates_args=())(_fft_conv_backward)


@fft_conv_backward_op.register_fake
def _(dy, saved, scale, kernel, n_in, L, mode, need_dx, need_dkernel, odd=False):
    N = dy.shape[0]
    dx = dy.new_empty(N, kernel.shape[1] * n_in) if need_dx else dy.new_empty(0)
    return dx, (kernel.new_empty(kernel.shape) if need_dkernel else kernel.new_empty(0))


def _setup(ctx, inputs, output):
    x, kernel, n_in, L, n_out, mode, odd = inputs
    _, saved, scale = output
    ctx.mark_non_differentiable(saved, scale)
    # saved (the input's spectrum, as large as x or larger) gets no gradient: without this, autograd
    # would allocate and zero-fill one for it on every backward
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(saved, scale, kernel)
    ctx.n_in, ctx.L, ctx.mode, ctx.odd = n_in, L, mode, odd


def _gradients(backward):
    def grads(ctx, dy, _dsaved, _dscale):
        saved, scale, kernel = ctx.saved_tensors
        need_dx, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if dy is None or not (need_dx or need_dk):
            return None, None, None, None, None, None, None
        dx, dK = backward(dy.contiguous(), saved, scale, kernel, ctx.n_in, ctx.L, ctx.mode, need_dx, need_dk, ctx.odd)
        return (dx if need_dx else None), (dK if need_dk else None), None, None, None, None, None

    return grads


fft_conv_op.register_autograd(_gradients(fft_conv_backward_op), setup_context=_setup)
# plain eager calls skip the custom-op dispatch (host time: see mmm.ops._eager)
_EagerFFTConv = eager_twin("_EagerFFTConv", _fft_conv_forward, _setup, _gradients(_fft_conv_backward))


def fft_conv(x: torch.Tensor, kernel: torch.Tensor, n_in: int, L: int, n_out: int, odd: bool = False) -> torch.Tensor:
    """y[..., i*n_out + r] = irfft_L(sum_j rfft_L(x_j) kernel[i, j])[r] for r < n_out, x [..., q*n_in]
    read as q blocks of n_in, kernel [p, q, L//2 + 1] complex (see naive.py). Differentiable in x and
    kernel; x's dtype out (computed in fp32, or fp64 for fp64 x).

    odd=True: the kernel's even frequencies count as zero (its gradient there is zero), so that the
    product is a skew-circular convolution of length L/2 (n_in, n_out <= L/2): the packed path then
    transforms rows of L/2, not L (module docstring)."""
    check_float_tensor("x", x)
    if not kernel.is_complex() or kernel.dim() != 3 or kernel.shape[-1] != L // 2 + 1:
        raise ValueError(f"kernel must be complex [p, q, L//2 + 1] = [p, q, {L // 2 + 1}], got {kernel.dtype} {tuple(kernel.shape)}")
    if not 0 < n_in <= L or not 0 < n_out <= L:
        raise ValueError(f"n_in ({n_in}) and n_out ({n_out}) must be in [1, L] with L = {L}")
    if odd and (L % 2 or 2 * n_in > L or 2 * n_out > L):
        raise ValueError(f"odd=True needs an even L and n_in, n_out <= L/2, got L={L}, n_in={n_in}, n_out={n_out}")
    p, q, _ = kernel.shape
    check_last_dim("x", x, q * n_in)
    if kernel.device != x.device:
        raise ValueError(f"x is on {x.device} but the kernel is on {kernel.device}; move them to one device")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, q * n_in)
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, p * n_out)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if odd and L % 8:  # (module docstring)
        kernel, odd = naive.odd_frequencies(kernel), False
    mode = pick_mode(x2, L) if kernels_enabled() else "torch"
    auto_dft = mode != "torch" and _forced_mode is None and DFT_PATH and _precision == "fp16" and x2.dtype in (torch.float16, torch.bfloat16)
    if (mode == "dft" or auto_dft) and not odd:
        if dft.plan(p, q, n_in, L, n_out) is not None and x2.dtype != torch.float64:
            return dft.dft_conv_op(x2, kernel, n_in, L, n_out).reshape(*lead, p * n_out)
        if mode == "dft":
            raise ValueError(f"the dft path takes fp32/bf16/fp16 x and one block (kernel [1, 1, L//2 + 1]) with n_in, n_out <= n "
                             f"and L = n or 2n, n in {dft.SIZES}; got {x2.dtype}, kernel {tuple(kernel.shape)}, "
                             f"n_in={n_in}, L={L}, n_out={n_out}")
    if mode == "dft":  # forced, for an odd product, which the dft path does not take
        mode = "packed"
    if mode != "torch" and (L % 2 or x2.dtype == torch.float64):
        raise ValueError(f"the {mode} path needs an even L and fp32/bf16/fp16 x, got L={L}, {x2.dtype}")
    y = (_EagerFFTConv.apply if plain_eager(x2, kernel) else fft_conv_op)(x2, kernel, n_in, L, n_out, mode, odd)[0]
    return y.reshape(*lead, p * n_out)
