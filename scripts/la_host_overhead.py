"""Host (CPU/Python) cost of one linear-attention forward and forward+backward, split by layer.

The H200 showed fwd+bwd at ~0.9-1.8 ms for T = 512-4096 (flat in T) while its kernels take ~0.2 ms:
a fixed host cost. This times each layer of the call stack per call, in microseconds:

  fwd_body / bwd_body   the ops' Python bodies (allocations + launches), no torch.library dispatch
  fwd_op / bwd_op       the same through torch.ops.mmm.* (custom-op dispatch), no autograd
  fwd_nograd            public linear_attention(), inputs without requires_grad (checks + dispatch)
  fwd_grad              public linear_attention() recording autograd (autograd.Function + setup_context)
  fwd_bwd               forward + torch.autograd.grad(o, (q, k, v), go)
  bodies_fwd_bwd        the same with the two bodies under a plain autograd.Function (no torch.library)
  base:*                the same stack for plain torch ops, to compare (empty_like, a trivial
                        autograd.Function, an autograd.grad through it)
then a torch.profiler table (torch ops by self CPU time) and a cProfile (Python functions by own time)
of fwd_bwd.

Modes:
  noop (default without CUDA): the kernels' innermost launchers (InterpretedFunction.run on CPU,
      JITFunction.run on GPU) are replaced by no-ops, so only the host path runs. On CPU it sets
      TRITON_INTERPRET=1 (as tests/conftest.py does) so the package takes the kernel path.
  real (with CUDA): real launches, torch.cuda.synchronize() after the N calls. Where the GPU work is
      small (T = 512, 2048) this is the host cost with Triton's launcher; real minus noop = Triton's launchers
      (the op bodies, not single launches, are timed: a launch's arguments belong to the op alone).
  both (default with CUDA, or --gpu): real, then noop.

    python scripts/la_host_overhead.py                 # CPU: noop
    python scripts/la_host_overhead.py --gpu           # GPU: real launches, then noop (~1 min)
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from mmm.ops.linear_attention import kernels, linear_attention  # noqa: E402
from mmm.ops.linear_attention import op as la_op  # noqa: E402

KERNELS = ("chunk_state_kernel", "scan_kernel", "fwd_kernel", "bwd_dqdk_kernel", "bwd_dv_kernel")


def _innermost(kernel):
    """The object whose .run launches: the JIT/interpreted function under an Autotuner."""
    return kernel.fn if hasattr(kernel, "configs") else kernel


def patch_launches_to_noop() -> None:
    for name in KERNELS:
        _innermost(getattr(kernels, name)).run = lambda *args, **kwargs: None


def per_call_us(fn, n: int, sync: bool, repeats: int = 7) -> float:
    """Best over `repeats` of (time of n calls) / n, in microseconds, after a warmup (the best, not the
    median: other jobs on a shared machine only ever add time)."""
    for _ in range(max(3, n // 10)):
        fn()
    if sync:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if sync:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return min(times)


class _Trivial(torch.autograd.Function):
    """Baseline: the cheapest autograd.Function with three outputs, two non-differentiable (and no
    zero gradients made for those)."""

    @staticmethod
    def forward(ctx, q, k, v):
        o, a, b = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
        ctx.save_for_backward(q, k, v, o)
        ctx.mark_non_differentiable(a, b)
        ctx.set_materialize_grads(False)
        return o, a, b

    @staticmethod
    def backward(ctx, do, _a, _b):
        q, k, v, o = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _Bodies(torch.autograd.Function):
    """The ops' Python bodies under a plain autograd.Function: fwd_bwd minus this is what the
    torch.library layers (custom-op dispatch, register_autograd's generated Function) add."""

    @staticmethod
    def forward(ctx, q, k, v, cfg, eps, written):
        o, rden, states, fk = la_op.linear_attention_fwd._init_fn(q, k, v, *cfg[:3], eps, *cfg[3:], written)
        ctx.save_for_backward(q, fk if written else k, v, o, rden, states)  # as the op saves them
        ctx.cfg, ctx.written = cfg, written
        return o

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = la_op.linear_attention_bwd._init_fn(do.contiguous(), *ctx.saved_tensors, *ctx.cfg, None, ctx.written)
        return dq, dk, dv, None, None, None


def measure(B, T, H, D, dtype, device, n, sync, feature_map="elu", normalize=True, causal=True) -> dict:
    q, k, v, go = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    seg = la_op.segment_len(T, B * H)
    feature = kernels.FEATURE_CODES[feature_map]
    eps = 1e-6
    fwd_body = la_op.linear_attention_fwd._init_fn
    bwd_body = la_op.linear_attention_bwd._init_fn
    written = la_op.features_written(feature, dtype, causal, 0, True)
    o, rden, states, fk = la_op.linear_attention_fwd(q, k, v, feature, normalize, causal, eps, seg, 1.0, 0, written)
    kb = fk if written else k  # what the backward reads: the keys' features where the forward wrote them
    cfg = (feature, normalize, causal, seg, 1.0, 0)  # scale 1, lag 0

    def fwd_bwd():
        torch.autograd.grad(linear_attention(qg, kg, vg, feature_map, normalize, causal), (qg, kg, vg), go)

    def bodies_fwd_bwd():
        torch.autograd.grad(_Bodies.apply(qg, kg, vg, cfg, eps, written), (qg, kg, vg), go)

    def base_fwd_bwd():
        torch.autograd.grad(_Trivial.apply(qg, kg, vg)[0], (qg, kg, vg), go)

    cases = {
        "fwd_body": lambda: fwd_body(q, k, v, feature, normalize, causal, eps, seg, 1.0, 0, written),
        "fwd_op": lambda: la_op.linear_attention_fwd(q, k, v, feature, normalize, causal, eps, seg, 1.0, 0, written),
        "fwd_nograd": lambda: linear_attention(q, k, v, feature_map, normalize, causal),
        "fwd_grad": lambda: linear_attention(qg, kg, vg, feature_map, normalize, causal),
        "bwd_body": lambda: bwd_body(go, q, kb, v, o, rden, states, *cfg, None, written),
        "bwd_op": lambda: la_op.linear_attention_bwd(go, q, kb, v, o, rden, states, *cfg, None, written),
        "fwd_bwd": fwd_bwd,
        "bodies_fwd_bwd": bodies_fwd_bwd,
        "base:empty_like": lambda: torch.empty_like(q),
        "base:autograd_fn_fwd": lambda: _Trivial.apply(qg, kg, vg),
        "base:autograd_fn_fwd_bwd": base_fwd_bwd,
    }
    return {name: round(per_call_us(fn, n, sync), 1) for name, fn in cases.items()}, fwd_bwd


def op_table(fn, n: int, cuda: bool, rows: int = 15) -> str:
    """torch.profiler table of n calls by self CPU time: which torch ops (allocations, fills, the custom
    ops, autograd nodes) the host time goes to; with real launches on a GPU, their CUDA time too."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)


def profile(fn, n: int, top: int = 25) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("noop", "real", "both"), default="both" if cuda else "noop")
    p.add_argument("--gpu", action="store_const", const="both", dest="mode", help="same as --mode both")
    p.add_argument("--n", type=int, default=200, help="calls per timing")
    p.add_argument("--seq", type=int, nargs="*", default=[512, 2048] if cuda else [128])
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    if args.mode in ("real", "both") and not cuda:
        sys.exit("--mode real needs a CUDA device")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    B, H, D = 1, 16, 128
    modes = ["real", "noop"] if args.mode == "both" else [args.mode]  # real first: noop patching is for good
    for mode in modes:
        if mode == "noop":
            patch_launches_to_noop()
        for T in args.seq:
            times, fwd_bwd = measure(B, T, H, D, dtype, device, args.n, sync=cuda and mode == "real")
            print(f"\n== mode={mode} device={device} B={B} T={T} H={H} D={D} {dtype}: us per call")
            for name, us in times.items():
                print(f"  {name:28s} {us:9.1f}")
        if not args.no_profile:
            print(f"\n== torch.profiler of 20 fwd_bwd calls (mode={mode}, T={args.seq[-1]})")
            print(op_table(fwd_bwd, 20, cuda and mode == "real"))
            print(f"\n== cProfile of {args.n} fwd_bwd calls (mode={mode}, T={args.seq[-1]}), by own time")
            print(profile(fwd_bwd, args.n))


if __name__ == "__main__":
    main()
