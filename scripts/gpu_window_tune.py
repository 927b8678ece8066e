"""Can FlexAttention's window path get faster? Times causal window attention (the near part of the hybrid)
at the issue-4 shape with flex's sparse block size and kernel tiles varied, forward and f+b.

    PYTHONPATH=src python scripts/gpu_window_tune.py [--t 131072] [--window 256] [--budget-s 200]

Each setting: the band's BlockMask at that block size (mmm.attention.flex.band_block_mask), torch.compile
of flex_attention with `kernel_options` (BLOCK_M/N forward, BLOCK_M1/N1/M2/N2 backward), its output and
gradients compared with the default setting's, then CUDA-event medians. One row per setting; settings
that fail to compile or run are listed with their error. Each costs a compile (~20-60 s): the budget
stops the sweep. Writes $OUT/window_tune.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from mmm.attention.flex import band_block_mask  # noqa: E402
from mmm.bench.timing import FULL, median_ms  # noqa: E402

# (sparse block, kernel_options): the default first (the reference for the equality check)
SETTINGS = [
    (128, {}),
    # block 64 needs every tile at <= 64 (flex's defaults are 128: "Q and KV block size must be divisible")
    (64, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64}),
    (128, {"BLOCK_M": 128, "BLOCK_N": 64}),
    (128, {"BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64}),
    (64, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}),
    (128, {"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32}),
]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--t", type=int, default=131072)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=200.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.t, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    rows, ref, start = [], None, time.perf_counter()
    for block, opts in SETTINGS:
        if time.perf_counter() - start > args.budget_s:
            rows.append({"block": block, "kernel_options": opts, "error": "skipped: budget"})
            continue
        row = {"block": block, "kernel_options": opts}
        torch._dynamo.reset()  # past dynamo's recompile limit flex would run unfused (scores materialized)
        try:
            mask = band_block_mask(args.t, args.window, True, q.device, block)
            fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=mask, kernel_options=opts or None))
            t0 = time.perf_counter()
            out = fn(q, k, v)
            grads = torch.autograd.grad(out, (q, k, v), g)
            torch.cuda.synchronize()
            row["compile_s"] = round(time.perf_counter() - t0, 1)
            if ref is None:
                ref = (out.detach(), [x.detach() for x in grads])
            else:
                row["rel_diff_out"] = rel(out, ref[0])
                row["rel_diff_grads"] = max(rel(a, b) for a, b in zip(grads, ref[1]))
            with torch.no_grad():
                row["fwd_ms"] = median_ms(lambda: fn(q, k, v), "cuda", FULL)
            row["fwd_bwd_ms"] = median_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), g), "cuda", FULL)
            row["bwd_over_fwd"] = (row["fwd_bwd_ms"] - row["fwd_ms"]) / row["fwd_ms"]
        except Exception as exc:  # a tile flex cannot take: recorded, the sweep goes on
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nwindow {args.window}, T={args.t}, B=1, H={args.heads}, D=128, causal, bf16")
    print(f"{'block':>5}  {'kernel_options':<70} {'fwd ms':>8} {'f+b ms':>8} {'bwd/fwd':>7}")
    for r in rows:
        if "fwd_bwd_ms" in r:
            print(f"{r['block']:>5}  {json.dumps(r['kernel_options']):<70} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} {r['bwd_over_fwd']:7.2f}")
        else:
            print(f"{r['block']:>5}  {json.dumps(r['kernel_options']):<70} {r.get('error', '')}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "window_tune.json"), "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
