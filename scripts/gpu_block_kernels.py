"""H200: correctness, then timing of the block-diagonal and Monarch Triton kernels (src/mmm/ops/{blockdiag,monarch})
against dense cuBLAS, the naive bmm reference (eager and torch.compile) and, per launch, the roofline floor.

    PYTHONPATH=src python scripts/gpu_block_kernels.py        (about 5-7 min; writes $OUT/gpu_block_kernels.json)

Sections, each saved to the JSON as soon as it is done (BLOCK_BENCH_BUDGET_S, default 420 s, stops new work):
 1. roofline rates measured now (bf16 matmul TFLOP/s, copy GB/s);
 2. correctness in bf16 at small odd shapes and at the benchmark shapes: output and every gradient against
    fp64, pass = kernel error <= 2x PyTorch's own bf16 error; outputs NaN-poisoned before each launch;
    this also runs the autotuning of every benchmark shape, so the timings below exclude it;
 3. n = 8192 tokens, d in {16384, 4096, 32768}: dense F.linear vs ours vs naive eager (vs torch.compile of naive
    at d = 16384), fwd and fwd+bwd (gradients of x and all weights, no accumulation), with each launch timed
    alone against its floor max(FLOPs / rate, bytes / bandwidth), and the targets checked;
 4. when to multiply by a pre-merged dense matrix instead (few tokens): entries for MERGED_DENSE_MAX_TOKENS.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
if os.environ.get("BLOCK_BENCH_SMOKE") == "1":  # see SMOKE below; must precede the kernel imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmm.bench.machine import measure_rates  # noqa: E402
from mmm.bench.timing import TimerSettings, median_ms  # noqa: E402
from mmm.ops.blockdiag import kernels as bk  # noqa: E402
from mmm.ops.blockdiag import naive as bd_naive  # noqa: E402
from mmm.ops.blockdiag import op as bd_op  # noqa: E402
from mmm.ops.monarch import kernels as mk  # noqa: E402
from mmm.ops.monarch import naive as mo_naive  # noqa: E402
from mmm.ops.monarch import op as mo_op  # noqa: E402

OUT = os.environ.get("OUT", ".")
BUDGET_S = float(os.environ.get("BLOCK_BENCH_BUDGET_S", "420"))
T0 = time.time()
BF = torch.bfloat16
E = 2  # bytes per bf16 element
TARGET_SPEEDUP = {("monarch", 4): 1.9, ("monarch", 16): 6.0, ("monarch", 128): 25.0}
# BLOCK_BENCH_SMOKE=1 runs every code path of this script on CPU under TRITON_INTERPRET=1 at toy sizes
# (a check of the script itself before it spends GPU time; its numbers mean nothing).
SMOKE = os.environ.get("BLOCK_BENCH_SMOKE") == "1"
if SMOKE:
    DEV, N_TOK, D_LIST, HEADLINE_D = torch.device("cpu"), 20, (32, 16, 64), 32
    MONARCH_B, BLOCKDIAG_B, SMALL_N = (2, 4, 8), (2, 4), 17
    TIMER = TimerSettings(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1)
    SMALL_CASES = [("monarch", 4, 32, 32, None), ("monarch", 3, 18, 12, 5), ("blockdiag", 4, 32, 16, None)]
    MERGE_CASES, MERGE_TOKENS = [("monarch", 4, 32, 32)], (1, 16)
else:
    DEV, N_TOK, D_LIST, HEADLINE_D = torch.device("cuda"), 8192, (16384, 4096, 32768), 16384
    MONARCH_B, BLOCKDIAG_B, SMALL_N = (4, 16, 128), (4, 16), 999
    TIMER = TimerSettings(warmup_ms=10.0, rep_ms=60.0, min_reps=5, max_reps=300)
    SMALL_CASES = [("monarch", 4, 1024, 1024, None), ("monarch", 32, 1024, 1024, None), ("monarch", 8, 2048, 1024, None),
                   ("monarch", 3, 96, 48, 5), ("blockdiag", 4, 1024, 1024, None), ("blockdiag", 16, 1024, 512, None)]
    MERGE_CASES, MERGE_TOKENS = [("monarch", 4, 1024, 1024), ("monarch", 16, 4096, 4096), ("blockdiag", 4, 1024, 1024)], (1, 16, 64, 256)
RES: dict = {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (smoke)", "notes": [],
             "correctness": [], "cases": []}
if SMOKE:  # the interpreter's fp32 -> bf16 cast truncates (the GPU rounds to nearest): ~2x torch's error
    RES["notes"].append("smoke run: bf16 correctness fails by design under the interpreter (truncating casts)")


def elapsed() -> float:
    return time.time() - T0


def save() -> None:
    RES["elapsed_s"] = round(elapsed(), 1)
    with open(os.path.join(OUT, "gpu_block_kernels.json"), "w") as f:
        json.dump(RES, f, indent=1)


def ms(fn) -> float:
    return median_ms(fn, DEV, TIMER)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------------
# structures under test: (kind, b, in, out) -> weights and the three ways to multiply
# --------------------------------------------------------------------------------------------------

class Case:
    def __init__(self, kind: str, b: int, d_in: int, d_out: int, dtype=BF, block_rank: int | None = None):
        self.kind, self.b, self.d_in, self.d_out = kind, b, d_in, d_out
        p, s = d_in // b, d_out // b
        if kind == "monarch":
            self.c = block_rank or max(1, min(d_in, d_out) // (b * b))
            m = b * self.c
            self.weights = [torch.randn(b, m, p, device=DEV, dtype=dtype) / math.sqrt(p),
                            torch.randn(b, s, m, device=DEV, dtype=dtype) / math.sqrt(3 * m)]
        else:
            self.c = None
            self.weights = [torch.randn(b, s, p, device=DEV, dtype=dtype) / math.sqrt(p)]

    @property
    def name(self) -> str:
        return f"{self.kind}_b{self.b}"

    def ours(self, x, *w):  # the Triton kernels (not whatever the dispatch would pick)
        if self.kind == "monarch":
            return mo_op.monarch_matmul(x, *w, self.c, path="triton")
        return bd_op.blockdiag_matmul(x, *w, path="triton")

    def naive(self, x, *w):
        return mo_naive.monarch_matmul(x, *w, self.c) if self.kind == "monarch" else bd_naive.blockdiag_matmul(x, *w)

    def dense(self) -> torch.Tensor:
        """The [out, in] matrix (for the merged-dense comparison)."""
        b, p, s = self.b, self.d_in // self.b, self.d_out // self.b
        if self.kind == "monarch":
            L, R = self.weights
            c = self.c
            return torch.einsum("lskt,kltp->lskp", R.view(b, s, b, c), L.view(b, b, c, p)).reshape(self.d_out, self.d_in)
        (w,) = self.weights
        return torch.block_diag(*w)

    # ---- stage launches, each with its roofline floor ----
    def stages(self, N: int):
        """[(name, fn, flops, bytes)] for every launch of forward and backward, plus the unfused
        alternative of a fused backward stage (to check that the fusion pays)."""
        b, p, s = self.b, self.d_in // self.b, self.d_out // self.b
        x = torch.randn(N, self.d_in, device=DEV, dtype=BF)
        dout = torch.randn(N, self.d_out, device=DEV, dtype=BF)
        out = torch.empty(N, self.d_out, device=DEV, dtype=BF)
        dx = torch.empty_like(x)
        runs = []

        def add(name, P, Q, fwd_fn, bwd_fn):
            w_bytes = E * b * P * Q
            fl = 2.0 * N * b * P * Q
            runs.append((f"{name}.fwd", fwd_fn, fl, E * N * b * (P + Q) + w_bytes))
            fused = bk.fused_backward_fits(P, Q)
            bwd_bytes = E * N * b * (P + 2 * Q) + 2 * w_bytes if fused else 2 * E * N * b * (P + Q) + 2 * w_bytes
            runs.append((f"{name}.bwd" + ("(fused)" if fused else ""), bwd_fn, 2 * fl, bwd_bytes))
            if fused:
                def unfused():
                    saved = bk.FUSED_BACKWARD_MAX
                    bk.FUSED_BACKWARD_MAX = 0
                    try:
                        bwd_fn()
                    finally:
                        bk.FUSED_BACKWARD_MAX = saved
                runs.append((f"{name}.bwd(two launches)", unfused, 2 * fl, 2 * E * N * b * (P + Q) + 2 * w_bytes))

        if self.kind == "monarch":
            L, R = self.weights
            c, m = self.c, b * self.c
            mid = torch.empty(b, m, N, device=DEV, dtype=BF)
            dmid = torch.empty_like(mid)
            add("stage1", m, p,
                lambda: bk.stage_forward(bk.rows_of(x, p), L, mk.mid_by_input_block(mid), N),
                lambda: bk.stage_backward(mk.mid_by_input_block(dmid), bk.rows_of(x, p), L, bk.rows_of(dx, p), N))
            add("stage2", s, m,
                lambda: bk.stage_forward(mk.mid_by_output_block(mid, c), R, bk.rows_of(out, s), N),
                lambda: bk.stage_backward(bk.rows_of(dout, s), mk.mid_by_output_block(mid, c), R,
                                          mk.mid_by_output_block(dmid, c), N))
            # The same block GEMM as stage 1 through cuBLAS (strided batched, no shuffle): how far the
            # Triton tile loop is from the vendor GEMM on this shape.
            xb, Lt = x.view(N, b, p).transpose(0, 1), L.transpose(1, 2)
            runs.append(("stage1.fwd as cuBLAS bmm (no shuffle)", lambda: torch.bmm(xb, Lt), 2.0 * N * b * m * p,
                         E * (N * b * (m + p) + b * m * p)))
        else:
            (w,) = self.weights
            add("blocks", s, p,
                lambda: bk.stage_forward(bk.rows_of(x, p), w, bk.rows_of(out, s), N),
                lambda: bk.stage_backward(bk.rows_of(dout, s), bk.rows_of(x, p), w, bk.rows_of(dx, p), N))
        return runs

    def flops_fwd(self, N: int) -> float:
        b, p, s = self.b, self.d_in // self.b, self.d_out // self.b
        if self.kind == "monarch":
            return 2.0 * N * b * self.b * self.c * (p + s)
        return 2.0 * N * b * p * s


def grads_of(fn, inputs, g):
    inputs = [t.detach().requires_grad_() for t in inputs]
    y = fn(*inputs)
    return [y, *torch.autograd.grad(y, inputs, g)]


# --------------------------------------------------------------------------------------------------
# 2. correctness
# --------------------------------------------------------------------------------------------------

def check(case: Case, N: int) -> bool:
    x = torch.randn(N, case.d_in, device=DEV, dtype=BF)
    g = torch.randn(N, case.d_out, device=DEV, dtype=BF)
    inputs = [x, *case.weights]
    bk.POISON_OUTPUTS = True
    try:
        ours = grads_of(case.ours, inputs, g)
    finally:
        bk.POISON_OUTPUTS = False
    torch_bf16 = grads_of(case.naive, inputs, g)
    ref = grads_of(case.naive, [t.double() for t in inputs], g.double())
    names = ["out", "dx"] + (["dL", "dR"] if case.kind == "monarch" else ["dw"])
    rows, ok = {}, True
    for nm, a, t, r in zip(names, ours, torch_bf16, ref):
        ea, et = rel(a, r), rel(t, r)
        good = math.isfinite(ea) and ea <= 2 * et + 1e-6
        ok &= good
        rows[nm] = dict(ours=ea, torch_bf16=et, ok=good)
    RES["correctness"].append(dict(case=case.name, N=N, d_in=case.d_in, d_out=case.d_out, c=case.c, errors=rows, ok=ok))
    print(f"  {case.name:14s} N={N:5d} {case.d_in}->{case.d_out} c={case.c}: "
          + " ".join(f"{k}={v['ours']:.1e}/{v['torch_bf16']:.1e}" for k, v in rows.items()) + ("  ok" if ok else "  FAIL"),
          flush=True)
    return ok


# --------------------------------------------------------------------------------------------------
# 3. timing
# --------------------------------------------------------------------------------------------------

def fwd_and_fwdbwd(fn, inputs):
    """(fwd ms, fwd+bwd ms) as in training: inputs require grad (so the forward also keeps what backward
    needs, and a compiled fn compiles one graph), gradients of every input through autograd.grad (no
    accumulation into .grad)."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    g = torch.randn_like(fn(*inputs))

    def step():
        torch.autograd.grad(fn(*inputs), inputs, g)

    return ms(lambda: fn(*inputs)), ms(step)


def time_case(case: Case, dense_fb: float, dense_f: float, rates: dict, compile_naive: bool) -> dict:
    N = N_TOK
    x = torch.randn(N, case.d_in, device=DEV, dtype=BF)
    row = dict(case=case.name, d_in=case.d_in, d_out=case.d_out, c=case.c, N=N)
    row["ours_fwd"], row["ours_fwdbwd"] = fwd_and_fwdbwd(case.ours, [x, *case.weights])
    row["naive_eager_fwd"], row["naive_eager_fwdbwd"] = fwd_and_fwdbwd(case.naive, [x, *case.weights])
    if compile_naive:
        try:
            row["naive_compiled_fwd"], row["naive_compiled_fwdbwd"] = fwd_and_fwdbwd(torch.compile(case.naive), [x, *case.weights])
        except Exception as e:  # report, keep going
            row["naive_compiled_error"] = repr(e)[:300]
    row["speedup_fwdbwd_vs_dense"] = dense_fb / row["ours_fwdbwd"]
    row["speedup_fwd_vs_dense"] = dense_f / row["ours_fwd"]
    row["bwd_over_fwd"] = (row["ours_fwdbwd"] - row["ours_fwd"]) / row["ours_fwd"]
    # every launch alone, against its floor
    floor = dict(fwd=0.0, bwd=0.0)
    launches = []
    for name, fn, fl, nbytes in case.stages(N):
        # Stage functions called outside the ops must launch directly: through wrap_triton's tracing
        # wrapper every call re-ran the autotuning of block_gemm_kernel (~0.8 s per "launch" in the
        # 2026-11-28 run). See kernels.eager_launches.
        with bk.eager_launches():
            t = ms(fn)
        fl_ms = 1e3 * max(fl / (rates["matmul_tflops"] * 1e12), nbytes / (rates["copy_gbps"] * 1e9))
        launches.append(dict(launch=name, ms=t, floor_ms=fl_ms, over_floor=t / fl_ms,
                             tflops=fl / t / 1e9, gbps=nbytes / t / 1e6))
        if ".fwd" in name and "cuBLAS" not in name:
            floor["fwd"] += fl_ms
        if ".bwd" in name and "two launches" not in name:
            floor["bwd"] += fl_ms
    row["launches"] = launches
    row["floor_fwd_ms"], row["floor_bwd_ms"] = floor["fwd"], floor["bwd"]
    row["fwd_over_floor"] = row["ours_fwd"] / floor["fwd"]
    row["bwd_over_floor"] = (row["ours_fwdbwd"] - row["ours_fwd"]) / floor["bwd"]
    # the floor of the whole product if nothing but x, the weights and y crossed memory
    params = sum(w.numel() for w in case.weights)
    ideal = 1e3 * max(3 * case.flops_fwd(N) / (rates["matmul_tflops"] * 1e12),
                      E * (3 * N * (case.d_in + case.d_out) + 3 * params) / (rates["copy_gbps"] * 1e9))
    row["ideal_fwdbwd_ms"] = ideal
    target = TARGET_SPEEDUP.get((case.kind, case.b)) if case.d_in == HEADLINE_D else None
    if target:
        row["target_speedup"] = target
        row["meets_target"] = row["speedup_fwdbwd_vs_dense"] >= target
    return row


def print_case(row: dict) -> None:
    comp = row.get("naive_compiled_fwdbwd")
    print(f"  {row['case']:14s} d={row['d_in']:5d}  ours fwd {row['ours_fwd']:7.3f}  f+b {row['ours_fwdbwd']:7.3f} ms"
          f"  x{row['speedup_fwdbwd_vs_dense']:5.2f} vs dense" + (f" (target {row['target_speedup']})" if "target_speedup" in row else "")
          + f"  | naive eager f+b {row['naive_eager_fwdbwd']:7.3f}" + (f"  compiled {comp:7.3f}" if comp else "")
          + f"  | fwd/floor {row['fwd_over_floor']:4.2f}  bwd/floor {row['bwd_over_floor']:4.2f}  bwd/fwd {row['bwd_over_fwd']:4.2f}",
          flush=True)
    for ln in row["launches"]:
        print(f"      {ln['launch']:38s} {ln['ms']:7.3f} ms  floor {ln['floor_ms']:7.3f}  x{ln['over_floor']:5.2f}"
              f"  {ln['tflops']:6.1f} TFLOP/s  {ln['gbps']:7.1f} GB/s", flush=True)


# --------------------------------------------------------------------------------------------------
# 4. merged dense for few tokens
# --------------------------------------------------------------------------------------------------

def merged_dense_crossover(case: Case) -> dict:
    W = case.dense()
    row = dict(case=case.name, d=case.d_in, tokens={})
    largest, dense_wins_so_far = 0, True
    for N in MERGE_TOKENS:
        x = torch.randn(N, case.d_in, device=DEV, dtype=BF)
        with torch.no_grad():
            t_s = ms(lambda: case.ours(x, *case.weights))
            t_d = ms(lambda: F.linear(x, W))
        row["tokens"][N] = dict(structured_ms=t_s, merged_dense_ms=t_d)
        dense_wins_so_far &= t_d < t_s
        if dense_wins_so_far:
            largest = N  # dense faster at every measured count up to here
    row["max_tokens_dense_faster"] = largest
    return row


def main() -> int:
    torch.manual_seed(0)
    print(f"device: {RES['device']}   budget {BUDGET_S:.0f} s", flush=True)
    rates = measure_rates(DEV, BF, quick=SMOKE)
    RES["rates"] = rates
    print(f"rates: matmul {rates['matmul_tflops']:.0f} TFLOP/s, copy {rates['copy_gbps']:.0f} GB/s", flush=True)
    save()

    print("correctness (rel. error vs fp64: ours / torch bf16; pass = ours <= 2x torch)", flush=True)
    ok = True
    for kind, b, d_in, d_out, c in SMALL_CASES:
        ok &= check(Case(kind, b, d_in, d_out, block_rank=c), SMALL_N)

    def cases_at(d):
        return [Case("monarch", b, d, d) for b in MONARCH_B] + [Case("blockdiag", b, d, d) for b in BLOCKDIAG_B]

    bench_cases = {d: cases_at(d) for d in D_LIST[:2]}
    for case in bench_cases[D_LIST[0]] + bench_cases[D_LIST[1]]:
        ok &= check(case, N_TOK)
        save()
    RES["correct"] = ok
    save()
    if not ok:
        print("CORRECTNESS FAILED: timings below are of a wrong kernel", flush=True)

    print(f"timing (n={N_TOK}, bf16; ms are medians; floor = max(FLOPs/rate, bytes/bandwidth) per launch)", flush=True)
    for d in D_LIST:
        if elapsed() > BUDGET_S * (0.75 if d == D_LIST[2] else 0.9):
            RES["notes"].append(f"d={d} skipped: time budget")
            print(f"d={d}: skipped (time budget)", flush=True)
            continue
        try:
            x = torch.randn(N_TOK, d, device=DEV, dtype=BF)
            W = torch.randn(d, d, device=DEV, dtype=BF) / math.sqrt(d)
            dense_f, dense_fb = fwd_and_fwdbwd(F.linear, [x, W])
            del W
            torch.cuda.empty_cache()
            RES["cases"].append(dict(case="dense", d_in=d, d_out=d, N=N_TOK, fwd=dense_f, fwdbwd=dense_fb))
            print(f"  dense          d={d:5d}  fwd {dense_f:7.3f}  f+b {dense_fb:7.3f} ms", flush=True)
            cases = bench_cases.get(d) or cases_at(d)
            for case in cases:
                if elapsed() > BUDGET_S:
                    RES["notes"].append(f"{case.name} d={d} skipped: time budget")
                    continue
                compile_naive = d == HEADLINE_D and not SMOKE and elapsed() < 0.6 * BUDGET_S
                row = time_case(case, dense_fb, dense_f, rates, compile_naive)
                RES["cases"].append(row)
                print_case(row)
                save()
                del case.weights
                torch.cuda.empty_cache()
        except torch.cuda.OutOfMemoryError as e:
            RES["notes"].append(f"d={d}: out of memory: {e!r}"[:300])
            torch.cuda.empty_cache()

    if elapsed() < BUDGET_S:
        print("merged dense vs structured forward, few tokens (no grad):", flush=True)
        table = {}
        for kind, b, d_in, d_out in MERGE_CASES:
            if elapsed() > BUDGET_S:
                break
            case = Case(kind, b, d_in, d_out)
            row = merged_dense_crossover(case)
            RES.setdefault("merged_dense", []).append(row)
            key = (case.kind, case.d_in, case.d_out, case.b, "bfloat16")
            table[str(key)] = row["max_tokens_dense_faster"]
            print(f"  {case.name} d={case.d_in}: " + "  ".join(
                f"N={n}: {v['structured_ms']:.4f}/{v['merged_dense_ms']:.4f}" for n, v in row["tokens"].items())
                + f"  -> MERGED_DENSE_MAX_TOKENS[{key}] = {row['max_tokens_dense_faster']}", flush=True)
        RES["merged_dense_table"] = table

    RES["autotune"] = {
        "block_gemm": {str(k): str(v) for k, v in getattr(bk.block_gemm_kernel, "cache", {}).items()},
        "block_bwd_fused": {str(k): str(v) for k, v in getattr(bk.block_bwd_fused_kernel, "cache", {}).items()},
    }
    save()

    print("\nsummary (fwd+bwd, n=8192, bf16):", flush=True)
    print(f"  {'case':14s} {'d':>6s} {'ours ms':>8s} {'dense ms':>8s} {'speedup':>8s} {'target':>7s} {'naive':>8s} {'compiled':>8s}"
          f" {'fwd/fl':>6s} {'bwd/fl':>6s} {'b/f':>5s}", flush=True)
    dense = {r["d_in"]: r for r in RES["cases"] if r["case"] == "dense"}
    for r in RES["cases"]:
        if r["case"] == "dense":
            continue
        comp = r.get("naive_compiled_fwdbwd")
        print(f"  {r['case']:14s} {r['d_in']:6d} {r['ours_fwdbwd']:8.3f} {dense[r['d_in']]['fwdbwd']:8.3f} "
              f"{r['speedup_fwdbwd_vs_dense']:8.2f} {str(r.get('target_speedup', '')):>7s} {r['naive_eager_fwdbwd']:8.3f} "
              f"{(f'{comp:8.3f}' if comp else '       -')} {r['fwd_over_floor']:6.2f} {r['bwd_over_floor']:6.2f} {r['bwd_over_fwd']:5.2f}"
              + ("" if "meets_target" not in r else ("  MEETS" if r["meets_target"] else "  misses")), flush=True)
    print(f"correct: {RES.get('correct')}   elapsed {elapsed():.0f} s   json: {os.path.join(OUT, 'gpu_block_kernels.json')}", flush=True)
    return 0 if RES.get("correct") else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        RES["error"] = traceback.format_exc()[-2000:]
        save()
        sys.exit(2)
