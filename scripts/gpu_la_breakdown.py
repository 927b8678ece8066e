"""H200: what the feature map and the normalizer cost in the linear-attention kernels.

The 2026-11-28 run measured normalized elu+1 at 2.2x the time of identity/unnormalized at T = 128k
(11.1 vs 5.0 ms fwd+bwd). This times the four combinations (identity / elu+1) x (unnormalized /
normalized), forward and forward+backward, with CUDA time per kernel, to show which of the two costs.

    PYTHONPATH=src python scripts/gpu_la_breakdown.py      (about a minute; prints a table, writes $OUT/la_breakdown.json)
"""
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from mmm.ops.linear_attention import kernels, linear_attention  # noqa: E402

B, H, D, BF = 1, 16, 128, torch.bfloat16
VARIANTS = [(None, False), ("elu", False), (None, True), ("elu", True), ("elu outside", True)]
# "elu outside": elu+1 computed in one compiled pass (bf16 features, its backward compiled too), then the
# identity kernels, as Hedgehog and FAVOR+ run: does that beat applying the map inside the kernels' loops?
_elu1 = torch.compile(lambda x: torch.nn.functional.elu(x * x.shape[-1] ** -0.25) + 1)


def forward(q, k, v, fmap, norm):
    if fmap == "elu outside":
        return linear_attention(_elu1(q), _elu1(k), v, None, norm)
    return linear_attention(q, k, v, fmap, norm)


def profile(step, n=5) -> tuple[dict, dict]:
    """(CUDA ms per kernel, host ms per op: the 8 largest by self CPU time), per fwd+bwd step."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = {e.key[:40]: round(e.device_time_total / n / 1e3, 4) for e in events
           if getattr(e, "device_time_total", 0) > 0 and "kernel" in e.key}
    host = {e.key[:40]: round(e.self_cpu_time_total / n / 1e3, 4)
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]}
    return dict(sorted(gpu.items(), key=lambda kv: -kv[1])), host


def main() -> None:
    results = []
    # T = 2048: fwd+bwd took 0.93 ms there (floor 0.02) while the forward took 0.14: where does the
    # backward's fixed cost go, host or GPU?
    for T in (2048, 32768, 131072):
        q, k, v, go = (torch.randn(B, T, H, D, device="cuda", dtype=BF, requires_grad=i < 3) for i in range(4))
        for fmap, norm in VARIANTS:
            fwd = lambda: forward(q, k, v, fmap, norm)  # noqa: E731
            step = lambda: torch.autograd.grad(fwd(), (q, k, v), go)  # noqa: E731
            step()
            row = dict(T=T, feature_map=fmap or "identity", normalize=norm,
                       fwd_ms=do_bench(fwd, warmup=10, rep=100, return_mode="median"),
                       fwdbwd_ms=do_bench(step, warmup=10, rep=100, return_mode="median"),
                       kernels_ms=None, host_ms=None)
            row["kernels_ms"], row["host_ms"] = profile(step)
            row["kernel_sum_ms"] = round(sum(row["kernels_ms"].values()), 4)
            results.append(row)
            print(json.dumps(row), flush=True)
        del q, k, v, go
        torch.cuda.empty_cache()
    name = "la_breakdown_zdot.json" if kernels.ZDOT else "la_breakdown.json"  # MMM_LA_ZDOT=1: the A/B's other half
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'T':>7} {'features':>11} {'norm':>5} {'fwd':>7} {'fwd+bwd':>8} {'GPU sum':>8}  kernels (ms)")
    for r in results:
        ks = " ".join(f"{k.split('_kernel')[0]}={v:.2f}" for k, v in r["kernels_ms"].items())
        print(f"{r['T']:>7} {r['feature_map']:>11} {str(r['normalize']):>5} {r['fwd_ms']:7.3f} {r['fwdbwd_ms']:8.3f} "
              f"{r['kernel_sum_ms']:8.3f}  {ks}")
    print("host time per fwd+bwd at T=2048, elu normalized:", results[3]["host_ms"])


if __name__ == "__main__":
    main()
