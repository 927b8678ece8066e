"""Host (Python/dispatch) cost of one eager forward+backward of the block-diagonal, Monarch and Kronecker
ops, with the Triton launches replaced by no-ops: what the ops cost besides the launches.

The H200 runs of these layers are launch-bound (results/h200/2026-12-05-host-profile.txt: Monarch b=128
issues one f+b in ~1.8 ms of host time, its kernels need 0.86 ms). This runs the public functions
(blockdiag_matmul, monarch_matmul, kron_matmul) on CPU under TRITON_INTERPRET=1 with each kernel's
innermost launcher (the InterpretedFunction under its Autotuner) made a no-op, so everything around
the launches runs: input checks, dispatch, the autograd.Function, allocations, the weight-gradient
reductions and casts. Outputs are allocated by the op bodies, so their shapes are right; their values
are garbage (never read). Host cost does not depend on size, so the shapes are small, in bf16 as on the
GPU (fp32 would hide the weight-gradient casts, which are no-ops there).

What it cannot see: Triton's own launch Python on a GPU (JITFunction.run's binder and specialization,
the autotuner's key), which differs from the interpreter's; time that with the bench's host column.

Reports, per structure: microseconds per f+b (best of several repeats), the aten ops per f+b
(torch.profiler counts) and a cProfile top list by own time.

    python scripts/host_overhead_cpu.py [--n 300] [--top 18] [--no-profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from collections import Counter

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

from mmm.ops.blockdiag import kernels as block_kernels  # noqa: E402
from mmm.ops.blockdiag.op import blockdiag_matmul  # noqa: E402
from mmm.ops.kronecker import kernels as kron_kernels  # noqa: E402
from mmm.ops.kronecker.op import kron_matmul  # noqa: E402
from mmm.ops.monarch import kernels as monarch_kernels  # noqa: E402
from mmm.ops.monarch.op import monarch_matmul  # noqa: E402

KERNELS = {block_kernels: ("block_gemm_kernel", "block_bwd_fused_kernel", "block_bwd_fused_v2_kernel"),
           monarch_kernels: ("swap_blocks_kernel",),
           kron_kernels: ("kron_apply_kernel", "kron_factor_grad_kernel", "kron_dx_da_kernel",
                          "kron_bwd_one_pass_kernel")}


def patch_launches_to_noop() -> None:
    """Every kernel's innermost launcher (under its Autotuner, if any) does nothing."""
    for module, names in KERNELS.items():
        for name in names:
            kernel = getattr(module, name)
            inner = kernel.fn if hasattr(kernel, "configs") else kernel
            inner.run = lambda *args, **kwargs: None


class _Trivial(torch.autograd.Function):
    """Baseline: the cheapest autograd.Function with two weights, one output allocated per pass."""

    @staticmethod
    def forward(ctx, x, a, b):
        ctx.save_for_backward(x, a, b)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        x, a, b = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(a), torch.empty_like(b)


def cases(dtype: torch.dtype) -> dict:
    """name: (function of (x, *weights), x, weights). Shapes keep the token reductions split (several
    fp32 partial sums per weight gradient, as on the GPU; the interpreter counts 2 SMs for the block ops,
    4 for Kronecker), so the reduce-and-cast code runs."""
    n = 64

    def param(*shape):
        return torch.nn.Parameter(torch.randn(*shape, dtype=dtype))

    return {
        # Monarch b=128 at d=16384 has rank-1 blocks of 128 (c=1): here b=2, c=1, p=s=32
        "monarch b=2 c=1": (lambda x, L, R: monarch_matmul(x, L, R, 1, path="triton"),
                            torch.randn(n, 64, dtype=dtype), (param(2, 2, 32), param(2, 32, 2))),
        # one term, as the bench's Kronecker (128 x 128 factors at d=16384)
        "kronecker 1 term": (kron_matmul, torch.randn(n, 256, dtype=dtype), (param(1, 16, 16), param(1, 16, 16))),
        "blockdiag b=2": (lambda x, w: blockdiag_matmul(x, w, path="triton"),
                          torch.randn(n, 64, dtype=dtype), (param(2, 32, 32),)),
        "base: trivial autograd.Function": (lambda x, a, b: _Trivial.apply(x, a, b),
                                            torch.randn(n, 64, dtype=dtype), (param(4, 4), param(4, 4))),
    }


def step_of(fn, x, weights):
    """One f+b as the bench times it (mmm.bench.timing.host_ms): gradients dropped before each call."""
    x = x.clone().requires_grad_()
    g = torch.randn_like(fn(x, *weights))
    leaves = (x, *weights)

    def step():
        for t in leaves:
            t.grad = None
        fn(x, *weights).backward(g)

    return step


def per_call_us(fn, n: int, repeats: int = 7) -> float:
    """Best over `repeats` of (time of n calls) / n, after a warmup: the best, since other jobs on a
    shared machine only ever add time."""
    for _ in range(max(5, n // 10)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return min(times)


# aten ops that launch no kernel on a GPU: views, allocations, and wrappers whose work is a nested op
NO_KERNEL = {"view", "reshape", "_reshape_alias", "slice", "as_strided", "detach", "unsqueeze", "alias", "t",
             "transpose", "expand", "empty", "empty_like", "empty_strided", "to", "_to_copy", "contiguous"}


def kernel_ops(ops: Counter) -> int:
    """Ops per call that would launch a kernel on a GPU (on CPU, sum adds a fill_ that CUDA does not)."""
    return sum(v for k, v in ops.items() if k.removeprefix("aten::") not in NO_KERNEL | {"fill_"})


def aten_ops(fn, n: int = 10) -> Counter:
    """aten ops per call (torch.profiler, which does not change how the ops dispatch)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    counts = Counter()
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            counts[e.key] = e.count // n
    return counts


def profile(fn, n: int, top: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return "\n".join(line for line in s.getvalue().splitlines()[4:] if line.strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=300, help="calls per timing")
    p.add_argument("--top", type=int, default=18, help="rows of the cProfile list")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--only", nargs="*", help="structure names starting with these")
    args = p.parse_args()
    torch.set_num_threads(1)
    patch_launches_to_noop()
    rows = []
    for name, (fn, x, weights) in cases(torch.bfloat16).items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        step = step_of(fn, x, weights)
        us = per_call_us(step, args.n)
        ops = aten_ops(step)
        rows.append((name, us, sum(ops.values()), kernel_ops(ops)))
        print(f"\n== {name}: {us:.1f} us per f+b (launches no-op), {sum(ops.values())} aten ops per f+b, "
              f"{kernel_ops(ops)} of them kernels on a GPU")
        print("   " + ", ".join(f"{k.removeprefix('aten::')} x{v}" for k, v in sorted(ops.items())))
        if not args.no_profile:
            print(profile(step, args.n, args.top))
    print("\n== summary per f+b: host us (launches no-op), aten ops, of them torch kernels on a GPU (besides Triton's)")
    for name, us, n_ops, n_kernels in rows:
        print(f"  {name:34s} {us:8.1f} us  {n_ops:3d} ops  {n_kernels:2d} kernels")


if __name__ == "__main__":
    main()
