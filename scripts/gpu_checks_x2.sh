#!/usr/bin/env bash
# One call on an nvidia-h200-x2 machine that runs the open GPU checks in two streams, one per GPU, under a
# deadline, and packs every result into $OUT/results.tgz (the device tool returns only a few files).
#   phase 0, both GPUs: scripts/gpu_train_distributed.sh (DDP / FSDP2 vs one GPU, fp32), then
#   (DIST=0 skips phase 0)
#   stream A, GPU 0: `mmm bench --cases 'attn.*'` (Triton linear-attention kernel on);
#   stream B, GPU 1: model tests, 16384 projections, the fused-Adam spectrum-cache test, then `mmm bench`
#                    of the d = 16384 square linear cases.
# Usage (repo root): OUT=/some/dir DEADLINE_S=540 bash scripts/gpu_checks_x2.sh
set -uo pipefail
ROOT=${OUT:-runs/gpu_checks}
export OUT=$ROOT/r  # child scripts write their JSON to $OUT
mkdir -p "$OUT"
END=$((SECONDS + ${DEADLINE_S:-540}))
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# step NAME MAX_S CMD...: runs CMD with the smaller of MAX_S and the time left, logs to $OUT/NAME.log
step() {
  local name=$1 max=$2; shift 2
  local left=$((END - SECONDS - 5)); local t=$((max < left ? max : left))
  if ((t < 20)); then echo "[skip] $name (no time left)" | tee -a "$OUT/steps.txt"; return; fi
  local t0=$SECONDS
  timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "[rc=$? ${name} $((SECONDS - t0))s of ${t}s]" | tee -a "$OUT/steps.txt"
}

if [[ ${DIST:-1} == 1 ]]; then step distributed 150 env OUT="$OUT/distributed" bash scripts/gpu_train_distributed.sh; fi
mkdir -p "$OUT/attn" "$OUT/linear"

(
  export CUDA_VISIBLE_DEVICES=0
  step bench_attention 420 python -m mmm bench --cases 'attn.*' --no-progress \
    --json "$OUT/attn/bench_attention.json" --markdown "$OUT/attn/bench_attention.md" --plot "$OUT/attn/bench_attention.png"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  step models_tests 40 python -m pytest -q -p no:cacheprovider tests/test_models.py -x
  step projection_16384 100 python -m pytest -q -s -p no:cacheprovider -m gpu tests/test_block_structures.py -k projection_16384
  step fft_fused_adam 40 python -m pytest -q -l -p no:cacheprovider -m gpu tests/test_fft_structures.py -k fused_adam
  step bench_linear 300 python -m mmm bench --cases 'linear.square.d16384' --no-progress \
    --json "$OUT/linear/bench_linear.json" --markdown "$OUT/linear/bench_linear.md" --plot "$OUT/linear/bench_linear.png"
) &
wait
cat "$OUT/steps.txt"
tar czf "$ROOT/results.tgz" -C "$OUT" . && rm -rf "$OUT" && echo "packed $(du -h "$ROOT/results.tgz" | cut -f1)"
