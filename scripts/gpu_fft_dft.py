"""The "dft" path of the FFT structures (four-step FFT as tensor-core GEMMs, mmm/ops/fft/dft.py) against
dense cuBLAS and the cuFFT path (packed16), on one GPU:

    PYTHONPATH=src python scripts/gpu_fft_dft.py            (H200: ~2-3 min; writes $OUT/fft_dft.json)
    PYTHONPATH=src python scripts/gpu_fft_dft.py --ptxas    (no GPU: sm_90 registers / spills / shared memory
                                                             of every config, ~2 min on 2 CPU cores)
    TRITON_INTERPRET=1 PYTHONPATH=src python scripts/gpu_fft_dft.py --smoke   (CPU dry run of the script, tiny sizes)

1. Correctness, bf16, 512 tokens: y, dx and the parameter's gradient of the dft and packed16 paths against an
   fp64 reference (the fp64 FFT path: exact to ~1e-15), beside PyTorch's own bf16 error for the same dense
   product; the project's bar is <= 2x PyTorch's.
2. Configs of the dft kernels (row blocks, warps) timed on circulant d = 16384 forward + backward; the
   best is used below at d = 16384 (and printed, to make it the default in dft._config).
3. Timing (triton.testing.do_bench, median), n = 8192 tokens, bf16: dense x @ W^T, the packed16 path and the
   dft path, forward and forward + backward, circulant and Toeplitz at d in {4096, 16384}; speedup against
   the dense product of the same d measured in this run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
sys.path.insert(0, SRC)

N_TOKENS = 8192
SIZES = (4096, 16384)
# changes to dft._config's choice for the 128 x 128 tiles of d = 16384 ({} = the default)
# (fused=False: the backward's dx and kernel gradient by two kernels, dft.FUSED_BACKWARD)
# most telling first (the sweep stops at the time budget): two 4-warp programs per SM (spill-free, so
# one pair's memory latency hides behind the other's math), the two-kernel backward, 64-row blocks
SWEEP = [{}, dict(BK=16, BN=32, num_warps=4, progs_per_sm=2, BKC=16, corr_warps=4), dict(fused=False),
         dict(BK=64), dict(BN=32)]


# ------------------------------------------------------------------ --ptxas: sm_90 compile report, no GPU

def ptxas_report() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mmm.ops.fft import dft, dft_kernels

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    fp32_ptrs = {"k_ptr", "gain_ptr", "part_ptr"}
    bf16_ptrs = {"x_ptr", "y_ptr", "dy_ptr"}

    def compile_one(kernel, consts, warps):
        fn = kernel  # the JITFunction (its .fn is the plain Python function)
        sig, cx, attrs = {}, {}, {}
        for i, a in enumerate(fn.arg_names):
            if a in consts:
                sig[a], cx[(i,)] = "constexpr", consts[a]
            elif a.endswith("_ptr"):
                sig[a] = "*fp32" if a in fp32_ptrs else "*bf16" if a in bf16_ptrs else "*fp16"
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[a] = "i32"
                if a not in ("N", "N_PAIRS", "PAIRS_PER_CHUNK"):  # sizes and strides: multiples of 16 here
                    attrs[(i,)] = [["tt.divisibility", 16]]
        c = triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=1))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(c.asm["ptx"])
            log = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        text = log.stdout + log.stderr
        regs = re.search(r"Used (\d+) registers", text)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        ttgir = c.asm["ttgir"]
        return dict(regs=int(regs[1]) if regs else None, spill_store=int(spill[1]) if spill else None,
                    spill_load=int(spill[2]) if spill else None, smem_kb=c.metadata.shared / 1024,
                    wgmma=ttgir.count("warp_group_dot "), mma=ttgir.count(" tt.dot ") + ttgir.count("ttg.dot "))

    seen = set()
    print("kernel       n1 x n2  NB  rows/KC  warps: regs  spill st/ld B  smem KB  wgmma/mma dots", flush=True)
    for n1, n2, nb, change in [(128, 128, 1, c) for c in SWEEP] + [(128, 128, 2, {}), (64, 64, 1, {}), (64, 64, 2, {})]:
        change = {k: v for k, v in change.items() if k != "fused"}
        cfg = {**dft._config(n1, n2, nb), **change}
        conv = dict(N1=n1, N2=n2, NB=nb, BK=cfg["BK"], BN=cfg["BN"], KC=cfg["KC"])
        for name, kernel, consts, warps in [
                ("conv", dft_kernels.dft_conv_kernel, dict(conv, CORR=False), cfg["num_warps"]),
                ("conv+grad", dft_kernels.dft_conv_kernel, dict(conv, CORR=True), cfg["num_warps"]),
                ("corr", dft_kernels.dft_corr_kernel, dict(N1=n1, N2=n2, BK=cfg["BKC"], KC=cfg["KC"]), cfg["corr_warps"])]:
            key = (name, warps, *sorted(consts.items()))
            if key in seen or (name == "corr" and nb == 2):  # corr's branch is a grid axis, not a constant
                continue
            seen.add(key)
            r = compile_one(kernel, dict(consts, BOUND=dft.BOUND, PREC="tf32"), warps)
            rows = (f"{consts['BK']}/{consts['BN']}" if "BN" in consts else f"{consts['BK']}") + f"/{consts['KC']}"
            print(f"{name:9s}  {n1:4d}x{n2:<4d} {nb:2d} {rows:>9s} {warps:4d}:  {r['regs']:4d}  {r['spill_store']:5d}/{r['spill_load']:<5d}  "
                  f"{r['smem_kb']:7.1f}  {r['wgmma']}/{r['mma']}", flush=True)


# ------------------------------------------------------------------ GPU run

def gpu_main(args) -> None:
    import torch
    import triton

    import mmm
    from mmm.ops.fft import dft, force_mode
    from mmm.structures import Circulant, Toeplitz

    global N_TOKENS, SIZES, SWEEP
    if args.smoke:  # the script's logic on CPU under the interpreter: tiny sizes, wall-clock timing
        N_TOKENS, SIZES, SWEEP = 32, (256,), SWEEP[:1]
    else:
        assert torch.cuda.is_available(), "needs a CUDA device (or --ptxas / --smoke)"
    t_start = time.time()
    dev = "cpu" if args.smoke else "cuda"
    out_dir = os.environ.get("OUT", ".")
    result = dict(device="cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  n_tokens=N_TOKENS, correctness=[], sweep=[], timing=[])
    kinds = {"circulant": (Circulant, mmm.CirculantConfig()), "toeplitz": (Toeplitz, mmm.ToeplitzConfig())}

    def rel(a, b):
        a, b = a.double(), b.double()
        return float((a - b).norm() / b.norm().clamp_min(1e-300))

    def make(kind, d, dtype, scale=None):
        cls, cfg = kinds[kind]
        s = cls(d, d, cfg, device=dev, dtype=dtype)
        if scale is not None:
            with torch.no_grad():
                for p in s.parameters():
                    p.copy_(torch.randn_like(p) * scale)
        return s

    def run(s, x, g):
        x = x.detach().clone().requires_grad_(True)
        y = s(x)
        (p,) = list(s.parameters())
        dx, dp = torch.autograd.grad(y, [x, p], g)
        return y.detach(), dx, dp

    # 1. correctness ------------------------------------------------------------------------------
    for kind in kinds:
        for d in SIZES:
            s64 = make(kind, d, torch.float64, 1 / math.sqrt(d))
            with torch.no_grad():  # the parameters as a bf16 model holds them
                for p in s64.parameters():
                    p.copy_(p.bfloat16().double())
            s = make(kind, d, torch.bfloat16)
            s.load_state_dict(s64.state_dict())
            x64 = torch.randn(16 if args.smoke else 512, d, device=dev, dtype=torch.float64)
            g64 = torch.randn(16 if args.smoke else 512, d, device=dev, dtype=torch.float64)
            with force_mode("torch"):
                ref = run(s64, x64, g64)
            # PyTorch's own bf16 error for the dense product (dW mapped to the parameter through to_dense)
            w64 = s64.to_dense().detach()
            xd, wd, gd = x64.bfloat16(), w64.bfloat16(), g64.bfloat16()
            (p64,) = list(s64.parameters())
            dp_torch = torch.autograd.grad(s64.to_dense(), p64, (gd.T @ xd).double())[0]
            torch_err = [rel(xd @ wd.T, ref[0]), rel(gd @ wd, ref[1]), rel(dp_torch, ref[2])]
            del w64, wd, dp_torch
            for mode in ("packed16", "dft"):
                with force_mode(mode):
                    got = run(s, x64.bfloat16(), g64.bfloat16())
                errs = [rel(a, b) for a, b in zip(got, ref)]
                row = dict(structure=kind, d=d, mode=mode, err=errs, torch_err=torch_err,
                           ratio=[e / t for e, t in zip(errs, torch_err)], ok=all(e <= 2 * t for e, t in zip(errs, torch_err)),
                           finite=all(bool(torch.isfinite(a).all()) for a in got))
                result["correctness"].append(row)
                print(f"{kind:9s} d={d:5d} {mode:8s} err y/dx/dp {errs[0]:.2e} {errs[1]:.2e} {errs[2]:.2e}  "
                      f"x torch {row['ratio'][0]:.2f} {row['ratio'][1]:.2f} {row['ratio'][2]:.2f}  ok={row['ok']}", flush=True)
            del s64, s
            if not args.smoke:
                torch.cuda.empty_cache()

    # timing helpers ------------------------------------------------------------------------------
    def bench(fn, grad_to_none=None):
        if args.smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")

    def time_structure(s, mode, d):
        x = torch.randn(N_TOKENS, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(N_TOKENS, d, device=dev, dtype=torch.bfloat16)
        params = list(s.parameters())

        def fwd():
            with torch.no_grad():
                s(x)

        def fwd_bwd():
            s(x).backward(dy)

        with force_mode(mode):
            fwd_bwd()  # compile and fill the spectrum cache
            return bench(fwd), bench(fwd_bwd, [x, *params])

    # 2. config sweep (circulant d = 16384, f+b) --------------------------------------------------
    s = make("circulant", SIZES[-1], torch.bfloat16)
    best = None
    for change in SWEEP:
        if time.time() - t_start > args.budget_s - 70:  # keep ~70 s for the timing table
            print("sweep cut short by the time budget", flush=True)
            break
        dft.FUSED_BACKWARD = change.get("fused", True)
        dft.CONFIG_OVERRIDE = {k: v for k, v in change.items() if k != "fused"}
        label = f"config {change or 'default'} -> {dft.config(128, 128, 1)}, fused backward {dft.FUSED_BACKWARD}"
        try:
            fwd, fb = time_structure(s, "dft", SIZES[-1])
        except Exception as e:  # a config that does not compile or launch (shared memory, registers)
            print(f"{label}: failed {type(e).__name__}: {str(e)[:160]}", flush=True)
            result["sweep"].append(dict(change=change, error=str(e)[:300]))
            continue
        result["sweep"].append(dict(change=change, config=dft.config(128, 128, 1), fused=dft.FUSED_BACKWARD, fwd_ms=fwd, fwd_bwd_ms=fb))
        print(f"{label}: fwd {fwd:.3f} ms  f+b {fb:.3f} ms", flush=True)
        if best is None or fb < best[1]:
            best = (dict(change), fb)
    dft.CONFIG_OVERRIDE, dft.FUSED_BACKWARD = None, True
    del s
    result["best_config_16384"] = best[0] if best else None

    # 3. timing ----------------------------------------------------------------------------------
    rows = []
    for d in SIZES:
        w = torch.randn(d, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        x = torch.randn(N_TOKENS, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(N_TOKENS, d, device=dev, dtype=torch.bfloat16)

        def dense_fwd():
            with torch.no_grad():
                x @ w.T

        def dense_fb():
            (x @ w.T).backward(dy)

        dense = (bench(dense_fwd), bench(dense_fb, [x, w]))
        rows.append(dict(structure="dense", d=d, mode="cuBLAS", fwd_ms=dense[0], fwd_bwd_ms=dense[1]))
        del w, x, dy
        for kind in kinds:
            s = make(kind, d, torch.bfloat16)
            for mode in ("packed16", "dft"):
                if mode == "dft" and best is not None and d == SIZES[-1]:
                    dft.CONFIG_OVERRIDE = {k: v for k, v in best[0].items() if k != "fused"}
                    dft.FUSED_BACKWARD = best[0].get("fused", True)
                fwd, fb = time_structure(s, mode, d)
                dft.CONFIG_OVERRIDE, dft.FUSED_BACKWARD = None, True
                rows.append(dict(structure=kind, d=d, mode=mode, fwd_ms=fwd, fwd_bwd_ms=fb,
                                 x_dense_fwd=dense[0] / fwd, x_dense_fwd_bwd=dense[1] / fb))
            del s
            if not args.smoke:
                torch.cuda.empty_cache()
    result["timing"] = rows

    err = {(r["structure"], r["d"], r["mode"]): r["ratio"] for r in result["correctness"]}
    print(f"\n{result['device']}, n = {N_TOKENS} tokens, bf16; best dft config at d={SIZES[-1]}: {result['best_config_16384']}")
    print("| structure | d | path | fwd ms | f+b ms | x dense fwd | x dense f+b | err y / dx / dparam (x PyTorch bf16) |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        e = err.get((r["structure"], r["d"], r["mode"]))
        es = " / ".join(f"{v:.2f}" for v in e) if e else "-"
        print(f"| {r['structure']} | {r['d']} | {r['mode']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
              f"{r.get('x_dense_fwd', 1.0):.2f} | {r.get('x_dense_fwd_bwd', 1.0):.2f} | {es} |")
    result["wall_s"] = time.time() - t_start
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "fft_dft.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wall {result['wall_s']:.0f} s; wrote {os.path.join(out_dir, 'fft_dft.json')}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ptxas", action="store_true", help="sm_90 compile report of the configs (no GPU)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run under TRITON_INTERPRET=1 (tiny sizes)")
    ap.add_argument("--budget-s", type=float, default=220,
                    help="no new sweep config after this minus 70 s (a new config compiles two kernels, ~10-20 s each)")
    args = ap.parse_args()
    if args.ptxas:
        ptxas_report()
    else:
        gpu_main(args)


if __name__ == "__main__":
    main()
