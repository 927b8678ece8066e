"""Which Hedgehog fit (loss, feature count) beats elu+1 on the full-size layer, and by how much?

History (H100, held-out error vs softmax at 8k, bf16): the bench's rows gave Hedgehog 0.614 / 0.708 /
0.703 / 0.715 / 0.682 against elu+1's 0.577 / 0.681 / 0.693 / 0.720 / 0.682 (sessions 11-20), while this
script, fitting with the bench's own recipe (FULL_HEDGEHOG, fit_slices) on its own process's layer, gave
0.610 vs 0.695 (session 13) and 0.537 vs 0.589 (session 16). Both evaluate bf16 captures through the
kernel, so only the layer or the path differed: the bench trained two layers, one per device name, and
judged its fit on the other one (fixed in session 23, bench.timing.canonical_device). This script measures,
on one layer:
  - "bench": the bench row's own map and measure (`trained_hedgehog`, `mmm_error` on inputs cast to the
    bench's dtype), so a gap between it and the same recipe fitted here would point at the bench's path;
  - each fit through the kernel and through the PyTorch path (linear.USE_TRITON_KERNEL off): a gap there
    would point at the kernel's computed-feature path (two 128-wide calls at F = 256);
  - fits on the cross-entropy ("weights") and on the output error ("output"), with F = 2 D (the default)
    and F = D (num_features = D / 2: one 128-wide kernel call instead of two). On the CPU replica (2 x 128
    heads, scripts/hedgehog_replica.py, session 23) F = D with the output loss matched F = 2 D's best
    (0.785 / 0.607 / 0.502 at 2k / 8k / 16k vs 0.782 / 0.615 / 0.500; cross-entropy F = 2 D 0.773 / 0.632 /
    0.529; elu+1 0.899 / 0.732 / 0.601), and its validation loss stopped improving after ~200 steps.

    PYTHONPATH=src python scripts/gpu_hedgehog_fit.py      (~3 min; writes $OUT/hedgehog_fit.json)
    PYTHONPATH=src python scripts/gpu_hedgehog_fit.py --quick   (CPU dry run: the quick layer, tiny fits)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import mmm  # noqa: E402
from mmm.attention import linear  # noqa: E402
from mmm.attention.feature_maps import HedgehogFeatureMap  # noqa: E402
from mmm.attention.fit import train_hedgehog  # noqa: E402
from mmm.bench.attention_inputs import real_qkv  # noqa: E402
from mmm.bench.cases_attention import (FULL_HEDGEHOG, QUICK_HEDGEHOG, QUALITY_ROWS, fit_slices,  # noqa: E402
                                       mmm_error, trained_hedgehog)

# (loss, features per sign as a fraction of D): the bench's recipe first (its steps, lr and rows)
FITS = [("weights", 1), ("output", 1), ("output", 0.5), ("weights", 0.5)]
HELD_OUT_T = (2048, 8192, 32768)


@contextlib.contextmanager
def pytorch_path():
    """mmm.attention's linear path without the Triton kernel, inside the block."""
    saved, linear.USE_TRITON_KERNEL = linear.USE_TRITON_KERNEL, False
    try:
        yield
    finally:
        linear.USE_TRITON_KERNEL = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    quick = ap.parse_args().quick
    if not (quick or torch.cuda.is_available()):
        sys.exit("needs a CUDA device (or --quick)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the bench's dtype here
    fit, lengths = (QUICK_HEDGEHOG, (256, 1024)) if quick else (FULL_HEDGEHOG, HELD_OUT_T)
    steps = 20 if quick else fit.steps
    q, k, v, text = fit_slices(fit, quick, dev)
    held = {t: real_qkv(t, quick, dev) for t in lengths}
    d = q.shape[-1]

    def errors(fmap):
        """Held-out error per T as the bench measures it (inputs cast to its dtype), through the kernel
        and through the PyTorch path."""
        out = {}
        for t, x in held.items():
            args = [y.to(dtype) for y in (x.q, x.k, x.v)]
            with torch.no_grad():
                out[f"err_T{t}"] = round(mmm_error("linear", feature_map=fmap)(*args), 4)
                with pytorch_path():
                    out[f"err_T{t}_pytorch"] = round(mmm_error("linear", feature_map=fmap)(*args), 4)
        return out

    rows = [{"map": name, **errors(name)} for name in ("elu", "relu")]
    for r in rows:
        print(json.dumps(r), flush=True)
    bench_map, info = trained_hedgehog(quick, dev)
    rows.append({"map": "hedgehog (the bench row's map)", "fit_s": info["hedgehog_train_seconds"], **errors(bench_map)})
    print(json.dumps(rows[-1]), flush=True)
    for loss, share in FITS:
        start = time.perf_counter()
        fmap = HedgehogFeatureMap(d, num_features=int(d * share), num_heads=q.shape[2], num_kv_heads=k.shape[2])
        fmap = train_hedgehog(q, k, fmap, v=v if loss == "output" else None, steps=steps, lr=fit.lr,
                              sample_rows=fit.sample_rows, progress=False).requires_grad_(False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rows.append({"map": "hedgehog", "loss": loss, "features": fmap.feature_dim, "steps": steps, "lr": fit.lr,
                     "sample_rows": fit.sample_rows, "fit_s": round(time.perf_counter() - start, 1), **errors(fmap)})
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "hedgehog_fit.json"), "w") as f:
        json.dump({"fit_inputs": text, "bench_fit": dataclasses.asdict(fit), "dtype": str(dtype), "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
