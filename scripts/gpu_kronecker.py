"""H200: correctness, then timing of the Kronecker-sum kernels vs dense cuBLAS and einsum (+ torch.compile).

PYTHONPATH=src python scripts/gpu_kronecker.py   (writes $OUT/kronecker.json)
"""
import json
import math
import os

import torch
from triton.testing import do_bench

from mmm.ops.kronecker import kernels, kron_matmul, naive

dev, bf = "cuda", torch.bfloat16
OUT = os.environ.get("OUT", ".")
torch.manual_seed(0)


def med(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def fwd_bwd(fn, *params):
    y = fn()
    g = torch.randn_like(y)

    def step():
        for p in params:
            p.grad = None
        fn().backward(g)
    return med(step)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


rows = {}
n = 8192
# the headline size first and the JSON rewritten after each size: a run cut by a timeout keeps what it measured
for d, (f1, f2) in [(16384, (128, 128)), (4096, (64, 64)), (8192, (64, 128)), (32768, (128, 256))]:
    x = torch.randn(n, d, device=dev, dtype=bf, requires_grad=True)
    A = (torch.randn(1, f1, f1, device=dev, dtype=bf) / math.sqrt(f1)).requires_grad_()
    B = (torch.randn(1, f2, f2, device=dev, dtype=bf) / math.sqrt(f2)).requires_grad_()
    # correctness on a slice
    xs = x[:256].detach()
    err = rel(kron_matmul(xs, A.detach(), B.detach()), naive.kron_matmul(xs.double(), A.detach().double(), B.detach().double()))
    err_torch = rel(naive.kron_matmul(xs, A.detach(), B.detach()), naive.kron_matmul(xs.double(), A.detach().double(), B.detach().double()))
    W = (torch.randn(d, d, device=dev, dtype=bf) / math.sqrt(d)).requires_grad_()
    t_dense = med(lambda: x @ W)
    tb_dense = fwd_bwd(lambda: x @ W, x, W)
    del W
    torch.cuda.empty_cache()
    comp = torch.compile(naive.kron_matmul)
    r = dict(err_kernel=err, err_torch_bf16=err_torch, dense_fwd=t_dense, dense_fwdbwd=tb_dense)
    # backward flags (ONE_PASS_BWD, FUSED_DX_DA): read in the backward, so they stay set while a variant is timed
    for name, f, (one_pass, fused) in [("kernel", lambda: kron_matmul(x, A, B), (False, False)),
                                       ("kernel_fused_dx_da", lambda: kron_matmul(x, A, B), (False, True)),
                                       ("kernel_one_pass", lambda: kron_matmul(x, A, B), (True, False)),
                                       ("einsum", lambda: naive.kron_matmul(x, A, B), (False, False)),
                                       ("compiled", lambda: comp(x, A, B), (False, False))]:
        kernels.ONE_PASS_BWD, kernels.FUSED_DX_DA = one_pass, fused
        tf, tb = med(f), fwd_bwd(f, x, A, B)
        kernels.ONE_PASS_BWD, kernels.FUSED_DX_DA = False, False
        r[name] = dict(fwd=tf, fwdbwd=tb, speedup_fwd=t_dense / tf, speedup_fwdbwd=tb_dense / tb, bwd_over_fwd=(tb - tf) / tf)
    flops = 2 * n * (f1 * f1 * f2 + f1 * f2 * f2)
    bytes_ = 2 * 2 * n * d
    r["floor_fwd_ms"] = max(flops / 775e12, bytes_ / 4.2e12) * 1e3
    rows[d] = r
    print(d, json.dumps(r, indent=None, default=lambda v: round(v, 4)), flush=True)
    json.dump(rows, open(os.path.join(OUT, "kronecker.json"), "w"), indent=1)
    del x, A, B
    torch.cuda.empty_cache()

print(f"{'d':>6} {'err':>8} {'torch':>8} {'dense fb':>9} {'kern fb':>8} {'x fb':>6} {'x fwd':>6} {'bwd/fwd':>7} {'fused x':>7} {'1pass x':>7} {'einsum x':>8} {'comp x':>7} {'fwd/floor':>9}")
for d, r in rows.items():
    k = r["kernel"]
    print(f"{d:>6} {r['err_kernel']:8.2e} {r['err_torch_bf16']:8.2e} {r['dense_fwdbwd']:9.3f} {k['fwdbwd']:8.3f} {k['speedup_fwdbwd']:6.1f} "
          f"{k['speedup_fwd']:6.1f} {k['bwd_over_fwd']:7.2f} {r['kernel_fused_dx_da']['speedup_fwdbwd']:7.1f} {r['kernel_one_pass']['speedup_fwdbwd']:7.1f} {r['einsum']['speedup_fwdbwd']:8.1f} {r['compiled']['speedup_fwdbwd']:7.1f} {k['fwd'] / r['floor_fwd_ms']:9.2f}")
