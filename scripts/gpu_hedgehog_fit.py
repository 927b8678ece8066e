"""Which Hedgehog fit (loss, length) brings its error below elu+1 on the bench's full-size layer?

The H100 bench of 2026-12-06 (results/h100/2026-12-06-s11-attn-causal-T*.md) fitted Hedgehog with the
bench's FULL_HEDGEHOG budget (300 steps, lr 1e-2, 128 sampled rows, ~5 s) and measured a held-out error
against softmax of 0.614 / 0.713 / 0.735 at 8k / 32k / 128k. elu+1 measured 0.577 / 0.679 / 0.749, so
Hedgehog lost at 8k and 32k, where the issue asks it to win. On the quick CPU layer it wins clearly
(tests/test_attention_fit.py). This script fits with larger budgets on the same slices of training text
and prints the held-out error of each fit beside elu+1's, at 8k and 32k. Session 13 (H100): 300 steps
beat elu+1 on this script's layer (0.610 vs 0.695 at 8k) while the bench's rows lost in sessions 13 and
14 (0.708 vs 0.681, 0.703 vs 0.693): the trained layer differs from run to run. Session 14 added fits on
the output error (`train_hedgehog(..., v=v)`), the measure the bench reports.

    PYTHONPATH=src python scripts/gpu_hedgehog_fit.py      (~2-3 min; writes $OUT/hedgehog_fit.json)
    PYTHONPATH=src python scripts/gpu_hedgehog_fit.py --quick   (CPU dry run: the quick layer, tiny fits)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import mmm  # noqa: E402
from mmm.attention.fit import train_hedgehog  # noqa: E402
from mmm.bench.attention_inputs import real_qkv  # noqa: E402
from mmm.bench.cases_attention import FULL_HEDGEHOG, QUICK_HEDGEHOG, QUALITY_ROWS, fit_slices  # noqa: E402

# (steps, lr, sampled rows, loss): the bench's budget first, on the cross-entropy ("weights") and on the
# output error ("output": train_hedgehog given v); session 13 found longer cross-entropy fits worse
BUDGETS = [(300, 1e-2, 128, "weights"), (300, 1e-2, 128, "output"), (1000, 1e-2, 128, "output"),
           (300, 3e-2, 128, "output")]
HELD_OUT_T = (8192, 32768)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    quick = ap.parse_args().quick
    if not (quick or torch.cuda.is_available()):
        sys.exit("needs a CUDA device (or --quick)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fit, budgets, lengths = ((QUICK_HEDGEHOG, [(20, 2e-2, 64, "weights"), (20, 2e-2, 64, "output")], (1024,)) if quick
                             else (FULL_HEDGEHOG, BUDGETS, HELD_OUT_T))
    q, k, v, text = fit_slices(fit, quick, dev)
    held = {t: real_qkv(t, quick, dev) for t in lengths}

    def error(t, fmap):
        x = held[t]
        return round(float(mmm.attention_error(x.q, x.k, x.v, "linear", feature_map=fmap, sample_rows=QUALITY_ROWS,
                                               causal=True)), 4)

    rows = [{"map": "elu", **{f"err_T{t}": error(t, "elu") for t in lengths}}]
    print(json.dumps(rows[-1]), flush=True)
    for steps, lr, sample_rows, loss in budgets:
        start = time.perf_counter()
        fmap = train_hedgehog(q, k, v=v if loss == "output" else None, steps=steps, lr=lr, sample_rows=sample_rows,
                              progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = round(time.perf_counter() - start, 1)
        with torch.no_grad():
            rows.append({"map": "hedgehog", "loss": loss, "steps": steps, "lr": lr, "sample_rows": sample_rows, "fit_s": seconds,
                         **{f"err_T{t}": error(t, fmap.requires_grad_(False)) for t in lengths}})
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "hedgehog_fit.json"), "w") as f:
        json.dump({"fit_inputs": text, "bench_fit": dataclasses.asdict(fit), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
