"""`mmm bench` attention cases: the quick set end to end through the CLI (rows, times, the quality column
measured on real q/k/v, the crossover), the real-input capture (shapes, faithful to the layer, causal
prefixes, not Gaussian-like), the crossover interpolation and the cost model. No assertion on speed."""

import importlib.util
import json
import math

import pytest
import torch

from mmm.attention import attention, attention_error
from mmm.bench import run_case
from mmm.bench import attention_inputs
from mmm.bench.attention_inputs import QUICK_SPEC, capture_qkv, read_stream, real_qkv, trained_model, training_qkv
from mmm.bench.cases_attention import (
    QUALITY_KEY,
    QUICK_HEDGEHOG,
    QUICK_SIZES,
    attention_variant,
    crossover_length,
    fla_variant,
    fitted_hybrid_map,
    linear_flops,
    softmax_flops,
    trained_hedgehog,
    visible_pairs,
)
from mmm.bench.runner import measure_variant
from mmm.bench.timing import TimerSettings, canonical_device
from mmm.cli import main

FAST = TimerSettings(warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3)
APPROXIMATE = ("linear", "window", "hybrid", "fla")
HAVE_FLA = importlib.util.find_spec("fla") is not None


def test_quick_attention_bench_end_to_end(tmp_path):
    out_json, out_md = tmp_path / "attn.json", tmp_path / "attn.md"
    rc = main(["bench", "--quick", "--cases", "attn.*", "--no-progress", "--json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    results = json.loads(out_json.read_text())
    cases = {c["name"]: c for c in results["cases"]}
    assert set(cases) == {"attn.crossover.quick", "attn.causal.T256", "attn.causal.T512"}
    h, d = QUICK_SIZES.heads, QUICK_SIZES.head_dim

    for t in QUICK_SIZES.lengths:
        case = cases[f"attn.causal.T{t}"]
        assert case["error"] is None
        rows = {r["variant"]: r for r in case["rows"]}
        base = rows["sdpa math"]
        assert base["baseline"] and base["info"]["backend"] == "math"
        assert base["flops"] == 4 * h * d * t * (t + 1) // 2
        for prefix in ("sdpa flash", "linear elu", "linear relu", "linear favor+", "linear hedgehog (trained)", "window", "hybrid"):
            assert any(label.startswith(prefix) for label in rows), prefix
        real = real_qkv(t, True, "cpu")
        for label, r in rows.items():
            if label.startswith("fla"):
                assert r["error"], "fla cannot run on a CPU: its rows must record an error (or be absent)"
                continue
            assert r["error"] is None, (label, r["error"])
            assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
            assert r["speedup_fwd_bwd"] == pytest.approx(base["fwd_bwd_ms"] / r["fwd_bwd_ms"])
            assert r["bwd_over_fwd"] == pytest.approx((r["fwd_bwd_ms"] - r["fwd_ms"]) / r["fwd_ms"])
            if label.startswith(APPROXIMATE):
                err = r["quality"][QUALITY_KEY]
                assert math.isfinite(err) and err > 1e-3, (label, err)
                assert r["info"]["quality_inputs"]["shape"] == [1, t, h, d]
            else:
                assert r["quality"] == {}, label  # exact attention: no error to report
        if not HAVE_FLA:
            assert not any(label.startswith("fla") for label in rows)
        # the quality column is the error on the trained layer's q/k/v, not on the Gaussian timing inputs
        w = QUICK_SIZES.windows[0]
        assert rows[f"window {w}"]["quality"][QUALITY_KEY] == pytest.approx(
            attention_error(real.q, real.k, real.v, "window", window=w, sample_rows=1024), rel=1e-6)
        assert rows["linear elu (normalized)"]["quality"][QUALITY_KEY] == pytest.approx(
            attention_error(real.q, real.k, real.v, "linear", feature_map="elu", sample_rows=1024), rel=1e-6)
        # the Hedgehog map, fitted on the layer's training text, beats elu+1 and FAVOR+ on the held-out q/k/v
        hh = rows["linear hedgehog (trained)"]
        errors = {label: rows[label]["quality"][QUALITY_KEY] for label in ("linear elu (normalized)", "linear favor+")}
        assert math.isfinite(hh["quality"][QUALITY_KEY]), hh
        assert all(hh["quality"][QUALITY_KEY] < e for e in errors.values()), (hh["quality"], errors)
        assert hh["info"]["hedgehog_steps"] == QUICK_HEDGEHOG.steps and hh["info"]["hedgehog_train_seconds"] > 0
        assert "training stdlib" in hh["info"]["hedgehog_train_inputs"]
        fmap, _ = trained_hedgehog(True, torch.device("cpu"))  # the same cached map for every T
        assert hh["quality"][QUALITY_KEY] == pytest.approx(
            attention_error(real.q, real.k, real.v, "linear", feature_map=fmap, sample_rows=1024), rel=1e-6)
        # the hybrid's calibration, fitted on the training text, lowers its held-out error; a Hedgehog map
        # trained inside the hybrid lowers it further
        w = QUICK_SIZES.hybrid_window
        hy, hh_hy = rows[f"hybrid w={w} elu (calibrated)"], rows[f"hybrid w={w} hedgehog (trained in the hybrid)"]
        calibrated, _ = fitted_hybrid_map("elu", True, torch.device("cpu"), w)
        assert hy["info"]["calibration_log_scale"] == [round(c, 3) for c in calibrated.hybrid_log_scale.tolist()]
        assert hy["quality"][QUALITY_KEY] == pytest.approx(attention_error(
            real.q, real.k, real.v, "hybrid", window=w, feature_map=calibrated, sample_rows=1024), rel=1e-6)
        assert hy["info"]["quality_uncalibrated"] == pytest.approx(attention_error(
            real.q, real.k, real.v, "hybrid", window=w, feature_map="elu", sample_rows=1024), rel=1e-6)
        assert hy["quality"][QUALITY_KEY] < hy["info"]["quality_uncalibrated"], hy
        assert hh_hy["quality"][QUALITY_KEY] < hy["quality"][QUALITY_KEY], (hh_hy["quality"], hy["quality"])
        assert "quality_uncalibrated" not in hh_hy["info"] and hh_hy["info"]["fit_steps"] == QUICK_HEDGEHOG.steps

    cross = cases["attn.crossover.quick"]
    assert cross["error"] is None
    labels = [r["variant"] for r in cross["rows"]]
    assert labels == [f"{m} T={t}" for t in QUICK_SIZES.crossover for m in ("exact", "linear elu (normalized)")]
    assert all(r["fwd_bwd_ms"] > 0 and not r["baseline"] and r["error"] is None for r in cross["rows"])
    info = cross["rows"][0]["info"]
    timed = info["crossover_fwd_bwd_ms"]
    assert timed["T"] == list(QUICK_SIZES.crossover) and min(timed["exact_ms"] + timed["linear_ms"]) > 0
    at, text = crossover_length(QUICK_SIZES.crossover, timed["exact_ms"], timed["linear_ms"])
    assert info["crossover"] == text or info["crossover_T"] == pytest.approx(at, rel=0.01)

    md = out_md.read_text()
    assert "## attn.causal.T512" in md and QUALITY_KEY in md and "sdpa math (baseline)" in md


def _entropy(q, k):
    """Mean entropy (nats) of causal softmax attention rows, skipping the first 16 (few keys)."""
    t = q.shape[1]
    s = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) / q.shape[-1] ** 0.5
    p = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -torch.inf).softmax(-1)
    return float(-(p * p.clamp_min(1e-300).log()).sum(-1)[..., 16:].mean())


def _gaussian_like(x, gen):
    """Gaussian with x's per-head, per-channel mean and standard deviation."""
    mean, std = x.mean(dim=(0, 1), keepdim=True), x.std(dim=(0, 1), keepdim=True)
    return torch.randn(x.shape, generator=gen) * std + mean


def test_real_qkv_shapes_and_differs_from_gaussian():
    t = 256
    r = real_qkv(t, True, "cpu")
    for x in (r.q, r.k, r.v):
        assert x.shape == (1, t, QUICK_SIZES.heads, QUICK_SIZES.head_dim) and x.dtype == torch.float32
        assert bool(torch.isfinite(x).all()) and float(x.std()) > 0
    assert r.info["train_loss_last"] < r.info["train_loss_first"] - 1.0  # it did learn (ln 256 = 5.5 at the start)
    gen = torch.Generator().manual_seed(0)
    gq, gk = _gaussian_like(r.q, gen), _gaussian_like(r.k, gen)
    real_h = _entropy(r.q, r.k)
    # a trained layer attends more sharply than moment-matched or standard Gaussian q/k
    assert real_h < _entropy(gq, gk) - 0.1
    assert real_h < _entropy(torch.randn(r.q.shape, generator=gen), torch.randn(r.k.shape, generator=gen)) - 0.1
    # and linear attention approximates it much worse than it approximates the Gaussian stand-in
    assert attention_error(r.q, r.k, r.v, "linear") > 2 * attention_error(gq, gk, r.v, "linear")


def test_capture_is_the_layers_qkv_and_causal():
    trained = trained_model(QUICK_SPEC, "cpu")
    model = trained.model
    text, _ = read_stream(trained.files, trained.first_heldout, 96)
    tokens = torch.from_numpy(text[:96].astype("int64"))[None]
    q, k, v = capture_qkv(model, tokens)
    # the layer's own output equals its output projection of exact attention on the captured q, k, v
    seen = {}
    handle = model.blocks[-1].attn.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    with torch.no_grad():
        again = model.blocks[-1].attn.o(attention(q, k, v, "exact").flatten(2))
    torch.testing.assert_close(again, seen["out"], rtol=1e-5, atol=1e-6)
    # causal: the capture of a prefix is the prefix of the capture (why one long capture serves every T)
    for a, b in zip(capture_qkv(model, tokens[:, :40]), (q, k, v)):
        torch.testing.assert_close(a, b[:, :40], rtol=1e-5, atol=1e-6)


def test_real_qkv_rejects_bad_length():
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        real_qkv(0, True, "cpu")
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        training_qkv(-3, True, "cpu")
    with pytest.raises(ValueError, match="at most the training stream"):
        training_qkv(QUICK_SPEC.train_bytes + 1, True, "cpu")


def test_training_capture_is_training_text_not_held_out():
    trained = trained_model(QUICK_SPEC, "cpu")
    t = 200
    got = training_qkv(t, True, "cpu")
    assert got.q.shape == (1, t, QUICK_SIZES.heads, QUICK_SIZES.head_dim) and "training" in got.info["text"]
    # it is the layer on the first bytes of the training stream, a prefix of a longer capture...
    text, _ = read_stream(trained.files, 0, t)
    expect = capture_qkv(trained.model, torch.from_numpy(text[:t].astype("int64"))[None])
    for a, b in zip((got.q, got.k, got.v), expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    longer = training_qkv(2 * t, True, "cpu")
    torch.testing.assert_close(longer.q[:, :t], got.q, rtol=1e-5, atol=1e-6)
    # ...and not the held-out text the quality column is measured on
    held = real_qkv(t, True, "cpu")
    assert "held-out" in held.info["text"] and not torch.allclose(held.q, got.q)


def test_crossover_length():
    lengths = (512, 1024, 2048, 4096)
    at, text = crossover_length(lengths, [1.0, 2.0, 4.0, 8.0], [2.0, 2.5, 3.0, 3.5])
    ratio_lo, ratio_hi = 2.0 / 2.5, 4.0 / 3.0  # exact / linear at 1024 and 2048
    expected = 1024 * 2 ** (-math.log(ratio_lo) / (math.log(ratio_hi) - math.log(ratio_lo)))
    assert at == round(expected) and 1024 < at < 2048 and "between 1024 and 2048" in text
    assert crossover_length(lengths, [4, 4, 4, 4], [1, 1, 1, 1])[0] == 512  # linear always faster
    assert crossover_length(lengths, [1, 1, 1, 1], [2, 2, 2, 2])[0] is None  # never
    # faster at 512 by noise, slower at 1024, faster from 2048: linear *stays* faster only from 2048
    at, _ = crossover_length(lengths, [2, 1, 4, 8], [1, 2, 2, 2])
    assert 1024 < at < 2048


def test_cost_model():
    for t in (1, 5, 16, 33):
        for w in (None, 1, 4, 16, 64):
            brute = sum(1 for i in range(t) for j in range(i + 1) if w is None or i - j < w)
            assert visible_pairs(t, w) == brute
    assert softmax_flops(2, 3, 10, 8) == 4 * 2 * 3 * 8 * 55
    # linear: 4 F D (state update, read-out) + 2 C (F + D) (chunk-local) per token, C = min(64, T)
    assert linear_flops(1, 2, 256, 32) == 2 * 256 * 4 * 32 * (32 + 64)
    assert linear_flops(1, 2, 256, 32, 64) == 2 * 256 * (4 * 64 * 32 + 2 * 64 * (64 + 32))


def test_banded_memory_estimate_follows_the_path(monkeypatch):
    """Window / hybrid keep fp32 blocks only on their blockwise paths: on flex (CUDA) nothing is skipped
    for memory (session 14's H100 run skipped window 1024 at 128k as needing ~96 GiB)."""
    import mmm.bench.cases_attention as cases

    q = torch.randn(1, 64, 2, 8)
    for kind in ("window", "hybrid"):
        assert cases.banded_bytes(kind, q, 16) == cases.peak_bytes(kind, 1, 2, 64, 16) > 0  # CPU: blockwise
    for hybrid_path in ("flex+triton", "fused"):
        paths = {"window": "flex", "hybrid": hybrid_path}
        monkeypatch.setattr(cases, "attention_path", lambda q, k, v, method, window: paths[method])
        assert cases.banded_bytes("window", q, 16) == 0 and cases.banded_bytes("hybrid", q, 16) == 0


def _tiny_inputs(t=16):
    q, k, v = (torch.randn(1, t, 2, 8, requires_grad=True) for _ in range(3))
    return (q, k, v), torch.randn(1, t, 2, 8)


def test_memory_skip_and_quality_failure_are_recorded():
    inputs, grad = _tiny_inputs()
    fn = lambda q, k, v: attention(q, k, v, "exact")  # noqa: E731
    row = measure_variant(attention_variant("huge", fn, inputs, grad, 1, 2.5, need_bytes=2**80), torch.device("cpu"), FAST)
    assert row["error"].startswith("MemoryError: skipped") and row["fwd_ms"] is None

    def broken():
        raise RuntimeError("no real inputs here")

    with pytest.warns(UserWarning, match="quality not measured"):
        row = measure_variant(attention_variant("approx", fn, inputs, grad, 1, 2.5, error_fn=lambda q, k, v: 0.5, real=broken),
                              torch.device("cpu"), FAST)
    assert row["error"] is None and row["fwd_ms"] > 0 and row["quality"] == {}
    assert "no real inputs here" in row["info"]["quality_error"]

    # a NaN error (session 20: the fused hybrid's NaN rows) stays in the table and is said out loud
    real = lambda: type("Real", (), dict(q=inputs[0], k=inputs[1], v=inputs[2], info={}))  # noqa: E731
    with pytest.warns(UserWarning, match="non-finite error"):
        row = measure_variant(attention_variant("approx", fn, inputs, grad, 1, 2.5, error_fn=lambda q, k, v: math.nan,
                                                real=real), torch.device("cpu"), FAST)
    assert math.isnan(row["quality"][QUALITY_KEY]) and "NaN or inf" in row["info"]["quality_error"]


@pytest.mark.skipif(HAVE_FLA, reason="fla is installed: its missing-package path cannot be exercised")
def test_fla_missing_is_recorded_not_fatal():
    inputs, grad = _tiny_inputs()
    row = measure_variant(fla_variant("fla x", "normalized", inputs, grad, 1, real=lambda: None), torch.device("cpu"), FAST)
    assert row["error"].startswith(("ModuleNotFoundError", "ImportError")) and row["fwd_ms"] is None


@pytest.mark.gpu
def test_attention_case_on_gpu():
    """Full size, shortest length: cuDNN baseline, mmm paths and quality on the trained 16 x 128 layer (bf16).
    Hedgehog is only compared with FAVOR+ here: its map is fitted on 8192-token slices and beats elu+1 at
    8k and 32k (tests/test_attention_fit.py), not at this 2k case (H100, 2026-12-05: 0.676 vs 0.596)."""
    from mmm.bench import CASES, load_builtin_cases
    from mmm.bench.machine import machine_header

    load_builtin_cases()
    device = torch.device("cuda")
    header = machine_header(device, torch.bfloat16, quick=True)
    result = run_case(CASES["attn.causal.T2048"], device, torch.bfloat16, False, header)
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["sdpa cudnn"]["error"] is None and rows["sdpa cudnn"]["baseline"]
    for label in ("linear elu (normalized)", "linear relu (normalized)", "linear favor+", "linear hedgehog (trained)",
                  "window 256", "window 1024", "hybrid w=256 elu (calibrated)", "hybrid w=64 elu (calibrated)"):
        r = rows[label]
        assert r["error"] is None, (label, r["error"])
        assert r["fwd_bwd_ms"] > 0 and math.isfinite(r["quality"][QUALITY_KEY])
        assert r["info"]["quality_inputs"]["shape"] == [1, 2048, 16, 128]
    hedgehog = rows["linear hedgehog (trained)"]["quality"][QUALITY_KEY]
    assert hedgehog < rows["linear favor+"]["quality"][QUALITY_KEY]
    # the calibration must not hurt on held-out text (the H200 layer of session 3 gave the uncalibrated
    # hybrid window 256's error: c_h may find nothing to gain there, hence 1% of slack)
    hybrid = rows["hybrid w=256 elu (calibrated)"]
    assert hybrid["quality"][QUALITY_KEY] <= 1.01 * hybrid["info"]["quality_uncalibrated"], hybrid
    assert rows["hybrid w=256 hedgehog (trained in the hybrid)"]["error"] is None
    assert rows["hybrid w=64 elu (calibrated)"]["info"]["path"] == "fused"


def test_one_trained_layer_per_gpu_whatever_the_device_is_called(monkeypatch):
    """The bench names its device "cuda" (the quality inputs) and its tensors' "cuda:0" (the Hedgehog and
    hybrid fits): both must reach one trained layer, or each fit is judged on another layer than it was
    fitted to (sessions 11-23, where Hedgehog tied elu+1 in every bench run)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert canonical_device("cuda") == canonical_device(torch.device("cuda:0")) == torch.device("cuda", 0)
    assert canonical_device("cuda:1") == torch.device("cuda", 1)
    assert canonical_device("cpu") == torch.device("cpu")
    sentinel = object()
    monkeypatch.setitem(attention_inputs._TRAINED, (QUICK_SPEC, "cuda:0"), sentinel)
    assert trained_model(QUICK_SPEC, "cuda") is sentinel  # a cache hit: no second model is trained
    assert trained_model(QUICK_SPEC, torch.device("cuda", 0)) is sentinel
