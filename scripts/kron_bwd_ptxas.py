"""Registers, spills, shared memory and resident programs per SM of the Kronecker one-term backward kernels
for sm_90, compiled on any machine (no GPU needed: scripts/sm90.py).

    PYTHONPATH=src python scripts/kron_bwd_ptxas.py [--quick]     (a few minutes on 2 CPU cores)

Shapes: n = 8192 bf16 tokens, factors 128x128 (d = 16384, the headline case) and 128x256 (d = 32768), as
op.py launches them (contiguous dY, X, dX). Rows: the one-pass kernel (dX, dA, dB) for every i2 chunk
width BC x warps x stages, and the two-pass path's dX/dA kernel for comparison. An SM holds at most
65536 registers, 228 KB of shared memory and 2048 threads; the fewest of the three bounds is "per SM".
"""

from __future__ import annotations

import argparse
import sm90  # scripts/sm90.py: sets up the compile for sm_90 (no interpreter) and the path to src

from mmm.ops.kronecker import kernels as kk  # noqa: E402

N = 8192
FP32_PTRS = {"pa_ptr", "pb_ptr", "part_ptr"}  # fp32 partial sums; every other pointer is bf16


def compile_and_assemble(kernel, values: dict, constants: dict, num_warps: int, num_stages: int) -> dict:
    """sm90.compile_and_assemble with this script's pointer dtypes, plus the PTX's wgmma count."""
    r = sm90.compile_and_assemble(kernel, values, constants, num_warps, num_stages, FP32_PTRS)
    return {**r, "wgmma": r["ptx"].count("wgmma.mma_async")}


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
