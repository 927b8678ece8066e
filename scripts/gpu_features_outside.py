"""A/B of where linear attention's elu+1 features are computed: inside the kernel's loops, or in one
compiled pass before it (`mmm.attention.linear.FEATURES_OUTSIDE_MIN_ROWS`), through `mmm.attention`,
forward+backward, beside cuDNN SDPA, at 4k-128k tokens (B=1, H=16, D=128, causal, bf16). Sets the
threshold's evidence at the lengths the per-kernel breakdown did not time.

    PYTHONPATH=src python scripts/gpu_features_outside.py      (about a minute; writes $OUT/features_outside.json)
"""
import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import mmm  # noqa: E402
from mmm.attention import linear as linear_mod  # noqa: E402


def fwd_bwd_ms(fn, q, k, v, go) -> float:
    step = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), go)  # noqa: E731
    step()
    return do_bench(step, warmup=10, rep=100, return_mode="median")


def main() -> None:
    rows = []
    for T in (4096, 8192, 16384, 32768, 131072):
        q, k, v, go = (torch.randn(1, T, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=i < 3)
                       for i in range(4))
        row = {"T": T}
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            row["cudnn_ms"] = fwd_bwd_ms(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
                a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), is_causal=True).transpose(1, 2), q, k, v, go)
        for label, min_rows in (("inside_ms", 1 << 40), ("outside_ms", 0)):
            linear_mod.FEATURES_OUTSIDE_MIN_ROWS = min_rows
            row[label] = fwd_bwd_ms(lambda a, b, c: mmm.attention(a, b, c, "linear"), q, k, v, go)
        row["outside_speedup"] = row["inside_ms"] / row["outside_ms"]
        row["best_vs_cudnn"] = row["cudnn_ms"] / min(row["inside_ms"], row["outside_ms"])
        rows.append(row)
        print(json.dumps({k_: round(x, 4) if isinstance(x, float) else x for k_, x in row.items()}), flush=True)
        del q, k, v, go
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "features_outside.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
