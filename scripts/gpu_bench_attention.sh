#!/usr/bin/env bash
# Full-size attention bench on one GPU (H200), results under $OUT; run from the repo root.
# Cases attn.crossover and attn.causal.T{2048,8192,32768,131072}: cuDNN SDPA baseline, SDPA flash, mmm
# linear / window / hybrid, fla when it imports (put its wheels on PYTHONPATH first, e.g. PYTHONPATH=/tmp/site:
# kept below), quality on q/k/v of a 16-head x 128 model trained at the start (~1 min). Expected 3-5 min;
# `timeout` keeps it under 9 (outputs are rewritten after every case, so a cut run keeps what it measured).
set -o pipefail
out="${OUT:-.}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
python -c 'import fla; print("fla", fla.__version__, "from", fla.__file__)' 2>&1 | tail -1 | tee "$out/bench_attention.log"
timeout -k 15 520 python -m mmm bench --cases 'attn.*' --no-progress \
  --json "$out/bench_attention.json" --markdown "$out/bench_attention.md" --plot "$out/bench_attention.png" \
  2>&1 | tee -a "$out/bench_attention.log"
