"""Linear attention kernels against the naive reference, forward and every gradient, errors measured
against fp64. On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest) in fp32 on tiny
shapes; the `gpu` tests check bf16 accuracy, opcheck and torch.compile on CUDA."""

import math

import pytest
import torch

from conftest import OpNames, rel_err

try:
    import triton
except ImportError:  # the kernel tests skip without triton
    triton = None
from mmm.ops.linear_attention import SUPPORTED_HEAD_DIMS, linear_attention, linear_attention_naive
from mmm.ops.linear_attention import op

needs_kernel = pytest.mark.skipif(
    not (op.HAVE_TRITON and (torch.cuda.is_available() or op.kernels.INTERPRET)),
    reason="needs triton with CUDA or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, T, H, D, feature_map, normalize, dtype=torch.float32, device=DEV, dv=None):
    """q, k [B, T, H, D] and v [B, T, H, dv] (dv = D unless given)."""
    q, k = (torch.randn(B, T, H, D, dtype=dtype, device=device) for _ in range(2))
    v = torch.randn(B, T, H, D if dv is None else dv, dtype=dtype, device=device)
    if feature_map is None and normalize:
        # identity features can make phi(q) . z cross zero, where the normalized output is undefined:
        # keep q and k positive so the comparison measures the kernel, not the conditioning
        q, k = q.abs() + 0.1, k.abs() + 0.1
    return q, k, v


def check_against_fp64(q, k, v, feature_map, normalize, causal, seg_len, tol, grad_floor=0.0, scale=1.0, lag=0):
    """Forward and dq, dk, dv of the kernel path vs the naive reference in fp64 (upstream grad random);
    scale: the kernel's input scaling, which the reference gets as scale * q, scale * k; lag: the key lag."""
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = op._kernel_forward(qs, ks, vs, feature_map, normalize, causal, 1e-6, seg_len=seg_len, scale=scale, lag=lag)
    go = torch.randn_like(o)
    o.backward(go)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = linear_attention_naive(q64 * scale, k64 * scale, v64, feature_map, normalize, causal, 1e-6, lag=lag)
    ref.backward(go.double())
    assert o.dtype == q.dtype and o.shape == v.shape
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
@pytest.mark.parametrize("feature_map", ["elu", "relu", None])
@pytest.mark.parametrize("normalize,causal", [(True, True), (False, True), (True, False)])
def test_input_scale_applied_in_the_kernel(feature_map, normalize, causal, poisoned_empty):
    """phi(scale * q), phi(scale * k) with the scale applied as the kernels read q and k, and dq, dk
    carrying it (chain rule): as the reference on pre-scaled inputs, forward and every gradient."""
    q, k, v = make_inputs(1, 70, 2, 16, feature_map, normalize)
    check_against_fp64(q, k, v, feature_map, normalize, causal, seg_len=32, tol=2e-5, scale=0.37)


@needs_kernel
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("writer", ["forward", "backward", "none"])
def test_features_written_once(feature_map, causal, writer, poisoned_empty, monkeypatch):
    """The kernel that first computes a map's features writes them as the dots take them for the later
    kernels to read: phi(s q) the backward's chunk_state; phi(s k) the forward's chunk_state
    (`op.features_written`), or else (a key lag, the hybrid's) the backward's first dq/dk launch; with
    MMM_LA_WRITE_FEATURES=0 (`op.WRITE_FEATURES`) none, each kernel computing them. All match fp64, and the
    backward keeps q and the keys' features in the first case, q and k in the others."""
    if writer == "backward":
        monkeypatch.setattr(op, "features_written", lambda *args: False)
    elif writer == "none":
        monkeypatch.setattr(op, "WRITE_FEATURES", False)
    q, k, v = make_inputs(1, 100, 2, 16, feature_map, True)
    check_against_fp64(q, k, v, feature_map, True, causal, seg_len=32, tol=2e-5, scale=0.37)
    qs, ks = (t.clone().requires_grad_() for t in (q, k))
    o = op._kernel_forward(qs, ks, v, feature_map, True, causal, seg_len=32, scale=0.37)
    phi = torch.relu if feature_map == "relu" else (lambda x: torch.nn.functional.elu(x) + 1)
    want = (q, phi(0.37 * k)) if writer == "forward" else (q, k)
    for got, expected in zip(o.grad_fn.saved_tensors[:2], want):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("only", ["chunk_state", "fwd", "dqdk"])
def test_normalizer_sums_as_dots_in_one_kernel(only, monkeypatch):
    """ZDOT limited to one kernel (MMM_LA_ZDOT=<name>, for bisecting a GPU failure): that kernel alone
    switches, and output and gradients still match fp64."""
    monkeypatch.setattr(op.kernels, "ZDOT", frozenset({only}))
    assert [op.kernels.zdot(n) for n in op.kernels.ZDOT_KERNELS] == [n == only for n in op.kernels.ZDOT_KERNELS]
    q, k, v = make_inputs(1, 70, 2, 16, "elu", True)
    check_against_fp64(q, k, v, "elu", True, True, seg_len=32, tol=2e-5)


@needs_kernel
@pytest.mark.parametrize("feature_map,causal", [("elu", True), ("relu", False), (None, True)])
@pytest.mark.parametrize("split", [True, False], ids=["dq-dk-apart", "dq-dk-together"])
def test_normalizer_sums_as_dots(feature_map, causal, split, poisoned_empty, monkeypatch):
    """kernels.ZDOT: the normalizer's sums as tensor-core dots in every kernel, forward and backward
    (rden's own gradient included, dq and dk in one launch or two): as the reference, like the default."""
    monkeypatch.setattr(op.kernels, "ZDOT", True)
    monkeypatch.setattr(op.kernels, "SPLIT_DQDK", split)
    q, k, v = make_inputs(1, 70, 2, 16, feature_map, True)
    check_against_fp64(q, k, v, feature_map, True, causal, seg_len=32, tol=2e-5)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    o, rden = linear_attention(qs, ks, vs, feature_map, causal=causal, with_rden=True)
    (o.sum() + rden.sum()).backward()
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    monkeypatch.setattr(op.kernels, "ZDOT", False)
    o64, rden64 = linear_attention(q64.float(), k64.float(), v64.float(), feature_map, causal=causal, with_rden=True)
    (o64.sum() + rden64.sum()).backward()
    assert rel_err(rden, rden64) < 2e-5
    for got, want in ((qs.grad, q64.grad), (ks.grad, k64.grad), (vs.grad, v64.grad)):
        assert rel_err(got, want) < 2e-5


@needs_kernel
@pytest.mark.parametrize("T", [1, 17, 64])
def test_sequence_lengths(T, poisoned_empty):
    q, k, v = make_inputs(1, T, 2, 16, "elu", True)
    # normalized with T=1, o = v exactly and dq, dk vanish (up to eps): measure them against ||dv||
    check_against_fp64(q, k, v, "elu", True, True, seg_len=32, tol=2e-5, grad_floor=1.0 if T == 1 else 0.0)


@needs_kernel
@pytest.mark.parametrize("feature_map,normalize,causal,lag", [
    ("elu", True, True, 0), ("relu", False, False, 0), (None, False, True, 0), ("elu", True, True, 40)])
def test_whole_chunks_drop_the_row_masks(feature_map, normalize, causal, lag, poisoned_empty):
    """T and the segment length multiples of MAX_BT: the kernels run without row masks (FULL_CHUNKS; the
    key lag keeps its own mask). Output and every gradient against fp64, as with masked chunks."""
    T, seg = 2 * op.kernels.MAX_BT, op.kernels.MAX_BT
    assert op.full_chunks(T, seg) and not op.full_chunks(T - 1, seg) and not op.full_chunks(T, seg + 16)
    q, k, v = make_inputs(1, T, 2, 16, feature_map, normalize)
    check_against_fp64(q, k, v, feature_map, normalize, causal, seg_len=seg, tol=2e-5, lag=lag,
                       grad_floor=1.0 if lag else 0.0)


@needs_kernel
def test_autotuning_keys_on_a_shape_bucket(monkeypatch):
    """Each kernel tunes once per bucket of (sequence, segment) pairs and segment length, so the first
    call's length does not choose the tiles for every length; every launch passes its bucket."""
    kern = op.kernels
    for name in kern.CONFIGS:  # the autotuned kernels
        assert "TUNE_BUCKET" in getattr(kern, name).keys, name
    # 16 heads on the GPU: T = 1k / 2k, 8k / 32k and 128k (segments 256, 1024 / 4096, 16384)
    assert [kern.tune_bucket(p, L) for p, L in ((64, 256), (128, 256), (128, 1024), (128, 4096), (128, 16384))] == [3, 3, 4, 4, 5]
    assert kern.tune_bucket(8, 256) == 0 and kern.tune_bucket(8, 8192) == 2
    seen = []
    run = kern.fwd_kernel.run
    monkeypatch.setattr(kern.fwd_kernel, "run", lambda *a, **kw: (seen.append(kw["TUNE_BUCKET"]), run(*a, **kw))[1])
    q, k, v = make_inputs(1, 48, 2, 16, "elu", True)
    op._kernel_forward(q, k, v, "elu", True, True, 1e-6, seg_len=16)
    assert seen == [kern.tune_bucket(3 * 2, 16)]


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
@pytest.mark.parametrize("dk,dv", [(32, 16), (16, 32)], ids=["dk32-dv16", "dk16-dv32"])
@pytest.mark.parametrize("feature_map", ["elu", "relu", None])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_key_and_value_widths_differ(dk, dv, feature_map, normalize, causal, poisoned_empty):
    # q, k [.., dk] and v [.., dv]: two 16-wide tiles on the wider side, one on the other; T=50 in
    # segments of 32 (ragged last chunk and segment), B=2 for the batch offsets of both widths
    q, k, v = make_inputs(2, 50, 2, dk, feature_map, normalize, dv=dv)
    check_against_fp64(q, k, v, feature_map, normalize, causal, seg_len=32, tol=2e-5)


@needs_kernel
@pytest.mark.parametrize("feature_map,normalize,causal", [("elu", True, True), ("relu", True, False), (None, False, True)])
def test_dq_and_dk_in_two_launches(feature_map, normalize, causal, poisoned_empty, monkeypatch):
    """kernels.SPLIT_DQDK: dq and dk from two launches of the backward kernel (PART 1, 2), each writing
    only its own gradient (the NaN-poisoned buffers catch one that writes nothing)."""
    monkeypatch.setattr(op.kernels, "SPLIT_DQDK", True)
    q, k, v = make_inputs(2, 50, 2, 32, feature_map, normalize, dv=16)
    check_against_fp64(q, k, v, feature_map, normalize, causal, seg_len=32, tol=2e-5)


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


def test_scale_on_the_reference_path():
    q, k, v = (torch.randn(1, 9, 2, 16, dtype=torch.float64) for _ in range(3))
    want = linear_attention_naive(q * 0.5, k * 0.5, v, "elu")
    assert rel_err(linear_attention(q, k, v, "elu", scale=0.5), want) < 1e-12


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
        (lambda: (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16), torch.randn(1, 4, 2, 16)), ValueError, r"v must have shape .* as q's \(1, 3, 2\)"),
        (lambda: (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 3, 16), torch.randn(1, 3, 2, 16)), ValueError, "k must have the same shape"),
        (lambda: (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 32), torch.randn(1, 3, 2, 32)), ValueError, r"k must have the same shape as q \(1, 3, 2, 16\), got \(1, 3, 2, 32\)"),
        (lambda: (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16), torch.randn(1, 3, 16)), ValueError, "v must have shape"),
        (lambda: (torch.ones(1, 3, 2, 16, dtype=torch.int32),) * 3, TypeError, "q must be float16, bfloat16, float32 or float64"),
        (lambda: (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16, dtype=torch.float64), torch.randn(1, 3, 2, 16)), TypeError, "k must have the same dtype"),
        (lambda: (torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16, device="meta"), torch.randn(1, 3, 2, 16)), ValueError, "k is on meta"),
    ],
)
def test_bad_inputs(make, error, match):
    q, k, v = make()
    with pytest.raises(error, match=match):
        linear_attention(q, k, v)


def naive_rden(q, k, feature_map, causal, eps):
    """1 / (phi(q_t) . sum_{s <= t} phi(k_s) + eps) as [B, H, T] (the sum over all s when not causal)."""
    phi = {"elu": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu, None: lambda x: x}[feature_map]
    a, b = phi(q), phi(k)
    z = b.cumsum(1) if causal else b.sum(1, keepdim=True)
    return (1.0 / ((a * z).sum(-1) + eps)).transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize("feature_map,causal", [("elu", True), ("relu", False)])
def test_rden_output_and_its_gradient(feature_map, causal, poisoned_empty):
    """with_rden: rden matches the reference, and gradients through both o and rden (as hybrid attention
    uses them), or through rden alone, match fp64."""
    q, k, v = make_inputs(2, 45, 3, 16, feature_map, True, dv=32)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    o, rden = linear_attention(qs, ks, vs, feature_map, causal=causal, with_rden=True)
    go, gr = torch.randn_like(o), torch.randn_like(rden)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o_ref = linear_attention_naive(q64, k64, v64, feature_map, True, causal, 1e-6)
    r_ref = naive_rden(q64, k64, feature_map, causal, 1e-6)
    assert rden.dtype == torch.float32 and rden.shape == (2, 3, 45)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(rden, r_ref) < 1e-5
    got = torch.autograd.grad((o * go).sum() + (rden * gr).sum(), (qs, ks, vs))
    want = torch.autograd.grad((o_ref * go.double()).sum() + (r_ref * gr.double()).sum(), (q64, k64, v64), retain_graph=True)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))
    _, rden = linear_attention(qs, ks, vs, feature_map, causal=causal, with_rden=True)
    got = torch.autograd.grad((rden * gr).sum(), (qs, ks))
    want = torch.autograd.grad((r_ref * gr.double()).sum(), (q64, k64))
    for name, a, b in zip(("dq", "dk"), got, want):
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


@needs_kernel
@pytest.mark.parametrize("lag,feature_map,normalize", [
    (1, "elu", True), (16, "relu", False), (37, None, False), (45, "elu", True), (60, "relu", False)])
def test_key_lag(lag, feature_map, normalize, poisoned_empty):
    """lag: query t sees the keys s <= t - lag. Output and every gradient against fp64: lag 1 (an int
    argument Triton specializes), across one or two segment boundaries (segments of 16), two batches (the
    lag must not reach into the previous sequence's rows), lag = T (no keys) and beyond; dk and dv of the
    last `lag` rows are 0."""
    q, k, v = make_inputs(2, 45, 3, 16, feature_map, normalize, dv=32)
    check_against_fp64(q, k, v, feature_map, normalize, True, 16, 1e-5, grad_floor=1.0, lag=lag)


@needs_kernel
def test_key_lag_rden_rows_without_keys():
    """Rows t < lag see no key: o = 0 and rden = 1 / eps; the rest as the unlagged kernel on the shifted
    sequence (what hybrid attention computed before the lag, by slicing)."""
    q, k, v = make_inputs(1, 50, 2, 16, "elu", True)
    o, rden = linear_attention(q, k, v, "elu", with_rden=True, lag=7)
    o_s, rden_s = linear_attention(q[:, 7:], k[:, :43], v[:, :43], "elu", with_rden=True)
    assert torch.all(o[:, :7] == 0) and torch.allclose(rden[..., :7], torch.full_like(rden[..., :7], 1e6))
    assert rel_err(o[:, 7:], o_s) < 1e-6 and rel_err(rden[..., 7:], rden_s) < 1e-6


def test_key_lag_bad_values():
    q = torch.randn(1, 8, 2, 16)
    for lag in (-1, 1.5, True):
        with pytest.raises(ValueError, match="lag must be an int >= 0"):
            linear_attention(q, q, q, lag=lag)
    with pytest.raises(ValueError, match="lag needs causal=True"):
        linear_attention(q, q, q, causal=False, lag=2)
    want = linear_attention_naive(q.double(), q.double(), q.double(), lag=3)  # rows without keys: 0
    assert torch.equal(want[:, :3], torch.zeros_like(want[:, :3])) and want[:, 3:].abs().amin(-1).gt(0).all()


@needs_kernel
def test_rden_needs_the_normalized_kernel():
    q = torch.randn(1, 3, 2, 16)
    with pytest.raises(ValueError, match="with_rden"):
        linear_attention(q, q, q, normalize=False, with_rden=True)
    with pytest.raises(ValueError, match="with_rden"):
        linear_attention(q.double(), q.double(), q.double(), with_rden=True)


def test_bad_options():
    q = torch.randn(1, 3, 2, 16)
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, q, q, feature_map="softmax")
    with pytest.raises(ValueError, match="eps"):
        linear_attention(q, q, q, eps=-1.0)
    with pytest.raises(TypeError, match="bools"):
        linear_attention(q, q, q, causal=1)
    for bad in (math.nan, math.inf, "0.5", True):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            linear_attention(q, q, q, scale=bad)


@needs_kernel
def test_unsupported_head_dim_names_the_supported_ones():
    q = torch.randn(1, 3, 2, 48, device=DEV)
    with pytest.raises(ValueError, match=r"head_dim .* must be one of \(16, 32, 64, 128, 256\)"):
        linear_attention(q, q, q)
    with pytest.raises(ValueError, match="seg_len"):
        op._kernel_forward(q[..., :16], q[..., :16], q[..., :16], seg_len=7)


@needs_kernel
def test_unsupported_value_width_names_the_supported_ones():
    """The key and value widths are checked separately: a supported key width with v of another,
    unsupported width (and the other way round) is refused with the role named."""
    q16, v48 = torch.randn(1, 3, 2, 16, device=DEV), torch.randn(1, 3, 2, 48, device=DEV)
    with pytest.raises(ValueError, match=r"value head_dim \(last dimension of v\) must be one of \(16, 32, 64, 128, 256\).* got 48"):
        linear_attention(q16, q16, v48)
    with pytest.raises(ValueError, match=r"key head_dim \(last dimension of q and k\) must be one of .* got 48"):
        linear_attention(v48, v48, q16)


def test_reference_takes_a_value_width_of_its_own():
    """The naive reference with v wider than q, k equals it run per half of v's columns."""
    q, k = (torch.randn(1, 9, 2, 4, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 9, 2, 6, dtype=torch.float64)
    o = linear_attention_naive(q, k, v)
    assert o.shape == v.shape
    halves = [linear_attention_naive(q, k, v[..., i:i + 3]) for i in (0, 3)]
    assert rel_err(o, torch.cat(halves, -1)) < 1e-12


# ------------------------------------------------------------- every GPU tile config, bounds-checked on CPU

TILE_NAMES = {"chunk_state_kernel": "BK", "fwd_kernel": "BV", "bwd_dqdk_kernel": "BK", "bwd_dv_kernel": "BV"}
GUARD = 1 << 16  # elements before and after each buffer: more than one [BT, H*D] chunk of the shapes below
SENTINEL = -12345.0


def gpu_config_sets():
    """Every GPU config of every kernel at least once, in as few runs as possible: run i takes config i of
    each kernel (cycling the shorter lists)."""
    n = max(len(v) for v in op.kernels.CONFIGS.values())
    return [{name: cfgs[i % len(cfgs)] for name, cfgs in op.kernels.CONFIGS.items()} for i in range(n)]


def largest_tiles():
    """For the fast test: each kernel's config with the biggest BT x tile (the likeliest to overrun)."""
    return {name: max(cfgs, key=lambda c: (c[0] * c[1], c[0])) for name, cfgs in op.kernels.CONFIGS.items()}


def force_configs(monkeypatch, chosen):
    """Run each autotuned kernel with one given (BT, tile, num_warps, num_stages): under the interpreter
    only the tile sizes matter, and they are what decides the addresses."""
    for name, (bt, t, w, s) in chosen.items():
        cfg = triton.Config({"BT": bt, TILE_NAMES[name]: t}, num_warps=w, num_stages=s)
        monkeypatch.setattr(getattr(op.kernels, name), "configs", [cfg])


@pytest.fixture
def guarded_empty(monkeypatch):
    """torch.empty / empty_like (every buffer the op allocates: outputs, rden, r, states) return NaN-filled
    views into larger buffers whose guard regions hold SENTINEL. Returns a function asserting the guards are
    intact: the interpreter does not catch out-of-bounds stores, but they land in a guard."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    buffers = []

    def guarded(like):
        assert like.is_contiguous()
        buf = real_empty(like.numel() + 2 * GUARD, dtype=like.dtype, device=like.device).fill_(SENTINEL)
        buffers.append(buf)
        return buf[GUARD:GUARD + like.numel()].view(like.shape).fill_(math.nan)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: guarded(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: guarded(real_empty_like(*a, **kw)))

    def check():
        assert buffers, "the op allocated nothing through torch.empty: the guard check saw no buffer"
        for buf in buffers:
            for side, part in (("before", buf[:GUARD]), ("after", buf[-GUARD:])):
                bad = int((part != SENTINEL).sum())
                assert bad == 0, f"{bad} elements written {side} a buffer of {buf.numel() - 2 * GUARD}"

    return check


def guarded_input(B, T, H, D, values):
    """values [B=1, T, H, D] (D: that tensor's own width) placed inside a NaN buffer with GUARD rows of NaN either side; returned as a
    contiguous view, so the kernels read it in place and an unmasked read past either end yields NaN."""
    assert B == 1
    pad = -(-GUARD // (H * D))
    big = torch.full((1, T + 2 * pad, H, D), math.nan, dtype=values.dtype)
    big[:, pad:pad + T] = values
    view = big[:, pad:pad + T]
    assert view.is_contiguous() and view.data_ptr() != big.data_ptr()
    return view


def run_bounds_checked(check_guards, feature_map, normalize, causal, dk=128, dv=128, T=200, seg_len=144):
    """fwd + bwd at D=128 (room for every GPU tile), T=200 in segments of 144: two segments, each swept in
    chunks of 16..128 rows with a ragged last chunk (segments need not be multiples of BT); T=256 in
    segments of 128 takes the unmasked whole-chunk path. Inputs and the upstream gradient sit in
    NaN-guarded buffers, outputs in sentinel-guarded ones. dk, dv: the key and value widths (q, k and v, do)."""
    B, H = 1, 2
    vals = make_inputs(B, T, H, dk, feature_map, normalize, device="cpu", dv=dv) + (torch.randn(B, T, H, dv),)
    q, k, v, go = (guarded_input(B, T, H, x.shape[-1], x) for x in vals)
    originals = [x.clone() for x in (q, k, v, go)]
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    o = op._kernel_forward(qs, ks, vs, feature_map, normalize, causal, 1e-6, seg_len=seg_len)
    o.backward(go)
    check_guards()
    for before, after in zip(originals, (q, k, v, go)):
        assert torch.equal(before, after), "a kernel wrote into one of its inputs"
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in originals[:3])
    ref = linear_attention_naive(q64, k64, v64, feature_map, normalize, causal, 1e-6)
    ref.backward(originals[3].double())
    for name, got, want in (("o", o, ref), ("dq", qs.grad, q64.grad), ("dk", ks.grad, k64.grad), ("dv", vs.grad, v64.grad)):
        assert torch.isfinite(got).all(), f"{name} has NaN or inf (an element not written, or a read out of bounds)"
        assert rel_err(got, want) < 2e-5, (name, rel_err(got, want))


@needs_kernel
@pytest.mark.skipif(not op.kernels.INTERPRET, reason="the interpreter runs any tile config on CPU")
@pytest.mark.parametrize("T,seg_len", [(200, 144), (256, 128)], ids=["ragged", "whole-chunks"])
def test_largest_gpu_tiles_stay_in_bounds(T, seg_len, monkeypatch, guarded_empty):
    force_configs(monkeypatch, largest_tiles())
    run_bounds_checked(guarded_empty, "elu", True, True, T=T, seg_len=seg_len)


@needs_kernel
@pytest.mark.skipif(not op.kernels.INTERPRET, reason="the guards check the interpreter's addresses on CPU")
@pytest.mark.parametrize("dk,dv", [(32, 16), (16, 32)], ids=["dk32-dv16", "dk16-dv32"])
def test_different_key_and_value_widths_stay_in_bounds(dk, dv, guarded_empty):
    run_bounds_checked(guarded_empty, "elu", True, True, dk=dk, dv=dv)


@needs_kernel
@pytest.mark.slow
@pytest.mark.skipif(not op.kernels.INTERPRET, reason="the interpreter runs any tile config on CPU")
@pytest.mark.parametrize("feature_map,normalize,causal", [("elu", True, True), (None, False, True), ("relu", True, False)])
@pytest.mark.parametrize("config_set", range(max(len(v) for v in op.kernels.CONFIGS.values())) if op.HAVE_TRITON else [])
@pytest.mark.parametrize("T,seg_len", [(200, 144), (256, 128)], ids=["ragged", "whole-chunks"])
def test_every_gpu_tile_config_stays_in_bounds(T, seg_len, config_set, feature_map, normalize, causal, monkeypatch,
                                               guarded_empty, request):
    """~3 min on 2 cores, so only when asked for: pytest tests/test_linear_attention_kernel.py -m slow"""
    if "slow" not in request.config.getoption("markexpr", "") or "not slow" in request.config.getoption("markexpr", ""):
        pytest.skip("sweeps every GPU tile config under the interpreter (~3 min): run with -m slow")
    force_configs(monkeypatch, gpu_config_sets()[config_set])
    run_bounds_checked(guarded_empty, feature_map, normalize, causal, T=T, seg_len=seg_len)


@needs_kernel
def test_kernels_are_idempotent_under_autotuning(monkeypatch):
    """The autotuner launches each config many times on the same buffers: launching every autotuned kernel
    twice must give bit-identical results (no accumulation into outputs, no input overwritten)."""
    q, k, v = make_inputs(1, 40, 1, 32, "elu", True)  # 3 segments, 2 K- and V-tiles each
    go = torch.randn_like(q)

    def fwd_bwd():
        qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o = op._kernel_forward(qs, ks, vs, "elu", True, True, 1e-6, seg_len=16)
        o.backward(go)
        return [o.detach(), qs.grad, ks.grad, vs.grad]

    once = fwd_bwd()
    for name in TILE_NAMES:
        kern = getattr(op.kernels, name)
        real_run = kern.run

        def run_twice(*args, _run=real_run, **kwargs):
            _run(*args, **kwargs)
            return _run(*args, **kwargs)

        monkeypatch.setattr(kern, "run", run_twice)
    twice = fwd_bwd()
    for name, a, b in zip(("o", "dq", "dk", "dv"), once, twice):
        assert torch.equal(a, b), name


def _chained_dot_rows(name, bt, tile, D):
    """Smallest row count (M) among the dots of the kernels with several dots; None for chunk_state."""
    return {"fwd_kernel": min(bt, D), "bwd_dv_kernel": min(bt, D), "bwd_dqdk_kernel": min(bt, tile)}.get(name)


@pytest.mark.skipif(triton is None or not op.HAVE_TRITON, reason="needs triton")
@pytest.mark.parametrize("D", SUPPORTED_HEAD_DIMS)
def test_pruner_keeps_safe_gpu_configs(D):
    """For every head dim, the GPU configs that survive pruning: at least one, tiles dividing D, and for the
    kernels with several dots no 8-warp config whose dots have < 128 rows (the H200 fault, see kernels.py);
    the 8-warp BT=64 configs of the first H200 run are rejected."""
    retired = {"fwd_kernel": [(64, 64, 8, 2), (64, 32, 8, 2)], "bwd_dv_kernel": [(64, 64, 8, 2), (64, 32, 8, 2)],
               "bwd_dqdk_kernel": [(64, 64, 8, 2), (64, 32, 8, 2), (64, 16, 8, 2)]}
    for name, tile in TILE_NAMES.items():
        prune = getattr(op.kernels, name).early_config_prune
        for options in (op.kernels.CONFIGS[name], op.kernels.CONFIGS[name] + retired.get(name, [])):
            cfgs = [triton.Config({"BT": bt, tile: t}, num_warps=w, num_stages=s) for bt, t, w, s in options]
            kept = prune(cfgs, {}, DK=D, DV=D)
            assert kept, (name, D)
            for c in kept:
                assert D % c.kwargs[tile] == 0, (name, D, c)
                rows = _chained_dot_rows(name, c.kwargs["BT"], c.kwargs[tile], D)
                assert rows is None or c.num_warps <= 4 or rows >= 16 * c.num_warps, (name, D, c)
        for bt, t, w, s in retired.get(name, []):
            cfg = triton.Config({"BT": bt, tile: t}, num_warps=w, num_stages=s)
            assert prune([cfg], {}, DK=D, DV=D)[0].num_warps == 4, (name, D, cfg)


@pytest.mark.skipif(triton is None or not op.HAVE_TRITON, reason="needs triton")
@pytest.mark.parametrize("dk,dv", [(32, 256), (256, 32), (16, 128), (128, 16)])
def test_pruner_uses_the_width_each_tile_splits(dk, dv):
    """BK tiles split DK, BV tiles split DV: every kept tile divides its own width, also when the other
    width is larger than the tile; a config is refused only on limits of the right width."""
    widths = {"BK": dk, "BV": dv}
    for name, tile in TILE_NAMES.items():
        prune = getattr(op.kernels, name).early_config_prune
        cfgs = [triton.Config({"BT": bt, tile: t}, num_warps=w, num_stages=s) for bt, t, w, s in op.kernels.CONFIGS[name]]
        kept = prune(cfgs, {}, DK=dk, DV=dv)
        assert kept, (name, dk, dv)
        for c in kept:
            assert widths[tile] % c.kwargs[tile] == 0, (name, dk, dv, c)
    # the same config kept or not depending on which width the tile splits: BV=64 fits DV=128, not DV=32
    prune = op.kernels.fwd_kernel.early_config_prune
    cfg = triton.Config({"BT": 64, "BV": 64}, num_warps=4, num_stages=2)
    assert prune([cfg, cfg], {}, DK=32, DV=128) == [cfg, cfg]
    assert all(c.kwargs["BV"] <= 32 for c in prune([cfg, cfg], {}, DK=128, DV=32))


@pytest.mark.skipif(triton is None or not op.HAVE_TRITON, reason="needs triton")
@pytest.mark.parametrize("D", [64, 128])
def test_pruner_keeps_whole_row_groups_for_fwd_zdot(D):
    """fwd_kernel with ZDOT keeps only chunks of >= 16 rows per warp (its 16- and 32-row chunks lay mma
    dots with rows replicated across warps and convert them: kernels._pruner), without ZDOT every config."""
    prune = op.kernels.fwd_kernel.early_config_prune
    cfgs = [triton.Config({"BT": bt, "BV": t}, num_warps=w, num_stages=s) for bt, t, w, s in op.kernels.CONFIGS["fwd_kernel"]]
    with_zdot = prune(cfgs, {}, DK=D, DV=D, ZDOT=True)
    assert with_zdot and all(c.kwargs["BT"] >= 16 * c.num_warps for c in with_zdot), with_zdot
    assert {c.kwargs["BT"] for c in prune(cfgs, {}, DK=D, DV=D, ZDOT=False)} == {bt for bt, *_ in op.kernels.CONFIGS["fwd_kernel"]}


@pytest.mark.skipif(not op.HAVE_TRITON, reason="needs triton")
def test_forced_config_parsing(monkeypatch):
    assert op.kernels._forced_configs("fwd_kernel=64,32,4,2; bwd_dv_kernel=32,64,4,2") == {
        "fwd_kernel": (64, 32, 4, 2), "bwd_dv_kernel": (32, 64, 4, 2)}
    assert op.kernels._forced_configs("") == {}
    for bad in ("fwd=64,32,4,2", "fwd_kernel=64,32,4", "fwd_kernel=a,b,c,d", "fwd_kernel=64,32,4,2,168,1"):
        with pytest.raises(ValueError, match="MMM_LA_CONFIG"):
            op.kernels._forced_configs(bad)
    # a fifth number caps the registers per thread: it reaches the Triton config, absent otherwise
    forced = op.kernels._forced_configs("fwd_kernel=16,32,4,2,168")
    assert forced == {"fwd_kernel": (16, 32, 4, 2, 168)}
    monkeypatch.setattr(op.kernels, "FORCED", forced)
    [capped] = op.kernels._configs("fwd_kernel", "BV")
    [plain] = op.kernels._configs("bwd_dv_kernel", "BV")[:1]
    assert capped.maxnreg == 168 and capped.kwargs == {"BT": 16, "BV": 32} and capped.num_stages == 2
    assert plain.maxnreg is None


@needs_kernel
def test_forced_tile_that_does_not_divide_head_dim_is_refused(monkeypatch):
    force_configs(monkeypatch, {"chunk_state_kernel": (16, 32, 1, 1)})
    q = torch.randn(1, 20, 1, 16, device=DEV)
    with pytest.raises(ValueError, match="BK=32 does not divide head_dim 16"):
        linear_attention(q, q, q)


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
    q, k, v = make_inputs(1, T, 4, D, feature_map, normalize, dtype=torch.bfloat16, device="cuda")
    _assert_within_twice_pytorch_bf16(q, k, v, feature_map, normalize)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_normalizer_sums_as_dots_bf16(D, causal, monkeypatch):
    """kernels.ZDOT (the normalizer sums of chunk_state as dots, r in two bf16 parts) within 2x PyTorch's
    bf16 error, output and every gradient, like the default path."""
    # MMM_LA_ZDOT=fwd (etc.) keeps ZDOT to those kernels: gpu_single.sh's zdotbisect phase runs one each
    monkeypatch.setattr(op.kernels, "ZDOT", op.kernels.ZDOT or True)
    q, k, v = make_inputs(1, 4096, 4, D, "elu", True, dtype=torch.bfloat16, device="cuda")
    _assert_within_twice_pytorch_bf16(q, k, v, "elu", True, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("DK,DV", [(256, 128), (64, 128), (128, 64)])
def test_gpu_bf16_key_width_differs_from_value_width(DK, DV):
    """Prefeatured maps (Hedgehog: features in PyTorch, identity in the kernel) run with DK = feature
    width != DV: positive features, normalized, against fp64 like the equal-width test."""
    q, k = (torch.rand(1, 1000, 4, DK, device="cuda").add_(0.05).to(torch.bfloat16) for _ in range(2))
    v = torch.randn(1, 1000, 4, DV, device="cuda", dtype=torch.bfloat16)
    _assert_within_twice_pytorch_bf16(q, k, v, None, True)


def _assert_within_twice_pytorch_bf16(q, k, v, feature_map, normalize, causal=True):
    go = torch.randn_like(v)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64 = linear_attention_naive(q64, k64, v64, feature_map, normalize, causal)
    o64.backward(go.double())
    ref = [o64.detach(), q64.grad, k64.grad, v64.grad]
    ours = _errors_vs_fp64(lambda a, b, c: linear_attention(a, b, c, feature_map, normalize, causal), q, k, v, go, ref)
    torch_bf16 = _errors_vs_fp64(lambda a, b, c: linear_attention_naive(a, b, c, feature_map, normalize, causal),
                                 q, k, v, go, ref)
    for name, e, e_ref in zip(("o", "dq", "dk", "dv"), ours, torch_bf16):
        assert math.isfinite(e) and e <= 2 * e_ref, (name, e, e_ref)


def _pin_tile_configs(monkeypatch, more_tuners=()):
    """Each autotuned kernel keeps one tile config: the one of its last launch. opcheck compares the op's
    eager and traced outputs to ~1e-5, and a traced launch tunes again: torch's wrap_triton re-wraps the
    pruned configs in a new Autotuner with its own cache, whose timings may pick another chunk length,
    which rounds bf16 differently (session 17, H200: the forward's outputs a few bf16 ulps apart on 3% of
    elements; identical with one config). FastLaunch forgets its compiled kernels, so eager launches take
    the pinned config too."""
    from mmm.ops import _eager

    for tuner in [getattr(op.kernels, name) for name in op.kernels.CONFIGS] + list(more_tuners):  # autotuned
        if not hasattr(tuner, "best_config"):
            continue  # not launched by the ops under test (the fused hybrid runs no fwd_kernel)
        monkeypatch.setattr(tuner, "configs", [tuner.best_config])
        fast = _eager._FAST_LAUNCHERS.get(tuner)
        if fast is not None:
            monkeypatch.setattr(fast, "entries", {})


@pytest.mark.gpu
@pytest.mark.parametrize("normalize,causal,lag,written", [(True, True, 5, False), (False, False, 0, False), (True, True, 0, True)])
def test_gpu_opcheck(normalize, causal, lag, written, monkeypatch):
    q, k, v = (torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    args = (q, k, v, 1, normalize, causal, 1e-6, 128, 0.5, lag, written)
    o, rden, states, fk = torch.ops.mmm.linear_attention_fwd(*args)
    do = torch.randn_like(o)
    # rden is a differentiable output: detach it and the states, or opcheck differentiates the backward op;
    # with the keys' features written the backward takes them in place of k
    bwd_args = (do, q.detach(), fk if written else k.detach(), v.detach(), o.detach(), rden.detach(), states.detach(),
                1, normalize, causal, 128, 0.5, lag, None, written)
    torch.ops.mmm.linear_attention_bwd(*bwd_args)  # every kernel launched (and tuned) once before pinning
    _pin_tile_configs(monkeypatch)
    torch.library.opcheck(torch.ops.mmm.linear_attention_fwd.default, args)
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
    # The traced op may sum in another order than the eager launch (fp32 state, then one bf16 rounding):
    # outputs then differ by a bf16 ulp (2^-8 relative) in some entries, not more (H100: 1.3e-3).
    for e, c in zip(eager, compiled):
        assert rel_err(c, e) < 2**-8


@needs_kernel
@pytest.mark.parametrize("eager", [True, False], ids=["eager-function", "torch-library-op"])
def test_backward_materializes_no_gradient_for_the_saved_states(eager, monkeypatch):
    """rden and the per-segment states are non-differentiable outputs of the forward: autograd must not
    allocate and zero-fill gradients for them on every backward (states is [B*H, segments+1, D*D+D] fp32),
    on either path (the plain autograd.Function of eager calls, the torch.library op otherwise)."""
    monkeypatch.setattr(op, "plain_eager", lambda *t: eager)
    q, k, v = (torch.randn(1, 40, 2, 16, device=DEV, requires_grad=True) for _ in range(3))
    o = linear_attention(q, k, v, "elu", True)
    assert (o.grad_fn.name() == "_EagerLinearAttentionBackward") == eager, o.grad_fn.name()
    with OpNames() as log:
        o.backward(torch.randn_like(o))
    assert not {"zeros", "zeros_like"} & set(log.names), log.names
    assert eager or "linear_attention_bwd" in log.names, log.names


@needs_kernel
@pytest.mark.parametrize("normalize", [True, False])
def test_eager_function_and_library_op_agree_exactly(normalize, monkeypatch):
    """The eager fast path runs the same launches as the torch.library op: identical outputs and grads."""
    q, k, v, g = (torch.randn(2, 37, 3, 16, device=DEV) for _ in range(4))
    results = []
    for eager in (True, False):
        monkeypatch.setattr(op, "plain_eager", lambda *t, eager=eager: eager)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = linear_attention(*leaves, "relu", normalize)
        o.backward(g)
        results.append([o.detach(), *(t.grad for t in leaves)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_plain_eager_only_without_tracing_modes_or_subclasses():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mmm.ops._eager import plain_eager

    x = torch.randn(3)
    assert plain_eager(x)
    with OpNames():
        assert not plain_eager(x)  # a dispatch mode (here an op logger) must see the op, not its launches
    with FakeTensorMode():
        assert not plain_eager(torch.empty(3))
    assert plain_eager(torch.nn.Parameter(x))

    class Sub(torch.Tensor):  # subclasses (DTensor, ...) keep the op path
        pass

    assert not plain_eager(x.as_subclass(Sub))


@needs_kernel
@pytest.mark.parametrize("split", [True, False])
def test_fp32_dq_within_twice_pytorch_fp32_error_on_a_long_segment(split, monkeypatch):
    """The backward must not lose fp32 precision along a segment: dq of the first rows, computed from the
    segment's end state by subtracting chunks, had ~40x PyTorch's fp32 error on the GPU (T = 1000).
    The split dq launch sweeps forward from the segment's start instead (the one-launch form, PART 0,
    still subtracts: its dq error grows with the segment length, so it is only bounded loosely here)."""
    monkeypatch.setattr(op.kernels, "SPLIT_DQDK", split)
    torch.manual_seed(0)
    q, k, v = make_inputs(1, 640, 1, 16, "elu", True)
    go = torch.randn_like(v)
    grads = {}
    for name, fn in (("kernel", lambda a, b, c: op._kernel_forward(a, b, c, "elu", True, True, 1e-6, seg_len=640)),
                     ("torch", lambda a, b, c: linear_attention_naive(a, b, c, "elu", True, True, 1e-6)),
                     ("fp64", lambda a, b, c: linear_attention_naive(a, b, c, "elu", True, True, 1e-6))):
        dt = torch.float64 if name == "fp64" else torch.float32
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        grads[name] = torch.autograd.grad(fn(*leaves), leaves, go.to(dt))
    errs = {n: [rel_err(g, r) for g, r in zip(grads[n], grads["fp64"])] for n in ("kernel", "torch")}
    bound = 2 if split else 20
    for got, own in zip(errs["kernel"], errs["torch"]):
        assert got <= bound * own + 1e-7, errs
