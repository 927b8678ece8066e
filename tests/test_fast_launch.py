"""FastLaunch (mmm.ops._eager): the first launch of each key goes through Triton, later ones call the
compiled kernel directly. The key must split everything Triton specializes on (dtype, 16-byte alignment,
ints equal to 1 or divisible by 16, constexpr values, the autotuning key, the device), or a launch would
run a kernel compiled for other arguments. CPU: the key and the argument assembly, against a stand-in
kernel. GPU: every fused op gives the same outputs and gradients with the fast path on and off."""

import inspect
import os
import subprocess
import sys
import types

import pytest
import torch

from mmm.ops import _eager
from mmm.ops._eager import FastLaunch, _arg_class


class _Param:
    def __init__(self, name, constexpr=False, default=inspect.Parameter.empty):
        self.name, self.is_constexpr, self.default = name, constexpr, default


class _Compiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self, log):
        self.log = log

    def run(self, g0, g1, g2, stream, function, packed, metadata, enter, exit_hook, *args):
        self.log.append(("direct", (g0, g1, g2), args))


class _Tuned:
    """Stands in for triton.autotune(...)(triton.jit(f)) with f(x, n, eps, FLAG: constexpr, B: constexpr)."""

    def __init__(self):
        self.fn = types.SimpleNamespace(params=[_Param("x"), _Param("n"), _Param("eps", default=1e-6),
                                                _Param("FLAG", True), _Param("B", True)])
        self.configs, self.keys, self.log = [1, 2], ["n"], []
        self.best_config = types.SimpleNamespace(kwargs={"B": 64}, pre_hook=None)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return _Compiled(self.log)
        return run


@pytest.fixture
def fake_cuda(monkeypatch):
    """CPU tensors pass for CUDA ones inside FastLaunch, which is switched on."""
    monkeypatch.setattr(_eager, "FAST_LAUNCH", True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_eager, "_raw_stream", lambda device: 7)
    monkeypatch.setattr(_eager, "knobs", types.SimpleNamespace(runtime=types.SimpleNamespace(
        launch_enter_hook=None, launch_exit_hook=None)))


def _switch_in_a_new_process(value: str | None):
    """FAST_LAUNCH as a fresh import sees it with MMM_FAST_LAUNCH=value (unset for None)."""
    env = {k: v for k, v in os.environ.items() if k != "MMM_FAST_LAUNCH"}
    if value is not None:
        env["MMM_FAST_LAUNCH"] = value
    code = "import mmm.ops._eager as e; print(e.FAST_LAUNCH)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_switch_from_the_environment_is_checked():
    assert _switch_in_a_new_process("1").stdout.strip() == "True"
    assert _switch_in_a_new_process("0").stdout.strip() == "False"
    bad = _switch_in_a_new_process("yes")
    assert bad.returncode != 0 and "MMM_FAST_LAUNCH must be 0" in bad.stderr


def test_fast_launch_is_on_by_default():
    assert _switch_in_a_new_process(None).stdout.strip() == "True"


def test_arg_class_splits_what_triton_specializes():
    buf = torch.zeros(64, dtype=torch.bfloat16)
    assert _arg_class(buf) != _arg_class(buf[1:])  # 2-byte offset: not 16-byte aligned
    assert _arg_class(buf) != _arg_class(buf.float())
    assert _arg_class(1) != _arg_class(17) != _arg_class(32)
    assert _arg_class(2**31) != _arg_class(2**31 - 16)
    assert _arg_class(2**63) != _arg_class(2**62)
    assert _arg_class(17) == _arg_class(19) and _arg_class(32) == _arg_class(48)
    assert _arg_class(0.5) is float and _arg_class(True) is bool
    assert _arg_class("text") is None and _arg_class(None) is None


def test_key_classes_every_argument_as_arg_class_does():
    """FastLaunch._key inlines _arg_class for tensors and ints: the same classes for every argument."""
    buf = torch.zeros(64, dtype=torch.bfloat16)
    args = (buf, buf[1:], buf.float(), 1, 16, 17, -16, -17, 2**31 - 16, 2**31, 2**63, 0.5, True)
    fast = FastLaunch(_Tuned())
    fast._setup()
    classes, _, _, _ = fast._key(args, {}, 0)
    assert classes == tuple(map(_arg_class, args))
    assert fast._key((buf, "text"), {}, 0) is None


def test_first_launch_per_key_goes_through_triton_then_direct(fake_cuda):
    kernel = _Tuned()
    fast = FastLaunch(kernel)
    x = torch.randn(32)
    grid = lambda meta: (meta["n"] // meta["B"] + 1,)  # noqa: E731  (reads a runtime arg and the config)
    fast[grid](x, 17, FLAG=True)
    fast[grid](x, 19, FLAG=True)  # same class as 17, but n is the autotuning key: its own entry
    fast[grid](x, 19, FLAG=True)
    kinds = [entry[0] for entry in kernel.log]
    assert kinds == ["triton", "triton", "direct"] and fast.direct_launches == 1
    _, g, args = kernel.log[-1]
    assert g == (1, 1, 1) and args[1:] == (19, 1e-6, True, 64)  # defaults and the tuned config fill the tail
    fast[grid](x, 19, FLAG=False)  # another constexpr value
    fast[grid](x, 19, FLAG=True, num_warps=8)  # a launch option: counts whole, like constexprs
    fast[grid](x, 19, FLAG=True, num_warps=4)
    fast[grid](x[1:], 19, FLAG=True)  # misaligned
    fast[grid](x.double(), 19, FLAG=True)  # another dtype
    fast[grid](x, 19, 0.5, FLAG=True)  # eps given: another key (one more positional argument) ...
    fast[grid](x, 19, 0.25, FLAG=True)  # ... whose next launch is direct, with the value given
    assert [entry[0] for entry in kernel.log[3:]] == ["triton"] * 6 + ["direct"]
    assert kernel.log[-1][2][2] == 0.25


def test_not_used_for_pre_hooks_unknown_args_or_launch_hooks(fake_cuda):
    kernel = _Tuned()
    kernel.best_config.pre_hook = lambda args: None
    fast = FastLaunch(kernel)
    x = torch.randn(4)
    for _ in range(2):
        fast[(1,)](x, 16, FLAG=True)
    assert [e[0] for e in kernel.log] == ["triton", "triton"]
    kernel = _Tuned()
    fast = FastLaunch(kernel)
    for _ in range(2):
        fast[(1,)](x, 16, "unknown", FLAG=True)
    _eager.knobs.runtime.launch_enter_hook = print  # a profiler's hook wants Triton's path
    fast[(1,)](x, 16, FLAG=True)
    fast[(1,)](x, 16, FLAG=True)
    assert [e[0] for e in kernel.log] == ["triton"] * 4


def test_empty_hook_chains_count_as_no_hook(fake_cuda):
    """triton 3.6 keeps its launch hooks as HookChain objects, never None (the first GPU run of
    FastLaunch fell back to Triton's path on every launch because of that)."""
    HookChain = pytest.importorskip("triton.knobs").HookChain

    chain = HookChain()
    _eager.knobs.runtime.launch_enter_hook = chain
    _eager.knobs.runtime.launch_exit_hook = HookChain(reversed=True)
    kernel = _Tuned()
    fast = FastLaunch(kernel)
    x = torch.randn(4)
    for _ in range(2):
        fast[(1,)](x, 16, FLAG=True)
    chain.add(print)  # a profiler hooks in
    fast[(1,)](x, 16, FLAG=True)
    assert [e[0] for e in kernel.log] == ["triton", "direct", "triton"]


def test_cpu_tensors_take_triton_path():
    kernel = _Tuned()
    fast = FastLaunch(kernel)
    with _eager.fast_launches():
        for _ in range(2):
            fast[(1,)](torch.randn(4), 16, FLAG=True)
    assert [e[0] for e in kernel.log] == ["triton", "triton"]


def test_switch_is_read_at_every_launch(fake_cuda):
    kernel = _Tuned()
    fast = FastLaunch(kernel)
    x = torch.randn(4)
    with _eager.fast_launches(False):
        fast[(1,)](x, 16, FLAG=True)
        fast[(1,)](x, 16, FLAG=True)
    assert _eager.FAST_LAUNCH  # restored
    fast[(1,)](x, 16, FLAG=True)
    fast[(1,)](x, 16, FLAG=True)
    assert [e[0] for e in kernel.log] == ["triton", "triton", "triton", "direct"]


def test_bench_twin_switches_fast_launch_off_for_its_calls_only(monkeypatch):
    monkeypatch.setattr(_eager, "FAST_LAUNCH", True)
    from mmm.bench.graphs import triton_launched
    from mmm.bench.registry import Variant, Workload

    seen = []
    probe = lambda: seen.append(_eager.FAST_LAUNCH)  # noqa: E731

    def build():
        probe()
        return Workload(forward=probe, forward_backward=probe)

    twin = triton_launched(Variant("monarch b=128", build))
    assert twin.label == "monarch b=128 [triton launch]" and not twin.baseline
    work = twin.build()
    work.forward()
    work.forward_backward()
    assert seen == [False, False, False] and work.info["fast_launch"] is False
    assert _eager.FAST_LAUNCH


def test_direct_launch_count_sums_every_kernel(fake_cuda, monkeypatch):
    monkeypatch.setattr(_eager, "_FAST_LAUNCHERS", {})
    x = torch.randn(4)
    for kernel in (_Tuned(), _Tuned()):
        for _ in range(3):  # the first launch of a key goes through Triton, the next two are direct
            _eager.fast_launch(kernel)[(1,)](x, 16, FLAG=True)
    assert _eager.direct_launch_count() == 4


# ---- GPU: the fused ops, fast path on vs off ----

def _bf16(shape, offset):
    """Random bf16 of `shape`; offset 1 makes it a view 2 bytes into its buffer (not 16-byte aligned)."""
    n = torch.Size(shape).numel()
    return (torch.randn(n + offset, device="cuda", dtype=torch.bfloat16) / 4)[offset:].view(shape)


def _cases():
    from mmm.ops.blockdiag.op import blockdiag_matmul
    from mmm.ops.fft.op import fft_conv
    from mmm.ops.kronecker.op import kron_matmul
    from mmm.ops.linear_attention import linear_attention
    from mmm.ops.monarch.op import monarch_matmul

    spectrum = lambda: torch.randn(1, 1, 1025, dtype=torch.complex64, device="cuda") / 32  # noqa: E731
    return {  # name: (function, inputs(offset))
        "blockdiag": (lambda x, w: blockdiag_matmul(x, w, path="triton"),
                      lambda o: [_bf16((1000, 512), o), _bf16((4, 128, 128), o)]),
        "monarch": (lambda x, L, R: monarch_matmul(x, L, R, 1, path="triton"),
                    lambda o: [_bf16((1000, 1024), o), _bf16((16, 16, 64), o), _bf16((16, 64, 16), o)]),
        "kronecker": (kron_matmul, lambda o: [_bf16((1000, 1024), o), _bf16((1, 32, 32), o), _bf16((1, 32, 32), o)]),
        "linear_attention": (linear_attention, lambda o: [_bf16((1, 3000, 4, 64), o) for _ in range(3)]),
        "fft_conv": (lambda x, k: fft_conv(x, k, 1024, 2048, 1024), lambda o: [_bf16((1000, 1024), o), spectrum()]),
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["blockdiag", "monarch", "kronecker", "linear_attention", "fft_conv"])
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_fast_launch_matches_triton_path(name, offset, monkeypatch):
    fn, make = _cases()[name]
    torch.manual_seed(0)
    inputs = make(offset)

    def run():
        leaves = [t.detach().requires_grad_() for t in inputs]
        y = fn(*leaves)
        y.float().square().sum().backward()
        return [y.detach(), *(t.grad for t in leaves)]

    monkeypatch.setattr(_eager, "_FAST_LAUNCHERS", {})
    with _eager.fast_launches(False):
        slow = run()
    with _eager.fast_launches():
        run()  # fills the cache through Triton
        before = sum(f.direct_launches for f in _eager._FAST_LAUNCHERS.values())
        fast = run()
    direct = sum(f.direct_launches for f in _eager._FAST_LAUNCHERS.values()) - before
    assert direct >= 2, f"{direct} launches of the second forward+backward took the fast path"
    for a, b in zip(slow, fast):
        assert torch.isfinite(torch.view_as_real(b) if b.is_complex() else b).all()
        a, b = (torch.view_as_real(t) if t.is_complex() else t.float() for t in (a, b))
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2 * a.abs().max().item())
