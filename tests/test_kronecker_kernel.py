"""Kronecker-sum Triton kernels against the PyTorch reference (interpreter on CPU, fp32; GPU in bf16)."""

import pytest
import torch

from mmm.ops.kronecker import kernels, kron_matmul, naive
from mmm.ops.kronecker.op import use_kernel

from conftest import grads, rel_err

SHAPES = [  # (N, terms, o1, i1, o2, i2)
    (5, 1, 4, 4, 4, 4),
    (7, 2, 3, 5, 6, 2),
    (9, 1, 5, 6, 7, 40),     # one term, i2 over several chunks: the fused dX/dA backward loops
    (1, 3, 8, 16, 40, 40),   # second factor wider than one tile: several o2 and p tiles
    (33, 1, 16, 12, 9, 7),
    (17, 1, 9, 20, 24, 70),  # one term, rectangular factors, i2 over several chunks with a partial last one
    (2, 1, 3, 5, 33, 6),     # one token per program, o2 > i2
]

# the backward paths: (ONE_PASS_BWD, FUSED_DX_DA); the one-pass and fused ones apply to one term only
BACKWARDS = {"two_pass": (False, False), "fused_dx_dA": (False, True), "one_pass": (True, False)}


def _use_backward(name, monkeypatch):
    monkeypatch.setattr(kernels, "ONE_PASS_BWD", BACKWARDS[name][0])
    monkeypatch.setattr(kernels, "FUSED_DX_DA", BACKWARDS[name][1])


def _inputs(N, r, o1, i1, o2, i2, dtype, device="cpu"):
    x = torch.randn(N, i1 * i2, dtype=dtype, device=device)
    A = torch.randn(r, o1, i1, dtype=dtype, device=device) / i1**0.5
    B = torch.randn(r, o2, i2, dtype=dtype, device=device) / i2**0.5
    return x, A, B


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradients_match_reference(shape, backward, monkeypatch):
    _use_backward(backward, monkeypatch)
    N, r, o1, i1, o2, i2 = shape
    x, A, B = _inputs(*shape, torch.float32)
    assert use_kernel(x)  # the interpreter path really runs
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    y = kron_matmul(x, A, B)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B), g)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = naive.kron_matmul(x64, A64, B64)
    ref = torch.autograd.grad(y64, (x64, A64, B64), g.double())
    assert rel_err(y, y64) < 1e-5
    for name, a, b in zip("xAB", got, ref):
        assert rel_err(a, b) < 1e-5, name


def test_leading_dims_and_strided_input():
    x, A, B = _inputs(6, 2, 4, 4, 4, 8, torch.float32)
    xs = torch.randn(3, 2, 64)[..., ::2]  # strided, [3, 2, 32]
    y = kron_matmul(xs, A, B)
    assert y.shape == (3, 2, 16)
    assert rel_err(y, naive.kron_matmul(xs.reshape(-1, 32).double(), A.double(), B.double()).reshape(3, 2, 16)) < 1e-5


@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradients_of_non_contiguous_inputs(backward, monkeypatch):
    _use_backward(backward, monkeypatch)
    N, o1, i1, o2, i2 = 7, 6, 5, 4, 36
    x = torch.randn(N, 2 * i1 * i2)[:, ::2]       # every other column
    A = torch.randn(1, i1, o1).transpose(1, 2)    # [1, o1, i1], transposed storage
    B = torch.randn(1, o2, 2 * i2)[..., i2:]      # [1, o2, i2], row stride 2 i2
    assert not (x.is_contiguous() or A.is_contiguous() or B.is_contiguous())
    y, *got = grads(kron_matmul, (x, A, B), g := torch.randn(N, o1 * o2))
    y64, *ref = grads(naive.kron_matmul, (x.double(), A.double(), B.double()), g.double())
    assert rel_err(y, y64) < 1e-5
    for name, a, b in zip("xAB", got, ref):
        assert rel_err(a, b) < 1e-5, name


def test_one_pass_backward_on_strided_views():
    """The kernel itself on strided dY, X, A, B and dX (the op passes contiguous ones, the kernel takes strides)."""
    N, o1, i1, o2, i2 = 5, 7, 9, 20, 40
    dY = torch.randn(o2, N, o1).permute(1, 2, 0)      # [N, o1, o2], token stride o1
    X = torch.randn(N, i1, 2 * i2)[..., 1::2]          # [N, i1, i2], column stride 2
    A = torch.randn(1, i1, o1).transpose(1, 2)
    B = torch.randn(1, i2, o2).transpose(1, 2)
    dX = torch.full((N, i2, i1), float("nan")).transpose(1, 2)   # [N, i1, i2], NaN until written
    dA, dB = kernels.kron_bwd_one_pass(dY, X, A, B, dX)
    d64, x64, a64, b64 = (t.double() for t in (dY, X, A[0], B[0]))
    assert rel_err(dX, torch.einsum("ao,nab,bi->noi", a64, d64, b64)) < 1e-5
    assert rel_err(dA[0], torch.einsum("nab,bi,nci->ac", d64, b64, x64)) < 1e-5
    assert rel_err(dB[0], torch.einsum("nab,ac,nci->bi", d64, a64, x64)) < 1e-5


def test_bad_input():
    x, A, B = _inputs(2, 1, 4, 4, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="last dimension 16"):
        kron_matmul(x[:, :15], A, B)
    with pytest.raises(ValueError, match="same number of terms"):
        kron_matmul(x, A, torch.cat([B, B]))
    with pytest.raises(ValueError, match="3-D"):
        kron_matmul(x, A[0], B)
    with pytest.raises(TypeError, match="float"):
        kron_matmul(x.long(), A, B)


@pytest.mark.gpu
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("shape", [(4096, 1, 128, 128, 128, 128), (1000, 2, 64, 64, 128, 128), (512, 1, 128, 128, 256, 256),
                                   (777, 1, 96, 80, 48, 200)], ids=str)
def test_gpu_bf16_within_twice_torch_error(shape, backward, monkeypatch):
    _use_backward(backward, monkeypatch)
    x, A, B = _inputs(*shape, torch.bfloat16, "cuda")
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    y = kron_matmul(x, A, B)
    g = torch.randn_like(y)
    got = (y,) + torch.autograd.grad(y, (x, A, B), g)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = naive.kron_matmul(x64, A64, B64)
    ref = (y64,) + torch.autograd.grad(y64, (x64, A64, B64), g.double())
    xb, Ab, Bb = (t.detach().requires_grad_() for t in (x, A, B))
    yb = naive.kron_matmul(xb, Ab, Bb)
    torch_bf16 = (yb,) + torch.autograd.grad(yb, (xb, Ab, Bb), g)
    for name, a, b, c in zip(["y", "dx", "dA", "dB"], got, ref, torch_bf16):
        assert rel_err(a, b) <= 2 * rel_err(c, b) + 1e-3, name


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    from mmm.ops.kronecker.op import kron_fwd

    x, A, B = _inputs(64, 1, 16, 16, 16, 16, torch.bfloat16, "cuda")
    torch.library.opcheck(kron_fwd, (x, A, B))
    f = torch.compile(kron_matmul, fullgraph=True)
    xr = x.clone().requires_grad_()
    y = f(xr, A, B)
    y.sum().backward()
    assert rel_err(y, naive.kron_matmul(x.double(), A.double(), B.double())) < 2e-2
    assert xr.grad is not None and torch.isfinite(xr.grad).all()
