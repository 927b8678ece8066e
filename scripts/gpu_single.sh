#!/usr/bin/env bash
# One call on a single-GPU machine (H200 or H100), phases chosen by name, every result packed into
# $OUT/results.tgz (the device tool returns only a few files). Run from the repository root:
#   OUT=$OUT DEADLINE_S=560 bash scripts/gpu_single.sh tests            # GPU tests, 8 processes, ~4.5 min
#   OUT=$OUT DEADLINE_S=580 bash scripts/gpu_single.sh attn128k         # issue-4 bench at 128k, ~6.5 min, alone
#   OUT=$OUT DEADLINE_S=560 bash scripts/gpu_single.sh attn32k attn8k linear host
# Phases: tests (no timing: may share the GPU) and retests (the attention and linear-attention GPU tests), then timing
# phases, each alone: attn128k, attn32k, attn8k, crossover (mmm bench attention cases; fla from .whl when
# carried), linear (mmm bench linear.square.d16384), host (scripts/gpu_host_profile.py), launch
# (scripts/gpu_launch_paths.py, host time of a Triton launch by path, then the GPU test of FastLaunch,
# ~2 min), hostab (gpu_host_profile.py with FastLaunch off, then on, ~2.5 min), la_host
# (scripts/la_host_overhead.py --gpu), fftk (scripts/gpu_fft_kernels.py: the FFT structures' spectral
# kernels and their tilings, ~1 min), hybridprof (scripts/gpu_hybrid_profile.py: CUDA time per kernel of
# linear, window, hybrid and FAVOR+ f+b at 128k, ~2 min), zdot (scripts/gpu_la_breakdown.py with MMM_LA_ZDOT=0,
# then 1: CUDA time per linear-attention kernel, ~3 min), segsweep (linear attention's segment length at
# 2k / 8k / 128k, CUDA-graph times, ~1 min), bksweep (the same with dq/dk's K tile forced to 32, then 64,
# ~2 min), hhfit (scripts/gpu_hedgehog_fit.py: on one layer, the bench row's Hedgehog map and fits by loss
# and feature count, through the kernel and the PyTorch path, beside elu+1 and relu at 2k / 8k / 32k, ~3 min), window (scripts/gpu_window_tune.py: flex's block size and tiles for
# the window / hybrid near part at 128k, ~4 min), ncu (scripts/gpu_ncu.py: Nsight Compute counters and
# stall reasons of the slow kernels, ~3 min), sanitize (the fastest fwd/dv configs, 8 warps at BT=64,
# under compute-sanitizer beside a retired config of the 2026-11-28 fault as the positive control,
# ~3 min), zdotbisect (ZDOT's GPU test with ZDOT on in one kernel at a
# time, ~3 min), favor (normalised FAVOR+'s GPU test on the kernel; when it passes, the kernel is switched
# on in this copy (linear.RESCALED_NORMALIZED_ON_KERNEL) for the phases after it), la128k / la32k (the
# bench's linear, FAVOR+, window and hybrid rows only, ~2 min), zdotsan (fwd_kernel's ZDOT fault under
# compute-sanitizer memcheck, ~2 min), capsweep (the register-capped configs of gpu_linear_attention_configs.py's
# candidates, each forced against the baseline, ~4 min), laab (scripts/gpu_la_ab.py on a carried ../snap_old
# checkout, then on this one: the linear-attention op side by side, ~2 min), opdiag (scripts/gpu_opcheck_diag.py,
# ~1 min; opdiag_old: on ../snap_old), hybrid (scripts/gpu_hybrid_fused.py: the fused hybrid
# beside linear and the flex hybrid, CUDA-graph times at 8k-128k, ~3 min; its tests are in retests), hybridab
# (the same, fused (sliding and block) and linear rows at 8k and 128k, on a carried ../snap_old checkout,
# then on this one, ~4 min), la8k (the 8k bench's linear, window and hybrid rows, ~2 min), fitted8k / fitted32k (the rows
# fitted on the bench's trained layer: Hedgehog and the calibrated hybrids, beside elu+1, ~2 min), hhprof
# (gpu_hybrid_profile.py at 8k: CUDA time per kernel and wall time of linear elu+1 and Hedgehog, ~1 min),
# compiletests (the linear-attention and hybrid torch.compile(fullgraph) GPU tests alone, ~3 min), zdotdq
# (gpu_la_ab.py with the normaliser sums as dots where the default has them, everywhere, and in chunk_state
# only, ~3 min), dqdkab (the same with dq/dk in one launch, with and without ZDOT's sums: zdotdq's rows
# are the two-launch side, ~2 min), feattests (session 25's features written once: the linear-attention and hybrid bf16 GPU
# tests and opcheck, ~3 min), zdotfwdcfg (fwd's ZDOT D = 64 test, one forced fwd config per process,
# ~3 min), zdottest (the ZDOT-everywhere bf16 GPU test, ~1 min), cand128 (fwd and dv at
# (128, 128, 8, 2), each forced against the baseline: correctness and time, ~3 min), hylong (the
# fused hybrid's GPU test at window 256, which faulted, under compute-sanitizer, ~2 min), fftab (the
# circulant and Toeplitz rows of the linear bench with the FFT backward's kernel gradient in a pass of its
# own, then in the mix's pass, ~3 min), ffttests and fftbench (session 26's LDR as two fft_conv products and
# Toeplitz FFN shapes as grids of blocks: the FFT structures' and no-sync GPU tests, ~3 min; then the linear
# bench's dense, LDR, circulant and Toeplitz rows at d = 16384 and every row of d = 4096 -> 16384, ~5 min).
# Bench files land
# as bench_<phase>.{md,json,png}.
set -uo pipefail
OUT=${OUT:-runs/gpu_single}
source scripts/gpu_steps.sh
if compgen -G ".whl/*.whl" > /dev/null; then  # fla for the attention benches, carried as wheels
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

bench() {  # bench PHASE MAX_S CASES [VARIANT GLOBS...]
  local phase=$1 max_s=$2 cases=$3
  shift 3
  step "$phase" "$max_s" python -m mmm bench --no-progress --cases "$cases" --json "$OUT/bench_$phase.json" \
    --markdown "$OUT/bench_$phase.md" --plot "$OUT/bench_$phase.png" ${1:+--variants "$@"}
}
LA_ROWS=("linear elu*" "linear relu*" "window 256" "hybrid w=256 elu*" "hybrid w=64 elu*" "hybrid block=64 elu*")
FIT_ROWS=("linear elu*" "linear hedgehog*" "hybrid*")  # the rows fitted on the bench's trained layer

tests() {  # eight pytest processes side by side (-v: a timeout still leaves each test's verdict)
  local t="timeout -k 5 250 python -m pytest -v --tb=short -m gpu -p no:cacheprovider"
  $t tests/test_no_host_sync.py tests/test_bench.py > "$OUT/t_sync_bench.log" 2>&1 &
  $t tests/test_fft_structures.py tests/test_fft_dft.py > "$OUT/t_fft.log" 2>&1 &
  $t tests/test_linear_attention_kernel.py > "$OUT/t_la.log" 2>&1 &
  $t tests/test_attention_gpu.py tests/test_attention_flex.py > "$OUT/t_attention.log" 2>&1 &
  $t tests/test_block_structures.py tests/test_checkpoint.py tests/test_projection_methods.py > "$OUT/t_structures.log" 2>&1 &
  $t tests/test_kronecker_kernel.py tests/test_block_kernels.py > "$OUT/t_block.log" 2>&1 &
  $t tests/test_block_paths.py tests/test_eager_dispatch.py tests/test_eager_fast_path.py > "$OUT/t_paths.log" 2>&1 &
  # one process: both files' GPU tests train the full-size real-input layer once (cached per process)
  $t tests/test_bench_attention.py tests/test_attention_fit.py > "$OUT/t_real_inputs.log" 2>&1 &
  wait
  grep -hE "^(FAILED|ERROR)| passed| failed" "$OUT"/t_*.log
}

retests() {  # session 17: whole chunks without row masks (FULL_CHUNKS, the bench lengths take it), the
  # opcheck test with one tile config per kernel; the session-16 kernels' tests as before
  local t="timeout -k 5 250 python -m pytest -v --tb=short -m gpu -p no:cacheprovider"
  $t tests/test_attention_gpu.py -k "key_slices or favor_through_the_kernel" > "$OUT/t_attn.log" 2>&1 &
  $t tests/test_attention_flex.py -k "flex_paths or compile" > "$OUT/t_flex.log" 2>&1 &
  $t tests/test_linear_attention_kernel.py -k "bf16 or opcheck or compile" > "$OUT/t_la.log" 2>&1 &
  $t tests/test_hybrid_kernel.py > "$OUT/t_hybrid.log" 2>&1 &  # session 18: the fused hybrid
  $t tests/test_fft_structures.py > "$OUT/t_fft.log" 2>&1 &  # session 22: the kernel gradient in the backward's mix
  wait
  grep -hE "^(FAILED|ERROR)| passed| failed" "$OUT"/t_*.log
}

compiletests() {  # the torch.compile(fullgraph) tests that retests' 270 s did not reach (session 23), alone
  local t="timeout -k 5 250 python -m pytest -v --tb=short -m gpu -p no:cacheprovider"
  $t tests/test_linear_attention_kernel.py -k torch_compile > "$OUT/t_la_compile.log" 2>&1 &
  $t tests/test_hybrid_kernel.py -k torch_compile > "$OUT/t_hybrid_compile.log" 2>&1 &
  wait
  grep -hE "^(FAILED|ERROR)| passed| failed" "$OUT"/t_*compile.log
}

for phase in "$@"; do
  case $phase in
    tests) step tests 270 bash -c "$(declare -f tests); OUT=$OUT; tests" ;;
    retests) step retests 270 bash -c "$(declare -f retests); OUT=$OUT; retests" ;;
    attn128k) bench attn128k 540 attn.causal.T131072 ;;  # ~6.5 min, fla's autotuning 2.5 of them
    attn32k) bench attn32k 330 attn.causal.T32768 ;;  # fresh machine: compiles and the layer's training ~2 min, fla tunes
    attn8k) bench attn8k 300 attn.causal.T8192 ;;  # FAVOR+ compiles ~95 s and Hedgehog trains: 240 s ran out (session 21)
    crossover) bench crossover 200 attn.crossover ;;
    linear) bench linear 150 linear.square.d16384 ;;
    fftab) for f in 0 1; do  # the FFT backward's kernel gradient in its own pass (0), then in the mix's (1)
        MMM_FFT_FUSED_GRAD=$f bench "fftab_$f" 100 linear.square.d16384 "circulant*" "toeplitz*"; done ;;
    ffttests) step ffttests 200 python -m pytest -v --tb=short -m gpu -p no:cacheprovider tests/test_fft_structures.py \
        tests/test_no_host_sync.py -k "not attention" ;;
    fftbench) bench fftnew_square 150 linear.square.d16384 "dense nn.Linear*" "ldr*" "circulant*" "toeplitz*"
      bench fftnew_up4x 180 linear.up4x.d4096 ;;  # every structure: no FFN-shaped case has run on a GPU yet
    host) step host 90 python scripts/gpu_host_profile.py ;;
    launch) step launch 40 python scripts/gpu_launch_paths.py
      step t_fast 120 python -m pytest -v --tb=short -m gpu -p no:cacheprovider tests/test_fast_launch.py ;;
    hostab) for fast in 0 1; do  # host and GPU time of the launch-bound rows with FastLaunch off, then on
        step "host_fast$fast" 80 env MMM_FAST_LAUNCH=$fast python scripts/gpu_host_profile.py \
          --structures kronecker circulant "monarch b=128" dense; done ;;
    la_host) step la_host 90 python scripts/la_host_overhead.py --gpu ;;
    fftk) step fftk 90 python scripts/gpu_fft_kernels.py ;;
    hybridprof) step hybridprof 180 python scripts/gpu_hybrid_profile.py ;;
    hybrid) step hybrid_fused 200 python scripts/gpu_hybrid_fused.py ;;
    hylong) step hylong 200 env MMM_HYBRID_LONG_WINDOWS=1 CUDA_LAUNCH_BLOCKING=1 compute-sanitizer --tool memcheck \
        --print-limit 5 python -m pytest -x -q --tb=line -m gpu -p no:cacheprovider tests/test_hybrid_kernel.py \
        -k "1000-128-128-256" ;;  # where hybrid_fwd_kernel faults at W = 256 (H100, session 20)
    hybridab) for side in old new; do  # the fused hybrid and linear alone: ../snap_old (carried) vs this tree
        src=src; [ $side = old ] && src=../snap_old/src
        step hybridab_$side 150 env PYTHONPATH=$src python scripts/gpu_hybrid_fused.py --labels fused linear \
          --lengths 8192 131072 --tag $side
      done ;;
    laab) for side in old new; do  # A/B of the linear-attention op: ../snap_old (carried) vs this tree
        src=src; [ $side = old ] && src=../snap_old/src
        step laab_$side 150 env PYTHONPATH=$src python scripts/gpu_la_ab.py --label $side
      done ;;
    opdiag) step opdiag 90 python scripts/gpu_opcheck_diag.py ;;  # opcheck's eager-vs-AOT forward, ~1 min
    opdiag_old) step opdiag_old 90 env PYTHONPATH=../snap_old/src python scripts/gpu_opcheck_diag.py ;;
    segsweep) step segsweep 120 python scripts/gpu_linear_attention.py --sweep-only ;;
    bksweep) for bk in 32 64; do  # the segment sweep with dq/dk forced to wider K tiles (fewer programs
        # recompute g v^T; more segments give back the parallelism), beside segsweep's autotuned one
        step "bksweep$bk" 120 env MMM_LA_CONFIG="bwd_dqdk_kernel=64,$bk,4,2" python scripts/gpu_linear_attention.py --sweep-only
      done ;;
    hhfit) step hhfit 300 python scripts/gpu_hedgehog_fit.py ;;
    hhprof) step hhprof 150 python scripts/gpu_hybrid_profile.py --t 8192 --labels "linear elu" hedgehog ;;
    compiletests) step compiletests 270 bash -c "$(declare -f compiletests); OUT=$OUT; compiletests" ;;
    favor) step favor 150 python -m pytest -v --tb=short -m gpu -p no:cacheprovider tests/test_attention_gpu.py \
        -k favor_through_the_kernel \
      && sed -i 's/^RESCALED_NORMALIZED_ON_KERNEL = False/RESCALED_NORMALIZED_ON_KERNEL = True/' src/mmm/attention/linear.py
      grep -H "^RESCALED_NORMALIZED_ON_KERNEL" src/mmm/attention/linear.py | tee -a "$OUT/steps.txt" ;;
    la128k) bench la128k 200 attn.causal.T131072 "${LA_ROWS[@]}" ;;
    la32k) bench la32k 120 attn.causal.T32768 "${LA_ROWS[@]}" ;;
    la8k) bench la8k 150 attn.causal.T8192 "${LA_ROWS[@]}" ;;
    fitted8k) bench fitted8k 200 attn.causal.T8192 "${FIT_ROWS[@]}" ;;
    fitted32k) bench fitted32k 200 attn.causal.T32768 "${FIT_ROWS[@]}" ;;
    zdotdq) for z in chunk_state,dqdk 1 chunk_state; do  # the normaliser sums as dots: the default, with fwd's
        # too, without dq/dk's, timed per kernel at 8k-128k (it replaces session 15's zdotab, which ran the
        # bench rows; session 24 ran it on rewrites of both: results/h100/2026-12-07-s24-la-ab.jsonl)
        step "zdotdq_${z//,/+}" 120 env MMM_LA_ZDOT=$z python scripts/gpu_la_ab.py --label "zdot=$z"; done ;;
    cand128) step cand128 240 python scripts/gpu_linear_attention_configs.py --budget-s 180 \
        --only fwd_kernel=128,128,8,2 bwd_dv_kernel=128,128,8,2 ;;  # session 24's one-V-tile candidates
    feattests) step feattests 270 python -m pytest -v --tb=short -m gpu -p no:cacheprovider \
        tests/test_linear_attention_kernel.py tests/test_hybrid_kernel.py -k "bf16 or opcheck" ;;  # session 25
    zdotfwdcfg) for c in 64,64,4,2 64,32,4,2 32,64,4,2 16,32,4,2; do  # fwd's ZDOT (session 24's rewrite, in
        # since session 25): its D = 64 autotuning fault, one forced fwd config per process
        step "zdotfwd_${c//,/_}" 90 env MMM_LA_ZDOT=1 MMM_LA_CONFIG="fwd_kernel=$c" \
          python -m pytest -q --tb=line -m gpu -p no:cacheprovider tests/test_linear_attention_kernel.py \
          -k "gpu_normalizer_sums_as_dots_bf16 and 64"; done ;;
    dqdkab) for z in chunk_state chunk_state,dqdk; do  # session 25: dq/dk in one launch, without and with
        # ZDOT's sums (zdotdq times the same settings with two launches, the default)
        step "dqdkab_onelaunch_${z//,/+}" 120 env MMM_LA_SPLIT_DQDK=0 MMM_LA_ZDOT=$z \
          python scripts/gpu_la_ab.py --label "split=0 zdot=$z"; done ;;
    zdottest) step zdottest 120 env MMM_LA_ZDOT=1 python -m pytest -v --tb=short -m gpu -p no:cacheprovider \
        tests/test_linear_attention_kernel.py -k "normalizer_sums or bf16" ;;
    zdotbisect) for kern in chunk_state fwd dqdk; do  # which kernel's ZDOT is wrong: one process each
        step "zdot_$kern" 120 env MMM_LA_ZDOT=$kern python -m pytest -v --tb=line -m gpu -p no:cacheprovider \
          tests/test_linear_attention_kernel.py -k normalizer_sums; done ;;
    zdotsan) step zdotsan 200 env MMM_LA_ZDOT=fwd compute-sanitizer --tool memcheck --print-limit 5 \
        python -m pytest -x -q --tb=line -m gpu -p no:cacheprovider tests/test_linear_attention_kernel.py \
        -k "normalizer_sums and True-64" ;;  # where fwd_kernel's ZDOT faults (global or shared, which instruction)
    zdot) for z in 0 1; do  # linear attention per kernel, chunk_state's normalizer sums as dots off, then on
        step "la_zdot$z" 150 env MMM_LA_ZDOT=$z python scripts/gpu_la_breakdown.py; done ;;
    window) step window 240 python scripts/gpu_window_tune.py --budget-s 170 ;;
    ncu) step ncu 240 python scripts/gpu_ncu.py --profile ;;
    capsweep) step capsweep 280 python scripts/gpu_linear_attention_configs.py --budget-s 200 --only \
      fwd_kernel=64,32,4,1,168 fwd_kernel=16,32,4,2,168 bwd_dv_kernel=64,32,4,1,168 bwd_dv_kernel=64,32,4,2,168 \
      chunk_state_kernel=64,32,4,1,128 chunk_state_kernel=64,128,8,2,168 bwd_dqdk_kernel=64,16,4,1,168 \
      bwd_dqdk_kernel=64,16,4,3,168 ;;  # register caps (session 15): each vs the baseline at 8k, tests included
    sanitize) step sanitize 300 python scripts/gpu_linear_attention_configs.py --sanitize --budget-s 200 \
      --only fwd_kernel=64,128,8,2 bwd_dv_kernel=64,128,8,2 fwd_kernel=64,64,8,2 ;;
    *) echo "unknown phase $phase" | tee -a "$OUT/steps.txt" ;;
  esac
done
cat "$OUT/steps.txt" 2>/dev/null
pack
