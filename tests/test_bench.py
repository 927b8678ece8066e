"""`mmm bench`: the CLI end to end on one tiny real case, the registry, the runner's bookkeeping (errors,
speedups, roofline floor) on fake cases with known numbers, and the timer's protocol. No assertion on
speed: only on what the harness computes from the times it measured."""

import json
import time

import pytest
import torch

from mmm.bench import CASES, Variant, Workload, bench_case, derive, floor_ms, median_ms, run_case
from mmm.bench.cases_linear import structured_configs
from mmm.bench.timing import TimerSettings, host_ms
from mmm.cli import main

FAST = TimerSettings(warmup_ms=0.0, rep_ms=0.0, min_reps=3, max_reps=3)


@pytest.fixture
def temporary_cases():
    """Register cases for one test only."""
    before = set(CASES)
    yield bench_case
    for name in set(CASES) - before:
        del CASES[name]


def _matmul_workload(m: int, **costs) -> Workload:
    a = torch.randn(m, m, requires_grad=True)
    b = torch.randn(m, m)

    def forward_backward():
        (a @ b).sum().backward()

    return Workload(forward=lambda: a @ b, forward_backward=forward_backward, grad_to_none=[a], **costs)


def test_quick_case_end_to_end(tmp_path, monkeypatch):
    # the harness is under test, not every structure: keep two of them so the test stays short
    from mmm.bench import cases_linear

    every = cases_linear.structured_configs
    monkeypatch.setattr(cases_linear, "structured_configs",
                        lambda d_in, d_out: [c for c in every(d_in, d_out) if c[0] in ("lowrank r=32", "blockdiag b=4")])
    out_json, out_md, out_png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    rc = main(["bench", "--quick", "--cases", "linear.square.d256", "--no-progress",
               "--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png)])
    assert rc == 0
    results = json.loads(out_json.read_text())
    header = results["header"]
    assert header["dtype"] == "float32" and header["device_type"] == "cpu"
    assert header["versions"]["torch"] == torch.__version__
    assert header["matmul_tflops"] > 0 and header["copy_gbps"] > 0
    (case,) = results["cases"]
    assert case["name"] == "linear.square.d256" and case["error"] is None
    rows = {r["variant"]: r for r in case["rows"]}
    base = rows["dense nn.Linear"]
    assert base["baseline"] and base["error"] is None
    assert base["flops"] == 2 * 256 * 256 * 256
    assert base["speedup_fwd"] == pytest.approx(1.0) and base["speedup_fwd_bwd"] == pytest.approx(1.0)
    assert list(rows) == ["dense nn.Linear", "lowrank r=32", "blockdiag b=4"]
    ok = [r for r in case["rows"] if r["error"] is None]
    assert len(ok) >= 2  # dense and low rank exist from the start
    for r in ok:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["speedup_fwd"] == pytest.approx(base["fwd_ms"] / r["fwd_ms"])
        assert r["speedup_fwd_bwd"] == pytest.approx(base["fwd_bwd_ms"] / r["fwd_bwd_ms"])
        assert r["flops_vs_baseline"] == pytest.approx(r["flops"] / base["flops"])
        assert r["fwd_over_floor"] == pytest.approx(r["fwd_ms"] / r["floor_fwd_ms"])
    assert rows["lowrank r=32"]["flops"] == 2 * 256 * 32 * (256 + 256)
    md = out_md.read_text()
    assert "## linear.square.d256" in md and "dense nn.Linear (baseline)" in md and header["device"] in md
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("linear.square.d256", "linear.up4x.d512", "linear.square.d4096", "linear.up4x.d32768"):
        assert name in out


def test_unknown_case_lists_known_ones(capsys):
    assert main(["bench", "--quick", "--cases", "no.such.case"]) == 2
    err = capsys.readouterr().err
    assert "no.such.case" in err and "linear.square.d256" in err and "linear.up4x.d512" in err
    # a full-size case named with --quick: the error says so
    assert main(["bench", "--quick", "--cases", "linear.square.d4096"]) == 2
    assert "drop --quick" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU guard")
def test_full_set_on_cpu_is_refused(capsys):
    assert main(["bench"]) == 2
    assert "--quick" in capsys.readouterr().err


def test_failing_variant_is_recorded_and_the_run_goes_on(temporary_cases, tmp_path):
    def broken_build():
        raise RuntimeError("CUDA out of memory (simulated)")

    def backward_fails():
        w = _matmul_workload(8)
        w.forward_backward = lambda: (_ for _ in ()).throw(TypeError("bf16 not supported (simulated)"))
        return w

    @temporary_cases("test.failing", group="test", quick=True)
    def _(device, dtype, quick):
        return [Variant("base", lambda: _matmul_workload(16), baseline=True),
                Variant("broken", broken_build),
                Variant("no backward", backward_fails),
                Variant("fine", lambda: _matmul_workload(8))]

    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--cases", "test.*", "--no-progress", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["cases"][0]["rows"]}
    assert rows["broken"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert rows["broken"]["fwd_ms"] is None and rows["broken"]["speedup_fwd"] is None
    assert rows["no backward"]["error"] == "TypeError: bf16 not supported (simulated)"
    assert rows["no backward"]["fwd_ms"] > 0 and rows["no backward"]["fwd_bwd_ms"] is None
    assert rows["fine"]["error"] is None and rows["fine"]["fwd_bwd_ms"] > 0
    assert rows["fine"]["speedup_fwd"] == pytest.approx(rows["base"]["fwd_ms"] / rows["fine"]["fwd_ms"])


def test_variants_option_times_only_matching_labels_beside_the_baseline(temporary_cases, tmp_path):
    built = []

    def build(label):
        return lambda: built.append(label) or _matmul_workload(8)

    @temporary_cases("test.pick", group="test", quick=True)
    def _(device, dtype, quick):
        return [Variant(label, build(label), baseline=label == "dense")
                for label in ("dense", "Linear elu", "linear relu", "hybrid w=256")]

    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--cases", "test.pick", "--variants", "LINEAR E*", "hyb*",
                 "--no-progress", "--json", str(out)]) == 0
    rows = [r["variant"] for r in json.loads(out.read_text())["cases"][0]["rows"]]
    assert rows == built == ["dense", "Linear elu", "hybrid w=256"]


def test_run_cut_short_mid_case_leaves_the_rows_it_measured(temporary_cases, tmp_path):
    """A timeout kills the process mid-case (simulated by an interrupt in the third variant's build): the
    JSON and markdown already hold the case's first two rows, with their speedups."""
    def killed():
        raise KeyboardInterrupt

    @temporary_cases("test.cut_short", group="test", quick=True)
    def _(device, dtype, quick):
        return [Variant("base", lambda: _matmul_workload(16), baseline=True),
                Variant("second", lambda: _matmul_workload(8)),
                Variant("killed here", killed)]

    out, md = tmp_path / "r.json", tmp_path / "r.md"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--quick", "--cases", "test.*", "--no-progress", "--json", str(out), "--markdown", str(md)])
    rows = json.loads(out.read_text())["cases"][0]["rows"]
    assert [r["variant"] for r in rows] == ["base", "second"]
    assert rows[1]["speedup_fwd"] == pytest.approx(rows[0]["fwd_ms"] / rows[1]["fwd_ms"])
    assert "| second |" in md.read_text()


def test_setup_failure_is_recorded(temporary_cases):
    @temporary_cases("test.setup_fails", group="test", quick=True)
    def setup(device, dtype, quick):
        raise MemoryError("inputs too large (simulated)")

    header = {"matmul_tflops": 1.0, "copy_gbps": 1.0}
    result = run_case(CASES["test.setup_fails"], torch.device("cpu"), torch.float32, True, header)
    assert result["error"] == "MemoryError: inputs too large (simulated)" and result["rows"] == []


def test_roofline_floor_on_fake_case_with_fake_rates(temporary_cases):
    # rates: 2 TFLOP/s and 100 GB/s. Compute-bound: 4e9 FLOP -> 2 ms vs 1e8 B -> 1 ms: floor 2 ms.
    # Memory-bound: 1e9 FLOP -> 0.5 ms vs 5e8 B -> 5 ms: floor 5 ms.
    @temporary_cases("test.floor", group="test", quick=True)
    def _(device, dtype, quick):
        return [Variant("compute", lambda: _matmul_workload(8, flops=4e9, bytes=1e8, fwd_bwd_flops=12e9,
                                                           fwd_bwd_bytes=3e8), baseline=True),
                Variant("memory", lambda: _matmul_workload(8, flops=1e9, bytes=5e8)),
                Variant("flops only", lambda: _matmul_workload(8, flops=1e9))]

    header = {"matmul_tflops": 2.0, "copy_gbps": 100.0}
    rows = {r["variant"]: r for r in run_case(CASES["test.floor"], torch.device("cpu"), torch.float32, True, header)["rows"]}
    assert rows["compute"]["floor_fwd_ms"] == pytest.approx(2.0)
    assert rows["compute"]["floor_fwd_bwd_ms"] == pytest.approx(6.0)
    assert rows["memory"]["floor_fwd_ms"] == pytest.approx(5.0)
    assert rows["memory"]["floor_fwd_bwd_ms"] is None and rows["memory"]["fwd_bwd_over_floor"] is None
    assert rows["flops only"]["floor_fwd_ms"] == pytest.approx(0.5)
    for r in rows.values():
        assert r["fwd_over_floor"] == pytest.approx(r["fwd_ms"] / r["floor_fwd_ms"])
    assert rows["memory"]["flops_vs_baseline"] == pytest.approx(0.25)
    assert floor_ms(None, None, 1.0, 1.0) is None


def test_derive_on_known_times():
    rows = [
        {"variant": "v", "baseline": False, "fwd_ms": 2.0, "fwd_bwd_ms": 5.0, "flops": 10, "bytes": None,
         "fwd_bwd_flops": None, "fwd_bwd_bytes": None},
        {"variant": "b", "baseline": True, "fwd_ms": 4.0, "fwd_bwd_ms": 12.0, "flops": 40, "bytes": None,
         "fwd_bwd_flops": None, "fwd_bwd_bytes": None},
    ]
    v, b = derive(rows, matmul_tflops=1.0, copy_gbps=1.0)
    assert v["speedup_fwd"] == pytest.approx(2.0) and v["speedup_fwd_bwd"] == pytest.approx(2.4)
    assert v["bwd_over_fwd"] == pytest.approx(1.5) and b["bwd_over_fwd"] == pytest.approx(2.0)
    assert v["flops_vs_baseline"] == pytest.approx(0.25) and b["speedup_fwd"] == pytest.approx(1.0)
    # no usable baseline: no speedups, but the rest is still derived
    v, b = derive([dict(rows[0]), dict(rows[1], fwd_ms=None)], 1.0, 1.0)
    assert v["speedup_fwd"] is None and v["bwd_over_fwd"] == pytest.approx(1.5)


def test_timer_drops_grads_before_every_call_and_sees_sleep():
    x = torch.randn(4, requires_grad=True)
    seen = []

    def step():
        seen.append(x.grad is None)
        (x * 2).sum().backward()

    median_ms(step, "cpu", FAST, grad_to_none=[x])
    assert len(seen) == 1 + 2 + 3 and all(seen)
    assert median_ms(lambda: time.sleep(0.003), "cpu", FAST) >= 3.0
    with pytest.raises(ValueError, match="device"):
        median_ms(lambda: None, "meta", FAST)


def test_host_time_is_cuda_only():
    assert host_ms(lambda: None, "cpu") is None


@pytest.mark.gpu
def test_host_time_sees_host_work_but_not_queued_gpu_work():
    a = torch.randn(4096, 4096, device="cuda")
    gpu_bound = lambda: [a @ a for _ in range(20)]  # noqa: E731  ~20 ms of GPU work, issued in microseconds
    assert host_ms(gpu_bound, "cuda", reps=3) < 0.5 * median_ms(gpu_bound, "cuda", FAST)
    assert host_ms(lambda: time.sleep(0.003), "cuda", reps=3) >= 3.0


def test_linear_case_keeps_only_structures_the_shape_takes():
    labels = [label for label, _ in structured_configs(48, 96)]
    assert "blockdiag b=16" in labels and "monarch b=4" in labels and "lowrank r=6" in labels
    assert "monarch b=16" not in labels  # 16^2 > 48: the middle of the Monarch would be wider than dense
    assert "monarch b=128" not in labels  # 128 does not divide 48
    assert "monarch b=128" not in [label for label, _ in structured_configs(4096, 16384)]
    assert "monarch b=128" in [label for label, _ in structured_configs(16384, 65536)]


@pytest.mark.gpu
def test_cuda_graph_twin_replays_the_same_forward_and_backward():
    from mmm.bench.graphs import graphed
    from mmm.configs import KroneckerConfig
    from mmm.linear import StructuredLinear

    layer = StructuredLinear(1024, 1024, KroneckerConfig(terms=1), device="cuda", dtype=torch.bfloat16)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    leaves = [x, *layer.parameters()]
    layer(x).backward(g)
    want = [t.grad.clone() for t in leaves]
    build = lambda: Workload(forward=lambda: layer(x), forward_backward=lambda: layer(x).backward(g), grad_to_none=leaves)  # noqa: E731
    work = graphed(Variant("kronecker", build)).build()
    assert work.grad_to_none == () and work.info["cuda_graph"]
    for t in leaves:  # the captured backward owns these buffers now: a replay must overwrite every one
        t.grad.fill_(float("nan"))
    work.forward_backward()
    torch.cuda.synchronize()
    for got, ref in zip((t.grad for t in leaves), want):
        torch.testing.assert_close(got, ref)
