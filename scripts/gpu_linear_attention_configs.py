"""Every autotune config of the linear-attention kernels, run alone on the GPU: pass / fail / error / crash.

Run on the H200 from the repository root (about 3-4 minutes, most of it compiling, in parallel):
    PYTHONPATH=src python scripts/gpu_linear_attention_configs.py
    PYTHONPATH=src python scripts/gpu_linear_attention_configs.py --sanitize   # each forced config under
        compute-sanitizer memcheck as well (small shape only, no timing; several minutes more)
    ... --only fwd_kernel=64,128,8,2 bwd_dv_kernel=64,128,8,2   # just these forced configs (+ the baseline)
    TRITON_INTERPRET=1 PYTHONPATH=src python scripts/gpu_linear_attention_configs.py --smoke   # CPU dry run
    PYTHONPATH=src python scripts/gpu_linear_attention_configs.py --ir [--ir-d 128] [--ir-dv 64]   # no GPU
        needed: compile every config for sm_90 (key width --ir-d, value width --ir-dv, default the same) and
        print shared memory, registers, spills and the risky layout conversions
Prints a table last; full results go to $OUT/la_configs.json (or ./la_configs.json).

Why subprocesses: a CUDA illegal address is sticky (every later CUDA call in that process fails), and the
first H200 run died inside autotuning, so each config gets a fresh process. A job forces one config of one
kernel through MMM_LA_CONFIG (see kernels.py) and pins the other kernels to the first config of their lists
(the "baseline" job runs those alone), then for bf16 inputs at D=128:
  - fwd + bwd at B=1 T=300 H=2 (the shape that faulted: one ragged segment) and at B=2 T=1000 H=3 in
    segments of 256, for (elu, normalized, causal), (identity, unnormalized, causal), (relu, normalized,
    non-causal); every buffer the op allocates is NaN-poisoned first; o, dq, dk, dv against the fp64
    reference: pass if finite and within 2x the error of the reference run in bf16 end to end;
  - the same fwd + bwd twice must give bit-identical results (the kernels use no atomics);
  - fwd + bwd time at B=1 T=8192 H=16 D=128 (median ms; only the forced kernel differs between jobs).
Roles: "current" = in kernels.CONFIGS; "retired" = the 8-warp BT=64 configs of the run that faulted
(expected to fail: if they pass, the fault has another cause); "candidate" = 8-warp configs whose dots all
have >= 128 rows (no layout conversion in the sm_90 IR; not in the lists yet).
"autotune" jobs force nothing: the normal autotuned path at every supported head dim, and fp16 / fp32.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

MARK = "@@LA_CONFIG_RESULT@@"
RETIRED = {
    "fwd_kernel": [(64, 64, 8, 2), (64, 32, 8, 2)],
    "bwd_dqdk_kernel": [(64, 64, 8, 2), (64, 32, 8, 2), (64, 16, 8, 2)],
    "bwd_dv_kernel": [(64, 64, 8, 2), (64, 32, 8, 2)],
}
# not in kernels.CONFIGS: 8-warp BT=128 tiles, and 3-stage pipelines of the chosen configs (the kernels
# look latency-bound, ~10 us per chunk iteration on the H200; but a third stage takes these over ~113 KB
# of shared memory, one program per SM instead of two: sm_90 report of 2026-12-05)
# (64, 128, 8, 2): the fastest fwd and dv configs of the 2026-12-04 tuning run (2.42 / 1.72 ms vs 2.69 / 1.99
# at 128k) but 8 warps at BT = 64, the pattern of the fault: run them under --sanitize first, with a
# retired config beside them as the positive control (--only, the `sanitize` phase of gpu_single.sh)
# A fifth number caps the registers per thread (maxnreg): the kernels run at 255 registers, 2 programs per
# SM, latency-bound (ncu, 2026-12-05). Caps at 168 (3 programs of 4 warps) for the configs that spill
# nothing or little under it (sm_90 report with --ir-maxnreg, 2026-12-07). One stage (no prefetch within a
# program: the other resident programs hide the latency instead) halves the shared memory of the BT = 64
# tiles, so 3-4 programs fit (fwd 64x32: 53 KB, 464 B spilled at 168; dv 64x32: 53 KB, 40 B).
# (128, 128, 8, 2) for fwd and dv (session 24): every dot has 128 rows (no replicated-row conversion) and one
# V tile computes the features and scores once instead of per tile. sm_90 SASS per chunk: dv 1710 (107
# warp-instructions per token over all 128 value columns, vs 156 at (64, 64, 4, 2)) with 400 B spilled;
# fwd as it is (no ZDOT) 2411 (151 per token, vs 211) with 800 B spilled. One program per SM (196-200 KB of
# shared memory). Untimed, never run.
CANDIDATES = {"fwd_kernel": [(128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2), (16, 32, 4, 2, 168), (16, 32, 4, 2, 128),
                             (64, 32, 4, 1, 168), (128, 128, 8, 2)],
              "bwd_dqdk_kernel": [(64, 64, 4, 3), (64, 16, 4, 3, 168), (64, 16, 4, 2, 168), (64, 16, 4, 1, 168)],
              "bwd_dv_kernel": [(128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2), (64, 32, 4, 2, 168), (64, 32, 4, 1, 168),
                                (128, 128, 8, 2)],
              "chunk_state_kernel": [(64, 128, 8, 2, 168), (64, 32, 4, 3, 168), (64, 32, 4, 3, 128), (64, 32, 4, 1, 128)]}
VARIANTS = [("elu", True, True), (None, False, True), ("relu", True, False)]
# smallest relative error a dtype is held to: fp16 inputs use tf32 dots (DOT_MODE 1), which are less
# exact than the reference run in that dtype, as are fp32 inputs when PyTorch allows tf32 (IEEE dots
# otherwise); bf16 is held to 2x the bf16 reference alone
ERR_FLOOR = {"bfloat16": 0.0, "float16": 2e-3, "float32": 2e-3}


# ------------------------------------------------------------------------------------------------ worker


def worker(spec: dict) -> dict:
    """Runs in a fresh process with MMM_LA_CONFIG already set. Returns a JSON-able result."""
    import torch

    from mmm.ops.linear_attention import kernels, linear_attention_naive, op

    dev = "cpu" if spec.get("smoke") else "cuda"
    dtype = getattr(torch, spec["dtype"])
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))

    def run_case(B, T, H, D, fm, norm, causal, seg_len):
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, go = (torch.randn(B, T, H, D, generator=gen).to(dev, dtype) for _ in range(4))
        if fm is None and norm:
            q, k = q.abs() + 0.1, k.abs() + 0.1
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        ref_o = linear_attention_naive(q64, k64, v64, fm, norm, causal)
        ref = [ref_o.detach()] + list(torch.autograd.grad(ref_o, (q64, k64, v64), go.double()))
        qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
        o_d = linear_attention_naive(qd, kd, vd, fm, norm, causal)
        base = [rel(o_d.detach(), ref[0])] + [rel(g, r) for g, r in zip(torch.autograd.grad(o_d, (qd, kd, vd), go), ref[1:])]

        def ours():
            qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
            torch.empty = lambda *a, **kw: poison(real_empty(*a, **kw))
            torch.empty_like = lambda *a, **kw: poison(real_empty_like(*a, **kw))
            try:
                o = op._kernel_forward(qs, ks, vs, fm, norm, causal, 1e-6, seg_len=seg_len)
                grads = torch.autograd.grad(o, (qs, ks, vs), go)
            finally:
                torch.empty, torch.empty_like = real_empty, real_empty_like
            sync()
            return [o.detach()] + list(grads)

        first, second = ours(), ours()
        errs = [rel(t, r) if torch.isfinite(t).all() else math.inf for t, r in zip(first, ref)]
        ratios = [e / max(b, ERR_FLOOR[spec["dtype"]] / 2, 1e-30) for e, b in zip(errs, base)]
        return {
            "shape": [B, T, H, D], "feature_map": fm, "normalize": norm, "causal": causal, "seg_len": seg_len,
            "err": [f"{e:.2e}" for e in errs], "ref_dtype_err": [f"{b:.2e}" for b in base],
            "worst_ratio": round(max(ratios), 3),
            "deterministic": all(torch.equal(a, b) for a, b in zip(first, second)),
            "ok": all(r <= 2 for r in ratios) and all(torch.equal(a, b) for a, b in zip(first, second)),
        }

    out = {"cases": []}
    try:
        for case in spec["cases"]:
            out["cases"].append(run_case(*case))
        if spec.get("time"):
            from triton.testing import do_bench

            B, T, H, D = spec["time"]
            q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            go = torch.randn_like(q)
            step = lambda: torch.autograd.grad(op._kernel_forward(q, k, v), (q, k, v), go)  # noqa: E731
            step()
            out["ms"] = round(do_bench(step, warmup=10, rep=100, return_mode="median"), 4)
        out["status"] = "pass" if all(c["ok"] for c in out["cases"]) else "fail"
    except Exception as e:  # a CUDA fault, a compile error, out of resources: recorded, not raised
        out["status"] = "error"
        out["error"] = f"{type(e).__name__}: {e}"[:600]
    out["chosen"] = {}  # the config each kernel ran last: (BT, tile, num_warps, num_stages)
    for name in kernels.CONFIGS:
        c = getattr(getattr(kernels, name), "best_config", None)
        if c is not None:
            out["chosen"][name] = [c.kwargs["BT"], c.kwargs.get("BK", c.kwargs.get("BV")), c.num_warps, c.num_stages]
    return out


# -------------------------------------------------------------------------------------------------- main


def jobs(smoke: bool, kernels_mod) -> list[dict]:
    configs = kernels_mod.CONFIGS
    baseline = {name: cfgs[0] for name, cfgs in configs.items()}
    if smoke:  # tiny shapes under the interpreter: checks the plumbing only
        cases = [(1, 40, 2, 128, "elu", True, True, 16)]
        auto_cases = [(1, 40, 2, 16, "elu", True, True, 16)]
        timing, dtype = None, "float32"
    else:
        cases = [(1, 300, 2, 128, *VARIANTS[0], None)] + [(2, 1000, 3, 128, *var, 256) for var in VARIANTS]
        auto_cases = None
        timing, dtype = (1, 8192, 16, 128), "bfloat16"

    def forced(name, cfg, role):
        pins = {**baseline, name: cfg}
        return {"kind": "config", "kernel": name, "config": list(cfg), "role": role, "dtype": dtype,
                "env": ";".join(f"{k}={','.join(map(str, c))}" for k, c in pins.items()),
                "cases": cases, "time": timing}

    out = [dict(forced("fwd_kernel", baseline["fwd_kernel"], "baseline"), kernel="(all)")]
    for name, cfgs in configs.items():
        for role, options in (("current", cfgs[1:]), ("retired", RETIRED.get(name, [])), ("candidate", CANDIDATES.get(name, []))):
            out += [forced(name, tuple(c), role) for c in options]
    auto = []
    for D, dt in [(16, "bfloat16"), (32, "bfloat16"), (64, "bfloat16"), (128, "bfloat16"), (256, "bfloat16"),
                  (128, "float16"), (128, "float32")]:
        c = auto_cases or [(2, 1000, 3, D, *VARIANTS[0], 256), (2, 1000, 3, D, *VARIANTS[2], 256)]
        auto.append({"kind": "autotune", "kernel": "(autotuned)", "config": f"D={D}", "role": "autotune",
                     "dtype": dtype if smoke else dt, "env": "", "cases": c, "time": None})
    if smoke:  # the baseline, one retired config, one autotuned path
        return [out[0], next(j for j in out if j["role"] == "retired"), auto[0]]
    return out + auto


def run_job(job: dict, smoke: bool, sanitize: bool, timeout_s: float) -> dict:
    spec = dict(job, smoke=smoke)
    if sanitize:  # memcheck slows kernels ~10-100x: the small shape only, no timing
        spec.update(cases=job["cases"][:1], time=None)
    env = dict(os.environ, MMM_LA_CONFIG=job["env"])
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    if sanitize:
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "3"] + cmd
    t = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        text = p.stdout + p.stderr
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith(MARK)), None)
        res = json.loads(line[len(MARK):]) if line else {"status": "crash", "error": f"exit {p.returncode}: {text[-600:]}"}
        if sanitize:
            m = re.search(r"ERROR SUMMARY: (\d+) error", text)
            res["sanitizer_errors"] = int(m[1]) if m else None
            res["sanitizer_first"] = [ln for ln in text.splitlines() if ln.startswith("=========") and "at " in ln][:3]
            if res["sanitizer_errors"]:
                res["status"] = "sanitizer"
    except subprocess.TimeoutExpired:
        res = {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
    res["wall_s"] = round(time.time() - t, 1)
    return {**{k: job[k] for k in ("kind", "kernel", "config", "role", "dtype")}, **res}


def note(r: dict) -> str:
    if r.get("error"):
        return r["error"].replace("\n", " ")[:70]
    bad = [c for c in r.get("cases", []) if not c["ok"]]
    if bad:
        c = bad[0]
        return f"{c['shape']} {c['feature_map']} norm={c['normalize']} causal={c['causal']} ratio={c['worst_ratio']} det={c['deterministic']}"
    if r["kind"] == "autotune":  # what the autotuner picked (BT, tile, num_warps, num_stages)
        return " ".join(f"{k.replace('bwd_', '').replace('_kernel', '')}={','.join(map(str, v))}" for k, v in r.get("chosen", {}).items())
    return ""


# ------------------------------------------------------------------ --ir: sm_90 compile report, no GPU


def loop_instructions(sass: str) -> int:
    """SASS instructions in the kernel's longest loop (from a backward branch's target to the branch): the
    chunk loop, what runs once per chunk."""
    ins = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass)
    addrs = [int(a, 16) for a, _, _ in ins]
    spans = [0]
    for a, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target[1], 16) < int(a, 16):
            spans.append(sum(1 for x in addrs if int(target[1], 16) <= x <= int(a, 16)))
    return max(spans)


def ir_report(D: int, DV: int | None = None, maxnreg: int | None = None) -> None:
    """Compiles each config (bf16, elu, normalized, causal; chunk_state in both directions; the features
    written once and read as they are, as in training) for sm_90 and
    prints shared memory, registers and spill bytes (cuobjdump -res-usage), the static SASS instruction
    count with its commonest opcodes (cuobjdump -sass: session 16 cut elu+1's ~14 instructions per element
    to ~7 by reading these), the kernel's mma v2 (HMMA) and wgmma (HGMMA) instructions, the mma layouts (warpsPerCTA),
    and the pattern behind the H200 fault: a dot result whose mma layout has more warps along M than it
    has 16-row groups (replicated rows), converted to another mma layout or dot operand."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mmm.ops.linear_attention import kernels

    cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    fp32_ptrs = {"rden_ptr", "r_ptr", "drden_ptr", "st_ptr", "dst_ptr"}
    tiles = {"chunk_state_kernel": "BK", "fwd_kernel": "BV", "bwd_dqdk_kernel": "BK", "bwd_dv_kernel": "BV"}
    DV = D if DV is None else DV
    print(f"DK={D} DV={DV}: kernel variant (BT,tile,warps,stages): shared bytes, registers, spill bytes, mma warpsPerCTA, flags")
    for name, tile in tiles.items():
        fn = getattr(kernels, name).fn
        # the training path: each map's features written once (op.features_written) and read as they are
        # by the later kernels (FEATURE_GIVEN = 3)
        variants = ([{"BWD": bwd, "HAS_DRDEN": False, "HAS_DELTA": False, "ZDOT": z, "WRITE_F": True}
                     for z in (False, True) for bwd in (False, True)]
                    if name == "chunk_state_kernel"
                    else [{"CAUSAL": True, "PART": p, "ZDOT": z, "PHI_Q": 3, "PHI_K": 3, "WRITE_F": False}
                          for z in (False, True) for p in (1, 2)]
                    if name == "bwd_dqdk_kernel"
                    else [{"CAUSAL": True, "ZDOT": z, "PHI_K": 3} for z in (False, True)] if name == "fwd_kernel"
                    else [{"CAUSAL": True, "FEATURE": 3}])
        options = kernels.CONFIGS[name] + RETIRED.get(name, []) + CANDIDATES.get(name, [])
        for bt, t, w, st, *cap in options:
            for var in variants:
                # whole chunks (T and segments multiples of MAX_BT, as at the bench's lengths): no row masks
                consts = {**dict(DK=D, DV=DV, FEATURE=1, NORMALIZE=True, DOT_MODE=0, FULL_CHUNKS=True, BT=bt, **{tile: t}), **var}
                if "HAS_LAG" in fn.arg_names:  # lag-free, within-chunk terms on: the plain linear attention path
                    consts["HAS_LAG"] = False
                if "INTRA" in fn.arg_names:
                    consts["INTRA"] = True
                sig = {a: "constexpr" if a in consts else ("*fp32" if a in fp32_ptrs else "*bf16") if a.endswith("_ptr")
                       else "fp32" if a in ("eps", "scale") else "i32" for a in fn.arg_names}
                src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()},
                                attrs={(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a.endswith("_ptr")})
                label = f"{name} {var} {(bt, t, w, st, *cap)}"
                try:
                    compile_options = dict(num_warps=w, num_stages=st, maxnreg=cap[0] if cap else maxnreg)
                    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=compile_options)
                except Exception as e:
                    print(f"{label}: compile error {type(e).__name__}: {str(e)[:120]}")
                    continue
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(c.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
                    sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
                # static SASS instruction count and the commonest opcodes: the kernels are issue-bound
                opcodes = [op.split(".")[0] for op in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)]
                top = ", ".join(f"{op} {n}" for op, n in collections.Counter(opcodes).most_common(6))
                m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
                ttgir = c.asm["ttgir"]
                mmas = dict(re.findall(r"(#mma\d*) = #ttg.nvidia_mma<\{versionMajor = \d, versionMinor = \d, warpsPerCTA = \[(\d+), \d+\]", ttgir))
                full = dict(re.findall(r"(#mma\d*) = #ttg.nvidia_mma<\{versionMajor = \d, versionMinor = \d, warpsPerCTA = \[(\d+, \d+)\]", ttgir))
                # wgmma and mma v2 results alike (session 25: fwd's ZDOT at BT = 16 / 32 lays mma v2 dots on
                # [4, 1]); converted to another mma layout, to an operand of another parent, or to a blocked
                # layout (through shared memory)
                replicated = {mm for rows, mm in re.findall(r"(?:warp_group_dot|tt\.dot) .* -> tensor<(\d+)x\d+x\w+, (#mma\d*)>", ttgir)
                              if 16 * int(mmas[mm]) > int(rows)}
                flags = sorted({f"{shape} [{full[src_]}]->{'dot' if op_ else 'mma' if dst else 'blocked'}[{full.get(dst, '')}]"
                                for shape, src_, op_, dst in re.findall(
                    r"convert_layout .* : tensor<([0-9x]+)x\w+, (#mma\d*)> -> tensor<[0-9x]+x\w+, (#ttg.dot_op<\{opIdx = \d, parent = )?(#mma\d*)?", ttgir)
                    if src_ in replicated and (not dst or full[src_] != full[dst])})
                # mma v2 (HMMA) vs wgmma (HGMMA): session 24's dq/dk rewrite moved to wgmma and ran slower
                mma = collections.Counter(op for op in opcodes if op in ("HMMA", "HGMMA"))
                print(f"{label}: {c.metadata.shared} B, {m[1] if m else '?'} regs, {m[2] if m else '?'} B spilled, "
                      f"{sorted(set(full.values()))}, {len(opcodes)} SASS instructions, {loop_instructions(sass)} in the "
                      f"chunk loop ({top}; HMMA {mma['HMMA']}, HGMMA {mma['HGMMA']})"
                      f"{'  RISKY: replicated rows converted ' + ', '.join(flags) if flags else ''}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--budget-s", type=float, default=270, help="start no job after this many seconds")
    ap.add_argument("--only", nargs="+", metavar="KERNEL=BT,tile,warps,stages",
                    help="run only these forced configs (they must be in the lists above), plus the baseline")
    ap.add_argument("--ir", action="store_true", help="sm_90 compile report of every config (no GPU)")
    ap.add_argument("--ir-d", type=int, default=128, help="key width DK (and value width unless --ir-dv)")
    ap.add_argument("--ir-dv", type=int, default=None, help="value width DV (default: --ir-d)")
    ap.add_argument("--ir-maxnreg", type=int, default=None, help="compile with this registers-per-thread cap")
    args = ap.parse_args()
    if args.ir:
        ir_report(args.ir_d, args.ir_dv, args.ir_maxnreg)
        return
    if args.worker:
        print(MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.sanitize and not shutil.which("compute-sanitizer"):
        sys.exit("--sanitize: compute-sanitizer is not on PATH (it ships with the CUDA toolkit)")
    from mmm.ops.linear_attention import kernels

    if not args.smoke:
        import torch
        import triton

        print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), "triton", triton.__version__, flush=True)
    todo = jobs(args.smoke, kernels)
    if args.only:  # the baseline (it fills the compile cache) and the named forced configs
        wanted = {(name, tuple(int(x) for x in cfg.split(","))) for name, _, cfg in (o.partition("=") for o in args.only)}
        todo = [todo[0]] + [j for j in todo[1:] if j["kind"] == "config" and (j["kernel"], tuple(j["config"])) in wanted]
    start = time.time()
    timeout = 500 if args.sanitize else 200
    results = []
    print(f"{len(todo)} jobs, {args.jobs} at a time; the baseline first (it fills the compile cache)", flush=True)

    def record(r):
        results.append(r)
        print(f"[{time.time() - start:6.1f}s] {r['kernel']:<16} {str(r['config']):<16} {r['role']:<9} {r['status']:<9} {note(r)}", flush=True)

    record(run_job(todo[0], args.smoke, args.sanitize, timeout))
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futures = []
        for job in todo[1:]:
            def go(job=job):
                if time.time() - start > args.budget_s:
                    return {**{k: job[k] for k in ("kind", "kernel", "config", "role", "dtype")}, "status": "skipped", "error": "time budget"}
                return run_job(job, args.smoke, args.sanitize, timeout)
            futures.append(pool.submit(go))
        for f in cf.as_completed(futures):
            record(f.result())

    order = {"baseline": 0, "current": 1, "candidate": 2, "retired": 3, "autotune": 4}
    results.sort(key=lambda r: (order[r["role"]], r["kernel"], str(r["config"]), r["dtype"]))
    path = os.path.join(os.environ.get("OUT", "."), "la_configs.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"\n{'kernel':<18} {'config (BT,tile,w,s)':<20} {'role':<9} {'dtype':<8} {'status':<9} {'worst':>6} {'ms':>7}  note")
    for r in results:
        worst = max((c["worst_ratio"] for c in r.get("cases", [])), default=float("nan"))
        ms = r.get("ms")
        print(f"{r['kernel']:<18} {str(r['config']):<20} {r['role']:<9} {r['dtype'][:8]:<8} {r['status']:<9} "
              f"{worst:6.2f} {'-' if ms is None else f'{ms:.3f}':>7}  {note(r)}")
    print("worst = largest (our error / error of the reference run in the input dtype) over cases and o, dq, dk, dv "
          "(pass: <= 2); ms = fwd+bwd at B=1 T=8192 H=16 D=128 bf16 with that config forced")
    bad = [r for r in results if r["status"] != "pass" and r["role"] in ("current", "baseline", "autotune")]
    print("PRUNE (current configs / autotuned paths that did not pass):", [(r["kernel"], r["config"], r["dtype"], r["status"]) for r in bad] or "none")
    print(f"results: {path}; total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
