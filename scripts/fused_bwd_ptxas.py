"""Registers, spills, shared memory and resident programs per SM of every fused-backward config, for sm_90,
compiled on any machine (no GPU needed: scripts/sm90.py).

    PYTHONPATH=src python scripts/fused_bwd_ptxas.py          (~1 min on 2 CPU cores)

Shapes: the two stage backwards of Monarch b=128, c=1 at d=16384, N=8192 (G=128 blocks of 128x128), the
case where the v1 kernel ran at a third of the copy bandwidth on the H200. An SM holds at most
65536 registers, 228 KB of shared memory and 2048 threads; the fewest of the three bounds is printed as
"per SM". With one resident program per SM, its own software pipeline is all that hides memory latency.
"""

from __future__ import annotations

import sm90  # scripts/sm90.py: sets up the compile for sm_90 (no interpreter) and the path to src

from mmm.ops.blockdiag import kernels as bk  # noqa: E402

N, G, P, Q = 8192, 128, 128, 128
TOKENS_PER_PROG = 2816  # what _token_splits gives for 128 blocks on 132 SMs
COMMON = dict(N=N, P=P, Q=Q, TOKENS_PER_PROG=TOKENS_PER_PROG, w_sg=P * Q, w_sr=Q, w_sc=1,
              dw_ss=G * P * Q, dw_sg=P * Q, dw_sr=Q, dw_sc=1, split=1, KEY_N=N)
STAGES = {  # argument values of stage_backward's launch (see monarch/kernels.py for the layouts)
    "stage1 (d_out token-minor, x rows)": dict(
        go_sg=P * N, go_sr=1, go_sc=N, x_sg=Q, x_sr=G * Q, x_sc=1, x_sc_hi=0,
        dx_sg=Q, dx_sr=G * Q, dx_sc=1, dx_sc_hi=0, LAYOUT=2),
    "stage2 (d_out rows, x token-minor)": dict(
        go_sg=P, go_sr=G * P, go_sc=1, x_sg=N, x_sr=1, x_sc=N, x_sc_hi=Q * N,
        dx_sg=N, dx_sr=1, dx_sc=N, dx_sc_hi=Q * N, LAYOUT=1),
}
CONSTANTS = dict(SPLIT_X=False, UPCAST=False, FP32_IEEE=False, BP=P, BQ=Q)


def compile_and_assemble(kernel, values: dict, constants: dict, num_warps: int, num_stages: int) -> dict:
    """sm90.compile_and_assemble with this script's pointer dtypes (dw's fp32 slots)."""
    return sm90.compile_and_assemble(kernel, values, constants, num_warps, num_stages, {"dw_ptr"})


def main() -> None:
    for stage, layout in STAGES.items():
        print(stage)
        values = {**COMMON, **layout}
        rows = [("v1", bk.block_bwd_fused_kernel, c) for c in bk._fused_configs()]
        rows += [("v2", bk.block_bwd_fused_v2_kernel, c) for c in bk._fused_v2_configs()]
        for variant, kernel, cfg in rows:
            r = compile_and_assemble(kernel, values, {**CONSTANTS, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)
            print(f"  {variant} {str(cfg.kwargs):26s} warps {cfg.num_warps} stages {cfg.num_stages}:  "
                  f"{r['regs']:3d} regs  spills {r['spill_bytes']:4d} B  smem {r['shared_kb']:6.1f} KB  "
                  f"{r['per_sm']} per SM", flush=True)


if __name__ == "__main__":
    main()
