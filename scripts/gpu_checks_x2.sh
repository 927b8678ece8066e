#!/usr/bin/env bash
# One call on an nvidia-h200-x2 machine for the checks that need no clean timing: the 2-GPU training match,
# then the GPU test files in two streams (one per GPU) under a deadline. Every result is packed into
# $OUT/results.tgz (the device tool returns only a few files). Timing runs belong in calls of their own.
#   phase 0, both GPUs: scripts/gpu_train_distributed.sh (DDP / FSDP2 vs one GPU, fp32; DIST=0 skips it)
#   stream A, GPU 0: the kernel ops' GPU tests (opcheck, torch.compile fullgraph, bf16 vs fp64)
#   stream B, GPU 1: FFT, attention (flex, 128k) and block-path GPU tests
# Usage (repo root): OUT=/some/dir DEADLINE_S=540 bash scripts/gpu_checks_x2.sh
set -uo pipefail
OUT=${OUT:-runs/gpu_checks}
source scripts/gpu_steps.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

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
pack
