#!/usr/bin/env bash
# Two H200s (kind nvidia-h200-x2), results under $OUT (run from the repository root):
#  1. match: the same 30-step run on 1 GPU, on 2 GPUs with DDP and on 2 GPUs with FSDP2, in fp32
#     (--precision fp32): the global batch is identical, so per-step losses must agree to float
#     rounding. (In bf16 autocast the first session saw 7.7e-2 drift by step 30: rounding differences
#     between one 16-sequence batch and two 8-sequence halves, amplified by training.)
#  2. speed: a wider model in bf16 (d_model 2048, seq 2048) on 1 GPU and on 2 with DDP: tokens/s.
#  3. the clear error for more processes than GPUs.
set -uo pipefail
OUT=${OUT:-runs/gpu_train_distributed}
WORK=${WORK:-/tmp/mmm_train_distributed}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
MATCH=(--d-model 1024 --n-layers 4 --n-heads 8 --seq-len 1024 --batch-size 16 --steps 30 --warmup 5
       --ffn-structure monarch:nblocks=4 --val-every 10 --val-batches 2 --no-progress --precision fp32)
SPEED=(--d-model 2048 --n-layers 8 --n-heads 16 --seq-len 2048 --batch-size 16 --steps 40 --warmup 5
       --ffn-structure monarch:nblocks=4 --val-every 0 --val-batches 1 --no-progress)
run1() { python -m mmm train "$@"; }
run2() { torchrun --standalone --nproc_per_node=2 -m mmm train "$@"; }
run1 "${MATCH[@]}" --out "$WORK/one" > "$OUT/one.log" 2>&1
run2 "${MATCH[@]}" --out "$WORK/ddp" > "$OUT/ddp.log" 2>&1
run2 "${MATCH[@]}" --fsdp --out "$WORK/fsdp" > "$OUT/fsdp.log" 2>&1
run1 "${SPEED[@]}" --out "$WORK/speed_one" > "$OUT/speed_one.log" 2>&1
run2 "${SPEED[@]}" --out "$WORK/speed_ddp" > "$OUT/speed_ddp.log" 2>&1
python - "$WORK" <<'PY' | tee "$OUT/distributed_vs_one.txt"
import json, sys
w = sys.argv[1]
def log(n):
    try:
        return json.load(open(f"{w}/{n}/log.json"))
    except OSError as e:
        print(f"{n}: no log ({e})")
        return None
one = log("one")
for n in ("ddp", "fsdp"):
    other = log(n)
    if one and other:
        a, b = one["history"]["loss"], other["history"]["loss"]
        diffs = [abs(x - y) for x, y in zip(a, b)]
        print(f"{n} (fp32): world_size={other['world_size']} max |loss - one-GPU loss| over {len(diffs)} steps = "
              f"{max(diffs):.2e} (step 0: {diffs[0]:.2e}, last: {diffs[-1]:.2e})")
s1, s2 = log("speed_one"), log("speed_ddp")
if s1 and s2:
    print(f"speed (bf16, d_model 2048, seq 2048, global batch 16): 1 GPU {s1['tokens_per_s']:.0f} tok/s, "
          f"2 GPUs DDP {s2['tokens_per_s']:.0f} tok/s ({s2['tokens_per_s'] / s1['tokens_per_s']:.2f}x)")
PY
for n in one ddp fsdp speed_one speed_ddp; do cp "$WORK/$n/log.json" "$OUT/$n.json" 2>/dev/null; done
echo "--- expected: a clear error for more processes than GPUs" | tee "$OUT/too_many_gpus.log"
run1_3() { torchrun --standalone --nproc_per_node=3 -m mmm train "${MATCH[@]}" --steps 2 --out "$WORK/three"; }
run1_3 2>&1 | grep -m1 "processes per node" | tee -a "$OUT/too_many_gpus.log"
