"""The fused causal hybrid kernels (mmm.ops.linear_attention.hybrid_op) against the naive hybrid in fp64,
forward and every gradient. On CPU they run under TRITON_INTERPRET=1 (conftest) in fp32 on tiny shapes;
the `gpu` tests check bf16 accuracy, opcheck and torch.compile on CUDA."""

import math

import pytest
import torch

import mmm
from conftest import rel_err
from mmm.attention import api, naive
from mmm.attention import hybrid as hybrid_mod
from mmm.attention import linear as linear_mod
from mmm.attention.feature_maps import make_feature_map
from mmm.attention.window import near_mask
from mmm.ops.linear_attention import hybrid_op, op

needs_kernel = pytest.mark.skipif(
    not (op.HAVE_TRITON and (torch.cuda.is_available() or op.kernels.INTERPRET)),
    reason="needs triton with CUDA or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def calibrated_map(name, d, log_scales):
    """An elu / relu map with a per-head calibration c_h (hybrid.py's docstring)."""
    fmap = make_feature_map(name, d)
    fmap.hybrid_log_scale = torch.tensor(log_scales, dtype=torch.float32)
    return fmap


def inputs(B, T, H, D, DV=None, dtype=torch.float32, device=DEV, hk=None):
    """q [B, T, H, D], k [B, T, hk, D], v [B, T, hk, DV]; scaled so that near and far weights both count."""
    hk = hk or H
    q, k = (torch.randn(B, T, n, D, dtype=dtype, device=device) for n in (H, hk))
    return q, k, torch.randn(B, T, hk, DV or D, dtype=dtype, device=device)


def fp64_reference(q, k, v, fmap, window, go, eps=1e-6, shape="sliding"):
    """naive_hybrid's output and dq, dk, dv in fp64."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o = naive.naive_hybrid(q64, k64, v64, fmap, window, True, eps, window_shape=shape)
    return [o.detach(), *torch.autograd.grad(o, (q64, k64, v64), go.double())]


def fused(q, k, v, fmap, window, go, eps=1e-6, shape="sliding"):
    """hybrid_attention_fused's output and dq, dk, dv (fresh leaves)."""
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    c = fmap.hybrid_log_scale_for(q.shape[2]).float()
    o = hybrid_op.hybrid_attention_fused(qs, ks, vs, c, fmap.name, window, eps, shape)
    return [o, *torch.autograd.grad(o, (qs, ks, vs), go)]


def assert_close(got, want, tol):
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and torch.isfinite(g).all(), name
        assert rel_err(g, w) < tol, (name, rel_err(g, w))


@needs_kernel
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("window,T", [(16, 40), (16, 64), (32, 75), (32, 128)])
def test_forward_and_gradients_match_fp64(feature_map, window, T, poisoned_empty):
    """Partial last chunks (40, 75) and whole ones (64; 128, where the kernels drop their row masks),
    several segments (the interpreter's are 16-32 rows), two batches, per-head calibrations."""
    q, k, v = inputs(2, T, 2, 16, DV=32)
    fmap = calibrated_map(feature_map, 16, [-1.0, 0.5])
    go = torch.randn(2, T, 2, 32, device=DEV)
    assert_close(fused(q, k, v, fmap, window, go), fp64_reference(q, k, v, fmap, window, go), 1e-5)


@needs_kernel
@pytest.mark.parametrize("feature_map,log_scales", [("elu", [-1.0, 0.5]), ("relu", [120.0, -3.0])])
@pytest.mark.parametrize("window,T", [(16, 40), (16, 75), (32, 128), (64, 130)])
def test_block_windows_match_fp64(feature_map, log_scales, window, T, poisoned_empty):
    """Block windows (window_shape='block'): the forward's unlagged state and diagonal block, the linear
    backward without its within-chunk terms at chunks set to the blocks (32, 64: not the interpreter's
    own 16), the band kernels' diagonal block. Partial and whole last blocks, two batches, c_h up to 120."""
    q, k, v = inputs(2, T, 2, 16, DV=32)
    fmap = calibrated_map(feature_map, 16, log_scales)
    go = torch.randn(2, T, 2, 32, device=DEV)
    got = fused(q, k, v, fmap, window, go, shape="block")
    assert_close(got, fp64_reference(q, k, v, fmap, window, go, shape="block"), 1e-5)
    # and it is not the sliding window's hybrid
    assert rel_err(got[0], fp64_reference(q, k, v, fmap, window, go)[0]) > 1e-2


@needs_kernel
@pytest.mark.parametrize("window,T", [(32, 40), (32, 75), (48, 96), (64, 130)])
def test_windows_over_one_chunk_match_fp64(window, T, poisoned_empty, monkeypatch):
    """Windows of several chunks (chunk 16 here: 2, 3 and 4 of them; on a GPU 64, e.g. window 256 = 4):
    the forward's loop over the wholly-near chunks between, the band kernels' over the same blocks.
    Partial and whole last chunks, T shorter than the window plus a chunk, two batches, elu and relu."""
    monkeypatch.setattr(hybrid_op, "MAX_CHUNK", 16)
    q, k, v = inputs(2, T, 2, 16, DV=32)
    for name, scales in (("elu", [-1.0, 0.5]), ("relu", [120.0, -3.0])):
        fmap = calibrated_map(name, 16, scales)
        go = torch.randn(2, T, 2, 32, device=DEV)
        assert_close(fused(q, k, v, fmap, window, go), fp64_reference(q, k, v, fmap, window, go), 1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU: the refusal on CUDA (LONG_WINDOWS_ON_CUDA)")
def test_long_windows_are_refused_on_cuda_for_now(monkeypatch):
    """Off on CUDA (an H100 fault, session 20) with a message that says so; the interpreter runs them."""
    monkeypatch.setattr(hybrid_op, "LONG_WINDOWS_ON_CUDA", False)
    q = torch.empty(1, 8, 1, 16, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(op, "_uses_kernel", lambda t: True)
    assert hybrid_op._kernel_applies(q, q, 64) and not hybrid_op._kernel_applies(q, q, 128)


@needs_kernel
def test_a_window_of_two_gpu_chunks_matches_fp64(poisoned_empty):
    """Window 128 with the kernels' own chunk of 64 (no patched constant), as on a GPU."""
    q, k, v = inputs(1, 200, 1, 16)
    fmap = calibrated_map("elu", 16, [0.5])
    go = torch.randn_like(v)
    assert_close(fused(q, k, v, fmap, 128, go), fp64_reference(q, k, v, fmap, 128, go), 1e-5)


@needs_kernel
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("log_scales", [(6.0, -30.0), (120.0, -120.0)])
def test_far_weights_dominate_and_vanish(feature_map, log_scales, poisoned_empty):
    """c_h = +6 makes the far keys outweigh the near ones, c_h = -30 leaves the window alone (the far
    share then underflows, the output is window softmax): the shared max r keeps both finite and exact.
    +-120: as large as fit_hybrid's on the bench's trained layer, where a max of the near scores and c_h
    alone made the rows without far mass (the first window, all-zero relu features) 0 / 0."""
    q, k, v = inputs(1, 96, 2, 32)
    go = torch.randn_like(v)
    fmap = calibrated_map(feature_map, 32, list(log_scales))
    assert_close(fused(q, k, v, fmap, 32, go), fp64_reference(q, k, v, fmap, 32, go), 1e-5)


@needs_kernel
def test_shorter_than_the_window_is_window_softmax(poisoned_empty):
    """T < W: every visible key is near; the hybrid is exact softmax attention there (and the lagged
    linear backward, whose lag then exceeds T, must still zero every key's far gradient)."""
    q, k, v = inputs(1, 10, 2, 16)
    fmap = calibrated_map("elu", 16, [0.0, 0.0])
    go = torch.randn_like(v)
    got = fused(q, k, v, fmap, 16, go)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    exact = torch.nn.functional.scaled_dot_product_attention(
        q64.transpose(1, 2), k64.transpose(1, 2), v64.transpose(1, 2), is_causal=True).transpose(1, 2)
    want = [exact.detach(), *torch.autograd.grad(exact, (q64, k64, v64), go.double())]
    assert_close(got, want, 1e-5)


@needs_kernel
@pytest.mark.parametrize("shape", ["sliding", "block"])
def test_through_mmm_attention_with_grouped_query_heads(shape, monkeypatch):
    """mmm.attention(method='hybrid', window=16) takes the fused path for elu maps (GQA keys repeated to
    the query heads inside) and matches the fp64 reference, for either window shape."""
    monkeypatch.setattr(linear_mod, "KERNEL_ON_CPU_INTERPRETER", True)
    q, k, v = inputs(1, 48, 4, 16, hk=2)
    fmap = calibrated_map("elu", 16, [-1.0, 0.0, 0.5, -2.0])
    opts = dict(window=16, window_shape=shape, feature_map=fmap)
    assert api.attention_path(q, k, v, "hybrid", **opts) == "fused"
    go = torch.randn_like(q)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    o = mmm.attention(qs, ks, vs, "hybrid", **opts)
    got = [o, *torch.autograd.grad(o, (qs, ks, vs), go)]
    assert_close(got, fp64_reference(q, k, v, fmap, 16, go, shape=shape), 1e-5)


@needs_kernel
def test_other_windows_maps_and_trained_calibrations_take_another_path(monkeypatch):
    monkeypatch.setattr(linear_mod, "KERNEL_ON_CPU_INTERPRETER", True)
    q, k, v = inputs(1, 48, 2, 16)
    path = lambda **kw: api.attention_path(q, k, v, "hybrid", **{"window": 16, "feature_map": "elu", **kw})
    assert path() == "fused"
    assert path(window=48) != "fused"  # not a window the kernels take
    assert path(window=128) != "fused"  # one they take, untimed against flex (DISPATCH_MAX_WINDOW)
    assert path(causal=False) != "fused"
    assert path(feature_map="favor") != "fused"
    assert path(window_shape="block") == "fused"
    assert path(window_shape="block", window=128) == "blockwise"  # blocks are the kernels' chunks: <= 64
    assert path(window_shape="block", causal=False) == "blockwise"
    trained = make_feature_map("elu", 16)
    trained.hybrid_log_scale.requires_grad_()  # fit_hybrid trains c_h: the kernel returns no gradient for it
    assert path(feature_map=trained) != "fused"
    assert not hybrid_mod.fused_applies(q.double(), v.double(), make_feature_map("elu", 16), 16, True)


@needs_kernel
@pytest.mark.parametrize("kwargs,match", [
    (dict(window=48), r"a window of 16, 32, 64 or \(sliding\) a multiple of 64 up to 512"),
    (dict(window=128, window_shape="block"), "got block window=128"),
    (dict(window_shape="blocks"), "window_shape must be"),
    (dict(window=576), "a window of 16, 32, 64"),
    (dict(feature_map="favor"), "feature_map must be 'elu' or 'relu'"),
    (dict(log_scale=torch.zeros(3)), r"log_scale must be \[heads\] = \[2\]"),
    (dict(log_scale=torch.zeros(2, requires_grad=True)), "without a gradient"),
    (dict(eps=-1.0), "eps must be a finite number"),
    (dict(eps=math.nan), "eps must be a finite number"),
])
def test_bad_arguments_name_what_is_expected(kwargs, match):
    q, k, v = inputs(1, 32, 2, 16)
    args = dict(log_scale=torch.zeros(2), feature_map="elu", window=16, eps=1e-6) | kwargs
    with pytest.raises(ValueError, match=match):
        hybrid_op.hybrid_attention_fused(q, k, v, **args)


@needs_kernel
@pytest.mark.parametrize("d", [24, 256])
def test_unsupported_head_dim_names_the_supported_ones(d, monkeypatch):
    q, k, v = inputs(1, 32, 2, d)
    with pytest.raises(ValueError, match=r"head dims in \(16, 32, 64, 128\)"):
        hybrid_op.hybrid_attention_fused(q, k, v, torch.zeros(2), "elu", 16)
    monkeypatch.setattr(linear_mod, "KERNEL_ON_CPU_INTERPRETER", True)
    assert api.attention_path(q, k, v, "hybrid", window=16) != "fused"  # 256: the flex / blockwise path


# ----------------------------------------------------------------------------------------------- GPU


def hybrid_in_input_dtype(q, k, v, fmap, window, eps=1e-6, shape="sliding"):
    """The causal hybrid written out in PyTorch in q's dtype (naive_hybrid computes in fp64): T x T scores
    and kernel weights, each row scaled by its largest near exponent as any low-precision implementation
    must. Its error against fp64 is PyTorch's own error in that dtype. Heads of q = heads of k."""
    t, d = q.shape[1], q.shape[-1]
    s = torch.einsum("bihd,bjhd->bhij", q, k) * d ** -0.5
    kappa = torch.einsum("bihf,bjhf->bhij", fmap(q, is_query=True), fmap(k, is_query=False))
    c = fmap.hybrid_log_scale_for(q.shape[2]).to(q.dtype)[:, None, None]
    i, j = torch.arange(t, device=q.device)[:, None], torch.arange(t, device=q.device)[None, :]
    visible = j <= i
    near = visible & near_mask(i, j, window, shape)
    far = visible & ~near
    m = torch.maximum(s.detach().masked_fill(~near, -torch.inf).amax(-1, keepdim=True), c)
    w = torch.where(near, torch.exp(s - m), 0.0) + torch.where(far, torch.exp(c - m) * kappa, 0.0)
    o = torch.einsum("bhij,bjhe->bihe", w, v)
    return o / (w.sum(-1) + eps * torch.exp(-m[..., 0])).transpose(1, 2).unsqueeze(-1)


@pytest.mark.parametrize("shape", ["sliding", "block"])
def test_hybrid_in_input_dtype_is_the_hybrid(shape):
    """In fp64 the reference above is naive_hybrid (so its bf16 error is the formula's, nothing else)."""
    q, k, v = inputs(1, 40, 2, 16, dtype=torch.float64, device="cpu")
    fmap = calibrated_map("elu", 16, [-1.0, 2.0])
    want = naive.naive_hybrid(q, k, v, fmap, 16, window_shape=shape)
    assert rel_err(hybrid_in_input_dtype(q, k, v, fmap, 16, shape=shape), want) < 1e-12


def _assert_within_twice_pytorch_bf16(q, k, v, fmap, window, shape="sliding"):
    """Kernel error (bf16 in and out) at most 2x the error of the hybrid written out in PyTorch in bf16,
    both against fp64, for the output and every gradient."""
    go = torch.randn_like(v)
    ref = fp64_reference(q, k, v, fmap, window, go, shape=shape)
    ours = fused(q, k, v, fmap, window, go, shape=shape)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    o = hybrid_in_input_dtype(qs, ks, vs, fmap, window, shape=shape)
    torch_bf16 = [o, *torch.autograd.grad(o, (qs, ks, vs), go)]
    for name, g, t, w in zip(("o", "dq", "dk", "dv"), ours, torch_bf16, ref):
        e, e_ref = rel_err(g, w), rel_err(t, w)
        assert math.isfinite(e) and e <= 2 * e_ref, (name, e, e_ref)


@needs_kernel
@pytest.mark.parametrize("shape", ["sliding", "block"])
def test_bf16_inputs_within_twice_pytorch_bf16_error(shape):
    """bf16 in and out (under the interpreter the dots run in fp32; on GPU see the gpu tests)."""
    q, k, v = inputs(1, 100, 2, 32, dtype=torch.bfloat16)
    _assert_within_twice_pytorch_bf16(q, k, v, calibrated_map("elu", 32, [-1.0, 0.5]).to(DEV), 32, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [16, 32, 64, 256])  # 256: four chunks of 64 (called directly)
@pytest.mark.parametrize("T,D,DV", [(1000, 128, 128), (4096, 64, 128), (2048, 128, 64)])
def test_gpu_bf16_within_twice_pytorch_bf16_error(window, T, D, DV):
    if window > hybrid_op.MAX_CHUNK and not hybrid_op.LONG_WINDOWS_ON_CUDA:
        pytest.skip("windows over 64 are off on CUDA (they faulted on an H100): MMM_HYBRID_LONG_WINDOWS=1")
    q, k, v = inputs(1, T, 4, D, DV=DV, dtype=torch.bfloat16)
    fmap = calibrated_map("elu", D, [-2.0, -1.0, 0.0, 1.0]).cuda()
    _assert_within_twice_pytorch_bf16(q, k, v, fmap, window)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [16, 32, 64])
@pytest.mark.parametrize("T,D,DV", [(1000, 128, 128), (4096, 64, 128)])
def test_gpu_block_bf16_within_twice_pytorch_bf16_error(window, T, D, DV):
    q, k, v = inputs(1, T, 4, D, DV=DV, dtype=torch.bfloat16)
    fmap = calibrated_map("elu", D, [-2.0, -1.0, 0.0, 1.0]).cuda()
    _assert_within_twice_pytorch_bf16(q, k, v, fmap, window, "block")


@pytest.mark.gpu
def test_gpu_relu_bf16_within_twice_pytorch_bf16_error():
    q, k, v = inputs(2, 3000, 2, 128, dtype=torch.bfloat16)
    _assert_within_twice_pytorch_bf16(q, k, v, calibrated_map("relu", 128, [-1.0, 0.0]).cuda(), 64)


@pytest.mark.gpu
@pytest.mark.parametrize("block", [False, True])
def test_gpu_opcheck(block, monkeypatch):
    from test_linear_attention_kernel import _pin_tile_configs

    q, k, v = (torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    args = (q, k, v, torch.tensor([-1.0, 0.5], device="cuda"), 1, 32, block, 1e-6, 64 ** -0.25)
    o, rfar, lse2, states = (t.detach() for t in torch.ops.mmm.hybrid_attention_fwd(*args))
    bwd_args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, rfar, lse2, states, 1, 32, block,
                64 ** -0.25)
    torch.ops.mmm.hybrid_attention_bwd(*bwd_args)  # every kernel launched (and tuned) once before pinning
    # (block: the backward's kernels at chunks set to the blocks, kernels.with_chunk's, too)
    _pin_tile_configs(monkeypatch, [hybrid_op.hybrid_kernels.hybrid_fwd_kernel, *op.kernels._WITH_CHUNK.values()])
    torch.library.opcheck(torch.ops.mmm.hybrid_attention_fwd.default, args)
    torch.library.opcheck(torch.ops.mmm.hybrid_attention_bwd.default, bwd_args)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["sliding", "block"])
def test_gpu_torch_compile_fullgraph(shape):
    q, k, v = inputs(2, 777, 4, 128, dtype=torch.bfloat16)
    fmap = calibrated_map("elu", 128, [-1.0, 0.0, 0.5, -2.0]).cuda()
    go = torch.randn_like(v)

    def f(a, b, c):  # (dynamo cannot call the module mmm.attention: its function)
        return api.attention(a, b, c, "hybrid", window=64, window_shape=shape, feature_map=fmap) * 2.0

    assert api.attention_path(q, k, v, "hybrid", feature_map=fmap, window=64, window_shape=shape) == "fused"
    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        o = fn(qs, ks, vs)
        results.append([o, *torch.autograd.grad(o, (qs, ks, vs), go)])
    # the traced op may sum in another order (fp32 sums, one bf16 rounding): a bf16 ulp apart at most
    for e, c in zip(*results):
        assert rel_err(c, e) < 2**-8
