"""mmm.attention: every method and feature map against the fp64 quadratic references in
mmm.attention.naive, forward and every gradient; input errors; attention_error; mmm.nn.Attention."""

import math
import os

import pytest
import torch

import mmm
from mmm.attention import _layout, api, naive
from mmm.attention.feature_maps import FEATURE_MAPS, FavorFeatureMap, HedgehogFeatureMap, TaylorFeatureMap, make_feature_map

from conftest import autograd_node_names, rel_err

B, T, H, HK, D, DV = 2, 37, 4, 2, 8, 6  # odd length, GQA (2 query heads per kv head), v_dim != head_dim
WINDOW, CHUNK = 8, 16


def qkv(dtype=torch.float64, t=T, h=H, hk=HK, d=D, dv=DV, scale=1.0, requires_grad=True):
    q = (scale * torch.randn(B, t, h, d, dtype=dtype)).requires_grad_(requires_grad)
    k = (scale * torch.randn(B, t, hk, d, dtype=dtype)).requires_grad_(requires_grad)
    v = torch.randn(B, t, hk, dv, dtype=dtype).requires_grad_(requires_grad)
    return q, k, v


def fmap_for(name, d=D):
    """A map with parameters away from their init (hedgehog) and a hybrid calibration c_h away from 0,
    one per head, so nothing about it is special."""
    if name == "hedgehog":
        fmap = HedgehogFeatureMap(d, num_features=6, num_heads=H, num_kv_heads=HK).double()
        with torch.no_grad():
            for p in fmap.parameters():
                p.add_(0.3 * torch.randn_like(p))
    elif name == "favor":
        fmap = FavorFeatureMap(d, num_features=24, seed=1).double()
    else:
        fmap = make_feature_map(name, d).double()
    fmap.hybrid_log_scale = torch.randn(H, dtype=torch.float64)
    return fmap


def reference(method, q, k, v, causal, fmap=None, normalize=True, window=WINDOW, eps=1e-6, window_shape="sliding"):
    if method == "exact":
        return naive.naive_exact(q, k, v, causal)
    if method == "window":
        return naive.naive_window(q, k, v, window, causal)
    if method == "linear":
        return naive.naive_linear(q, k, v, fmap, causal, normalize, eps)
    return naive.naive_hybrid(q, k, v, fmap, window, causal, eps, window_shape)


def check_against_reference(method, causal, fmap=None, normalize=True, window=WINDOW, dtype=torch.float64, tol=1e-9,
                            window_shape="sliding", **inputs):
    q, k, v = qkv(**inputs)
    kwargs = dict(causal=causal, window=window, chunk_size=CHUNK, normalize=normalize)
    if window_shape != "sliding":
        kwargs["window_shape"] = window_shape
    if fmap is not None:
        kwargs["feature_map"] = fmap
    params = [q, k, v] + (list(fmap.parameters()) if fmap is not None else [])
    out = mmm.attention(q.to(dtype), k.to(dtype), v.to(dtype), method, **kwargs)
    ref = reference(method, q, k, v, causal, fmap, normalize, window, window_shape=window_shape)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol, f"forward error {rel_err(out, ref)}"
    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(out, params, grad_out.to(dtype))
    want = torch.autograd.grad(ref, params, grad_out)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all()
        assert rel_err(g, w) < tol * 10, f"gradient {i} error {rel_err(g, w)}"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("method", ["exact", "window"])
def test_softmax_methods_match_reference(method, causal):
    check_against_reference(method, causal)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_linear_matches_reference(name, causal, normalize):
    check_against_reference("linear", causal, fmap_for(name), normalize)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_hybrid_matches_reference(name, causal):
    check_against_reference("hybrid", causal, fmap_for(name))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_block_hybrid_matches_reference(name, causal):
    """window_shape='block': the blockwise path (its chunks are the blocks) against naive_hybrid."""
    check_against_reference("hybrid", causal, fmap_for(name), window_shape="block")


@pytest.mark.parametrize("window", [1, 5, 36, 37, 100])
def test_block_window_edge_sizes(window):
    """Blocks of one token (every earlier key far), blocks that do not divide T, one block over all of T."""
    for causal in (True, False):
        check_against_reference("hybrid", causal, fmap_for("taylor"), window=window, window_shape="block")


def test_block_and_sliding_windows_differ_and_blocks_need_the_hybrid():
    q, k, v = qkv(requires_grad=False)
    fmap = fmap_for("elu")
    block = mmm.attention(q, k, v, "hybrid", window=WINDOW, window_shape="block", feature_map=fmap)
    assert rel_err(block, mmm.attention(q, k, v, "hybrid", window=WINDOW, feature_map=fmap)) > 1e-2
    with pytest.raises(ValueError, match="window_shape must be one of"):
        mmm.attention(q, k, v, "hybrid", window_shape="blocks")
    for method in ("window", "linear", "exact"):
        with pytest.raises(ValueError, match="window_shape='block' is for method='hybrid' only"):
            mmm.attention(q, k, v, method, window_shape="block")
    with pytest.raises(ValueError, match="got method='linear'"):  # 'auto' checks its long method at any T
        mmm.attention(q, k, v, "auto", long_method="linear", window_shape="block")
    auto = mmm.attention(q, k, v, "auto", window=WINDOW, window_shape="block", feature_map=fmap, crossover=1)
    assert rel_err(auto, block) < 1e-12


@pytest.mark.parametrize("method", ["window", "linear", "hybrid"])
def test_fp32_close_to_fp64_reference(method):
    fmap = None if method == "window" else fmap_for("elu")
    check_against_reference(method, True, fmap, dtype=torch.float32, tol=1e-5)


@pytest.mark.parametrize("window", [1, 5, 36, 37, 100])
@pytest.mark.parametrize("method", ["window", "hybrid"])
def test_window_edge_sizes(method, window):
    for causal in (True, False):
        check_against_reference(method, causal, None if method == "window" else fmap_for("taylor"), window=window)


def test_window_covering_everything_is_exact():
    q, k, v = qkv(requires_grad=False)
    for causal in (True, False):
        assert rel_err(mmm.attention(q, k, v, "window", window=T, causal=causal), mmm.attention(q, k, v, "exact", causal=causal)) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("method", ["window", "linear", "hybrid"])
def test_chunk_groups(method, causal, monkeypatch):
    """A tiny budget forces one chunk per group: carried states must give the same result."""
    monkeypatch.setattr(_layout, "GROUP_BUDGET", 1)
    check_against_reference(method, causal, None if method == "window" else fmap_for("favor"))


def test_single_token_and_no_gqa():
    check_against_reference("linear", True, fmap_for("elu"), t=1)
    check_against_reference("hybrid", True, fmap_for("elu"), t=1)
    check_against_reference("hybrid", True, fmap_for("elu"), hk=H)


def test_non_contiguous_inputs():
    q, k, v = qkv(requires_grad=False)
    # Same values, strange strides: transposed storage and every other element of a wider tensor.
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)
    ks = torch.cat([k, torch.full_like(k, float("nan"))], dim=-1)[..., :D]
    vs = torch.stack([v, v], dim=-1)[..., 0]
    assert not (qs.is_contiguous() or ks.is_contiguous() or vs.is_contiguous())
    for method in ("exact", "window", "linear", "hybrid"):
        want = mmm.attention(q, k, v, method, window=WINDOW, chunk_size=CHUNK)
        got = mmm.attention(qs, ks, vs, method, window=WINDOW, chunk_size=CHUNK)
        assert torch.isfinite(got).all() and rel_err(got, want) < 1e-12, method


def test_feature_map_kernels():
    """Taylor is exactly 1 + s + s^2/2; FAVOR+ with many features is close to exp(s)."""
    x, y = 0.5 * torch.randn(1, 5, 1, D, dtype=torch.float64), 0.5 * torch.randn(1, 7, 1, D, dtype=torch.float64)
    s = torch.einsum("bihd,bjhd->bij", x, y) / math.sqrt(D)
    taylor = TaylorFeatureMap(D)
    kappa = torch.einsum("bihf,bjhf->bij", taylor(x, True), taylor(y, False))
    assert rel_err(kappa, 1 + s + s * s / 2) < 1e-12
    favor = FavorFeatureMap(D, num_features=8192, seed=3).double()
    kappa = torch.einsum("bihf,bjhf->bij", favor(x, True), favor(y, False))
    assert rel_err(kappa, s.exp()) < 0.05


def test_favor_redraw():
    f = FavorFeatureMap(D, seed=5)
    w = f.projection.clone()
    f.redraw(seed=5)
    assert torch.equal(f.projection, w)
    f.redraw(seed=6)
    assert not torch.allclose(f.projection, w)
    f.redraw()
    assert torch.isfinite(f.projection).all()
    # Rows are orthogonal within each block of head_dim rows.
    block = f.projection[:D].double()
    gram = block @ block.T
    assert (gram - torch.diag(gram.diagonal())).abs().max() < 1e-4 * gram.diagonal().max()


def test_hybrid_with_calibrated_map_is_close_to_exact():
    """With small logits taylor's kernel is exp(s) to O(s^3): the shared normaliser must then give
    nearly exact attention (a mis-scaled far part would not)."""
    q, k, v = qkv(requires_grad=False, scale=0.3, t=96)
    hybrid = mmm.attention_error(q, k, v, "hybrid", window=8, feature_map="taylor", sample_rows=None)
    linear_elu = mmm.attention_error(q, k, v, "linear", feature_map="elu", sample_rows=None)
    assert hybrid < 1e-3 < linear_elu


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["elu", "relu", "hedgehog"])
def test_hybrid_with_a_large_calibration_keeps_rows_without_far_keys(name, causal):
    """fit_hybrid gives c_h ~ 75-135 on the bench's trained layer. The first `window` rows (causal) have
    no far key, and their near weights exp(s - c_h) underflow fp32 if c_h enters the shared max alone
    (they were 0 / 0 there); the max must take the far part's log mass, l + log(far_den), instead.
    fp32 blockwise path against the fp64 reference, c_h = +120 and -120, output and gradients."""
    fmap = fmap_for(name)
    fmap.hybrid_log_scale = torch.tensor([120.0, -120.0, 120.0, -120.0][:H], dtype=torch.float64)
    check_against_reference("hybrid", causal, fmap.float(), dtype=torch.float32, tol=2e-5)


def test_shared_max_keeps_both_parts_finite_and_its_gradient_clean():
    """hybrid.shared_max: the largest scaled weight is 1 (near max or far mass), rows without far mass
    get far_scale 0, and a calibration far above the scores leaves no inf / nan in the gradient."""
    from mmm.attention.hybrid import shared_max

    m = torch.tensor([0.0, 5.0, -3.0, 2.0])
    far_den = torch.tensor([0.0, 1e-3, 50.0, -1e-9])  # none, small, large, rounding below 0
    log_scale = torch.tensor([120.0, 120.0, 0.0, 120.0], requires_grad=True)
    r, far_scale = shared_max(m, log_scale, far_den)
    assert torch.equal(far_scale[[0, 3]], torch.zeros(2)) and torch.equal(r[[0, 3]], m[[0, 3]])
    top = torch.maximum(torch.exp(m - r), far_scale * far_den.clamp_min(0))
    assert torch.allclose(top, torch.ones(4))
    far_scale.sum().backward()
    assert torch.isfinite(log_scale.grad).all() and log_scale.grad[0] == 0 and log_scale.grad[3] == 0


def test_auto_switches_at_crossover():
    q, k, v = qkv(requires_grad=False)
    exact = mmm.attention(q, k, v, "exact")
    assert torch.equal(mmm.attention(q, k, v, "auto", crossover=T + 1), exact)
    below = mmm.attention(q, k, v, "auto", crossover=T, long_method="linear", feature_map="relu")
    assert torch.equal(below, mmm.attention(q, k, v, "linear", feature_map="relu"))


def test_auto_defaults_to_the_measured_crossover(monkeypatch):
    q, k, v = qkv(requires_grad=False)
    linear = mmm.attention(q, k, v, "linear", feature_map="relu")
    monkeypatch.setattr(api, "AUTO_CROSSOVER", T + 1)
    assert torch.equal(mmm.attention(q, k, v, "auto", long_method="linear", feature_map="relu"),
                       mmm.attention(q, k, v, "exact"))
    monkeypatch.setattr(api, "AUTO_CROSSOVER", T)
    assert torch.equal(mmm.attention(q, k, v, "auto", long_method="linear", feature_map="relu"), linear)


def test_exact_backend_names():
    q, k, v = qkv(dtype=torch.float32, requires_grad=False)
    assert mmm.attention.exact_backend(q, k, v) in ("flash", "math", "efficient", "cudnn")
    assert "math" in mmm.attention.exact_backends_available(q, k, v)


def test_fp16_large_inputs_long_sequence_stay_finite():
    t = 2048
    q = (300 * torch.randn(1, t, 2, 16)).half()
    k = (300 * torch.randn(1, t, 2, 16)).half()
    v = (300 * torch.randn(1, t, 2, 16)).half()
    for name in sorted(FEATURE_MAPS):
        out = mmm.attention(q, k, v, "linear", feature_map=name)
        assert out.dtype == torch.float16 and torch.isfinite(out).all(), name
        # Normalised with positive kernels: each output is a weighted mean of values, so within their range.
        assert out.float().abs().max() <= v.float().abs().max() * 1.01, name
    out = mmm.attention(q, k, v, "hybrid", window=64, feature_map="favor")
    assert torch.isfinite(out).all()


def test_autocast_does_not_lower_precision():
    q, k, v = qkv(dtype=torch.float32, requires_grad=False)
    for method in ("window", "linear", "hybrid"):
        want = mmm.attention(q, k, v, method, window=WINDOW, feature_map="favor")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = mmm.attention(q, k, v, method, window=WINDOW, feature_map="favor")
        assert got.dtype == torch.float32 and rel_err(got, want) < 1e-6, method


# --- errors -----------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv(requires_grad=False)
    with pytest.raises(ValueError, match="4-D"):
        mmm.attention(q[0], k, v)
    with pytest.raises(ValueError, match="same head_dim"):
        mmm.attention(q, k[..., :-1], v)
    with pytest.raises(ValueError, match="must divide q heads"):
        mmm.attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="k and v must have the same number of heads"):
        mmm.attention(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match="sequence length"):
        mmm.attention(q, k[:, :-1], v[:, :-1])
    with pytest.raises(ValueError, match="batch size"):
        mmm.attention(q, k[:1], v[:1])
    with pytest.raises(TypeError, match="one dtype"):
        mmm.attention(q, k.float(), v)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        mmm.attention(q, k.long(), v)
    with pytest.raises(ValueError, match=r"unknown method 'fast'.*'exact', 'window', 'linear', 'hybrid', 'auto'"):
        mmm.attention(q, k, v, "fast")
    with pytest.raises(ValueError, match=r"unknown feature_map 'gelu'.*'elu', 'favor', 'hedgehog', 'relu', 'taylor'"):
        mmm.attention(q, k, v, "linear", feature_map="gelu")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window must be a positive int"):
            mmm.attention(q, k, v, "window", window=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        mmm.attention(q, k, v, "linear", chunk_size=0)
    with pytest.raises(ValueError, match="long_method"):
        mmm.attention(q, k, v, "auto", long_method="exact")
    with pytest.raises(ValueError, match="always normalised"):
        mmm.attention(q, k, v, "hybrid", normalize=False)
    with pytest.raises(ValueError, match="head_dim=16"):
        mmm.attention(q, k, v, "linear", feature_map=make_feature_map("elu", 16))
    with pytest.raises(ValueError, match="eps"):
        mmm.attention(q, k, v, "linear", eps=-1.0)
    with pytest.raises(ValueError, match="feature_map is on meta"):
        mmm.attention(q, k, v, "linear", feature_map=mmm.attention.FavorFeatureMap(D).to("meta"))


def test_finite_checks_name_the_bad_input_only_when_on():
    q, k, v = qkv(requires_grad=False)
    k = k.clone()
    k[0, 3, 1, 2] = float("nan")
    assert torch.isnan(mmm.attention(q, k, v, "linear")).any()  # off by default: no pass, no host sync
    with mmm.finite_checks():
        for method in ("exact", "window", "linear", "hybrid", "auto"):
            with pytest.raises(ValueError, match="k contains 1 NaN/inf"):
                mmm.attention(q, k, v, method)
        with pytest.raises(ValueError, match="k contains"):
            mmm.attention_error(q, k, v, "linear")
        mmm.attention(q, k.nan_to_num(), v, "linear")  # finite inputs pass


# --- attention_error --------------------------------------------------------------------------------


def test_attention_error_exact_is_zero_approximations_positive():
    q, k, v = qkv(requires_grad=False)
    assert mmm.attention_error(q, k, v, "exact") < 1e-13
    for causal in (True, False):
        for method, extra in (("window", {}), ("linear", {"feature_map": "elu"}), ("hybrid", {"feature_map": "favor"})):
            err = mmm.attention_error(q, k, v, method, causal=causal, window=WINDOW, **extra)
            assert 1e-3 < err < 10, (method, causal, err)


def test_attention_error_matches_direct_computation():
    q, k, v = qkv(requires_grad=False)
    for causal in (True, False):
        out = mmm.attention(q, k, v, "linear", causal=causal, feature_map="relu")
        want = rel_err(out, naive.naive_exact(q, k, v, causal))
        assert abs(mmm.attention_error(q, k, v, "linear", causal=causal, feature_map="relu", sample_rows=None) - want) < 1e-12


def test_attention_error_sampled_estimate_is_close(monkeypatch):
    monkeypatch.setattr(api, "ERROR_ROW_BLOCK", 300_000)  # several blocks of rows
    q, k, v = qkv(dtype=torch.float32, requires_grad=False, t=1024)
    kw = dict(window=32, feature_map="elu")
    full = mmm.attention_error(q, k, v, "hybrid", sample_rows=None, **kw)
    rows = api.sample_query_rows(1024, 512, seed=1, device="cpu")
    assert rows.unique().numel() == 512 and 0 <= rows.min() and rows.max() < 1024
    sampled = mmm.attention_error(q, k, v, "hybrid", sample_rows=512, seed=1, **kw)
    out, ref = mmm.attention(q, k, v, "hybrid", **kw)[:, rows], naive.naive_exact(q, k, v)[:, rows]
    assert abs(sampled - rel_err(out, ref)) < 1e-5 * sampled  # exactly the error on those rows
    assert abs(sampled - full) < 0.1 * full  # and a close estimate of the full one


# --- mmm.nn.Attention -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "proj_config,method,feature_map",
    [
        (None, "exact", "elu"),
        (None, "window", "elu"),
        (mmm.LowRankConfig(rank=4), "linear", "hedgehog"),
        (mmm.LowRankConfig(rank=4), "hybrid", "favor"),
        (None, "auto", "taylor"),
    ],
)
def test_nn_attention_forward_backward(proj_config, method, feature_map):
    layer = mmm.nn.Attention(32, 4, n_kv_heads=2, method=method, window=8, feature_map=feature_map,
                             proj_config=proj_config, crossover=16)
    _check_layer(layer, method)
    if proj_config is not None:
        assert layer.q_proj.config == proj_config


def test_nn_attention_with_a_block_window_is_the_block_hybrid():
    layer = mmm.nn.Attention(32, 4, n_kv_heads=2, method="hybrid", window=8, window_shape="block")
    _check_layer(layer, "hybrid")
    x = torch.randn(2, 37, 32)
    q, k, v = layer.qkv(x)
    o = mmm.attention(q, k, v, "hybrid", window=8, window_shape="block", feature_map=layer.feature_map)
    assert rel_err(layer(x), layer.o_proj(o.reshape(2, 37, 32))) < 1e-6


def _check_layer(layer, method):
    x = torch.randn(2, 37, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    err = layer.attention_error(x, sample_rows=16)
    assert (err < 1e-5) if method == "exact" else (err > 1e-4)


def test_nn_attention_bad_arguments():
    with pytest.raises(ValueError, match="must divide d_model"):
        mmm.nn.Attention(30, 4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        mmm.nn.Attention(32, 4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown method"):
        mmm.nn.Attention(32, 4, method="sparse")
    with pytest.raises(ValueError, match="window_shape='block' is for method='hybrid' only"):
        mmm.nn.Attention(32, 4, method="window", window_shape="block")
    with pytest.raises(ValueError, match="3-D"):
        mmm.nn.Attention(32, 4)(torch.randn(2, 3, 4, 8))


# --- the Triton kernel behind method="linear" (on CPU through the interpreter) ----------------------------


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _interpreter_on(), reason="routes CPU tensors through the Triton interpreter")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_hedgehog_features_through_the_kernel_match_the_pytorch_path(causal, normalize, monkeypatch):
    """Maps the kernel does not apply itself (Hedgehog) go through it with precomputed features as the key
    width (F = 16) and v unpadded as the value width (32): output and every gradient (q, k, v and the map's
    parameters) as the chunked PyTorch path, in fp32. GQA and v_dim != head_dim != F included."""
    from mmm.attention import linear as linear_mod

    pytest.importorskip("triton")
    monkeypatch.setattr(linear_mod, "KERNEL_ON_CPU_INTERPRETER", True)
    d, num_features = 16, 8  # F = 16: a head width the kernel takes
    fmap = HedgehogFeatureMap(d, num_features=num_features, num_heads=H, num_kv_heads=HK)
    with torch.no_grad():
        for p in fmap.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q, k, v = qkv(torch.float32, d=d, dv=32)
    assert linear_mod.triton_applies(q, v, fmap)
    g = torch.randn(B, T, H, 32)
    params = [q, k, v, *fmap.parameters()]

    def run(kernel: bool):
        monkeypatch.setattr(linear_mod, "USE_TRITON_KERNEL", kernel)
        o = mmm.attention(q, k, v, "linear", feature_map=fmap, causal=causal, normalize=normalize)
        return [o, *torch.autograd.grad(o, params, g)]

    for got, want in zip(run(True), run(False)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.skipif(not _interpreter_on(), reason="routes CPU tensors through the Triton interpreter")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kind", ["hedgehog", "elu"])
def test_wide_keys_through_the_kernel_in_slices(kind, causal, normalize, monkeypatch):
    """Key widths over linear.KEY_SPLIT (here 16: Hedgehog's F = 32 features, or elu at head dim 32) go
    through the kernel as one call per 16-wide slice, combined through the normalisers: output, rden and
    every gradient as one 32-wide call and as the PyTorch path, in fp32, GQA included."""
    from mmm.attention import linear as linear_mod

    pytest.importorskip("triton")
    monkeypatch.setattr(linear_mod, "KERNEL_ON_CPU_INTERPRETER", True)
    if kind == "hedgehog":
        fmap = HedgehogFeatureMap(16, num_features=16, num_heads=H, num_kv_heads=HK)  # F = 32
        with torch.no_grad():
            for p in fmap.parameters():
                p.add_(0.3 * torch.randn_like(p))
    else:
        fmap = make_feature_map("elu", 32)
    q, k, v = qkv(torch.float32, d=16 if kind == "hedgehog" else 32, dv=32)
    g = torch.randn(B, T, H, 32)
    params = [q, k, v, *fmap.parameters()]
    calls = []  # key widths of the kernel calls

    def run(kernel: bool, split):
        monkeypatch.setattr(linear_mod, "USE_TRITON_KERNEL", kernel)
        monkeypatch.setattr(linear_mod, "KEY_SPLIT", split)
        o = mmm.attention(q, k, v, "linear", feature_map=fmap, causal=causal, normalize=normalize)
        return [o, *torch.autograd.grad(o, params, g)]

    import mmm.ops.linear_attention as la

    real = la.linear_attention

    def counting(q_, *args, **kwargs):
        calls.append(q_.shape[-1])
        return real(q_, *args, **kwargs)

    monkeypatch.setattr(la, "linear_attention", counting)
    sliced = run(True, 16)
    assert calls == [16, 16]
    for got, want in zip(sliced, run(True, None)):
        assert rel_err(got, want) < 1e-5
    assert calls[2:] == [32]
    for got, want in zip(sliced, run(False, 16)):
        assert rel_err(got, want) < 1e-5
    if normalize:  # the combined rden is the whole denominator's
        monkeypatch.setattr(linear_mod, "USE_TRITON_KERNEL", True)
        fq = fmap.features(q, True)[0]
        o, rden = linear_mod._triton_linear(q, k, v, fmap, causal, True, 1e-6, with_rden=True)
        monkeypatch.setattr(linear_mod, "KEY_SPLIT", None)
        o1, rden1 = linear_mod._triton_linear(q, k, v, fmap, causal, True, 1e-6, with_rden=True)
        assert fq.shape[-1] == 32 and rel_err(o, o1) < 1e-5 and rel_err(rden, rden1) < 1e-5


@pytest.mark.parametrize("name", ["favor", "taylor", "hedgehog"])
def test_computed_features_trace_whole_and_once_per_map_class(name):
    """The kernel path's feature pass (linear._padded_features) as torch.compile runs it on CUDA
    (fullgraph, dynamic shapes; here on the CPU with the aot_eager backend): features and their gradients
    equal the eager pass's, and a second map instance of the class (another layer) compiles nothing new."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from mmm.attention import linear as linear_mod

    torch._dynamo.reset()
    padded = linear_mod._pad_features
    compiled = torch.compile(padded, dynamic=True, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 37, H, 16, requires_grad=True)
    graphs = []
    for _ in range(2):
        fmap = make_feature_map(name, 16, **({"num_heads": H} if name == "hedgehog" else {}))
        width = linear_mod._kernel_key_width(fmap) or fmap.feature_dim
        piece = width // 2 if width % 2 == 0 else width  # two slices, each stored on its own (Taylor: one)
        for is_query in (True, False):
            params = fmap.feature_params(is_query)
            got, want = (f(type(fmap).apply_features, x, is_query, width, piece, *params) for f in (compiled, padded))
            assert [p.shape[-1] for p in got[0]] == [piece] * (width // piece) and all(p.is_contiguous() for p in got[0])
            assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
            assert (got[1] is None) == (want[1] is None) and (got[1] is None or torch.equal(got[1], want[1]))
            g = [torch.randn_like(p) for p in want[0]]
            inputs = [x, *(p for p in params if p.requires_grad)]
            for a, b in zip(torch.autograd.grad(got[0], inputs, g), torch.autograd.grad(want[0], inputs, g)):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0], graphs


@pytest.mark.parametrize("normalized, query_scale, n_parts", [
    (True, False, 2), (True, True, 1), (True, True, 3), (False, True, 2), (False, False, 2)])
def test_kernel_glue_traces_whole_under_compile(normalized, query_scale, n_parts):
    """The compiled elementwise pass after the kernel calls (linear._finish: slices combined through their
    normalisers, a query scale put back, the cast) as torch.compile runs it on CUDA (fullgraph, dynamic
    shapes; aot_eager on the CPU): output and gradients equal eager's."""
    import torch._dynamo

    from mmm.attention import linear as linear_mod

    torch._dynamo.reset()
    fn = linear_mod._finish.__wrapped__
    os_ = [torch.randn(B, 29, H, 8, requires_grad=True) for _ in range(n_parts)]
    rdens = [(torch.rand(B, 29, H) + 0.5).requires_grad_() for _ in range(n_parts)]
    log_scale = torch.randn(B, 29, H, requires_grad=True) if query_scale else None
    parts = list(zip(os_, rdens)) if normalized else os_
    want_rden = normalized and not query_scale
    args = (parts, normalized, log_scale, 1e-6, 1e-30 if query_scale else 1e-6, torch.float32, want_rden)
    leaves = os_ + (rdens if normalized else []) + ([log_scale] if query_scale else [])
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend="aot_eager")
    got, want = compiled(*args), fn(*args)
    assert (got[1] is None) == (want[1] is None) == (not want_rden)
    got, want = [x for x in got if x is not None], [x for x in want if x is not None]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    grads = [torch.randn_like(w) for w in want]
    for a, b in zip(torch.autograd.grad(got, leaves, grads), torch.autograd.grad(want, leaves, grads)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


class _DoubledHedgehog(HedgehogFeatureMap):
    """A user's map that overrides `features` (not `apply_features`): twice Hedgehog's features."""

    def features(self, x, is_query):
        phi, log_scale = super().features(x, is_query)
        return 2.0 * phi, log_scale


@pytest.mark.skipif(not _interpreter_on(), reason="routes CPU tensors through the Triton interpreter")
def test_kernel_path_runs_a_subclass_override_of_features(monkeypatch):
    """The kernel path computes built-in maps through their pure `apply_features`; a subclass that
    overrides `features` gets its own features there too (unnormalised: the factor 2 squared shows),
    output and every gradient as the PyTorch path, parameters included."""
    from mmm.attention import linear as linear_mod

    pytest.importorskip("triton")
    monkeypatch.setattr(linear_mod, "KERNEL_ON_CPU_INTERPRETER", True)
    q, k, v = qkv(torch.float32, d=16, dv=32)
    g = torch.randn(B, T, H, 32)
    outs = {}
    for cls in (HedgehogFeatureMap, _DoubledHedgehog):
        torch.manual_seed(3)
        fmap = cls(16, num_features=8, num_heads=H, num_kv_heads=HK)
        with torch.no_grad():
            for p in fmap.parameters():
                p.add_(0.3 * torch.randn_like(p))
        params = [q, k, v, *fmap.parameters()]
        for kernel in (True, False):
            monkeypatch.setattr(linear_mod, "USE_TRITON_KERNEL", kernel)
            assert (linear_mod._triton_linear(q, k, v, fmap, True, False, 1e-6) is not None) == kernel
            o = mmm.attention(q, k, v, "linear", feature_map=fmap, normalize=False)
            outs[cls, kernel] = [o, *torch.autograd.grad(o, params, g)]
        for got, want in zip(outs[cls, True], outs[cls, False]):
            assert rel_err(got, want) < 1e-5
    assert rel_err(outs[_DoubledHedgehog, True][0], 4.0 * outs[HedgehogFeatureMap, True][0]) < 1e-5


def rows_first_glue(monkeypatch, module, name: str, per_row_args, t: int = T) -> None:
    """Wraps module.name (compiled elementwise glue on CUDA) to check that the [B, T, H] tensors it gets
    (per_row_args(*args) lists them; None allowed; t rows) are stored in that order: read as transposed
    [B, H, T] views they made Inductor's pass read its big [B, T, H, D] inputs across rows, ~10x slower
    (the hybrid's combine: 9 ms at 128k on an H100, `linear._rows_first`)."""
    real = getattr(module, name)

    def checked(*args):
        for x in per_row_args(*args):
            assert x is None or (x.shape[1] == t and x.is_contiguous()), (name, tuple(x.shape), x.stride())
        return real(*args)

    monkeypatch.setattr(module, name, checked)


@pytest.mark.skipif(not _interpreter_on(), reason="routes CPU tensors through the Triton interpreter")
@pytest.mark.parametrize("num_features, split, causal, normalize", [
    (24, None, True, True), (24, None, False, False), (40, 16, True, False), (40, 16, False, True)])
def test_favor_through_the_kernel_matches_the_pytorch_path(num_features, split, causal, normalize, monkeypatch):
    """FAVOR+ (a query log scale, feature counts the kernel does not take) goes through the kernel with
    its features zero-padded (24 -> 32 in one call; 40 -> 64 in four 16-wide slices) and the query scale
    put back: output and the gradients of q, k, v as the chunked PyTorch path, in fp32, GQA included."""
    from mmm.attention import linear as linear_mod

    pytest.importorskip("triton")
    monkeypatch.setattr(linear_mod, "KERNEL_ON_CPU_INTERPRETER", True)
    monkeypatch.setattr(linear_mod, "KEY_SPLIT", split)
    monkeypatch.setattr(linear_mod, "RESCALED_NORMALIZED_ON_KERNEL", True)  # the default since 2026-12-07; set here so the test holds either way
    fmap = FavorFeatureMap(16, num_features=num_features, seed=3)
    q, k, v = qkv(torch.float32, d=16, dv=32)
    assert api.attention_path(q, k, v, "linear", feature_map=fmap) == "triton"
    g = torch.randn(B, T, H, 32)
    import mmm.ops.linear_attention as la

    widths, real = [], la.linear_attention

    def counting(q_, k_, *a, **kw):  # the feature slices reach the op stored on their own: no copies there
        assert q_.is_contiguous() and k_.is_contiguous()
        widths.append(q_.shape[-1])
        return real(q_, k_, *a, **kw)

    monkeypatch.setattr(la, "linear_attention", counting)
    rows_first_glue(monkeypatch, linear_mod, "_finish", lambda parts, normalized, log_scale, *rest: [
        log_scale, *(r for _, r in parts)] if normalized else [log_scale])

    def run(kernel: bool):
        monkeypatch.setattr(linear_mod, "USE_TRITON_KERNEL", kernel)
        o = mmm.attention(q, k, v, "linear", feature_map=fmap, causal=causal, normalize=normalize)
        return [o, *torch.autograd.grad(o, (q, k, v), g)]

    got = run(True)
    assert widths == ([32] if split is None else [16] * 4)
    for a, b in zip(got, run(False)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.skipif(not _interpreter_on(), reason="routes CPU tensors through the Triton interpreter")
@pytest.mark.parametrize("fmap_name, d", [("elu", 16), ("hedgehog", 8)])
def test_one_kernel_call_adds_no_split_to_the_graph(fmap_name, d, monkeypatch):
    """Keys that fit one kernel call go to it whole: no split node, whose backward would concatenate (copy)
    q's and k's gradients (a pass over each at every step: it crept in once, session 15)."""
    from mmm.attention import linear as linear_mod

    pytest.importorskip("triton")
    monkeypatch.setattr(linear_mod, "KERNEL_ON_CPU_INTERPRETER", True)
    q, k, v = qkv(torch.float32, d=d, dv=16)
    fmap = fmap_for(fmap_name, d)
    assert api.attention_path(q, k, v, "linear", feature_map=fmap) == "triton"
    names = autograd_node_names(mmm.attention(q, k, v, "linear", feature_map=fmap))
    assert not any("Split" in n for n in names), names  # (Hedgehog's own features hold a cat)


@pytest.mark.skipif(not _interpreter_on(), reason="routes CPU tensors through the Triton interpreter")
@pytest.mark.parametrize("fmap_name", ["elu", "relu"])
def test_native_maps_with_v_dim_other_than_head_dim_through_the_kernel(fmap_name, monkeypatch):
    """elu / relu with v wider than q and k (key width 16, value width 32) take the kernel and match the
    PyTorch path: output and the gradients of q, k, v, in fp32, GQA included."""
    from mmm.attention import linear as linear_mod

    pytest.importorskip("triton")
    monkeypatch.setattr(linear_mod, "KERNEL_ON_CPU_INTERPRETER", True)
    q, k, v = qkv(torch.float32, d=16, dv=32)
    fmap = make_feature_map(fmap_name, 16)
    assert linear_mod.triton_applies(q, v, fmap)
    g = torch.randn(B, T, H, 32)

    def run(kernel: bool):
        monkeypatch.setattr(linear_mod, "USE_TRITON_KERNEL", kernel)
        o = mmm.attention(q, k, v, "linear", feature_map=fmap)
        return [o, *torch.autograd.grad(o, (q, k, v), g)]

    for got, want in zip(run(True), run(False)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.skipif(not _interpreter_on(), reason="routes CPU tensors through the Triton interpreter")
def test_maps_the_kernel_cannot_take_stay_on_the_pytorch_path(monkeypatch):
    from mmm.attention import linear as linear_mod

    pytest.importorskip("triton")
    monkeypatch.setattr(linear_mod, "KERNEL_ON_CPU_INTERPRETER", True)
    q, k, v = qkv(torch.float32, d=16, dv=16)
    assert linear_mod.triton_applies(q, v, make_feature_map("elu", 16))
    favor = FavorFeatureMap(16, num_features=16)
    assert not linear_mod.triton_applies(q, v, favor)  # rescales its queries: only where the caller takes that
    assert linear_mod.triton_applies(q, v, favor, query_scale=True)
    assert linear_mod.triton_applies(q, v, favor, query_scale=True, normalize=True)
    assert api.attention_path(q, k, v, "linear", feature_map=favor) == "triton"
    assert api.attention_path(q, k, v, "linear", feature_map=favor, normalize=False) == "triton"
    monkeypatch.setattr(linear_mod, "RESCALED_NORMALIZED_ON_KERNEL", False)  # the switch, should a GPU disagree
    assert not linear_mod.triton_applies(q, v, favor, query_scale=True, normalize=True)
    assert api.attention_path(q, k, v, "linear", feature_map=favor) == "pytorch"
    monkeypatch.setattr(linear_mod, "RESCALED_NORMALIZED_ON_KERNEL", True)
    assert not linear_mod.triton_applies(q.half(), v.half(), favor, query_scale=True)  # fp16 key features overflow
    assert not linear_mod.triton_applies(q, v, TaylorFeatureMap(16))  # F = 273, features of either sign: no slices
    assert linear_mod.triton_applies(q, v, HedgehogFeatureMap(16, num_features=4))  # F = 8: padded to 16
    assert not linear_mod.triton_applies(q, v, FavorFeatureMap(16, num_features=2000), query_scale=True)  # too wide
    assert linear_mod.triton_applies(q, v[..., :8].repeat(1, 1, 1, 4), HedgehogFeatureMap(16, num_features=8))  # F=16, v 32
    assert not linear_mod.triton_applies(q, v[..., :6], HedgehogFeatureMap(16, num_features=8))  # v width 6: not taken
    assert not linear_mod.triton_applies(q, v[..., :6], make_feature_map("elu", 16))
    assert not linear_mod.triton_applies(q.double(), v.double(), make_feature_map("elu", 16))
    monkeypatch.setattr(linear_mod, "KERNEL_ON_CPU_INTERPRETER", False)
    assert not linear_mod.triton_applies(q, v, make_feature_map("elu", 16))  # CPU without the switch


def test_query_scale_put_back_survives_denominators_far_below_eps():
    """FAVOR+'s rescaled denominators are ~1e-9 to 1e-17 at head dim 128, far below eps = 1e-6. The
    kernel's slices then run with linear.RESCALED_KERNEL_EPS and the real eps (eps exp(-l)) goes in
    afterwards: slice outputs rounded to bf16 as the kernel returns them, combined and put back, match
    the fp64 formula. With the kernel's eps = eps (as on the H100, where the bf16 GPU test failed) the
    same combination blows up: cancellation in 1 - eps rden."""
    from mmm.attention import linear as linear_mod

    eps, b, t, h, dv = 1e-6, 1, 64, 2, 8
    dens = [torch.rand(b, h, t, dtype=torch.float64) * 1e-12 + 1e-15 for _ in range(3)]
    nums = [torch.randn(b, t, h, dv, dtype=torch.float64) * d.transpose(1, 2).unsqueeze(-1) for d in dens]
    log_scale = torch.rand(b, t, h, dtype=torch.float64) * 20 + 10
    want = sum(nums) / (sum(dens) + eps * torch.exp(-log_scale).transpose(1, 2)).transpose(1, 2).unsqueeze(-1)

    def put_back(kernel_eps: float) -> torch.Tensor:
        parts = []
        for n, d in zip(nums, dens):
            rden = (1.0 / (d + kernel_eps)).float().transpose(1, 2).contiguous()  # [B, T, H]
            parts.append(((n * rden.double().unsqueeze(-1)).to(torch.bfloat16), rden))
        return linear_mod._finish(parts, True, log_scale.float(), eps, kernel_eps, torch.float32, False)[0]

    assert rel_err(put_back(linear_mod.RESCALED_KERNEL_EPS), want) < 1e-2
    assert not rel_err(put_back(eps), want) < 1e-2
