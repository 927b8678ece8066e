"""The FlexAttention paths of mmm.attention (window on CUDA, near part of hybrid): the dispatch rule, the
analytic block mask against torch's create_block_mask, and the window / hybrid flex paths against the
fp64 references of mmm.attention.naive, forward and every gradient.

flex_attention has no backward on CPU, so forward checks run the real (eager) flex, and gradient checks
swap in `dense_flex`, a differentiable dense version of the same call that is itself checked against
the real flex here. On the GPU, scripts/gpu_attention_paths.py checks the compiled kernels."""

import warnings

import copy

import pytest
import torch

import mmm
from mmm.attention import _compiled, api, flex, hybrid, linear as linear_mod, naive, window as window_mod
from mmm.attention.feature_maps import FEATURE_MAPS, make_feature_map

from conftest import rel_err
from test_attention import fmap_for, rows_first_glue  # same B, T, H, HK, D as here

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
flex_attention_mod = pytest.importorskip("torch.nn.attention.flex_attention")

B, T, H, HK, D, DV = 2, 37, 4, 2, 8, 6  # odd length, GQA, v_dim != head_dim
WINDOW, CHUNK = 8, 16


def qkv(dtype=torch.float64, t=T, h=H, hk=HK, d=D, dv=DV, requires_grad=False):
    return tuple(torch.randn(B, t, n, e, dtype=dtype).requires_grad_(requires_grad) for n, e in ((h, d), (hk, d), (hk, dv)))


def dense_flex(q, k, v, block_mask, enable_gqa, return_lse):
    """`flex._call_flex` computed densely with autograd: the mask from the block mask's own mask_mod."""
    t, groups = q.shape[2], q.shape[1] // k.shape[1]
    assert enable_gqa == (groups > 1)
    mask = flex_attention_mod.create_mask(block_mask.mask_mod, None, None, t, t, q.device)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, -torch.inf)
    return torch.softmax(s, -1) @ v, s.logsumexp(-1) if return_lse else None


# --- which path runs ----------------------------------------------------------------------------------


def test_flex_applies_only_where_flex_compiles(monkeypatch):
    ok = dict(device_type="cuda", dtype=torch.bfloat16, head_dim=128, v_dim=128, seq_len=8192)
    assert flex.flex_applies(**ok)
    for dtype in (torch.float16, torch.float32):
        assert flex.flex_applies(**{**ok, "dtype": dtype})
    for bad in (dict(device_type="cpu"), dict(dtype=torch.float64), dict(head_dim=8), dict(head_dim=256),
                dict(v_dim=96), dict(seq_len=flex.FLEX_MIN_SEQ - 1)):
        assert not flex.flex_applies(**{**ok, **bad}), bad
    monkeypatch.setattr(flex, "FLEX_ENABLED", False)
    assert not flex.flex_applies(**ok)


def test_cpu_inputs_take_the_blockwise_paths():
    q, k, v = qkv(torch.float32, t=256, d=64, dv=64)
    assert window_mod.window_path(q, v) == "blockwise"
    assert hybrid.hybrid_path(q, v, make_feature_map("elu", 64)) == "blockwise"
    assert api.attention_path(q, k, v, "window") == "blockwise"
    assert api.attention_path(q, k, v, "hybrid", feature_map="taylor") == "blockwise"
    assert api.attention_path(q, k, v, "linear") == "pytorch"
    assert api.attention_path(q, k, v, "exact").startswith("sdpa:")
    assert api.attention_path(q, k, v, "auto", crossover=300) == api.attention_path(q, k, v, "exact")


def test_dispatch_runs_the_flex_paths_where_they_apply(monkeypatch):
    """With the rule forced on (CPU, eager flex), mmm.attention takes the flex paths and still matches
    the references; attention_path names them."""
    monkeypatch.setattr(flex, "flex_applies", lambda *args: True)
    calls = []
    real = flex.flex_band
    monkeypatch.setattr(flex, "flex_band", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = qkv()
    assert api.attention_path(q, k, v, "window") == "flex"
    assert api.attention_path(q, k, v, "hybrid", feature_map="favor") == "flex+chunked"
    out = mmm.attention(q, k, v, "window", window=WINDOW)
    assert rel_err(out, naive.naive_window(q, k, v, WINDOW)) < 1e-12 and len(calls) == 1
    fmap = fmap_for("favor")
    out = mmm.attention(q, k, v, "hybrid", window=WINDOW, feature_map=fmap, causal=False, chunk_size=CHUNK)
    assert rel_err(out, naive.naive_hybrid(q, k, v, fmap, WINDOW, causal=False)) < 1e-12
    assert calls[-1] == {"return_lse": True}


# --- block masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t", [1, 37, 128, 200, 256])
def test_band_block_mask_equals_create_block_mask(t, causal):
    for window in (1, 5, 16, 17, 40, 300):
        mask_mod = flex.band_mask_mod(window, causal)
        want = flex_attention_mod.create_block_mask(mask_mod, None, None, t, t, device="cpu", BLOCK_SIZE=16)
        got = flex.band_block_mask(t, window, causal, torch.device("cpu"), block=16)
        assert got.seq_lengths == (t, t) and got.BLOCK_SIZE == want.BLOCK_SIZE and got.mask_mod is mask_mod
        for name in ("kv", "full_kv", "q", "full_q"):
            num_g, num_w = getattr(got, f"{name}_num_blocks"), getattr(want, f"{name}_num_blocks")
            idx_g, idx_w = getattr(got, f"{name}_indices"), getattr(want, f"{name}_indices")
            assert torch.equal(num_g, num_w), (name, window)
            assert idx_g.shape == idx_w.shape and idx_g.dtype == idx_w.dtype == torch.int32
            valid = torch.arange(idx_g.shape[-1]) < num_g.unsqueeze(-1)
            assert torch.equal(idx_g[valid], idx_w[valid]), (name, window)


def test_band_block_mask_is_sparse_at_long_lengths():
    """128k tokens with a 256 window: only the O(T w) blocks near the diagonal are visited, and nothing
    of size T x T is built (create_block_mask without compile needed 128 GiB here)."""
    t, window = 131072, 256
    bm = flex.band_block_mask(t, window, True, torch.device("cpu"))
    n = t // flex.BLOCK
    assert bm.kv_num_blocks.shape == (1, 1, n)
    assert int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) <= 3 * n
    assert int(bm.full_kv_num_blocks.sum()) == n - 1  # the block just below the diagonal is full


# --- forward through the real (eager) flex ------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_window_forward_matches_reference(causal, dtype, tol):
    q, k, v = qkv()
    for window in (1, 5, WINDOW, T - 1, T, 100):
        out = flex.flex_window(q.to(dtype), k.to(dtype), v.to(dtype), window, causal)
        assert out.shape == (B, T, H, DV) and out.dtype == dtype
        assert rel_err(out, naive.naive_window(q, k, v, window, causal)) < tol, window
    # no GQA
    q, k, v = qkv(hk=H)
    assert rel_err(flex.flex_window(q, k, v, WINDOW, causal), naive.naive_window(q, k, v, WINDOW, causal)) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_flex_hybrid_forward_matches_reference(name, causal):
    q, k, v = qkv()
    fmap = fmap_for(name)
    for window in (1, 5, WINDOW, T - 1, T, 100):
        with torch.no_grad():
            out = hybrid.flex_hybrid(q, k, v, fmap, window, causal, 1e-6, CHUNK)
        assert out.shape == (B, T, H, DV) and out.dtype == q.dtype
        assert rel_err(out, naive.naive_hybrid(q, k, v, fmap, window, causal)) < 1e-12, window


def test_dense_flex_stand_in_matches_flex():
    q, k, v = (x.transpose(1, 2) for x in qkv())
    for causal in (True, False):
        bm = flex.band_block_mask(T, WINDOW, causal, q.device)
        o, lse = flex._call_flex(q, k, v, bm, True, True)
        o_d, lse_d = dense_flex(q, k, v, bm, True, True)
        assert rel_err(o_d, o) < 1e-13 and rel_err(lse_d, lse) < 1e-13


# --- gradients (flex swapped for dense_flex) ----------------------------------------------------------


def check_gradients(run, ref, params, tol=1e-9, ref_params=None):
    """ref_params: the reference's own leaves, when it does not take `params` (an fp64 copy)."""
    out, want = run(), ref()
    assert rel_err(out, want) < tol
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, params, g.to(out.dtype))
    for i, (a, b) in enumerate(zip(got, torch.autograd.grad(want, ref_params or params, g))):
        assert torch.isfinite(a).all() and rel_err(a, b) < 10 * tol, f"gradient {i}: {rel_err(a, b)}"


@pytest.mark.parametrize("causal", [True, False])
def test_flex_window_gradients(causal, monkeypatch):
    monkeypatch.setattr(flex, "_call_flex", dense_flex)
    q, k, v = qkv(requires_grad=True)
    check_gradients(lambda: flex.flex_window(q, k, v, WINDOW, causal), lambda: naive.naive_window(q, k, v, WINDOW, causal), [q, k, v])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("large", [False, True])
def test_flex_hybrid_gradients(name, causal, large, monkeypatch):
    """large: in fp32 with c_h = +-120, as large as fit_hybrid's on the bench's trained layer (where
    exp(s - c_h) underflows: hybrid.shared_max), against the fp64 reference."""
    monkeypatch.setattr(flex, "_call_flex", dense_flex)
    q, k, v = qkv(requires_grad=True)
    fmap = fmap_for(name)
    params = [q, k, v] + list(fmap.parameters())
    tol = 1e-9
    if large:
        fmap.hybrid_log_scale = torch.tensor([120.0, -120.0] * (H // 2), dtype=torch.float64)
        ref_map, fmap = fmap, copy.deepcopy(fmap).float()
        q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
        params, ref_params, tol = [q, k, v], params, 2e-5
    for window in (5, T - 1):
        if large:
            check_gradients(lambda: hybrid.flex_hybrid(q, k, v, fmap, window, causal, 1e-6, CHUNK),
                            lambda: naive.naive_hybrid(*ref_params[:3], ref_map, window, causal), params, tol,
                            ref_params[:3])
        else:
            check_gradients(lambda: hybrid.flex_hybrid(q, k, v, fmap, window, causal, 1e-6, CHUNK),
                            lambda: naive.naive_hybrid(q, k, v, fmap, window, causal), params)


# --- far part through the Triton linear-attention op (interpreter) -----------------------------------


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("name,causal", [("elu", True), ("relu", False), ("hedgehog", True)])
def test_flex_hybrid_with_triton_far_part(name, causal, large, monkeypatch):
    """large: c_h = +-120, as large as fit_hybrid's on the bench's trained layer (hybrid.shared_max)."""
    pytest.importorskip("triton")
    monkeypatch.setattr(flex, "_call_flex", dense_flex)
    monkeypatch.setattr(linear_mod, "KERNEL_ON_CPU_INTERPRETER", True)  # the Triton op under the interpreter
    q, k, v = (x.float().detach().requires_grad_() for x in qkv(t=45, d=16, dv=16))
    fmap = make_feature_map(name, 16)
    # a calibration per head, as fit_hybrid leaves it
    fmap.hybrid_log_scale = torch.tensor([120.0, -120.0] * (H // 2)) if large else torch.randn(H)
    rows_first_glue(monkeypatch, hybrid, "_combine", lambda o_w, lse, parts, *rest: [lse, *(r for _, r, _ in parts)], t=45)
    # the far part is the op with a key lag of `window` (44: one far key, for one map)
    for window in (WINDOW, 44) if name == "elu" else (WINDOW,):
        check_gradients(lambda: hybrid.flex_hybrid(q, k, v, fmap, window, causal, 1e-6, CHUNK),
                        lambda: naive.naive_hybrid(q, k, v, fmap.double(), window, causal), [q, k, v], tol=2e-5)


@pytest.mark.parametrize("two_sided", [False, True])
def test_combine_traces_whole_under_compile(two_sided):
    """hybrid._combine as torch.compile runs it on CUDA (fullgraph, dynamic shapes; aot_eager on the CPU):
    output and gradients equal the eager combination's, for one far part or two (two-sided)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(hybrid.combine_kernel_far, dynamic=True, fullgraph=True, backend="aot_eager")
    t = 29
    o_w = torch.randn(B, t, H, DV, requires_grad=True)
    lse = torch.randn(B, t, H, requires_grad=True)
    parts = [(torch.randn(B, t, H, DV, requires_grad=True), torch.rand(B, t, H, requires_grad=True) + 0.5, rev)
             for rev in ((False, True) if two_sided else (False,))]
    c = torch.randn(H)
    leaves = [o_w, lse, *(x for o, r, _ in parts for x in (o, r))]
    got, want = (f(o_w, lse, parts, c, 1e-6, torch.float32) for f in (compiled, hybrid.combine_kernel_far))
    assert got.shape == (B, t, H, DV) and torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# --- compile cache ------------------------------------------------------------------------------------


def test_compiled_flex_cache_keeps_one_code_object_per_key():
    """Each kind of call gets its own code object, hence its own compile cache and recompile limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = flex._compiled_flex(True, 256, torch.bfloat16, False, False, True)
        b = flex._compiled_flex(True, 1024, torch.bfloat16, False, False, True)
        assert flex._compiled_flex(True, 256, torch.bfloat16, False, False, True) is a
    code_a, code_b = (getattr(f, "_torchdynamo_orig_callable", f).__code__ for f in (a, b))
    assert code_a is not code_b and code_a is not flex._call_flex.__code__
    assert code_a.co_code == flex._call_flex.__code__.co_code


def test_compiled_glue_gets_a_compile_limit_per_kind_of_call(monkeypatch):
    """compiled_on_cuda compiles each kind of call (here: the function passed in, as `_pad_features` gets
    each map's apply_features; also dtypes, grad mode) from a code copy of its own: more kinds than
    dynamo's recompile limit (8) all compile, where one shared code object traced 8 and ran every later
    kind eagerly, silently. Traced on CPU with a recording backend."""
    traced = []

    def record(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    def glue(apply, x):
        return apply(x) * 2.0

    monkeypatch.setattr(_compiled, "BACKEND", record)
    run = _compiled.compiled_on_cuda(glue)
    x = torch.randn(5, 3)
    maps = [lambda x, i=i: x + i for i in range(10)]
    for apply in maps:
        args = (apply, x)
        torch.testing.assert_close(run.compiled_for(_compiled._kind(args))(*args), glue(*args))
    assert len(traced) == len(maps) > 8
    with torch.no_grad():
        no_grad_kind = _compiled._kind((maps[0], x))
    assert no_grad_kind != _compiled._kind((maps[0], x)) != _compiled._kind((maps[0], x.double()))
    run.compiled_for(_compiled._kind((maps[0], x)))(maps[0], x)  # a kind seen before: no new trace
    assert len(traced) == len(maps)


# --- GPU: the compiled kernels (full checks and timings: scripts/gpu_attention_paths.py) -------------


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_flex_paths_bf16(causal):
    q, k, v = (torch.randn(1, 1000, n, 64, device="cuda").bfloat16().requires_grad_() for n in (8, 2, 2))
    assert api.attention_path(q, k, v, "window") == "flex"
    assert api.attention_path(q, k, v, "hybrid", feature_map="elu") == "flex+triton"
    for method, ref in (("window", lambda: naive.naive_window(q, k, v, 128, causal)),
                        ("hybrid", lambda: naive.naive_hybrid(q, k, v, make_feature_map("elu", 64).cuda().double(), 128, causal))):
        out, want = mmm.attention(q, k, v, method, window=128, causal=causal), ref()
        assert out.dtype == torch.bfloat16 and rel_err(out, want) < 2e-2, method
        g = torch.randn_like(want)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g.bfloat16()), torch.autograd.grad(want, (q, k, v), g)):
            assert rel_err(a, b) < 5e-2, method
