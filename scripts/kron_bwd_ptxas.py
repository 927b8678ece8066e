"""Registers, spills, shared memory and resident programs per SM of the Kronecker one-term backward kernels
for sm_90, compiled on any machine (no GPU needed: Triton's own ptxas assembles the PTX).

    PYTHONPATH=src python scripts/kron_bwd_ptxas.py [--quick]     (a few minutes on 2 CPU cores)

Shapes: n = 8192 bf16 tokens, factors 128x128 (d = 16384, the headline case) and 128x256 (d = 32768), as
op.py launches them (contiguous dY, X, dX). Rows: the one-pass kernel (dX, dA, dB) for every i2 chunk
width BC x warps x stages, and the two-pass path's dX/dA kernel for comparison. An SM holds at most
65536 registers, 228 KB of shared memory and 2048 threads; the fewest of the three bounds is "per SM".
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile the GPU configs
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mmm.ops.kronecker import kernels as kk  # noqa: E402

N = 8192
FP32_PTRS = {"pa_ptr", "pb_ptr", "part_ptr"}  # fp32 partial sums; every other pointer is bf16


def compile_and_assemble(kernel, values: dict, constants: dict, num_warps: int, num_stages: int) -> dict:
    """Compile like the JIT would specialise these values (ints equal to 1 become constants, multiples of
    16 are marked divisible) and run ptxas -v on the PTX."""
    fn = kernel.fn
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FP32_PTRS else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in constants:
            signature[name], constexprs[name] = "constexpr", constants[name]
        elif values[name] == 1 and name not in fn.do_not_specialize:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0 and name not in fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = log.stdout + log.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    shared = compiled.metadata.shared
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256
    per_sm = min(65536 // (regs_per_warp * num_warps), (228 * 1024) // (shared + 1024), 2048 // (32 * num_warps))
    wgmma = compiled.asm["ptx"].count("wgmma.mma_async")
    return dict(regs=regs, spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else 0,
                shared_kb=shared / 1024, per_sm=per_sm, wgmma=wgmma)


def launch_values(f1: int, f2: int, bc: int) -> dict:
    """The one-pass kernel's integer arguments as kron_bwd_one_pass passes them on 132 SMs."""
    chunks = -(-f2 // bc)
    splits = max(1, 132 * kk.ONE_PASS_PROGRAMS_PER_SM // chunks)
    tok = -(-N // splits)
    return dict(N=N, I1=f1, I2=f2, O1=f1, O2=f2, TOK=tok, KEY_N=N,
                sdn=f1 * f2, sd1=f2, sd2=1, sxn=f1 * f2, sx1=f2, sx2=1, sao=f1, sai=1, sbo=f2, sbi=1,
                sen=f1 * f2, se1=f2, se2=1, pas=chunks * f1 * f1, pac=f1 * f1, pao=f1, pai=1,
                pbs=f2 * f2, pbo=f2, pbi=1)


def dx_da_values(f1: int, f2: int) -> dict:
    tok = -(-N // (4 * 132))
    return dict(N=N, I1=f1, I2=f2, O1=f1, O2=f2, TOK=tok, KEY_N=N,
                sdn=f1 * f2, sd1=f2, sd2=1, sxn=f1 * f2, sx1=f2, sx2=1, sao=f1, sai=1, sbo=f2, sbi=1,
                sen=f1 * f2, se1=f2, se2=1, sps=f1 * f1, spo=f1, spi=1)


def report(label: str, r: dict) -> None:
    print(f"  {label:34s} {r['regs']:3d} regs  spills {r['spill_bytes']:5d} B  smem {r['shared_kb']:6.1f} KB  "
          f"{r['per_sm']} per SM  wgmma {r['wgmma']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the 128x128 case and the default chunk")
    args = ap.parse_args()
    shapes = [(128, 128)] if args.quick else [(128, 128), (128, 256)]
    for f1, f2 in shapes:
        print(f"factors {f1}x{f1} (x) {f2}x{f2}, n = {N}, bf16")
        chunks = [kk.ONE_PASS_CHUNK] if args.quick else [32, 64, 128]
        for bc in chunks:
            for warps in (4, 8):
                for stages in (1, 2, 3, 4):
                    consts = dict(BO1=f1, BI1=f1, BO2=f2, BC=bc, PRECISION="ieee")
                    try:
                        r = compile_and_assemble(kk.kron_bwd_one_pass_kernel, launch_values(f1, f2, bc), consts,
                                                 warps, stages)
                    except Exception as e:  # e.g. shared memory over the limit
                        print(f"  one-pass BC={bc:3d} warps {warps} stages {stages}: failed: {str(e)[:100]}")
                        continue
                    report(f"one-pass BC={bc:3d} warps {warps} stages {stages}", r)
        if not args.quick:
            for bc in (64, 128):
                for warps in (4, 8):
                    consts = dict(BO1=f1, BI1=f1, BO2=f2, BC=bc, PRECISION="ieee")
                    report(f"dx/dA    BC={bc:3d} warps {warps} stages 2",
                           compile_and_assemble(kk.kron_dx_da_kernel, dx_da_values(f1, f2), consts, warps, 2))


if __name__ == "__main__":
    main()
