"""The hybrid calibration on a CPU replica of the bench's real-input layer (session 6 numbers).

    PYTHONPATH=src python scripts/hybrid_calibration_replica.py      (~4 min on 2 CPU cores)

The layer: the bench's recipe (`attention_inputs`) at 2 heads x 128 (d_model 256), trained 200 steps of
8 x 512 tokens. c_h is fitted by `fit_hybrid` on 4 slices of 4096 tokens of its training text; errors
(`mmm.attention_error`, 512 sampled rows) are on held-out text, for window 256 alone, the elu+1 hybrid
with c_h = 0 and with c_h fitted.
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import mmm  # noqa: E402
from mmm.attention.fit import fit_hybrid  # noqa: E402
from mmm.bench import attention_inputs as ai  # noqa: E402

SPEC = ai.ModelSpec(heads=2, head_dim=128, seq_len=512, batch=8, steps=200, lr=8e-4)
WINDOW, LENGTHS, SLICE = 256, (2048, 8192, 16384), 4096


def main() -> None:
    start = time.time()
    trained = ai.trained_model(SPEC, "cpu")
    held = ai._capture(trained, trained.first_heldout, max(LENGTHS), "held-out")
    train = ai._capture(trained, 0, 16 * SLICE, "training")
    q, k, v = (torch.cat([x[:, s:s + SLICE] for s in range(0, 16 * SLICE, 4 * SLICE)]) for x in (train.q, train.k, train.v))
    fmap = fit_hybrid(q, k, v, "elu", WINDOW, steps=100, sample_rows=128, progress=False)
    print(f"{trained.info['model']}; fitted c_h = {[round(c, 2) for c in fmap.hybrid_log_scale.tolist()]}")
    print(f"{'T':>6} {'window':>8} {'c=0':>8} {'fitted':>8}")
    for t in LENGTHS:
        def err(method, **kw):
            return mmm.attention_error(held.q[:, :t], held.k[:, :t], held.v[:, :t], method, window=WINDOW,
                                       sample_rows=512, **kw)
        print(f"{t:>6} {err('window'):8.3f} {err('hybrid', feature_map='elu'):8.3f} {err('hybrid', feature_map=fmap):8.3f}",
              flush=True)
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
