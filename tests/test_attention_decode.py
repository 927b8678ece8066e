"""mmm.attention.decode: the recurrent step reproduces the parallel causal form token by token."""

import pytest
import torch

import mmm
from mmm.attention import decode
from mmm.attention.feature_maps import FavorFeatureMap, HedgehogFeatureMap, make_feature_map

from conftest import rel_err

B, T, H, HK, D, DV, W = 2, 21, 4, 2, 8, 6, 5


def qkv(dtype=torch.float64):
    return (torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, HK, D, dtype=dtype), torch.randn(B, T, HK, DV, dtype=dtype))


def fmap_for(name):
    """A map with a hybrid calibration c_h away from 0, one per head (and Hedgehog parameters away from init)."""
    if name == "favor":
        fmap = FavorFeatureMap(D, num_features=16, seed=2).double()
    elif name == "hedgehog":
        fmap = HedgehogFeatureMap(D, num_heads=H, num_kv_heads=HK).double()
        with torch.no_grad():
            for p in fmap.parameters():
                p.add_(0.3 * torch.randn_like(p))
    else:
        fmap = make_feature_map(name, D)
    fmap.hybrid_log_scale = torch.randn(H)
    return fmap


def run_steps(q, k, v, state, start=0):
    outs = []
    for t in range(start, q.shape[1]):
        o, state = decode.step(q[:, t], k[:, t], v[:, t], state)
        outs.append(o)
    return torch.stack(outs, dim=1), state


@pytest.mark.parametrize("name", ["elu", "relu", "favor", "taylor", "hedgehog"])
@pytest.mark.parametrize("method", ["linear", "hybrid"])
def test_steps_match_parallel(method, name):
    q, k, v = qkv()
    fmap = fmap_for(name)
    opts = dict(method=method, feature_map=fmap, window=W)
    parallel = mmm.attention(q, k, v, method, window=W, feature_map=fmap, chunk_size=4)
    state = decode.init_state(B, HK, D, DV, dtype=torch.float64, **opts)
    stepped, end = run_steps(q, k, v, state)
    assert rel_err(stepped, parallel) < 1e-12
    assert end.pos == T and state.pos == 0  # step returns a new state, the old one is untouched
    # From a prompt: prefill the first 9 tokens (its output is the parallel form), then step.
    out, state = decode.prefill(q[:, :9], k[:, :9], v[:, :9], chunk_size=4, **opts)
    assert rel_err(out, parallel[:, :9]) < 1e-12
    stepped, end2 = run_steps(q, k, v, state, start=9)
    assert rel_err(stepped, parallel[:, 9:]) < 1e-12
    assert rel_err(end2.s, end.s) < 1e-12 and rel_err(end2.z, end.z) < 1e-12


@pytest.mark.parametrize("name", ["elu", "hedgehog"])
@pytest.mark.parametrize("window,prompt", [(W, 9), (W, 10), (3, 3), (1, 4)])
def test_block_window_steps_match_parallel(name, window, prompt):
    """window_shape='block': a block joins the far sums when the next one starts, also when the prompt
    ends on a block's last token (10 = 2 blocks of 5; 3 = 1 block of 3) or blocks are single tokens."""
    q, k, v = qkv()
    fmap = fmap_for(name)
    opts = dict(method="hybrid", feature_map=fmap, window=window, window_shape="block")
    parallel = mmm.attention(q, k, v, "hybrid", window=window, window_shape="block", feature_map=fmap)
    stepped, end = run_steps(q, k, v, decode.init_state(B, HK, D, DV, dtype=torch.float64, **opts))
    assert rel_err(stepped, parallel) < 1e-12
    out, state = decode.prefill(q[:, :prompt], k[:, :prompt], v[:, :prompt], **opts)
    assert rel_err(out, parallel[:, :prompt]) < 1e-12
    stepped, end2 = run_steps(q, k, v, state, start=prompt)
    assert rel_err(stepped, parallel[:, prompt:]) < 1e-12
    assert rel_err(end2.s, end.s) < 1e-12 and rel_err(end2.z, end.z) < 1e-12


def test_unnormalized_linear_and_fp32():
    q, k, v = qkv()
    parallel = mmm.attention(q, k, v, "linear", feature_map="taylor", normalize=False)
    stepped, _ = run_steps(q, k, v, decode.init_state(B, HK, D, DV, feature_map="taylor", normalize=False, dtype=torch.float64))
    assert rel_err(stepped, parallel) < 1e-12
    q, k, v = qkv(torch.float32)
    out, state = decode.prefill(q[:, :7], k[:, :7], v[:, :7], method="hybrid", window=W, feature_map="favor")
    assert state.s.dtype == torch.float32 and state.k_buf.shape == (B, HK, W, D)
    stepped, _ = run_steps(q, k, v, state, start=7)
    assert stepped.dtype == torch.float32
    assert rel_err(stepped, mmm.attention(q, k, v, "hybrid", window=W, feature_map="favor")[:, 7:]) < 1e-5


def test_decode_bad_arguments():
    with pytest.raises(ValueError, match="decoding supports method"):
        decode.init_state(B, HK, D, method="window")
    with pytest.raises(ValueError, match="window must be a positive int"):
        decode.init_state(B, HK, D, method="hybrid", window=0)
    with pytest.raises(ValueError, match="window_shape='block' is for method='hybrid' only"):
        decode.init_state(B, HK, D, method="linear", window_shape="block")
    state = decode.init_state(B, HK, D, DV, method="hybrid", window=W)
    q, k, v = qkv(torch.float32)
    with pytest.raises(ValueError, match="k_t must have shape"):
        decode.step(q[:, 0], q[:, 0], v[:, 0], state)
    with pytest.raises(ValueError, match="q_t must be"):
        decode.step(q[:, 0, :3], k[:, 0], v[:, 0], state)
    bad = v[:, 0].clone()
    bad[0, 0, 0] = float("inf")
    with mmm.finite_checks(), pytest.raises(ValueError, match="v_t contains 1 NaN/inf"):
        decode.step(q[:, 0], k[:, 0], bad, state)
