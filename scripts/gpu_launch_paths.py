"""Host time of one Triton launch by path, on the GPU machine (no CPU mode: the paths need the CUDA driver).

The eager bench rows of Monarch b=128, Kronecker and linear attention below 8k are host-bound on the
bench machines (dense nn.Linear alone takes 0.33-0.53 ms of host time per f+b there). This measures what
a leaner launch could save, per launch, for a toy kernel with 20 arguments (like ours) and 1 program:

  autotuned      kernel[grid](...) through triton.autotune (2 configs, key on two ints): what the ops do
  jit            the JITFunction's run with the tuned config's kwargs (no Autotuner wrapper)
  mmm fast       mmm.ops._eager.FastLaunch (what the ops use): a key from the arguments, then `compiled`
  compiled       the CompiledKernel's own launcher with a pre-built argument list (no binding, no
                 specialization, no cache lookup): the floor of any Python-side launch path
  torch add      one tiny torch op, to put the numbers on the machine's scale

    python scripts/gpu_launch_paths.py
"""
from __future__ import annotations

import time

import torch
import triton
import triton.language as tl
from triton import knobs

from mmm.ops import _eager
from mmm.ops._eager import FastLaunch


@triton.autotune(configs=[triton.Config({"BLOCK": 128}, num_warps=4), triton.Config({"BLOCK": 256}, num_warps=4)],
                 key=["n", "m"])
@triton.jit
def toy(a, b, c, d, e, f, g, h, n, m, s0, s1, s2, s3, s4, s5, eps, FLAG: tl.constexpr, MODE: tl.constexpr,
        BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(a + offs, mask=mask, other=0.0)
    tl.store(b + offs, x * eps + s0, mask=mask)


def per_launch_us(fn, n=2000, repeats=7):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main():
    dev = torch.device("cuda")
    ts = [torch.randn(4096, device=dev) for _ in range(8)]
    ints = (4096, 64, 16, 32, 48, 64, 80, 96)
    args = (*ts, *ints, 0.5)
    grid = (1,)

    def autotuned():
        toy[grid](*args, FLAG=True, MODE=1)

    autotuned()
    cfg = toy.best_config.all_kwargs()
    jit = toy.fn

    def jit_run():
        jit.run(*args, grid=grid, warmup=False, FLAG=True, MODE=1, **cfg)

    kernel = jit.run(*args, grid=grid, warmup=False, FLAG=True, MODE=1, **cfg)
    full = (*args, True, 1, cfg["BLOCK"])
    stream = torch.cuda.current_stream().cuda_stream
    meta = kernel.launch_metadata(grid, stream, *full)

    def compiled():
        kernel.run(1, 1, 1, stream, kernel.function, kernel.packed_metadata, meta,
                   knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *full)

    fast_kernel = FastLaunch(toy)
    _eager.FAST_LAUNCH = True  # its switch (on by default; MMM_FAST_LAUNCH=0 may have turned it off)

    def fast():
        fast_kernel[grid](*args, FLAG=True, MODE=1)

    x = ts[0]
    rows = [("autotuned", autotuned), ("jit", jit_run), ("mmm fast", fast), ("compiled", compiled),
            ("torch add", lambda: x.add(1.0))]
    # correctness of the compiled path: it writes what the autotuned launch writes
    ts[1].zero_()
    compiled()
    torch.cuda.synchronize()
    block = cfg["BLOCK"]
    ok = torch.equal(ts[1][:block], ts[0][:block] * 0.5 + 16) and not ts[1][block:].any()
    print(f"compiled launch writes the same result: {ok}")
    print(f"{'path':<12} {'us/launch':>10}")
    for name, fn in rows:
        print(f"{name:<12} {per_launch_us(fn):>10.2f}")
    # the "mmm fast" row means something only if its launches took the direct path
    print(f"mmm fast: {fast_kernel.direct_launches} of its launches took the direct path")


if __name__ == "__main__":
    main()
