"""H200: the FFT structures' paths (circulant, Toeplitz, LDR): correctness against fp64 and against
PyTorch's own bf16 error, then forward and forward+backward times at n = 8192 tokens against dense
cuBLAS, with time / floor. About 2-3 minutes on one H200.

    PYTHONPATH=src python scripts/gpu_fft_structures.py        (writes $OUT/fft_structures.{json,md})
    TRITON_INTERPRET=1 PYTHONPATH=src python scripts/gpu_fft_structures.py --smoke
        (the same code on CPU at tiny sizes, fp16 FFT emulated: checks the script, not the GPU)

Variants (see src/mmm/ops/fft/op.py):
  reference      the layer's plain PyTorch forward (rfft, einsum, irfft) differentiated by autograd
                 (what the 2026-11-28 bench measured)
  op-torch       mmm::fft_conv on rfft / irfft: frequency-domain backward, cached spectrum
  op-torch-nc    the same with the spectrum cache off (the cache's effect)
  packed-fp32    fp32 cuFFT on complex-pair views + Triton casts / spectral product / token reduction
  packed-fp16    the same with fp16 FFTs and spectra (the default for bf16 on CUDA, power-of-two L)
  packed-fp16-nc the same with the spectrum cache off
  chunked        (LDR) the token-chunked product with recomputing backward, cached spectra
Floors: `floor` is the bench's (max of FLOPs / matmul rate and the layer's minimum bytes / copy
bandwidth, rates measured in this run); `pipe` is the bytes the variant's own passes must move (cast
in, FFT, product, inverse FFT, cast out, and the backward's reduction) / copy bandwidth, so
time / pipe says how close each pass runs to bandwidth and floor / pipe what the pass structure costs.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import traceback

import torch

import mmm
from mmm.bench.machine import machine_header
from mmm.bench.timing import FULL, median_ms
from mmm.ops import reference_only
from mmm.ops.fft import force_mode
from mmm.ops.fft import op as fft_op
from mmm.structures import LDR, Circulant, Toeplitz
from mmm.structures._fft import spectrum_cache

OUT = os.environ.get("OUT", ".")
SMOKE = "--smoke" in sys.argv
dev, bf = torch.device("cpu" if SMOKE else "cuda"), torch.bfloat16
N = 64 if SMOKE else 8192
DIMS = (64, 128) if SMOKE else (4096, 16384, 32768)
CHECK_DIMS = (64, 128) if SMOKE else (4096, 16384)
CHECK_TOKENS = 16 if SMOKE else 2048
T0 = time.time()
torch.manual_seed(0)


def variant(name: str):
    stack = contextlib.ExitStack()
    if name == "reference":
        stack.enter_context(reference_only())
    elif name.startswith("op-torch"):
        stack.enter_context(force_mode("torch"))
    elif name.startswith("packed-fp32"):
        stack.enter_context(force_mode("packed"))
    elif name.startswith("packed-fp16"):
        stack.enter_context(force_mode("packed16"))
    if name.endswith("-nc"):
        stack.enter_context(spectrum_cache(False))
    return stack


VARIANTS = ["reference", "op-torch", "op-torch-nc", "packed-fp32", "packed-fp16", "packed-fp16-nc"]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def build(kind: str, d_in: int, d_out: int, dtype):
    if kind == "circulant":
        return Circulant(d_in, d_out, mmm.CirculantConfig(), device=dev, dtype=dtype)
    if kind == "toeplitz":
        return Toeplitz(d_in, d_out, mmm.ToeplitzConfig(), device=dev, dtype=dtype)
    return LDR(d_in, d_out, mmm.LDRConfig(rank=4), device=dev, dtype=dtype)


def fft_len(s, x):
    """The length of s's FFT product for input x (Toeplitz's depends on x's path)."""
    return s.product_length(x) if isinstance(s, Toeplitz) else s.block_size


# --------------------------------------------------------------------------------------------------
# correctness: every variant in bf16 (and packed-fp32 in fp32) against fp64, and PyTorch's own error
# --------------------------------------------------------------------------------------------------

def grads_of(module, x, g):
    x = x.clone().requires_grad_(True)
    y = module(x)
    (p,) = list(module.parameters())
    dx, dp = torch.autograd.grad(y, [x, p], g)
    return y.detach(), dx, dp


def check(kind, d_in, d_out, tokens, rows):
    s64 = build(kind, d_in, d_out, torch.float64)
    s = build(kind, d_in, d_out, bf)
    with torch.no_grad():
        s64.load_state_dict({k: v.bfloat16().double() for k, v in s64.state_dict().items()})  # exactly bf16 values
        s.load_state_dict(s64.state_dict())
    x64 = torch.randn(tokens, d_in, device=dev, dtype=torch.float64)
    g64 = torch.randn(tokens, d_out, device=dev, dtype=torch.float64)
    with force_mode("torch"):
        ref = grads_of(s64, x64, g64)  # fp64 FFTs: the op in fp64 is tested against dense fp64 on CPU
    # PyTorch's own bf16 error for the same product: dense bf16 matmuls, the weight gradient mapped to
    # the parameter through to_dense in fp64.
    w64 = s64.to_dense().detach()
    wb, xb, gb = w64.bfloat16(), x64.bfloat16(), g64.bfloat16()
    (p64,) = list(s64.parameters())
    dp_torch = torch.autograd.grad(s64.to_dense(), p64, (gb.T @ xb).double())[0]
    torch_err = [rel(xb @ wb.T, ref[0]), rel(gb @ wb, ref[1]), rel(dp_torch, ref[2])]
    del w64, wb
    empty_cache()
    for name in VARIANTS:
        if name.endswith("-nc"):
            continue
        r = dict(kind=kind, d_in=d_in, d_out=d_out, tokens=tokens, dtype="bfloat16", variant=name, L=fft_len(s, xb),
                 torch_bf16_err=dict(zip(["y", "dx", "dparam"], torch_err)))
        try:
            with variant(name):
                r["mode"] = fft_op.pick_mode(xb, fft_len(s, xb)) if name != "reference" else "reference"
                got = grads_of(s, xb, gb)
            errs = [rel(a, b) for a, b in zip(got, ref)]
            r["err"] = dict(zip(["y", "dx", "dparam"], errs))
            r["ratio"] = {k: e / t for k, e, t in zip(["y", "dx", "dparam"], errs, torch_err)}
            r["ok_2x"] = all(v <= 2.0 for v in r["ratio"].values())
        except Exception as e:  # noqa: BLE001 - record and go on: one broken path must not hide the others
            r["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(r)
        print(json.dumps(r, default=lambda v: round(v, 6)), flush=True)
    # fp32 inputs and parameters on the packed path: fp32 accuracy expected
    s32 = build(kind, d_in, d_out, torch.float32)
    s32.load_state_dict(s64.state_dict())
    r = dict(kind=kind, d_in=d_in, d_out=d_out, tokens=tokens, dtype="float32", variant="packed-fp32", L=fft_len(s32, x64.float()))
    try:
        with force_mode("packed"):
            got = grads_of(s32, x64.float(), g64.float())
        r["err"] = dict(zip(["y", "dx", "dparam"], [rel(a, b) for a, b in zip(got, ref)]))
        r["ok_1e-5"] = all(v < 1e-5 for v in r["err"].values())
    except Exception as e:  # noqa: BLE001
        r["error"] = f"{type(e).__name__}: {e}"
    rows.append(r)
    print(json.dumps(r, default=lambda v: round(v, 8)), flush=True)


def check_range(rows):
    """fp16 FFT on rows far outside fp16's range, a constant row, a spike and a DC-heavy kernel."""
    d = CHECK_DIMS[0]
    s = build("circulant", d, d, torch.float32)
    with torch.no_grad():
        s.c.fill_(1.0 / d).add_(torch.randn(d, device=dev) * 1e-3).mul_(1e3)
    x = torch.randn(8, d, device=dev)
    x[0] = 3e4
    x[1] *= 1e-30
    x[2] *= 1e30
    x[3, 7] = 6e4
    xb = x.bfloat16()
    sb = build("circulant", d, d, bf)
    sb.load_state_dict(s.state_dict())
    ref = xb.double() @ sb.to_dense().double().T
    r = dict(kind="circulant", d_in=d, d_out=d, check="range")
    try:
        with force_mode("packed16"):
            y = sb(xb)
        r["finite"] = bool(torch.isfinite(y).all())
        r["row_err"] = [rel(y[t], ref[t]) for t in range(8)]
        r["row_err_bf16_rounding"] = [rel(ref[t].bfloat16(), ref[t]) for t in range(8)]
    except Exception as e:  # noqa: BLE001
        r["error"] = f"{type(e).__name__}: {e}"
    rows.append(r)
    print(json.dumps(r, default=lambda v: round(v, 6)), flush=True)


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------

def pipeline_bytes(s, tokens: int, name: str, L: int) -> tuple[float, float] | None:
    """(forward, forward+backward) bytes moved by the packed path's passes for bf16 in and out, at FFT
    length L."""
    if not name.startswith("packed") or isinstance(s, LDR):
        return None
    w = 2 if "fp16" in name else 4  # bytes of one real in the FFTs and spectra
    if isinstance(s, Toeplitz) and s.block:
        g = s.block
        p, q, n_in, n_out = s.out_features // g, s.in_features // g, g, g
    elif isinstance(s, Toeplitz):
        p = q = 1
        n_in, n_out = s.in_features, s.out_features
    else:
        g = s.block_size
        p, q, n_in, n_out = s.out_features // g, s.in_features // g, g, g

    def one_way(qi, ni, po, no):
        cast_in = tokens * qi * (2 * ni + w * L)
        fft = 2 * tokens * qi * L * w
        mix = tokens * (po * qi + po) * L * w  # each input block read once per output block
        ifft = 2 * tokens * po * L * w
        cast_out = tokens * po * no * (w + 2)
        return cast_in + fft + mix + ifft + cast_out

    fwd = one_way(q, n_in, p, n_out)
    corr = tokens * 2 * p * q * L * w  # every (output, input) block pair reads both spectra
    return fwd, fwd + one_way(p, n_out, q, n_in) + corr


def timed(fn_fwd, fn_fwdbwd, grad_to_none):
    t_f = median_ms(fn_fwd, dev, FULL)
    t_fb = median_ms(fn_fwdbwd, dev, FULL, grad_to_none=grad_to_none)
    if SMOKE:
        return t_f, t_fb, 0.0
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn_fwdbwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return t_f, t_fb, peak


def time_case(kind, d_in, d_out, rates, rows, names):
    x = torch.randn(N, d_in, device=dev, dtype=bf, requires_grad=True)
    g = torch.randn(N, d_out, device=dev, dtype=bf)
    W = (torch.randn(d_out, d_in, device=dev, dtype=bf) / math.sqrt(d_in)).requires_grad_(True)

    def dense_fb():
        (x @ W.T).backward(g)

    t_f, t_fb, peak = timed(lambda: x @ W.T, dense_fb, [x, W])
    dense = dict(kind="dense", d_in=d_in, d_out=d_out, variant="cuBLAS", fwd_ms=t_f, fwd_bwd_ms=t_fb, peak_mib=peak)
    io = 2 * N
    dense_bytes = io * (d_in + d_out) + 2 * d_in * d_out
    dense["floor_fwd_ms"] = max(2 * N * d_in * d_out / (rates["matmul_tflops"] * 1e12), dense_bytes / (rates["copy_gbps"] * 1e9)) * 1e3
    rows.append(dense)
    print(json.dumps(dense, default=lambda v: round(v, 4)), flush=True)
    del W
    empty_cache()
    s = build(kind, d_in, d_out, bf)
    params = list(s.parameters())
    bw = rates["copy_gbps"] * 1e9
    min_fwd = io * (d_in + d_out) + s.param_bytes()
    min_fb = io * (3 * d_in + 2 * d_out) + 3 * s.param_bytes()
    flops = s.flops(N)
    floor_f = max(flops / (rates["matmul_tflops"] * 1e12), min_fwd / bw) * 1e3
    floor_fb = max(3 * flops / (rates["matmul_tflops"] * 1e12), min_fb / bw) * 1e3
    for name in names:
        r = dict(kind=kind, d_in=d_in, d_out=d_out, variant=name)
        try:
            with variant(name):
                r["L"] = fft_len(s, x)
                r["mode"] = fft_op.pick_mode(x, r["L"]) if kind != "ldr" and name != "reference" else name

                def fb():
                    s(x).backward(g)

                r["fwd_ms"], r["fwd_bwd_ms"], r["peak_mib"] = timed(lambda: s(x), fb, [x] + params)
            r["speedup_fwd"] = dense["fwd_ms"] / r["fwd_ms"]
            r["speedup_fwd_bwd"] = dense["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["bwd_over_fwd"] = (r["fwd_bwd_ms"] - r["fwd_ms"]) / r["fwd_ms"]
            r["floor_fwd_ms"], r["floor_fwd_bwd_ms"] = floor_f, floor_fb
            r["fwd_over_floor"] = r["fwd_ms"] / floor_f
            r["fwd_bwd_over_floor"] = r["fwd_bwd_ms"] / floor_fb
            pb = pipeline_bytes(s, N, name, r["L"])
            if pb:
                r["pipe_fwd_ms"], r["pipe_fwd_bwd_ms"] = pb[0] / bw * 1e3, pb[1] / bw * 1e3
                r["fwd_over_pipe"] = r["fwd_ms"] / r["pipe_fwd_ms"]
                r["fwd_bwd_over_pipe"] = r["fwd_bwd_ms"] / r["pipe_fwd_bwd_ms"]
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(r)
        print(json.dumps(r, default=lambda v: round(v, 4)), flush=True)
        for p in params:
            p.grad = None
        x.grad = None
        empty_cache()


def empty_cache():
    if not SMOKE:
        torch.cuda.empty_cache()


def markdown(header, checks, times) -> str:
    out = ["# FFT structures on the GPU", "",
           f"- device: {header['device']}   torch {header['versions']['torch']}, triton {header['versions']['triton']}, cuda {header['versions']['cuda']}",
           f"- measured in this run: matmul {header['matmul_tflops']:.1f} TFLOP/s (bf16), copy {header['copy_gbps']:.0f} GB/s; n = {N} tokens, bf16",
           "", "## Correctness (bf16 unless noted): error vs fp64, and / PyTorch's own bf16 error for the dense product", "",
           "| structure | d | variant | mode | y err | dx err | dparam err | y / torch | dx / torch | dparam / torch | ok (<= 2x) |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in checks:
        if c.get("check") == "range" or "err" not in c:
            continue
        e, rt = c["err"], c.get("ratio", {})
        out.append(f"| {c['kind']} | {c['d_in']}x{c['d_out']} | {c['variant']}{'' if c['dtype'] == 'bfloat16' else ' (fp32)'} | {c.get('mode', '-')} | "
                   f"{e['y']:.2e} | {e['dx']:.2e} | {e['dparam']:.2e} | " + " | ".join(f"{rt[k]:.2f}" if k in rt else "-" for k in ("y", "dx", "dparam"))
                   + f" | {c.get('ok_2x', c.get('ok_1e-5'))} |")
    for c in checks:
        if "error" in c:
            out.append(f"- {c['kind']} {c.get('variant', c.get('check'))}: **{c['error']}**")
        if c.get("check") == "range" and "row_err" in c:
            out.append(f"- range check (fp16 FFT, rows 3e4 constant / 1e-30 / 1e30 / spike 6e4, DC-heavy kernel): finite={c['finite']}, "
                       f"row errors {', '.join(f'{v:.1e}' for v in c['row_err'])} (bf16 rounding alone: {c['row_err_bf16_rounding'][4]:.1e})")
    out += ["", "## Timing (speedup against dense cuBLAS bf16 of the same shape, same run)", "",
            "| structure | d | variant | mode | fwd ms | f+b ms | bwd/fwd | x dense fwd | x dense f+b | fwd/floor | f+b/floor | f+b/pipe | pipe f+b ms | peak MiB |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in times:
        if "error" in r:
            out.append(f"| {r['kind']} | {r['d_in']}x{r['d_out']} | {r['variant']} | error: {r['error'][:80]} |")
            continue
        if r["kind"] == "dense":
            out.append(f"| dense | {r['d_in']}x{r['d_out']} | cuBLAS | - | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                       f"{(r['fwd_bwd_ms'] - r['fwd_ms']) / r['fwd_ms']:.2f} | 1.00 | 1.00 | {r['fwd_ms'] / r['floor_fwd_ms']:.2f} | - | - | - | {r['peak_mib']:.0f} |")
            continue

        def f(k, fmt="{:.2f}"):
            return fmt.format(r[k]) if k in r else "-"
        out.append(f"| {r['kind']} | {r['d_in']}x{r['d_out']} | {r['variant']} | {r.get('mode', '-')} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                   f"{r['bwd_over_fwd']:.2f} | {r['speedup_fwd']:.2f} | {r['speedup_fwd_bwd']:.2f} | {r['fwd_over_floor']:.1f} | "
                   f"{r['fwd_bwd_over_floor']:.1f} | {f('fwd_bwd_over_pipe')} | {f('pipe_fwd_bwd_ms', '{:.3f}')} | {r['peak_mib']:.0f} |")
    out.append("")
    out.append(f"wall {time.time() - T0:.0f} s")
    return "\n".join(out)


def main():
    assert SMOKE or torch.cuda.is_available(), "needs a CUDA device (or --smoke)"
    header = machine_header(dev, bf, quick=False)
    print(json.dumps(header), flush=True)
    checks: list[dict] = []
    for kind in ("circulant", "toeplitz"):
        for d in CHECK_DIMS:
            check(kind, d, d, CHECK_TOKENS, checks)
    check("circulant", CHECK_DIMS[0] // 4, CHECK_DIMS[0], CHECK_TOKENS, checks)  # block-circulant, 4 output blocks
    check_range(checks)
    print(f"correctness done at {time.time() - T0:.0f} s", flush=True)
    times: list[dict] = []
    for d in DIMS:
        time_case("circulant", d, d, header, times, VARIANTS)
        time_case("toeplitz", d, d, header, times, [v for v in VARIANTS if not v.endswith("-nc")])
        print(f"d={d} done at {time.time() - T0:.0f} s", flush=True)
    time_case("circulant", DIMS[0], 4 * DIMS[0], header, times, ["reference", "op-torch", "packed-fp32", "packed-fp16"])  # FFN up
    for d in DIMS[:2]:
        time_case("ldr", d, d, header, times, ["reference", "fused"])  # "fused": the two fft_conv products
    md = markdown(header, checks, times)
    with open(os.path.join(OUT, "fft_structures.json"), "w") as fh:
        json.dump({"machine": header, "correctness": checks, "timing": times, "wall_s": time.time() - T0}, fh, indent=1)
    with open(os.path.join(OUT, "fft_structures.md"), "w") as fh:
        fh.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
