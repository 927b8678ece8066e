#!/usr/bin/env bash
# Issue 5 experiment, one H200: a dense GPT vs the same GPT with Monarch FFNs (nblocks=4: half the FFN
# arithmetic), d_model=2048, 8 layers, seq 4096, exact attention in both, byte-level Python-stdlib corpus,
# MINUTES of training wall-clock each (validation, checkpointing and one warm-up step not counted).
# Total wall time about 2*MINUTES + 1-2 min (data load, validation, final checkpoints). Run from the repo root.
# Writes to $OUT: compare.png (val loss vs seconds), compare.json (tokens/s, final val loss, params,
# configs), dense/ and mmm/ (log.json, loss.png), command.txt, env.txt, train.log. The multi-GB checkpoints
# stay in $WORK.
set -euo pipefail
OUT=${OUT:-runs/gpu_train_compare}
WORK=${WORK:-/tmp/mmm_train_compare}
MINUTES=${MINUTES:-3.5}   # keeps the whole script under 10 minutes
FFN=${FFN:-monarch:nblocks=4}            # e.g. monarch:nblocks=8, lowrank:rank=512
ATTN_PROJ=${ATTN_PROJ:-dense}            # e.g. monarch:nblocks=4
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -m mmm info; } > "$OUT/env.txt" 2>&1 || true
CMD=(python -m mmm train --compare dense,mmm --minutes "$MINUTES"
     --d-model 2048 --n-layers 8 --n-heads 16 --seq-len 4096 --batch-size 8
     --ffn-structure "$FFN" --attn-proj-structure "$ATTN_PROJ" --attention exact
     --lr 6e-4 --warmup 100 --val-every 50 --val-batches 4 --out "$WORK")
echo "${CMD[*]}" > "$OUT/command.txt"
"${CMD[@]}" 2>&1 | tr '\r' '\n' | tee "$OUT/train.log"
cp "$WORK/compare.png" "$WORK/compare.json" "$OUT/"
for m in dense mmm; do mkdir -p "$OUT/$m" && cp "$WORK/$m/log.json" "$WORK/$m/loss.png" "$OUT/$m/"; done
