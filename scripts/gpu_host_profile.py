"""Where the host time of one structured-layer forward+backward goes, on the GPU (launch-bound rows of
`mmm bench`, whose "host f+b ms" is close to their "fwd+bwd ms").

    PYTHONPATH=src python scripts/gpu_host_profile.py [--d 16384] [--n 8192] [--structures kronecker circulant]

For each structure (bf16, x [n, d] -> [n, d], the bench's layer): the GPU time (CUDA events) and host
time (to issue, calls back to back) of f+b, every operation that synchronizes with the GPU
(torch.cuda.set_sync_debug_mode, with the line that called it), and the Python functions taking the
most host time (cProfile, own time, 10 calls). Writes $OUT/host_profile.txt too.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from mmm.bench.cases_linear import structured_configs  # noqa: E402
from mmm.bench.timing import FULL, host_ms, median_ms  # noqa: E402
from mmm.linear import StructuredLinear  # noqa: E402


def sync_points(step) -> list[str]:
    """The synchronizing operations of one call, each with the innermost mmm frame that caused it."""
    found = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
        for w in caught:
            if "synchroniz" in str(w.message):
                found.append(f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:100]}")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=16384)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--structures", nargs="*", default=["kronecker", "circulant", "toeplitz", "monarch b=128", "dense"])
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(args.n, args.d, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(args.n, args.d, device=dev, dtype=dt)
    configs = dict(structured_configs(args.d, args.d))
    lines = []
    for want in args.structures:
        label = next((k for k in configs if k.startswith(want)), "dense" if want == "dense" else None)
        if label is None:
            continue
        layer = (torch.nn.Linear(args.d, args.d, bias=False, device=dev, dtype=dt) if label == "dense"
                 else StructuredLinear(args.d, args.d, configs[label], bias=False, device=dev, dtype=dt))
        params = [x, *layer.parameters()]
        step = lambda: layer(x).backward(g)  # noqa: E731
        try:
            gpu = median_ms(step, dev, FULL, params)
            host = host_ms(step, dev, grad_to_none=params)
            syncs = sync_points(step)
            pr = cProfile.Profile()
            torch.cuda.synchronize()
            pr.enable()
            for _ in range(10):
                step()
            pr.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
            prof = "\n".join(line for line in s.getvalue().splitlines() if line.strip())[-2600:]
            lines += [f"== {label}: GPU f+b {gpu:.3f} ms, host f+b {host:.3f} ms, {len(syncs)} sync(s)"]
            lines += [f"   sync: {m}" for m in syncs[:6]] + [prof, ""]
        except Exception:
            lines += [f"== {label}: failed", traceback.format_exc()[-1500:]]
        layer = None
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(os.environ.get("OUT", "."), "host_profile.txt"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
