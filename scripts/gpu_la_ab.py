"""A/B timing of the linear-attention op between two checkouts, side by side on one GPU.

Times mmm's linear attention (elu+1 and relu, normalized, causal; B=1, H=16, D=128, bf16) forward and
forward+backward at 8k / 32k / 128k tokens from CUDA graphs (the GPU's time alone), cuDNN SDPA beside it,
and the CUDA time per kernel at 128k (torch.profiler). Import mmm from PYTHONPATH, so one copy of this
script times any checkout:

    PYTHONPATH=old/src python scripts/gpu_la_ab.py --label old
    PYTHONPATH=src python scripts/gpu_la_ab.py --label new        (about 40 s each; appends to $OUT/la_ab.jsonl)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

LENGTHS = (8192, 32768, 131072)


def kernel_ms(fn, grads=(), reps: int = 5) -> dict:
    """CUDA ms per call of fn by kernel (the 8 largest). The tensors in `grads` lose their .grad before
    each call, as in the timed graphs: accumulating into it would add an elementwise kernel (~1.55 ms at
    128k for q, k, v) that the timed rows do not have."""
    from torch.profiler import ProfilerActivity, profile

    def call():
        for t in grads:
            t.grad = None
        fn()

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CPU and getattr(e, "device_time_total", 0) > 0:
            out[e.key[:40]] = round(e.device_time_total / 1e3 / reps, 3)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])


def graph_ms(fwd, both, grads) -> tuple[float, float]:
    """Forward (under no_grad) and forward+backward ms, each replayed from a captured CUDA graph."""
    from mmm.bench.graphs import capture  # (checkouts from 7758096 on)

    with torch.no_grad():
        f_ms = do_bench(capture(fwd, ()).replay, warmup=25, rep=100)
    return f_ms, do_bench(capture(both, grads).replay, warmup=25, rep=100)


def timed_row(fwd, both, grads, **labels) -> dict:
    """`labels` plus forward and forward+backward ms from CUDA graphs (`graph_ms`) and their ratio."""
    f_ms, fb_ms = graph_ms(fwd, both, grads)
    return {**labels, "fwd_ms": round(f_ms, 4), "fwd_bwd_ms": round(fb_ms, 4), "bwd_over_fwd": round((fb_ms - f_ms) / f_ms, 2)}


def append_jsonl(rows: list[dict], name: str) -> None:
    """Appends rows to $OUT/name (the current folder without $OUT), one JSON object per line."""
    with open(os.path.join(os.environ.get("OUT", "."), name), "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True)
    args = ap.parse_args()
    import mmm
    from mmm.ops.linear_attention import linear_attention

    start = time.time()
    rows = []
    for t in LENGTHS:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, t, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        paths = {fm: (lambda fm=fm: linear_attention(q, k, v, feature_map=fm, normalize=True, causal=True)) for fm in ("elu", "relu")}
        if t <= 32768:
            def sdpa():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            paths["cudnn"] = sdpa
        for name, fwd in paths.items():
            def both(fwd=fwd):
                fwd().backward(do if name != "cudnn" else do.transpose(1, 2))
            row = timed_row(fwd, both, (q, k, v), label=args.label, T=t, path=name)
            if t == LENGTHS[-1] and name == "elu":
                row["kernels_ms"] = kernel_ms(both, (q, k, v))
            rows.append(row)
            print(json.dumps(row), flush=True)
    append_jsonl(rows, "la_ab.jsonl")
    print(f"[{args.label}] {mmm.__file__} {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
