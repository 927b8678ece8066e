"""Triton kernels for block-diagonal and Monarch products (src/mmm/ops/{blockdiag,monarch}) against the
PyTorch references, forward and every gradient, errors measured against fp64.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) in fp32 on tiny shapes; kernel outputs
are NaN-poisoned before each launch so an unwritten element fails the comparison. The `gpu` tests check
bf16/fp16 accuracy against PyTorch's own error, opcheck, torch.compile(fullgraph=True) and int64 offsets.
"""

import pytest
import torch

from conftest import grads, rel_err
from mmm.ops.blockdiag import kernels as bk
from mmm.ops.blockdiag import naive as bd_naive
from mmm.ops.blockdiag import op as bd_op
from mmm.ops.monarch import naive as mo_naive
from mmm.ops.monarch import op as mo_op

needs_triton = pytest.mark.skipif(not bd_op.HAVE_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(bk, "POISON_OUTPUTS", True)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def monarch_inputs(N, b, p, s, c, dtype=torch.float32, device=None, lead=()):
    device = device or _device()
    x = torch.randn(*lead, N, b * p, dtype=dtype, device=device)
    L = torch.randn(b, b * c, p, dtype=dtype, device=device) / p**0.5
    R = torch.randn(b, s, b * c, dtype=dtype, device=device) / (b * c) ** 0.5
    return x, L, R


def check_against_fp64(fn, ref_fn, inputs, g, tol):
    got = grads(fn, inputs, g)
    ref = grads(ref_fn, [t.double() for t in inputs], g.double())
    for name, a, b in zip(["out"] + [f"grad{i}" for i in range(len(inputs))], got, ref):
        assert a.dtype == inputs[0].dtype and a.shape == b.shape, name
        err = rel_err(a, b)
        assert err < tol, f"{name}: rel err {err:.2e}"


MONARCH_CASES = [  # N, b, p, s, c
    (1, 2, 8, 16, 2),
    (7, 4, 8, 8, 1),
    (33, 4, 16, 8, 3),  # block rank that is not a power of two: general split addressing
    (33, 2, 8, 16, 32),  # block rank larger than a K tile
    (33, 3, 5, 7, 2),  # odd block count and block sizes
]


@needs_triton
@pytest.mark.parametrize("fused", [True, False], ids=["fused_bwd", "two_launch_bwd"])
@pytest.mark.parametrize("N,b,p,s,c", MONARCH_CASES)
def test_monarch_matches_reference(N, b, p, s, c, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(bk, "FUSED_BACKWARD_MAX", 0)
    x, L, R = monarch_inputs(N, b, p, s, c)
    assert mo_op.use_kernel(x)
    g = torch.randn(N, b * s, device=x.device)
    check_against_fp64(lambda x, L, R: mo_op.monarch_matmul(x, L, R, c),
                       lambda x, L, R: mo_naive.monarch_matmul(x, L, R, c), [x, L, R], g, 1e-5)


@needs_triton
def test_monarch_middle_buffer_layout():
    """mid[k, l*c + t, n] holds y[n, k, l*c + t], the stage-1 output (the contract the kernels share)."""
    N, b, p, s, c = 9, 3, 4, 5, 2
    x, L, R = monarch_inputs(N, b, p, s, c)
    out, mid = torch.ops.mmm.monarch_fwd(x, L, R, c)
    y = torch.einsum("nkp,kjp->nkj", x.double().view(N, b, p), L.double())
    assert rel_err(mid.permute(2, 0, 1), y) < 1e-6
    assert rel_err(out, mo_naive.monarch_matmul(x.double(), L.double(), R.double(), c)) < 1e-6


@needs_triton
def test_monarch_strided_inputs_and_batch_dims():
    N, b, p, s, c = 5, 4, 8, 8, 2
    _, L, R = monarch_inputs(N, b, p, s, c)
    x = torch.randn(2, N, 2 * b * p, device=L.device)[..., ::2]  # [2, 5, 32] with feature stride 2
    g = torch.randn(b * s, 2, N, device=x.device).permute(1, 2, 0)  # non-contiguous output gradient
    check_against_fp64(lambda x, L, R: mo_op.monarch_matmul(x, L, R, c),
                       lambda x, L, R: mo_naive.monarch_matmul(x, L, R, c), [x, L, R], g, 1e-5)
    xt = torch.randn(b * p, 6, device=x.device).T  # tokens contiguous
    gt = torch.randn(6, b * s, device=x.device)
    check_against_fp64(lambda x, L, R: mo_op.monarch_matmul(x, L, R, c),
                       lambda x, L, R: mo_naive.monarch_matmul(x, L, R, c), [xt, L, R], gt, 1e-5)
    Lt = L.transpose(1, 2).contiguous().transpose(1, 2)  # weights with other strides
    check_against_fp64(lambda x, L, R: mo_op.monarch_matmul(x, L, R, c),
                       lambda x, L, R: mo_naive.monarch_matmul(x, L, R, c), [xt, Lt, R], gt, 1e-5)


@needs_triton
def test_monarch_bf16_under_interpreter_or_gpu():
    """bf16 storage with fp32 accumulation (operands upcast under the interpreter)."""
    N, b, p, s, c = 17, 2, 16, 16, 4
    x, L, R = monarch_inputs(N, b, p, s, c, dtype=torch.bfloat16)
    g = torch.randn(N, b * s, device=x.device, dtype=torch.bfloat16)
    check_against_fp64(lambda x, L, R: mo_op.monarch_matmul(x, L, R, c),
                       lambda x, L, R: mo_naive.monarch_matmul(x, L, R, c), [x, L, R], g, 2e-2)


BLOCKDIAG_CASES = [(1, 2, 8, 16), (7, 4, 8, 8), (33, 4, 16, 8), (33, 3, 5, 7)]  # N, b, p, s


@needs_triton
@pytest.mark.parametrize("fused", [True, False], ids=["fused_bwd", "two_launch_bwd"])
@pytest.mark.parametrize("N,b,p,s", BLOCKDIAG_CASES)
def test_blockdiag_matches_reference(N, b, p, s, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(bk, "FUSED_BACKWARD_MAX", 0)
    dev = _device()
    x = torch.randn(N, b * p, device=dev)
    w = torch.randn(b, s, p, device=dev) / p**0.5
    assert bd_op.use_kernel(x)
    g = torch.randn(N, b * s, device=dev)
    check_against_fp64(bd_op.blockdiag_matmul, bd_naive.blockdiag_matmul, [x, w], g, 1e-5)


@needs_triton
def test_blockdiag_strided_inputs_and_batch_dims():
    dev = _device()
    b, p, s = 2, 8, 4
    x = torch.randn(3, 2, 2 * b * p, device=dev)[..., 1::2]
    w = torch.randn(b, p, s, device=dev).transpose(1, 2)
    g = torch.randn(3, 2, b * s, device=dev)
    check_against_fp64(bd_op.blockdiag_matmul, bd_naive.blockdiag_matmul, [x, w], g, 1e-5)


def test_fp64_takes_reference_path():
    x, L, R = monarch_inputs(6, 2, 4, 4, 2, dtype=torch.float64, device="cpu")
    assert not mo_op.use_kernel(x)
    assert torch.equal(mo_op.monarch_matmul(x, L, R, 2), mo_naive.monarch_matmul(x, L, R, 2))
    w = torch.randn(2, 3, 4, dtype=torch.float64)
    assert torch.equal(bd_op.blockdiag_matmul(x[:, :8], w), bd_naive.blockdiag_matmul(x[:, :8], w))


def test_zero_tokens():
    x, L, R = monarch_inputs(0, 2, 4, 4, 2, device="cpu")
    assert not mo_op.use_kernel(x)
    assert mo_op.monarch_matmul(x, L, R, 2).shape == (0, 8)


def test_bad_inputs_name_the_argument():
    x, L, R = monarch_inputs(3, 2, 4, 4, 2, device="cpu")
    with pytest.raises(TypeError, match="x must be"):
        mo_op.monarch_matmul(x.long(), L, R, 2)
    with pytest.raises(ValueError, match="L must be 3-D"):
        mo_op.monarch_matmul(x, L[0], R, 2)
    with pytest.raises(ValueError, match="L must have shape"):
        mo_op.monarch_matmul(x, L, R, 3)
    with pytest.raises(ValueError, match="R must have shape"):
        mo_op.monarch_matmul(x, L, R[:, :, :3], 2)
    with pytest.raises(ValueError, match="x must have last dimension 8"):
        mo_op.monarch_matmul(x[:, :6], L, R, 2)
    with pytest.raises(TypeError, match="R is torch.float64"):
        mo_op.monarch_matmul(x, L, R.double(), 2)
    with pytest.raises(ValueError, match="block_rank must be a positive int"):
        mo_op.monarch_matmul(x, L, R, 0)
    with pytest.raises(ValueError, match="L is on meta"):
        mo_op.monarch_matmul(x, L.to("meta"), R, 2)
    with pytest.raises(ValueError, match="weight must be 3-D"):
        bd_op.blockdiag_matmul(x, torch.randn(8, 8))
    with pytest.raises(ValueError, match="x must have last dimension 12"):
        bd_op.blockdiag_matmul(x, torch.randn(3, 2, 4))
    with pytest.raises(TypeError, match="weight must be"):
        bd_op.blockdiag_matmul(x, torch.randn(2, 2, 4, dtype=torch.complex64))


def test_merged_dense_threshold_reads_the_measured_table(monkeypatch):
    key = ("monarch", 64, 64, 4, "bfloat16")
    assert not mo_op.prefer_merged_dense(1, *key[:4], torch.bfloat16)  # unmeasured: never merge
    monkeypatch.setitem(bd_op.MERGED_DENSE_MAX_TOKENS, key, 32)
    assert mo_op.prefer_merged_dense(32, *key[:4], torch.bfloat16)
    assert not mo_op.prefer_merged_dense(33, *key[:4], torch.bfloat16)
    assert not mo_op.prefer_merged_dense(1, *key[:4], torch.float16)


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------

GPU_MONARCH = [  # N, b, p, s, c
    (1000, 4, 256, 256, 64),
    (1000, 16, 64, 64, 4),
    (777, 32, 32, 32, 1),  # rank-1 blocks (c = 1), fused backward
    (1000, 8, 128, 64, 16),  # rectangular
    (2048, 4, 1024, 1024, 256),  # large blocks, two-launch backward with a token split
]


def _error_vs_torch(fn, ref_fn, inputs, g):
    """(kernel error, PyTorch error) of output and each gradient, both against an fp64 reference."""
    ref = grads(ref_fn, [t.double() for t in inputs], g.double())
    got = grads(fn, inputs, g)
    torch_own = grads(ref_fn, inputs, g)
    return [(rel_err(a, r), rel_err(t, r)) for a, t, r in zip(got, torch_own, ref)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,b,p,s,c", GPU_MONARCH)
def test_gpu_monarch_error_at_most_twice_torch(N, b, p, s, c, dtype):
    x, L, R = monarch_inputs(N, b, p, s, c, dtype=dtype, device="cuda")
    g = torch.randn(N, b * s, device="cuda", dtype=dtype)
    errs = _error_vs_torch(lambda x, L, R: mo_op.monarch_matmul(x, L, R, c, path="triton"),
                           lambda x, L, R: mo_naive.monarch_matmul(x, L, R, c), [x, L, R], g)
    for name, (ours, theirs) in zip(["out", "dx", "dL", "dR"], errs):
        assert ours <= 2 * theirs + 1e-6, f"{name}: kernel {ours:.2e} vs torch {theirs:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("N,b,p,s", [(1000, 4, 256, 256), (999, 16, 64, 32), (1000, 64, 64, 64)])
def test_gpu_blockdiag_error_at_most_twice_torch(N, b, p, s):
    x = torch.randn(N, b * p, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(b, s, p, device="cuda", dtype=torch.bfloat16) / p**0.5
    g = torch.randn(N, b * s, device="cuda", dtype=torch.bfloat16)
    errs = _error_vs_torch(lambda x, w: bd_op.blockdiag_matmul(x, w, path="triton"), bd_naive.blockdiag_matmul,
                           [x, w], g)
    for name, (ours, theirs) in zip(["out", "dx", "dw"], errs):
        assert ours <= 2 * theirs + 1e-6, f"{name}: kernel {ours:.2e} vs torch {theirs:.2e}"


@pytest.mark.gpu
def test_gpu_fp32_is_accurate():
    x, L, R = monarch_inputs(300, 4, 32, 32, 8, device="cuda")
    g = torch.randn(300, 128, device="cuda")
    check_against_fp64(lambda x, L, R: mo_op.monarch_matmul(x, L, R, 8),
                       lambda x, L, R: mo_naive.monarch_matmul(x, L, R, 8), [x, L, R], g, 1e-5)


@pytest.mark.gpu
def test_gpu_opcheck():
    x, L, R = monarch_inputs(100, 4, 32, 16, 8, dtype=torch.bfloat16, device="cuda")
    for t in (x, L, R):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.mmm.monarch_fwd.default, (x, L, R, 8))
    out, mid = torch.ops.mmm.monarch_fwd(x.detach(), L.detach(), R.detach(), 8)
    torch.library.opcheck(torch.ops.mmm.monarch_bwd.default, (torch.randn_like(out), x.detach(), mid, L.detach(), R.detach(), 8))
    w = torch.randn(4, 16, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.mmm.blockdiag_fwd.default, (x, w))
    torch.library.opcheck(torch.ops.mmm.blockdiag_bwd.default, (torch.randn(100, 64, device="cuda", dtype=torch.bfloat16), x.detach(), w.detach()))


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    x, L, R = monarch_inputs(257, 4, 64, 64, 16, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4, 32, 64, device="cuda", dtype=torch.bfloat16)

    def f(x, L, R, w):
        return bd_op.blockdiag_matmul(mo_op.monarch_matmul(x, L, R, 16), w)

    g = torch.randn(257, 128, device="cuda", dtype=torch.bfloat16)
    eager = grads(f, [x, L, R, w], g)
    compiled = grads(torch.compile(f, fullgraph=True), [x, L, R, w], g)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-2


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N * in_features > 2^31: element offsets overflow int32."""
    b, p, c = 16, 256, 16
    N = 2**31 // (b * p) + 37
    x, L, R = monarch_inputs(N, b, p, p, c, dtype=torch.bfloat16, device="cuda")
    x.requires_grad_()
    out = mo_op.monarch_matmul(x, L, R, c)
    tail = slice(N - 300, N)
    ref = mo_naive.monarch_matmul(x[tail].detach().float(), L.float(), R.float(), c)
    assert rel_err(out[tail], ref) < 1e-2
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    xt = x[tail].detach().float().requires_grad_()
    (ref_dx,) = torch.autograd.grad(mo_naive.monarch_matmul(xt, L.float(), R.float(), c), xt, g[tail].float())
    assert rel_err(dx[tail], ref_dx) < 1e-2
