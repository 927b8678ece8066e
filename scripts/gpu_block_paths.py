"""H200: every path of the block-diagonal and Monarch products, checked, then timed side by side; writes the
dispatch table the package reads (src/mmm/ops/blockdiag/dispatch_table.json) and, for few tokens, the
merged-dense table (MERGED_DENSE_MAX_TOKENS in src/mmm/ops/blockdiag/op.py).

    PYTHONPATH=src python scripts/gpu_block_paths.py          (under 6 min; $OUT/gpu_block_paths.json,
                                                               $OUT/dispatch_table.json, $OUT/merged_dense_table.json)
    BLOCK_PATHS_SMOKE=1 PYTHONPATH=src python scripts/gpu_block_paths.py   (CPU, TRITON_INTERPRET, toy sizes,
                                                               fp32: checks this script; numbers mean nothing)

Paths: "triton" (fused backward v2, the default), "triton_v1" (the original fused backward) and
"triton_2launch" (no fused backward) where a fused backward applies, "cublas" (strided bmm, split
shuffle), "cublas_copy" (Monarch: bmm + one permute copy per shuffle), "reference" (eager bmm + permute
PyTorch), and dense F.linear.
 1. rates measured now (bf16 matmul TFLOP/s, copy GB/s) for the floors;
 2. no-copy check: aten ops and CUDA kernels of each cuBLAS path's fwd+bwd under torch.profiler
    (expected copies: cublas 0, cublas_copy 2, both one per direction);
 3. per case (n = 8192 tokens; d = 16384 first, then 4096; Monarch b in 4, 16, 128, block-diagonal b in 4, 16):
    correctness of every path in bf16 against fp64 (output and every gradient; pass = error <= 2x the
    eager bf16 reference's own error; outputs NaN-poisoned), which also runs the autotuning; then fwd and
    fwd+bwd of every path and of dense; then every launch / GEMM alone against its floor
    max(FLOPs / rate, bytes / bandwidth) (bytes: each operand once);
 4. the dispatch table: per case the fastest correct path by fwd+bwd (among dispatch.PATHS: triton, cublas,
    cublas_copy, reference);
 5. last, merged dense for few tokens (inference, no grad): per layer of MERGE_CASES, after the correctness
    check of its paths, the forward through the pre-merged dense matrix against the fastest correct structured
    path at each of MERGE_TOKENS; the largest count up to which dense won every time is the layer's
    MERGED_DENSE_MAX_TOKENS entry.
The JSON is rewritten after every case; BLOCK_PATHS_BUDGET_S (default 280) stops new cases, section 5's included.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
SMOKE = os.environ.get("BLOCK_PATHS_SMOKE") == "1"
if SMOKE:  # must precede the kernel imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmm.bench.machine import measure_rates  # noqa: E402
from mmm.bench.timing import TimerSettings, median_ms  # noqa: E402
from mmm.ops.blockdiag import cublas as bc  # noqa: E402
from mmm.ops.blockdiag import dispatch  # noqa: E402
from mmm.ops.blockdiag import kernels as bk  # noqa: E402
from mmm.ops.blockdiag import naive as bd_naive  # noqa: E402
from mmm.ops.blockdiag import op as bd_op  # noqa: E402
from mmm.ops.monarch import cublas as mc  # noqa: E402
from mmm.ops.monarch import kernels as mk  # noqa: E402
from mmm.ops.monarch import naive as mo_naive  # noqa: E402
from mmm.ops.monarch import op as mo_op  # noqa: E402

OUT = os.environ.get("OUT", ".")
os.makedirs(OUT, exist_ok=True)
BUDGET_S = float(os.environ.get("BLOCK_PATHS_BUDGET_S", "280"))
T0 = time.time()
TARGET_SPEEDUP = {("monarch", 4): 1.9, ("monarch", 16): 6.0, ("monarch", 128): 25.0}
if SMOKE:
    DEV, DT, N_TOK, D_LIST, HEADLINE_D = torch.device("cpu"), torch.float32, 24, (64, 32), 64
    MONARCH_B, BLOCKDIAG_B = (2, 4), (2, 4)
    SMALL = [("monarch", 3, 18, 12, 5, 7), ("blockdiag", 3, 15, 9, None, 1)]  # kind, b, in, out, c, N
    PROFILE_CASES = [("monarch", 2, 16, 16, 8), ("blockdiag", 2, 16, 16, 8)]  # kind, b, in, out, N
    TIMER = TimerSettings(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1)
    MERGE_CASES, MERGE_TOKENS = [("monarch", 2, 16, 16), ("blockdiag", 2, 16, 8)], (1, 8)  # kind, b, in, out
else:
    DEV, DT, N_TOK, D_LIST, HEADLINE_D = torch.device("cuda"), torch.bfloat16, 8192, (16384, 4096), 16384
    MONARCH_B, BLOCKDIAG_B = (4, 16, 128), (4, 16)
    SMALL = [("monarch", 3, 96, 48, 5, 999), ("monarch", 4, 1024, 512, 64, 1), ("monarch", 32, 1024, 1024, None, 777),
             ("blockdiag", 3, 96, 48, None, 999), ("blockdiag", 4, 1024, 2048, None, 1)]
    PROFILE_CASES = [("monarch", 4, 4096, 4096, 512), ("monarch", 16, 4096, 4096, 512),
                     ("blockdiag", 4, 4096, 4096, 512)]
    TIMER = TimerSettings(warmup_ms=10.0, rep_ms=50.0, min_reps=5, max_reps=200)
    MERGE_CASES = [("monarch", 4, 1024, 1024), ("monarch", 16, 4096, 4096), ("blockdiag", 4, 1024, 1024)]
    MERGE_TOKENS = (1, 16, 64, 256)
E = torch.tensor([], dtype=DT).element_size()
RES: dict = {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (smoke)", "dtype": str(DT),
             "notes": [], "no_copy_check": [], "correctness": [], "cases": [], "merged_dense": []}


def elapsed() -> float:
    return time.time() - T0


def save() -> None:
    RES["elapsed_s"] = round(elapsed(), 1)
    with open(os.path.join(OUT, "gpu_block_paths.json"), "w") as f:
        json.dump(RES, f, indent=1)


def ms(fn) -> float:
    return median_ms(fn, DEV, TIMER)


def write_table(file_name: str, about: str, entries: list[dict], **extra) -> str:
    """A measured table for the package, under $OUT, stamped with the device and date; returns its path."""
    path = os.path.join(OUT, file_name)
    table = {"about": about, "device": RES["device"], "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             **extra, "entries": entries}
    with open(path, "w") as fh:
        json.dump(table, fh, indent=1)
    return path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@contextlib.contextmanager
def fused_backward(variant: str | None = None, enabled: bool = True):
    """Run the Triton path with fused backward `variant` ("v1"/"v2"), or without the fused backward."""
    saved = bk.FUSED_BACKWARD_VARIANT, bk.FUSED_BACKWARD_MAX
    bk.FUSED_BACKWARD_VARIANT = variant or saved[0]
    bk.FUSED_BACKWARD_MAX = saved[1] if enabled else 0
    try:
        yield
    finally:
        bk.FUSED_BACKWARD_VARIANT, bk.FUSED_BACKWARD_MAX = saved


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------

class Case:
    def __init__(self, kind: str, b: int, d_in: int, d_out: int, block_rank: int | None = None):
        self.kind, self.b, self.d_in, self.d_out = kind, b, d_in, d_out
        self.p, self.s = d_in // b, d_out // b
        if kind == "monarch":
            self.c = block_rank or max(1, min(d_in, d_out) // (b * b))
            self.m = b * self.c
            self.weights = [torch.randn(b, self.m, self.p, device=DEV, dtype=DT) / math.sqrt(self.p),
                            torch.randn(b, self.s, self.m, device=DEV, dtype=DT) / math.sqrt(3 * self.m)]
        else:
            self.c = None
            self.weights = [torch.randn(b, self.s, self.p, device=DEV, dtype=DT) / math.sqrt(self.p)]

    @property
    def name(self) -> str:
        return f"{self.kind}_b{self.b}"

    def fused_applies(self) -> bool:
        if self.kind == "monarch":
            return bk.fused_backward_fits(self.m, self.p) or bk.fused_backward_fits(self.s, self.m)
        return bk.fused_backward_fits(self.s, self.p)

    def paths(self) -> list[str]:
        out = ["triton"] + (["triton_v1", "triton_2launch"] if self.fused_applies() else [])
        return out + ["cublas"] + (["cublas_copy"] if self.kind == "monarch" else []) + ["reference"]

    def fn(self, path: str):
        """The product x, *weights -> y through `path` (a differentiable callable)."""
        if path == "reference":
            if self.kind == "monarch":
                return lambda x, L, R: mo_naive.monarch_matmul(x, L, R, self.c)
            return bd_naive.blockdiag_matmul
        base = path.split("_v1")[0].split("_2launch")[0]
        if self.kind == "monarch":
            call = lambda x, L, R: mo_op.monarch_matmul(x, L, R, self.c, path=base)  # noqa: E731
        else:
            call = lambda x, w: bd_op.blockdiag_matmul(x, w, path=base)  # noqa: E731
        if path == "triton_v1":
            ctx = lambda: fused_backward("v1")  # noqa: E731
        elif path == "triton_2launch":
            ctx = lambda: fused_backward(enabled=False)  # noqa: E731
        else:
            return call

        def wrapped(*args):  # the variant must be in force during backward too: see fwd_and_fwdbwd
            with ctx():
                return call(*args)
        wrapped.ctx = ctx
        return wrapped

    def flops_fwd(self, N: int) -> float:
        if self.kind == "monarch":
            return 2.0 * N * self.b * self.m * (self.p + self.s)
        return 2.0 * N * self.b * self.p * self.s


def _torch_swap(z, b, c):
    """The copy shuffle as PyTorch's strided copy_ (mc.SHUFFLE_BY_TRITON off), to time beside the kernel."""
    previous, mc.SHUFFLE_BY_TRITON = mc.SHUFFLE_BY_TRITON, False
    try:
        return mc._swap_blocks(z, b, c)
    finally:
        mc.SHUFFLE_BY_TRITON = previous


def grads_of(fn, inputs, g):
    inputs = [t.detach().requires_grad_() for t in inputs]
    ctx = getattr(fn, "ctx", contextlib.nullcontext)
    with ctx():
        y = fn(*inputs)
        return [y, *torch.autograd.grad(y, inputs, g)]


# --------------------------------------------------------------------------------------------------
# correctness and the no-copy check
# --------------------------------------------------------------------------------------------------

def check(case: Case, N: int) -> dict[str, bool]:
    """Every path against fp64; returns {path: ok}."""
    x = torch.randn(N, case.d_in, device=DEV, dtype=DT)
    g = torch.randn(N, case.d_out, device=DEV, dtype=DT)
    inputs = [x, *case.weights]
    ref = grads_of(case.fn("reference"), [t.double() for t in inputs], g.double())
    own = [rel(a, r) for a, r in zip(grads_of(case.fn("reference"), inputs, g), ref)]
    names = ["out", "dx"] + (["dL", "dR"] if case.kind == "monarch" else ["dw"])
    result = {}
    for path in case.paths():
        if path == "reference":
            continue
        bk.POISON_OUTPUTS = bc.POISON_OUTPUTS = True
        try:
            got = grads_of(case.fn(path), inputs, g)
        except Exception as e:  # record it and go on: one broken path must not cost the whole run
            result[path] = False
            RES["correctness"].append(dict(case=case.name, N=N, d_in=case.d_in, path=path, ok=False, error=repr(e)[:500]))
            print(f"  check {case.name:13s} N={N:5d} {path:15s} ERROR {e!r}"[:400], flush=True)
            continue
        finally:
            bk.POISON_OUTPUTS = bc.POISON_OUTPUTS = False
        errs = {nm: rel(a, r) for nm, a, r in zip(names, got, ref)}
        ok = all(math.isfinite(e) and e <= 2 * t + 1e-6 for e, t in zip(errs.values(), own))
        result[path] = ok
        RES["correctness"].append(dict(case=case.name, N=N, d_in=case.d_in, d_out=case.d_out, c=case.c, path=path,
                                       errors=errs, reference_bf16_errors=dict(zip(names, own)), ok=ok))
        print(f"  check {case.name:13s} N={N:5d} {case.d_in}->{case.d_out} c={case.c} {path:15s} "
              + " ".join(f"{k}={v:.1e}/{t:.1e}" for (k, v), t in zip(errs.items(), own)) + ("  ok" if ok else "  FAIL"),
              flush=True)
        del got
    return result


COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")


def no_copy_check(kind: str, b: int, d_in: int, d_out: int, N: int) -> bool:
    """Profile one fwd+bwd of each cuBLAS path: count aten copy ops and list the CUDA kernels."""
    case = Case(kind, b, d_in, d_out)
    expected = {"cublas": 0, "cublas_copy": 2}
    ok = True
    for path in ("cublas", "cublas_copy") if kind == "monarch" else ("cublas",):
        inputs = [t.detach().requires_grad_() for t in [torch.randn(N, d_in, device=DEV, dtype=DT), *case.weights]]
        g = torch.randn(N, d_out, device=DEV, dtype=DT)
        fn = case.fn(path)
        # on CPU the shuffle kernel runs in the interpreter, whose own tensor traffic would count as copies
        shuffle_by_triton, mc.SHUFFLE_BY_TRITON = mc.SHUFFLE_BY_TRITON, mc.SHUFFLE_BY_TRITON and DEV.type == "cuda"
        torch.autograd.grad(fn(*inputs), inputs, g)  # warm up (lazy init outside the profile)
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            torch.autograd.grad(fn(*inputs), inputs, g)
            if DEV.type == "cuda":
                torch.cuda.synchronize()
        mc.SHUFFLE_BY_TRITON = shuffle_by_triton
        events = prof.events()
        on_gpu = lambda e: getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA  # noqa: E731
        # a copy is an aten copy op or a launch of the Triton shuffle copy (mk.swap_blocks)
        copies = [e.name for e in events if e.name in COPY_OPS or (on_gpu(e) and e.name.startswith("swap_blocks_kernel"))]
        kernels = sorted({e.name[:90] for e in events if on_gpu(e)})
        good = len(copies) == expected[path]
        ok &= good
        RES["no_copy_check"].append(dict(case=case.name, d=d_in, N=N, c=case.c, path=path, copy_ops=copies,
                                         expected=expected[path], ok=good, cuda_kernels=kernels))
        print(f"  no-copy {case.name:13s} c={case.c} {path:12s}: {len(copies)} copy op(s) (expected {expected[path]})"
              f" {'ok' if good else 'FAIL'}; kernels: {kernels}", flush=True)
    return ok


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------

def fwd_and_fwdbwd(fn, inputs):
    """(fwd ms, fwd+bwd ms) as in training: inputs require grad, gradients of every input through
    autograd.grad (no accumulation). A path variant (fn.ctx) is in force for forward and backward."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    ctx = getattr(fn, "ctx", contextlib.nullcontext)
    with ctx():
        g = torch.randn_like(fn(*inputs))

        def step():
            torch.autograd.grad(fn(*inputs), inputs, g)

        return ms(lambda: fn(*inputs)), ms(step)


def floor_ms(flops: float, nbytes: float, rates: dict) -> float:
    return 1e3 * max(flops / (rates["matmul_tflops"] * 1e12), nbytes / (rates["copy_gbps"] * 1e9))


def launches(case: Case, N: int) -> list[tuple[str, object, float, float]]:
    """[(name, fn, flops, bytes)]: every Triton launch and every cuBLAS GEMM of the case alone."""
    b, p, s = case.b, case.p, case.s
    x = torch.randn(N, case.d_in, device=DEV, dtype=DT)
    dout = torch.randn(N, case.d_out, device=DEV, dtype=DT)
    out = torch.empty(N, case.d_out, device=DEV, dtype=DT)
    dx = torch.empty_like(x)
    runs = []

    def gemm(name, fn, P, Q, extra_bytes=0.0):  # one block GEMM of N x P x Q per block (+ weight)
        runs.append((name, fn, 2.0 * N * b * P * Q, E * (N * b * (P + Q) + b * P * Q) + extra_bytes))

    def triton_stage(name, P, Q, fwd, bwd):
        gemm(f"triton {name}.fwd", fwd, P, Q)
        fused = bk.fused_backward_fits(P, Q)
        w_bytes = E * b * P * Q
        bwd_bytes = (E * N * b * (P + 2 * Q) + 2 * w_bytes) if fused else (2 * E * N * b * (P + Q) + 2 * w_bytes)
        fl = 4.0 * N * b * P * Q
        if fused:
            for tag, ctx in (("fused v2", lambda: fused_backward("v2")), ("fused v1", lambda: fused_backward("v1"))):
                runs.append((f"triton {name}.bwd ({tag})", lambda ctx=ctx: _in(ctx, bwd), fl, bwd_bytes))
            runs.append((f"triton {name}.bwd (two launches)", lambda: _in(lambda: fused_backward(enabled=False), bwd),
                         fl, bwd_bytes))
        else:
            runs.append((f"triton {name}.bwd", bwd, fl, bwd_bytes))

    if case.kind == "monarch":
        L, R = case.weights
        c, m = case.c, case.m
        mid = torch.empty(b, m, N, device=DEV, dtype=DT)
        dmid = torch.empty_like(mid)
        triton_stage("stage1", m, p,
                     lambda: bk.stage_forward(bk.rows_of(x, p), L, mk.mid_by_input_block(mid), N),
                     lambda: bk.stage_backward(mk.mid_by_input_block(dmid), bk.rows_of(x, p), L, bk.rows_of(dx, p), N))
        triton_stage("stage2", s, m,
                     lambda: bk.stage_forward(mk.mid_by_output_block(mid, c), R, bk.rows_of(out, s), N),
                     lambda: bk.stage_backward(bk.rows_of(dout, s), mk.mid_by_output_block(mid, c), R,
                                               mk.mid_by_output_block(dmid, c), N))
        z = mc.stage1(x, L, c, "copy")
        dy = mc.grad_mid(dout, R, c, "copy")
        # the split GEMMs read their other operand b times: (b - 1) extra reads beyond the floor's bytes
        gemm("cublas stage1 (split, no copy)", lambda: mc.stage1(x, L, c, "split"), m, p)
        gemm("cublas stage1 (bmm + copy)", lambda: mc.stage1(x, L, c, "copy"), m, p, 2.0 * E * N * b * m)
        runs.append(("cublas shuffle copy alone", lambda: mc._swap_blocks(z, b, c), 0.0, 2.0 * E * N * b * m))
        runs.append(("cublas shuffle copy alone, torch copy_", lambda: _torch_swap(z, b, c), 0.0, 2.0 * E * N * b * m))
        gemm("cublas stage2", lambda: mc.stage2(z, R), s, m)
        gemm("cublas grad_mid (split, no copy)", lambda: mc.grad_mid(dout, R, c, "split"), s, m)
        gemm("cublas grad_mid (bmm + copy)", lambda: mc.grad_mid(dout, R, c, "copy"), s, m, 2.0 * E * N * b * m)
        gemm("cublas grad_R", lambda: mc.grad_R(dout, z, b), s, m)
        gemm("cublas grad_x", lambda: mc.grad_x(dy, L), m, p)
        gemm("cublas grad_L", lambda: mc.grad_L(dy, x), m, p)
    else:
        (w,) = case.weights
        triton_stage("blocks", s, p,
                     lambda: bk.stage_forward(bk.rows_of(x, p), w, bk.rows_of(out, s), N),
                     lambda: bk.stage_backward(bk.rows_of(dout, s), bk.rows_of(x, p), w, bk.rows_of(dx, p), N))
        gemm("cublas fwd", lambda: bc.forward(x, w), s, p)
        gemm("cublas dx", lambda: torch.bmm(bc.blocks(dout, b), w, out=bc.blocks(dx, b)), s, p)
        gemm("cublas dw", lambda: torch.bmm(bc.blocks(dout, b).mT, bc.blocks(x, b)), s, p)
    return runs


def _in(ctx, fn):
    with ctx():
        return fn()


def time_case(case: Case, dense: dict, rates: dict, good: dict[str, bool]) -> dict:
    N = N_TOK
    x = torch.randn(N, case.d_in, device=DEV, dtype=DT)
    row = dict(case=case.name, kind=case.kind, b=case.b, d_in=case.d_in, d_out=case.d_out, c=case.c, N=N, paths={})
    for path in case.paths():
        if elapsed() > BUDGET_S + 30 or not good.get(path, True):
            row["paths"][path] = dict(skipped="time budget" if good.get(path, True) else "failed the check")
            continue
        f, fb = fwd_and_fwdbwd(case.fn(path), [x, *case.weights])
        row["paths"][path] = dict(fwd=f, fwdbwd=fb, bwd_over_fwd=(fb - f) / f, speedup_fwd=dense["fwd"] / f,
                                  speedup_fwdbwd=dense["fwdbwd"] / fb, correct=good.get(path, True))
    with bk.eager_launches():  # stage functions outside the ops: launch directly (see kernels.eager_launches)
        row["launches"] = []
        for name, fn, fl, nbytes in launches(case, N):
            try:
                t = ms(fn)
            except Exception as e:  # e.g. a variant that failed above
                row["launches"].append(dict(launch=name, error=repr(e)[:300]))
                continue
            fl_ms = floor_ms(fl, nbytes, rates)
            row["launches"].append(dict(launch=name, ms=t, floor_ms=fl_ms, over_floor=t / fl_ms,
                                        tflops=fl / t / 1e9, gbps=nbytes / t / 1e6))
    # the floor of the whole product if only x, the weights, y and (Monarch) the middle crossed memory
    params = sum(w.numel() for w in case.weights)
    mid = 2 * N * case.b * case.m if case.kind == "monarch" else 0  # written + read in fwd, same in bwd
    row["floor_fwd_ms"] = floor_ms(case.flops_fwd(N), E * (N * (case.d_in + case.d_out) + params + mid), rates)
    row["floor_fwdbwd_ms"] = floor_ms(3 * case.flops_fwd(N), E * (3 * N * (case.d_in + case.d_out) + 3 * params + 2 * mid),
                                      rates)
    timed = {p: v for p, v in row["paths"].items() if "fwdbwd" in v and v["correct"] and p in dispatch.PATHS[case.kind]}
    if timed:
        best = min(timed, key=lambda p: timed[p]["fwdbwd"])
        row["fastest"] = best
        row["fastest_over_floor"] = timed[best]["fwdbwd"] / row["floor_fwdbwd_ms"]
        target = TARGET_SPEEDUP.get((case.kind, case.b)) if case.d_in == HEADLINE_D else None
        if target:
            row["target_speedup"] = target
            row["meets_target"] = timed[best]["speedup_fwdbwd"] >= target
    return row


def print_case(row: dict, dense: dict) -> None:
    print(f"  {row['case']} d={row['d_in']} c={row['c']}   dense fwd {dense['fwd']:.3f} f+b {dense['fwdbwd']:.3f} ms   "
          f"floor f+b {row['floor_fwdbwd_ms']:.3f}" + (f"   target x{row['target_speedup']}" if "target_speedup" in row else ""),
          flush=True)
    for path, v in row["paths"].items():
        if "fwdbwd" not in v:
            print(f"    {path:15s} skipped", flush=True)
            continue
        print(f"    {path:15s} fwd {v['fwd']:8.3f}  f+b {v['fwdbwd']:8.3f} ms  x{v['speedup_fwdbwd']:6.2f} vs dense"
              f"  (fwd x{v['speedup_fwd']:6.2f})  bwd/fwd {v['bwd_over_fwd']:4.2f}"
              + ("" if v["correct"] else "  WRONG") + ("  <- fastest" if row.get("fastest") == path else ""), flush=True)
    for ln in row["launches"]:
        if "error" in ln:
            print(f"      {ln['launch']:40s} ERROR {ln['error']}"[:300], flush=True)
            continue
        print(f"      {ln['launch']:40s} {ln['ms']:8.3f} ms  floor {ln['floor_ms']:7.3f}  x{ln['over_floor']:5.2f}"
              f"  {ln['tflops']:6.1f} TFLOP/s  {ln['gbps']:7.1f} GB/s", flush=True)


def compiled_kernel_report() -> list[dict]:
    """Registers, spills and shared memory of every compiled fused-backward variant (the b=128 question)."""
    rows = []
    for name, kernel in (("v1", bk.block_bwd_fused_kernel), ("v2", bk.block_bwd_fused_v2_kernel)):
        try:
            for caches in kernel.fn.device_caches.values():
                for key, ck in caches[0].items():
                    md = ck.metadata
                    rows.append(dict(variant=name, num_warps=md.num_warps, num_stages=getattr(md, "num_stages", None),
                                     shared=md.shared, n_regs=getattr(ck, "n_regs", None),
                                     n_spills=getattr(ck, "n_spills", None), key=str(key)[-160:]))
        except Exception as e:  # a diagnostic only: triton internals differ between versions
            rows.append(dict(variant=name, error=repr(e)[:200]))
    return rows


# --------------------------------------------------------------------------------------------------
# 5. merged dense for few tokens: entries for MERGED_DENSE_MAX_TOKENS (src/mmm/ops/blockdiag/op.py)
# --------------------------------------------------------------------------------------------------

MERGED_FILE = "merged_dense_table.json"


def merged_dense_crossover(case: Case) -> dict:
    """Forward, no grad: the pre-merged [out, in] matrix against the fastest correct structured path at each of
    MERGE_TOKENS. max_tokens: the largest count up to which dense was faster at every measured count (0: never)."""
    good = check(case, max(MERGE_TOKENS))
    paths = [p for p in dispatch.PATHS[case.kind] if good.get(p, True)]  # "reference" is never in `good`
    row = dict(structure=case.kind, in_features=case.d_in, out_features=case.d_out, nblocks=case.b, block_rank=case.c,
               dtype=str(DT).removeprefix("torch."), correct=all(good.values()), max_tokens=0, ms={})
    dense_wins_so_far = True
    with torch.no_grad():
        # the merged matrix is the product applied to the identity: no second copy of each layout here
        W = case.fn("reference")(torch.eye(case.d_in, device=DEV, dtype=DT), *case.weights).T.contiguous()
        for N in MERGE_TOKENS:
            x = torch.randn(N, case.d_in, device=DEV, dtype=DT)
            times = {p: ms(lambda fn=case.fn(p): fn(x, *case.weights)) for p in paths}
            times["merged_dense"] = ms(lambda: F.linear(x, W))
            row["ms"][N] = {p: round(t, 4) for p, t in times.items()}
            dense_wins_so_far &= times["merged_dense"] < min(times[p] for p in paths)
            if dense_wins_so_far:
                row["max_tokens"] = N
    return row


def merged_dense_section() -> bool:
    """Every MERGE_CASES layer within the budget; writes $OUT/merged_dense_table.json (empty when all were
    skipped). False if a check failed."""
    print("merged dense vs structured forward, few tokens (no grad; ms: fastest correct structured path / dense):",
          flush=True)
    ok = True
    for kind, b, d_in, d_out in MERGE_CASES:
        if elapsed() > BUDGET_S:
            RES["notes"].append(f"merged dense {kind} b={b} d={d_in}->{d_out} skipped: time budget")
            print(f"  {kind} b={b} {d_in}->{d_out}: skipped (time budget)", flush=True)
            continue
        try:
            row = merged_dense_crossover(Case(kind, b, d_in, d_out))
        except Exception as e:  # out of memory or a broken path: note it, keep the other layers
            RES["notes"].append(f"merged dense {kind} b={b} d={d_in}->{d_out}: {e!r}"[:500])
            print(f"  {kind} b={b} {d_in}->{d_out}: ERROR {e!r}"[:500], flush=True)
            traceback.print_exc()
            ok = False
            continue
        ok &= row["correct"]
        RES["merged_dense"].append(row)
        print(f"  {kind}_b{b} {d_in}->{d_out}: " + "  ".join(
            f"N={n}: {min(v for p, v in t.items() if p != 'merged_dense'):.4f}/{t['merged_dense']:.4f}"
            for n, t in row["ms"].items()) + f"  -> max_tokens {row['max_tokens']}", flush=True)
        save()
    # op.py's table is a Python dict keyed (structure, in, out, nblocks, dtype); 0 is its default, so only
    # layers where dense won need a line
    paste = [f"({r['structure']!r}, {r['in_features']}, {r['out_features']}, {r['nblocks']}, {r['dtype']!r}): "
             f"{r['max_tokens']}," for r in RES["merged_dense"] if r["max_tokens"] > 0 and r["correct"]]
    write_table(MERGED_FILE, "Largest token count up to which the pre-merged dense forward beat the fastest correct "
                "structured path at every measured count (median ms per path in 'ms'), measured by "
                "scripts/gpu_block_paths.py. Paste the 'paste' lines into MERGED_DENSE_MAX_TOKENS in "
                "src/mmm/ops/blockdiag/op.py (read by merged_dense_max_tokens / prefer_merged_dense).",
                RES["merged_dense"], paste=paste)
    return ok


# --------------------------------------------------------------------------------------------------

def main() -> int:
    torch.manual_seed(0)
    print(f"device: {RES['device']}  dtype {DT}  budget {BUDGET_S:.0f} s", flush=True)
    rates = measure_rates(DEV, DT, quick=SMOKE)
    RES["rates"] = rates
    print(f"rates: matmul {rates['matmul_tflops']:.0f} TFLOP/s, copy {rates['copy_gbps']:.0f} GB/s", flush=True)

    print("no-copy check (torch.profiler, one fwd+bwd):", flush=True)
    try:
        copies_ok = all([no_copy_check(*args) for args in PROFILE_CASES])
    except Exception as e:
        copies_ok = False
        RES["notes"].append(f"no-copy check failed to run: {e!r}"[:500])
        traceback.print_exc()
    RES["no_copy_ok"] = copies_ok
    save()

    print("correctness, small odd shapes (error vs fp64: path / eager bf16 reference; pass <= 2x):", flush=True)
    ok = True
    for kind, b, d_in, d_out, c, N in SMALL:
        ok &= all(check(Case(kind, b, d_in, d_out, c), N).values())
    save()

    entries = []
    for d in D_LIST:
        if elapsed() > BUDGET_S:
            RES["notes"].append(f"d={d} skipped: time budget")
            print(f"d={d}: skipped (time budget)", flush=True)
            continue
        x = torch.randn(N_TOK, d, device=DEV, dtype=DT)
        W = torch.randn(d, d, device=DEV, dtype=DT) / math.sqrt(d)
        f, fb = fwd_and_fwdbwd(F.linear, [x, W])
        dense = dict(fwd=f, fwdbwd=fb)
        del x, W
        RES["cases"].append(dict(case="dense", d_in=d, d_out=d, N=N_TOK, **dense))
        print(f"d={d}: dense fwd {f:.3f} ms, f+b {fb:.3f} ms", flush=True)
        cases = [("monarch", b) for b in MONARCH_B if b * b <= d] + [("blockdiag", b) for b in BLOCKDIAG_B]
        for kind, b in cases:
            if elapsed() > BUDGET_S:
                RES["notes"].append(f"{kind} b={b} d={d} skipped: time budget")
                print(f"  {kind} b={b}: skipped (time budget)", flush=True)
                continue
            try:
                case = Case(kind, b, d, d)
                good = check(case, N_TOK)
                ok &= all(good.values())
                row = time_case(case, dense, rates, good)
                RES["cases"].append(row)
                print_case(row, dense)
                if "fastest" in row:
                    entries.append(dict(structure=kind, in_features=d, out_features=d, nblocks=b, block_rank=case.c,
                                        dtype=str(DT).removeprefix("torch."), tokens=N_TOK, path=row["fastest"],
                                        ms={p: round(v["fwdbwd"], 4) for p, v in row["paths"].items() if "fwdbwd" in v}))
                del case
            except Exception as e:  # out of memory or a broken path: note it, keep the other cases
                RES["notes"].append(f"{kind} b={b} d={d}: {e!r}"[:500])
                print(f"  {kind} b={b} d={d}: ERROR {e!r}"[:500], flush=True)
                traceback.print_exc()
                ok = False
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
            save()
    RES["fused_backward_kernels"] = compiled_kernel_report()
    dispatch_file = write_table("dispatch_table.json", "Fastest path per shape (fwd+bwd, median ms per path in 'ms'), "
                                "measured by scripts/gpu_block_paths.py; read by src/mmm/ops/blockdiag/dispatch.py.",
                                entries)
    save()
    ok &= merged_dense_section()  # last: the dispatch table above is written whatever happens here
    RES["correct"] = ok
    save()

    print("\nsummary (fwd+bwd ms, n=%d, %s):" % (N_TOK, DT), flush=True)
    all_paths = ["triton", "triton_v1", "triton_2launch", "cublas", "cublas_copy", "reference"]
    print(f"  {'case':14s} {'d':>6s} {'dense':>8s} " + " ".join(f"{p:>14s}" for p in all_paths)
          + f" {'best':>12s} {'x dense':>8s} {'/floor':>6s} {'target':>6s}", flush=True)
    dense_by_d = {r["d_in"]: r for r in RES["cases"] if r["case"] == "dense"}
    for r in RES["cases"]:
        if r["case"] == "dense":
            continue
        cells = [f"{r['paths'][p]['fwdbwd']:14.3f}" if "fwdbwd" in r["paths"].get(p, {}) else f"{'-':>14s}" for p in all_paths]
        best = r.get("fastest", "-")
        sp = r["paths"][best]["speedup_fwdbwd"] if best in r["paths"] else float("nan")
        print(f"  {r['case']:14s} {r['d_in']:6d} {dense_by_d[r['d_in']]['fwdbwd']:8.3f} " + " ".join(cells)
              + f" {best:>12s} {sp:8.2f} {r.get('fastest_over_floor', float('nan')):6.2f} {str(r.get('target_speedup', '')):>6s}"
              + ("" if "meets_target" not in r else ("  MEETS" if r["meets_target"] else "  misses")), flush=True)
    print(f"correct: {ok}   no-copy check: {copies_ok}   elapsed {elapsed():.0f} s", flush=True)
    print(f"wrote {os.path.join(OUT, 'gpu_block_paths.json')}, {dispatch_file} (copy it to "
          f"src/mmm/ops/blockdiag/dispatch_table.json) and {os.path.join(OUT, MERGED_FILE)} (paste its 'paste' lines "
          f"into MERGED_DENSE_MAX_TOKENS in src/mmm/ops/blockdiag/op.py)", flush=True)
    return 0 if ok and copies_ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        RES["error"] = traceback.format_exc()[-2000:]
        save()
        sys.exit(2)
