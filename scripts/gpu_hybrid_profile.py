"""Where the hybrid's time goes: CUDA time per kernel of one forward+backward of linear elu+1, window
softmax and the hybrid of the two (window + linear for the far keys, one shared normaliser), side by side.

On the H100 (results/h100/2026-12-06-s11-attn-causal-T131072.md) the hybrid took 29.4 ms f+b at 128k
against 11.4 for linear and 7.3 for window 256: ~10.7 ms more than its two parts. This shows which
kernels (flex with its log-sum-exp, the far part's kernels with drden, the compiled combine, copies)
take it. FAVOR+ too (five 128-wide kernel calls on its 622 features plus the feature pass and the
combine: 117 ms f+b at 128k on the H100, 2026-12-07), by kernel and by host op. And Hedgehog (the bench's
64 + 64 features per head, untrained: the same cost): its row took 2.58 ms f+b at 8k against elu+1's 0.84
(H100, session 23). Each method also gets its wall time per f+b, host included: far above its kernels'
sum means the host issues slower than the GPU runs.

    PYTHONPATH=src python scripts/gpu_hybrid_profile.py [--t 131072] [--window 256] [--labels "linear elu" hedgehog]
    (about a minute; --labels: only the methods whose label holds one of these strings)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import mmm  # noqa: E402
from mmm.attention.api import attention_path  # noqa: E402
from mmm.attention.feature_maps import HedgehogFeatureMap  # noqa: E402


def kernel_ms(step, n: int = 3, by_op: bool = False) -> dict[str, float]:
    """CUDA ms per kernel name (first 60 characters) per call of `step`, largest first (after a warm call).
    by_op: per host-side op instead (aten::copy_, aten::fill_, CompiledFunction, ...: the CUDA time its
    own launches took), which says where copies and fills come from."""
    step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if by_op else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.key_averages():
        on_host = e.device_type == torch.autograd.DeviceType.CPU
        t = getattr(e, "self_device_time_total", 0) if by_op else getattr(e, "device_time_total", 0)
        if t > 0 and on_host == by_op:
            key = e.key[:60]
            times[key] = times.get(key, 0.0) + t / n / 1e3
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def wall_ms(step, n: int = 20) -> float:
    """Wall ms per call of `step`, n calls back to back between two synchronizations (host included)."""
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--t", type=int, default=131072)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--labels", nargs="+", default=None, help="run the methods whose label holds one of these (default all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.t, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn_like(q)
    methods = {"linear elu": dict(method="linear", feature_map="elu"),
               f"window {args.window}": dict(method="window", window=args.window),
               f"hybrid w={args.window} elu": dict(method="hybrid", window=args.window, feature_map="elu"),
               "linear favor+": dict(method="linear", feature_map="favor"),
               "linear hedgehog": dict(method="linear", feature_map=HedgehogFeatureMap(128, 64, num_heads=16).cuda())}
    if args.labels:
        methods = {k_: kw for k_, kw in methods.items() if any(w in k_ for w in args.labels)}
    report = {}
    for label, kw in methods.items():
        def step():
            torch.autograd.grad(mmm.attention(q, k, v, **kw), (q, k, v), g)

        times = kernel_ms(step)
        wall = wall_ms(step)
        # attention_path takes no window: only the method and the feature map decide the path
        path = attention_path(q, k, v, kw["method"], feature_map=kw.get("feature_map", "elu"))
        report[label] = {"total_ms": round(sum(times.values()), 3), "wall_ms": round(wall, 3),
                         "kernels_ms": {k_: round(t, 3) for k_, t in times.items()}}
        print(f"== {label}: {report[label]['total_ms']:.3f} ms of kernels per f+b, {wall:.3f} ms wall "
              f"(path {path})")
        for name, t in list(times.items())[:14]:
            print(f"   {t:8.3f}  {name}")
        if label != "linear elu":  # by host op too (window: whose is its 0.7 ms copy)
            ops = kernel_ms(step, by_op=True)
            report[label]["ops_ms"] = {k_: round(t, 3) for k_, t in ops.items()}
            print("   by host op (CUDA time of its own launches):")
            for name, t in list(ops.items())[:16]:
                print(f"   {t:8.3f}  {name}")
    with open(os.path.join(os.environ.get("OUT", "."), "hybrid_profile.json"), "w") as f:
        json.dump({"args": vars(args), "report": report}, f, indent=1)


if __name__ == "__main__":
    main()
