"""H200: the Kronecker backward paths for one term side by side: bf16 correctness against fp64, then forward,
backward and forward+backward times (do_bench medians, one run) against dense cuBLAS.

    PYTHONPATH=src OUT=<dir> python scripts/gpu_kronecker_bwd.py [--all]     (writes $OUT/kronecker_bwd.json)

Default: d = 16384 (128 x 128 factors, the headline case); --all adds 128 x 256, 64 x 128 and 64 x 64 (each
shape costs the autotuning of every kernel, tens of seconds on a fresh machine).

Paths: two_pass (dX through the forward kernel, dA and dB through the factor-gradient kernel), fused_dx_dA
(dX and dA in one pass, dB in a second: the default before the one-pass kernel) and one_pass_cXX (dX, dA, dB
in one pass with i2 chunks of XX columns per program). "ok" means every output's error against fp64 is
within twice PyTorch's own bf16 error (+1e-3), the standard of tests/test_kronecker_kernel.py.
"""
import json
import math
import os
import sys
import time

import torch
from triton.testing import do_bench

from mmm.ops.kronecker import kernels, kron_matmul, naive

dev, bf = "cuda", torch.bfloat16
OUT = os.environ.get("OUT", ".")
N = 8192
SHAPES = [(128, 128), (128, 256), (64, 128), (64, 64)]  # (f1, f2): A f1 x f1, B f2 x f2, d = f1 f2; headline first
if "--all" not in sys.argv:
    SHAPES = SHAPES[:1]
torch.manual_seed(0)
start = time.time()


def med(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def outputs(f, inputs, g):
    """(y, dx, dA, dB) of f at fresh leaf copies of inputs."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = f(*leaves)
    return (y.detach(), *torch.autograd.grad(y, leaves, g))


def timings(f, inputs, g):
    """fwd, bwd (autograd.grad on a kept graph: no .grad accumulation) and fwd+bwd medians in ms."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = f(*leaves)
    return dict(fwd=med(lambda: f(*leaves)),
                bwd=med(lambda: torch.autograd.grad(y, leaves, g, retain_graph=True)),
                fwdbwd=med(lambda: torch.autograd.grad(f(*leaves), leaves, g)))


PATHS = {"two_pass": dict(ONE_PASS_BWD=False, FUSED_DX_DA=False),
         "fused_dx_dA": dict(ONE_PASS_BWD=False, FUSED_DX_DA=True),
         "one_pass_c64": dict(ONE_PASS_BWD=True, ONE_PASS_CHUNK=64),
         "one_pass_c32": dict(ONE_PASS_BWD=True, ONE_PASS_CHUNK=32)}
defaults = {k: getattr(kernels, k) for p in PATHS.values() for k in p}

# the two rates of the roofline, measured in this run
big = torch.randn(8192, 16384, device=dev, dtype=bf)
copy_bw = 2 * big.numel() * 2 / (med(lambda: big.clone()) * 1e-3)     # read + write
sq = big[:, :8192].contiguous()
mm_rate = 2 * 8192**3 / (med(lambda: sq @ sq) * 1e-3)
del big, sq
rows = dict(copy_GBps=copy_bw / 1e9, matmul_TFLOPs=mm_rate / 1e12, shapes={})
print(f"copy {copy_bw / 1e12:.2f} TB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s", flush=True)

for f1, f2 in SHAPES:
    d = f1 * f2
    x = torch.randn(N, d, device=dev, dtype=bf)
    A = torch.randn(1, f1, f1, device=dev, dtype=bf) / math.sqrt(f1)
    B = torch.randn(1, f2, f2, device=dev, dtype=bf) / math.sqrt(f2)
    g = torch.randn(N, d, device=dev, dtype=bf)
    ref = outputs(naive.kron_matmul, (x.double(), A.double(), B.double()), g.double())
    torch_err = [rel(a, b) for a, b in zip(outputs(naive.kron_matmul, (x, A, B), g), ref)]
    W = torch.randn(d, d, device=dev, dtype=bf) / math.sqrt(d)
    dense = timings(lambda x_, w_: x_ @ w_, (x, W), g)
    del W
    torch.cuda.empty_cache()
    bwd_flops = 2 * N * (2 * f1 * f2 * f2 + 3 * f1 * f1 * f2)    # dY B, A^T (.), (.) X^T, A X, dY^T (.)
    bwd_bytes = 3 * N * d * 2                                     # read dy, x; write dx
    r = dict(dense=dense, torch_bf16_err=dict(zip(["y", "dx", "dA", "dB"], torch_err)),
             floor_bwd_ms=max(bwd_flops / mm_rate, bwd_bytes / copy_bw) * 1e3,
             floor_fwd_ms=max(2 * N * f1 * f2 * (f1 + f2) / mm_rate, 2 * N * d * 2 / copy_bw) * 1e3)
    for name, flags in PATHS.items():
        for k, v in flags.items():
            setattr(kernels, k, v)
        try:
            got = outputs(kron_matmul, (x, A, B), g)
            err = [rel(a, b) for a, b in zip(got, ref)]
            t = timings(kron_matmul, (x, A, B), g)
            r[name] = dict(t, err=dict(zip(["y", "dx", "dA", "dB"], err)),
                           ok=all(e <= 2 * te + 1e-3 for e, te in zip(err, torch_err)),
                           x_dense_fwdbwd=dense["fwdbwd"] / t["fwdbwd"], bwd_over_fwd=t["bwd"] / t["fwd"])
            if flags["ONE_PASS_BWD"]:
                cfg = kernels.kron_bwd_one_pass_kernel.best_config
                r[name].update(chunk=kernels._one_pass_chunk(f2, f2), warps=cfg.num_warps, stages=cfg.num_stages)
        except Exception as e:  # keep the other paths' numbers
            r[name] = dict(error=repr(e)[:300])
        finally:
            for k, v in defaults.items():
                setattr(kernels, k, v)
    rows["shapes"][f"{f1}x{f2}"] = r
    json.dump(rows, open(os.path.join(OUT, "kronecker_bwd.json"), "w"), indent=1)
    del x, g, ref
    torch.cuda.empty_cache()
    print(f"\nd = {d} ({f1}x{f1} (x) {f2}x{f2}), n = {N}: dense fwd {dense['fwd']:.3f} bwd {dense['bwd']:.3f} "
          f"f+b {dense['fwdbwd']:.3f} ms; floors fwd {r['floor_fwd_ms']:.3f} bwd {r['floor_bwd_ms']:.3f} ms")
    print(f"  {'path':13s} {'fwd':>6s} {'bwd':>6s} {'f+b':>6s} {'x dense':>7s} {'bwd/fwd':>7s} "
          f"{'err dx':>8s} {'err dA':>8s} {'err dB':>8s} ok  (torch bf16 errs {torch_err[1]:.1e} {torch_err[2]:.1e} {torch_err[3]:.1e})")
    for name in PATHS:
        p = r[name]
        if "error" in p:
            print(f"  {name:13s} FAILED {p['error']}")
            continue
        e = p["err"]
        extra = f"  (chunk {p['chunk']}, {p['warps']} warps, {p['stages']} stages)" if "chunk" in p else ""
        print(f"  {name:13s} {p['fwd']:6.3f} {p['bwd']:6.3f} {p['fwdbwd']:6.3f} {p['x_dense_fwdbwd']:7.1f} "
              f"{p['bwd_over_fwd']:7.2f} {e['dx']:8.1e} {e['dA']:8.1e} {e['dB']:8.1e} {'yes' if p['ok'] else 'NO '}{extra}",
              flush=True)
print(f"\n{time.time() - start:.0f} s", flush=True)
