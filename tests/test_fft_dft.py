"""The "dft" path of fft_conv (four-step FFT as GEMMs in one Triton kernel per direction, mmm/ops/fft/dft.py):
forward, dx and the kernel's gradient against the fp64 PyTorch reference (naive.py) and the dense matrix,
in fp32 and with the GPU's fp16 GEMM arithmetic, on circulant and Toeplitz sizes."""

import math

import pytest
import torch

import mmm
from mmm.ops.fft import dft, force_mode, naive
from mmm.ops.fft import op as fft_op
from mmm.structures import Circulant, Toeplitz

from conftest import OpNames, rel_err

f64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (n_in, L, n_out): circulant (L = n), Toeplitz-like (L = 2n, two branches), padded / cut rows,
# a non-square factorisation (512 = 32 x 16) and 4096 = 64 x 64
CASES = [(256, 256, 256), (512, 512, 512), (100, 512, 300), (256, 512, 256), (200, 512, 130), (4096, 4096, 4096)]


def _kernel(L, dtype=torch.complex64):
    return torch.randn(1, 1, L // 2 + 1, dtype=dtype, device=DEV)


def _reference(x, kernel, dy, n_in, L, n_out):
    """y, dx, dkernel in fp64 through naive.py."""
    y, X = naive.conv_forward(x.double(), kernel.to(torch.complex128), n_in, L, n_out)
    dx, dk = naive.conv_backward(dy.double(), X, kernel.to(torch.complex128), n_in, L)
    return y, dx, dk


def test_plan_takes_the_sizes_it_can_and_only_those():
    assert dft.plan(1, 1, 256, 256, 256) == (16, 16, 1)
    assert dft.plan(1, 1, 512, 512, 512) == (32, 16, 1)
    assert dft.plan(1, 1, 16384, 16384, 16384) == (128, 128, 1)
    assert dft.plan(1, 1, 16384, 32768, 16384) == (128, 128, 2)  # Toeplitz d = 16384
    assert dft.plan(1, 1, 4096, 8192, 4000) == (64, 64, 2)
    assert dft.plan(2, 1, 256, 256, 256) is None  # block-circulant
    assert dft.plan(1, 1, 32768, 32768, 32768) is None  # n > 16384
    assert dft.plan(1, 1, 128, 128, 128) is None  # tiles below 16 x 16
    assert dft.plan(1, 1, 300, 600, 300) is None  # not a power of two
    assert dft.plan(1, 1, 300, 512, 256) == (32, 16, 1)  # rows padded to L = n
    assert dft.plan(1, 1, 20000, 32768, 100) is None  # n_in > L / 2 = 16384 and L too long for one branch


@pytest.mark.parametrize("n_in,L,n_out", CASES)
def test_forward_and_gradients_match_fp64(n_in, L, n_out):
    kernel = _kernel(L).requires_grad_(True)
    x = torch.randn(7, n_in, device=DEV, requires_grad=True)  # odd: the last pair is half empty
    dy = torch.randn(7, n_out, device=DEV)
    with force_mode("dft"):
        y = fft_op.fft_conv(x, kernel, n_in, L, n_out)
    dx, dk = torch.autograd.grad(y, [x, kernel], dy)
    ref = _reference(x.detach(), kernel.detach(), dy, n_in, L, n_out)
    for name, a, b in zip(["y", "dx", "dkernel"], [y, dx, dk], ref):
        assert a.shape == b.shape and a.dtype == (kernel.dtype if name == "dkernel" else torch.float32), name
        assert rel_err(torch.view_as_real(a) if a.is_complex() else a, torch.view_as_real(b) if b.is_complex() else b) < 1e-5, name


@pytest.mark.parametrize("n_in,L,n_out", [(256, 256, 256), (200, 512, 130)])
def test_each_backward_route_matches_fp64(n_in, L, n_out, monkeypatch):
    """dx and dkernel from one fused pass (the default), from two kernels, and each alone; rows of very
    different sizes side by side (the fused pass ties the two tokens' scales of x to dy's)."""
    x = torch.randn(9, n_in, device=DEV) * torch.logspace(-3, 3, 9, device=DEV)[:, None]
    dy = torch.randn(9, n_out, device=DEV) * torch.logspace(2, -2, 9, device=DEV)[:, None]
    kernel = _kernel(L)
    _, rdx, rdk = _reference(x, kernel, dy, n_in, L, n_out)
    for fused in (True, False):
        monkeypatch.setattr(dft, "FUSED_BACKWARD", fused)
        for need_dx, need_dk in [(True, True), (True, False), (False, True)]:
            dx, dk = dft.dft_conv_backward_op(dy, x, kernel, n_in, L, need_dx, need_dk)
            if need_dx:
                assert rel_err(dx, rdx) < 1e-5, (fused, need_dx, need_dk)
            else:
                assert dx.numel() == 0
            if need_dk:
                assert rel_err(torch.view_as_real(dk), torch.view_as_real(rdk)) < 1e-5, (fused, need_dx, need_dk)
            else:
                assert dk.numel() == 0


def test_strided_rows_leading_dims_and_one_token():
    n, L = 256, 512
    kernel = _kernel(L).requires_grad_(True)
    big = torch.randn(3, 5, n + 37, device=DEV)
    x = big[..., :n].requires_grad_(False)  # rows 293 apart: the kernel reads the view itself
    x.requires_grad_(True)
    dy = torch.randn(3, 5, n, device=DEV)
    with force_mode("dft"):
        y = fft_op.fft_conv(x, kernel, n, L, n)
    dx, dk = torch.autograd.grad(y, [x, kernel], dy)
    ry, rdx, rdk = _reference(x.detach().reshape(15, n), kernel.detach(), dy.reshape(15, n), n, L, n)
    assert y.shape == (3, 5, n) and dx.shape == x.shape
    assert rel_err(y.reshape(15, n), ry) < 1e-5 and rel_err(dx.reshape(15, n), rdx) < 1e-5
    assert rel_err(torch.view_as_real(dk), torch.view_as_real(rdk)) < 1e-5
    x1 = torch.randn(1, n, device=DEV)
    with force_mode("dft"):
        y1 = fft_op.fft_conv(x1, kernel.detach(), n, L, n)
    assert rel_err(y1, _reference(x1, kernel.detach(), torch.zeros_like(x1), n, L, n)[0]) < 1e-5


def _dense_reference(s64, x64, g64):
    (p,) = list(s64.parameters())
    x = x64.clone().requires_grad_(True)
    y = x @ s64.to_dense().T
    dx, dp = torch.autograd.grad((y * g64).sum(), [x, p])
    return y.detach(), dx, dp


def _run(module, x, g):
    x = x.clone().requires_grad_(True)
    y = module(x)
    (p,) = list(module.parameters())
    dx, dp = torch.autograd.grad((y.float() * g.float()).sum(), [x, p])
    return y.detach(), dx, dp


def _structures(shape, dtype, scale=1.0):
    """(fp64 twin, module in dtype) with the same parameters (rounded to dtype), scaled by `scale`."""
    out = []
    for cls, cfg in [(Circulant, mmm.CirculantConfig()), (Toeplitz, mmm.ToeplitzConfig())]:
        s64 = cls(*shape, cfg, dtype=f64)
        with torch.no_grad():
            for p in s64.parameters():
                p.copy_((torch.randn_like(p) * scale).to(dtype).double())
        s = cls(*shape, cfg, dtype=dtype, device=DEV)
        s.load_state_dict(s64.state_dict())
        out.append((s64, s))
    return out


def test_structures_on_the_dft_path_match_their_dense_matrices():
    for s64, s in _structures((256, 256), torch.float32):
        x64 = torch.randn(9, 256, dtype=f64)
        g64 = torch.randn(9, 256, dtype=f64)
        with force_mode("dft"), OpNames() as log:  # under a dispatch mode, as torch.compile runs it
            got = _run(s, x64.to(DEV, torch.float32), g64.to(DEV, torch.float32))
        assert {"fft_dft_conv", "fft_dft_conv_backward"} <= set(log.names)
        for name, a, b in zip(["y", "dx", "dparam"], got, _dense_reference(s64, x64, g64)):
            assert rel_err(a.cpu(), b) < 1e-5, (type(s).__name__, name, rel_err(a.cpu(), b))


def _ops_used(module, d, dtype=torch.float32):
    """Names of the ops a forward + backward of `module` dispatches."""
    x = torch.randn(2, d, device=DEV, dtype=dtype, requires_grad=True)
    with OpNames() as log:
        module(x).float().sum().backward()
    return set(log.names)


def _torch_bf16_errors(s64, x64, g64):
    """PyTorch's own bf16 error for the dense product: y, dx, and the parameter's gradient (the dense
    weight gradient in bf16 mapped through to_dense in fp64)."""
    w64 = s64.to_dense().detach()
    xd, wd, gd = x64.bfloat16(), w64.bfloat16(), g64.bfloat16()
    y_ref, dx_ref, dp_ref = _dense_reference(s64, x64, g64)
    (p,) = list(s64.parameters())
    dp = torch.autograd.grad(s64.to_dense(), p, (gd.T @ xd).double())[0]
    return [rel_err(xd @ wd.T, y_ref), rel_err(gd @ wd, dx_ref), rel_err(dp, dp_ref)]


@pytest.mark.parametrize("d", [1024] if DEV == "cpu" else [1024, 4096])
def test_fp16_gemm_arithmetic_within_twice_pytorch_bf16_error(d, monkeypatch):
    """bf16 data and parameters (nn.Linear's scale), the GEMM operands and intermediates in fp16 as on
    the GPU (under the interpreter its fp16 dots even accumulate in fp16): y, dx and the parameter's
    gradient within 2x PyTorch's own bf16 error for the same dense product."""
    monkeypatch.setattr(dft, "WORK_DTYPE", torch.float16)
    for s64, s in _structures((d, d), torch.bfloat16, scale=1 / math.sqrt(d)):
        x64 = torch.randn(24, d, dtype=f64)
        g64 = torch.randn(24, d, dtype=f64)
        with force_mode("dft"):
            got = _run(s, x64.to(DEV, torch.bfloat16), g64.to(DEV, torch.bfloat16))
        ref = _dense_reference(s64, x64, g64)
        for name, a, b, t in zip(["y", "dx", "dparam"], got, ref, _torch_bf16_errors(s64, x64, g64)):
            assert torch.isfinite(a).all() and rel_err(a.cpu(), b) <= 2 * t, (type(s).__name__, name, rel_err(a.cpu(), b), t)


def test_fp16_range_holds_for_huge_and_tiny_rows(monkeypatch):
    """Rows far outside fp16's range (1e30, 1e-30, a spike of 6e4 beside 1e-3 noise) and a DC-heavy
    kernel: the per-pair and spectrum scales keep every intermediate finite and the error relative."""
    monkeypatch.setattr(dft, "WORK_DTYPE", torch.float16)
    n = 256
    x = torch.randn(6, n, dtype=f64) * torch.tensor([1e30, 1e-30, 1.0, 3e4, 1.0, 1e-3], dtype=f64)[:, None]
    x[4, 17] = 6e4
    c = torch.randn(n, dtype=f64) + 50.0
    kernel = torch.fft.rfft(c).reshape(1, 1, -1)
    ref = naive.conv_forward(x, kernel, n, n, n)[0]
    with force_mode("dft"):
        y = fft_op.fft_conv(x.float().to(DEV), kernel.to(DEV, torch.complex64), n, n, n)
    assert torch.isfinite(y).all()
    for t in range(6):
        assert rel_err(y[t].cpu(), ref[t]) < 3e-3, t


def test_forced_dft_path_rejects_what_it_cannot_take():
    x = torch.randn(3, 256, device=DEV)
    with force_mode("dft"):
        with pytest.raises(ValueError, match="dft path"):
            fft_op.fft_conv(x, torch.randn(2, 1, 129, dtype=torch.complex64, device=DEV), 256, 256, 256)  # two blocks
        with pytest.raises(ValueError, match="dft path"):
            fft_op.fft_conv(x[:, :96], _kernel(96), 96, 96, 96)
        with pytest.raises(ValueError, match="dft path"):
            fft_op.fft_conv(x.double(), _kernel(256, torch.complex128), 256, 256, 256)


def test_dft_switch_leaves_cpu_and_fp32_on_their_paths(monkeypatch):
    monkeypatch.setattr(fft_op, "DFT_PATH", True)
    s = Circulant(256, 256, mmm.CirculantConfig(), device=DEV)  # fp32: the dft path is for bf16/fp16 only
    used = _ops_used(s, 256)
    assert "fft_dft_conv" not in used and "fft_conv" in used


def test_opcheck_and_compile_fullgraph():
    kernel = _kernel(256).requires_grad_(True)
    x = torch.randn(5, 256, device=DEV, requires_grad=True)
    torch.library.opcheck(dft.dft_conv_op, (x, kernel, 256, 256, 256))
    torch.library.opcheck(dft.dft_conv_op, (torch.randn(4, 200, device=DEV, requires_grad=True), _kernel(512).requires_grad_(True), 200, 512, 130))
    s = Toeplitz(256, 256, mmm.ToeplitzConfig(), device=DEV)
    with force_mode("dft"):
        compiled = torch.compile(s, fullgraph=True, backend="aot_eager" if DEV == "cpu" else "inductor")
        y = compiled(x)
    y.square().sum().backward()
    dt = s.t.grad.clone()
    s.t.grad = None
    x2 = x.detach().clone().requires_grad_(True)
    with mmm.ops.reference_only():
        y2 = s(x2)
    y2.square().sum().backward()
    assert rel_err(y, y2) < 1e-5 and rel_err(x.grad, x2.grad) < 1e-5 and rel_err(dt, s.t.grad) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("d", [2048, 16384])
def test_cuda_bf16_dft_path_within_twice_pytorch_bf16_error(d, monkeypatch):
    """On the GPU, chosen by the DFT_PATH switch (no forced mode): bf16 circulant and Toeplitz."""
    monkeypatch.setattr(fft_op, "DFT_PATH", True)
    for s64, s in _structures((d, d), torch.bfloat16, scale=1 / math.sqrt(d)):
        x64 = torch.randn(33, d, dtype=f64)
        g64 = torch.randn(33, d, dtype=f64)
        got = _run(s, x64.to("cuda", torch.bfloat16), g64.to("cuda", torch.bfloat16))
        assert "fft_dft_conv" in _ops_used(s, d, torch.bfloat16)
        ref = _dense_reference(s64, x64, g64)
        for name, a, b, t in zip(["y", "dx", "dparam"], got, ref, _torch_bf16_errors(s64, x64, g64)):
            assert torch.isfinite(a).all() and rel_err(a.cpu(), b) <= 2 * t, (type(s).__name__, name, rel_err(a.cpu(), b), t)
