"""Linear attention kernels against the naive reference, forward and every gradient, errors measured
against fp64. On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest) in fp32 on tiny
shapes; the `gpu` tests check bf16 accuracy, opcheck and torch.compile on CUDA."""

import math

import pytest
import torch

from conftest import rel_err
from mmm.ops.linear_attention import SUPPORTED_HEAD_DIMS, linear_attention, linear_attention_naive
from mmm.ops.linear_attention import op

needs_kernel = pytest.mark.skipif(
    not (op.HAVE_TRITON and (torch.cuda.is_available() or op.kernels.INTERPRET)),
    reason="needs triton with CUDA or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, T, H, D, feature_map, normalize, dtype=torch.float32, device=DEV):
    q, k, v = (torch.randn(B, T, H, D, dtype=dtype, device=device) for _ in range(3))
    if feature_map is None and normalize:
        # identity features can make phi(q) . z cross zero, where the normalized output is undefined:
        # keep q and k positive so the comparison measures the kernel, not the conditioning
        q, k = q.abs() + 0.1, k.abs() + 0.1
    return q, k, v


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every buffer the op allocates with torch.empty / empty_like starts as NaN, so an element a kernel
    fails to write shows up as NaN instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(math.nan)

    def empty_like(*args, **kwargs):
        return real_empty_like(*args, **kwargs).fill_(math.nan)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def check_against_fp64(q, k, v, feature_map, normalize, causal, seg_len, tol, grad_floor=0.0):
    """Forward and dq, dk, dv of the kernel path vs the naive reference in fp64 (upstream grad random)."""
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = op._kernel_forward(qs, ks, vs, feature_map, normalize, causal, 1e-6, seg_len=seg_len)
    go = torch.randn_like(o)
    o.backward(go)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = linear_attention_naive(q64, k64, v64, feature_map, normalize, causal, 1e-6)
    ref.backward(go.double())
    assert o.dtype == q.dtype and o.shape == q.shape
    assert torch.isfinite(o).all()
    assert rel_err(o, ref) < tol, ("o", rel_err(o, ref))
    for name, got, want in (("dq", qs.grad, q64.grad), ("dk", ks.grad, k64.grad), ("dv", vs.grad, v64.grad)):
        assert torch.isfinite(got).all(), name
        # grad_floor: an absolute scale for gradients that are ~0 in exact arithmetic (T = 1, normalized)
        err = float((got.double() - want).norm() / max(float(want.norm()), grad_floor))
        assert err < tol, (name, err)


@needs_kernel
@pytest.mark.parametrize("feature_map", ["elu", "relu", None])
@pytest.mark.parametrize("normalize", [True, False])
def test_feature_maps_and_normalize(feature_map, normalize, poisoned_empty):
    # T=100 with 16-row chunks and 32-row segments: 4 segments, ragged last chunk and segment
    q, k, v = make_inputs(1, 100, 2, 16, feature_map, normalize)
    check_against_fp64(q, k, v, feature_map, normalize, True, seg_len=32, tol=2e-5)


@needs_kernel
@pytest.mark.parametrize("T", [1, 17, 64])
def test_sequence_lengths(T, poisoned_empty):
    q, k, v = make_inputs(1, T, 2, 16, "elu", True)
    # normalized with T=1, o = v exactly and dq, dk vanish (up to eps): measure them against ||dv||
    check_against_fp64(q, k, v, "elu", True, True, seg_len=32, tol=2e-5, grad_floor=1.0 if T == 1 else 0.0)


@needs_kernel
def test_several_state_tiles_and_batches(poisoned_empty):
    # D=32 with 16-wide tiles: two K-tiles and two V-tiles per segment; B=2 checks the batch offsets
    q, k, v = make_inputs(2, 40, 2, 32, "elu", True)
    check_against_fp64(q, k, v, "elu", True, True, seg_len=16, tol=2e-5)


@needs_kernel
@pytest.mark.parametrize("normalize", [True, False])
def test_non_causal(normalize, poisoned_empty):
    q, k, v = make_inputs(1, 50, 2, 16, "relu", normalize)
    check_against_fp64(q, k, v, "relu", normalize, False, seg_len=32, tol=2e-5)


@needs_kernel
def test_default_segments_and_public_function(poisoned_empty):
    q, k, v = make_inputs(1, 100, 2, 16, "elu", True)
    o = linear_attention(q, k, v)
    ref = linear_attention_naive(q.double(), k.double(), v.double())
    assert rel_err(o, ref) < 2e-5


@needs_kernel
def test_bf16_inputs_within_twice_pytorch_bf16_error():
    """bf16 in, bf16 out (under the interpreter the dots run in fp32; on GPU see the gpu test)."""
    q, k, v = make_inputs(1, 40, 2, 16, "elu", True, dtype=torch.bfloat16)
    ref = linear_attention_naive(q.double(), k.double(), v.double())
    o = op._kernel_forward(q, k, v, seg_len=16 if op.kernels.INTERPRET else 128)
    assert o.dtype == torch.bfloat16
    assert rel_err(o, ref) <= 2 * rel_err(linear_attention_naive(q, k, v), ref)


@needs_kernel
def test_strided_inputs():
    # [B, H, T, D] storage seen as [B, T, H, D], and a sliced head dim: neither is contiguous
    B, T, H, D = 1, 33, 2, 16
    q = torch.randn(B, H, T, D, device=DEV).transpose(1, 2)
    k = torch.randn(B, T, H, 2 * D, device=DEV)[..., ::2]
    v = torch.randn(B, H, T, D, device=DEV).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    q.requires_grad_(), v.requires_grad_()
    o = linear_attention(q, k, v, "elu")
    go = torch.randn_like(o)
    o.backward(go)
    q64, v64 = (t.detach().double().requires_grad_() for t in (q, v))
    ref = linear_attention_naive(q64, k.double(), v64, "elu")
    ref.backward(go.double())
    assert rel_err(o, ref) < 2e-5
    assert rel_err(q.grad, q64.grad) < 2e-5 and rel_err(v.grad, v64.grad) < 2e-5


def test_fp64_and_cpu_without_interpreter_use_the_reference():
    q, k, v = (torch.randn(1, 9, 2, 48, dtype=torch.float64) for _ in range(3))  # D=48: no kernel needed
    o = linear_attention(q, k, v, "relu", normalize=False, causal=False)
    assert torch.equal(o, linear_attention_naive(q, k, v, "relu", normalize=False, causal=False))


def test_naive_matches_a_direct_loop():
    """The reference itself against the recurrence written out token by token."""
    q, k, v = (torch.randn(1, 7, 2, 4, dtype=torch.float64) for _ in range(3))
    a, b = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    out = torch.empty_like(v)
    S = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    z = torch.zeros(1, 2, 4, dtype=torch.float64)
    for t in range(7):
        S = S + b[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + b[:, t]
        out[:, t] = torch.einsum("bhd,bhde->bhe", a[:, t], S) / ((a[:, t] * z).sum(-1, keepdim=True) + 1e-6)
    assert rel_err(linear_attention_naive(q, k, v), out) < 1e-12


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), ValueError, "4 dimensions"),
        (lambda: (torch.randn(1, 3, 2, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 3, 2, 16)), ValueError, "k must have the same shape"),
        (lambda: (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 8)), ValueError, "v must have the same shape"),
        (lambda: (torch.ones(1, 3, 2, 16, dtype=torch.int32),) * 3, TypeError, "q must be float16, bfloat16, float32 or float64"),
        (lambda: (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16, dtype=torch.float64), torch.randn(1, 3, 2, 16)), TypeError, "k must have the same dtype"),
        (lambda: (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16, device="meta"), torch.randn(1, 3, 2, 16)), ValueError, "k is on meta"),
    ],
)
def test_bad_inputs(make, error, match):
    q, k, v = make()
    with pytest.raises(error, match=match):
        linear_attention(q, k, v)


def test_bad_options():
    q = torch.randn(1, 3, 2, 16)
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, q, q, feature_map="softmax")
    with pytest.raises(ValueError, match="eps"):
        linear_attention(q, q, q, eps=-1.0)
    with pytest.raises(TypeError, match="bools"):
        linear_attention(q, q, q, causal=1)


@needs_kernel
def test_unsupported_head_dim_names_the_supported_ones():
    q = torch.randn(1, 3, 2, 48, device=DEV)
    with pytest.raises(ValueError, match=r"head_dim .* must be one of \(16, 32, 64, 128, 256\)"):
        linear_attention(q, q, q)
    with pytest.raises(ValueError, match="seg_len"):
        op._kernel_forward(q[..., :16], q[..., :16], q[..., :16], seg_len=7)


# ----------------------------------------------------------------------------------------------- GPU


def _errors_vs_fp64(fn, q, k, v, go, ref):
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(qs, ks, vs)
    o.backward(go)
    return [rel_err(o, ref[0]), rel_err(qs.grad, ref[1]), rel_err(ks.grad, ref[2]), rel_err(vs.grad, ref[3])]


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("T", [1000, 4096])
@pytest.mark.parametrize("feature_map,normalize", [("elu", True), ("relu", False)])
def test_gpu_bf16_within_twice_pytorch_bf16_error(D, T, feature_map, normalize):
    """Kernel error (bf16 in, bf16 out) at most 2x the error of the naive reference run in bf16 end to
    end, both against the fp64 reference, for the output and all three gradients."""
    B, H = 1, 4
    q, k, v = make_inputs(B, T, H, D, feature_map, normalize, dtype=torch.bfloat16, device="cuda")
    go = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64 = linear_attention_naive(q64, k64, v64, feature_map, normalize)
    o64.backward(go.double())
    ref = [o64.detach(), q64.grad, k64.grad, v64.grad]
    ours = _errors_vs_fp64(lambda a, b, c: linear_attention(a, b, c, feature_map, normalize), q, k, v, go, ref)
    torch_bf16 = _errors_vs_fp64(lambda a, b, c: linear_attention_naive(a, b, c, feature_map, normalize), q, k, v, go, ref)
    for name, e, e_ref in zip(("o", "dq", "dk", "dv"), ours, torch_bf16):
        assert math.isfinite(e) and e <= 2 * e_ref, (name, e, e_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("normalize,causal", [(True, True), (False, False)])
def test_gpu_opcheck(normalize, causal):
    q, k, v = (torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    args = (q, k, v, 1, normalize, causal, 1e-6, 128)
    torch.library.opcheck(torch.ops.mmm.linear_attention_fwd.default, args)
    o, rden, states = torch.ops.mmm.linear_attention_fwd(*args)
    do = torch.randn_like(o)
    bwd_args = (do, q.detach(), k.detach(), v.detach(), o.detach(), rden, states, 1, normalize, causal, 128)
    torch.library.opcheck(torch.ops.mmm.linear_attention_bwd.default, bwd_args)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    q, k, v = (torch.randn(2, 777, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    go = torch.randn_like(q)

    def step(fn):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        o = fn(qs, ks, vs)
        o.backward(go)
        return o, qs.grad, ks.grad, vs.grad

    def f(a, b, c):
        return linear_attention(a, b, c, "elu", True, True) * 2.0

    eager = step(f)
    compiled = step(torch.compile(f, fullgraph=True))
    for e, c in zip(eager, compiled):
        assert rel_err(c, e) < 1e-3
