#!/usr/bin/env bash
# Two H200s (kind nvidia-h200-x2): the same 30-step run on 1 GPU, on 2 GPUs with DDP and on 2 GPUs with
# FSDP2; the global batch is identical, so the loss curves must agree (bf16 autocast: to ~1e-2, not
# bitwise). Then the "more GPUs than exist" error. Also runs the GPU tests. Results under $OUT.
set -uo pipefail
OUT=${OUT:-runs/gpu_train_distributed}
WORK=${WORK:-/tmp/mmm_train_distributed}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
ARGS=(--d-model 1024 --n-layers 4 --n-heads 8 --seq-len 1024 --batch-size 16 --steps 30 --warmup 5
      --ffn-structure monarch:nblocks=4 --val-every 10 --val-batches 2 --no-progress)
python -m mmm train "${ARGS[@]}" --out "$WORK/one" 2>&1 | tee "$OUT/one.log"
torchrun --standalone --nproc_per_node=2 -m mmm train "${ARGS[@]}" --out "$WORK/ddp" 2>&1 | tee "$OUT/ddp.log"
torchrun --standalone --nproc_per_node=2 -m mmm train "${ARGS[@]}" --fsdp --out "$WORK/fsdp" 2>&1 | tee "$OUT/fsdp.log"
python - "$WORK" <<'PY' | tee "$OUT/distributed_vs_one.txt"
import json, sys
w = sys.argv[1]
logs = {n: json.load(open(f"{w}/{n}/log.json")) for n in ("one", "ddp", "fsdp")}
one = logs["one"]["history"]["loss"]
for n in ("ddp", "fsdp"):
    other = logs[n]["history"]["loss"]
    diff = max(abs(a - b) for a, b in zip(one, other))
    print(f"{n}: world_size={logs[n]['world_size']} max |loss - one-GPU loss| over {len(one)} steps = {diff:.2e}; "
          f"tok/s {logs[n]['tokens_per_s']:.0f} vs {logs['one']['tokens_per_s']:.0f}")
PY
echo "--- expected: a clear error for more processes than GPUs" | tee "$OUT/too_many_gpus.log"
torchrun --standalone --nproc_per_node=3 -m mmm train "${ARGS[@]}" --out "$WORK/three" 2>&1 | grep -m1 "processes per node" | tee -a "$OUT/too_many_gpus.log"
python -m pytest tests/test_models.py tests/test_train.py -q -x 2>&1 | tail -5 | tee "$OUT/pytest.log"
