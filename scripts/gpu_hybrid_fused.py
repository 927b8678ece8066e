"""The fused causal hybrid (one Triton pass: window softmax + lagged linear attention, shared normaliser)
beside the paths it replaces, side by side on one GPU.

Times forward and forward+backward from CUDA graphs (the GPU's time alone) at 8k / 32k / 128k tokens
(B=1, H=16, D=128, bf16, causal): the fused hybrid at sliding windows 16 / 32 / 64 and block windows
16 / 32 / 64 (window_shape='block'), linear elu+1 alone (the target: hybrid within 1.3x of it), the
flex+triton hybrid at the same window 64 and at 256 (the path before), window softmax 64 (flex), and
cuDNN SDPA up to 32k. Then the CUDA time per kernel of the fused hybrid (w=64 and block=64) at the
longest length. (Sliding windows over 64 are left out: their forward faults on the H100,
hybrid_op.LONG_WINDOWS_ON_CUDA.) Rows land in $OUT/hybrid_fused.jsonl, a table on stdout.

    PYTHONPATH=src python scripts/gpu_hybrid_fused.py [--lengths 8192 32768 131072] [--labels fused linear]
        [--tag new]   (about 2 min; 1 with --labels fused linear)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mmm
from mmm.attention import hybrid as hybrid_mod
from mmm.attention.api import attention_path, resolve_feature_map

from gpu_la_ab import append_jsonl, kernel_ms, timed_row  # scripts/ is on the path when this runs as a script


def paths(q, k, v, t: int) -> dict:
    """label -> (forward callable, the path attention_path reports)."""
    elu = resolve_feature_map("elu", q.shape[-1], q.device)
    out = {}
    for w in (16, 32, 64):
        out[f"fused hybrid w={w}"] = (lambda w=w: mmm.attention(q, k, v, "hybrid", window=w, feature_map="elu"),
                                      attention_path(q, k, v, "hybrid", window=w))
    for w in (16, 32, 64):
        out[f"fused hybrid block={w}"] = (
            lambda w=w: mmm.attention(q, k, v, "hybrid", window=w, window_shape="block", feature_map="elu"),
            attention_path(q, k, v, "hybrid", window=w, window_shape="block"))
    out["linear elu"] = (lambda: mmm.attention(q, k, v, "linear", feature_map="elu"), attention_path(q, k, v, "linear"))
    for w in (64, 256):
        out[f"flex hybrid w={w}"] = (lambda w=w: hybrid_mod.flex_hybrid(q, k, v, elu, w, True, 1e-6, 64),
                                     "flex+triton")
    out["window 64"] = (lambda: mmm.attention(q, k, v, "window", window=64), attention_path(q, k, v, "window"))
    if t <= 32768:
        def sdpa():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True).transpose(1, 2)
        out["cudnn exact"] = (sdpa, "sdpa:cudnn")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--labels", nargs="+", default=None,
                    help="time only the rows whose label starts with one of these (e.g. 'fused' 'linear')")
    ap.add_argument("--tag", default="", help="a label for this run's rows (an A/B of two checkouts)")
    args = ap.parse_args()
    start = time.time()
    rows = []
    for t in args.lengths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, t, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for label, (fwd, path) in paths(q, k, v, t).items():
            if args.labels and not label.startswith(tuple(args.labels)):
                continue
            def both(fwd=fwd):
                fwd().backward(do)
            try:
                row = timed_row(fwd, both, (q, k, v), tag=args.tag, T=t, label=label, path=path)
            except Exception as e:  # noqa: BLE001 - report and go on to the other rows
                print(f"T={t} {label}: {type(e).__name__}: {e}", flush=True)
                continue
            if t == max(args.lengths) and label in ("fused hybrid w=64", "fused hybrid block=64"):
                row["kernels_ms"] = kernel_ms(both, (q, k, v))
            rows.append(row)
            print(json.dumps(row), flush=True)
    append_jsonl(rows, "hybrid_fused.jsonl")
    print("\n| T | path | fwd ms | f+b ms | bwd/fwd | f+b / linear elu |\n|---|---|---|---|---|---|")
    for row in rows:
        lin = [r["fwd_bwd_ms"] for r in rows if r["T"] == row["T"] and r["label"] == "linear elu"]
        ratio = f"{row['fwd_bwd_ms'] / lin[0]:.2f}" if lin else "-"
        print(f"| {row['T']} | {row['label']} ({row['path']}) | {row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | "
              f"{row['bwd_over_fwd']:.2f} | {ratio} |")
    print(f"{time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
