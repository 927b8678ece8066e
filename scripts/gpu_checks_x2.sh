#!/usr/bin/env bash
# One call on an nvidia-h200-x2 machine for the checks that need no clean timing: the 2-GPU training match,
# then the GPU test files in two streams (one per GPU) under a deadline. Every result is packed into
# $OUT/results.tgz (the device tool returns only a few files). Timing runs belong in calls of their own.
#   phase 0, both GPUs: scripts/gpu_train_distributed.sh (DDP / FSDP2 vs one GPU, fp32; DIST=0 skips it)
#   stream A, GPU 0: the kernel ops' GPU tests (opcheck, torch.compile fullgraph, bf16 vs fp64)
#   stream B, GPU 1: FFT, attention (flex, 128k) and block-path GPU tests
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

(
  export CUDA_VISIBLE_DEVICES=0
  # the GPU tests, plus the eager-twin tests, which use CUDA when there is one (eager vs op bitwise, no
  # zero-filled grads); the other CPU tests of these files assume the interpreter's fp32 tolerances
  step tests_la_eager 300 python -m pytest -q -p no:cacheprovider tests/test_linear_attention_kernel.py \
    tests/test_eager_fast_path.py -k "gpu or eager or materializes"
  step tests_block_kron 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_block_kernels.py \
    tests/test_kronecker_kernel.py
) &
(
  export CUDA_VISIBLE_DEVICES=1
  step tests_fft_attention_paths 400 python -m pytest -q -p no:cacheprovider -m gpu tests/test_fft_structures.py \
    tests/test_attention_flex.py tests/test_attention_gpu.py tests/test_block_paths.py
) &
wait
cat "$OUT/steps.txt"
tar czf "$ROOT/results.tgz" -C "$OUT" . && rm -rf "$OUT" && echo "packed $(du -h "$ROOT/results.tgz" | cut -f1)"
