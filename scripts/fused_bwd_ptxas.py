"""Registers, spills, shared memory and resident programs per SM of every fused-backward config, for sm_90,
compiled on any machine (no GPU needed: Triton's own ptxas assembles the PTX).

    PYTHONPATH=src python scripts/fused_bwd_ptxas.py          (~1 min on 2 CPU cores)

Shapes: the two stage backwards of Monarch b=128, c=1 at d=16384, N=8192 (G=128 blocks of 128x128), the
case where the v1 kernel ran at a third of the copy bandwidth on the H200. An SM holds at most
65536 registers, 228 KB of shared memory and 2048 threads; the fewest of the three bounds is printed as
"per SM". With one resident program per SM, its own software pipeline is all that hides memory latency.
"""

from __future__ import annotations

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
    """Compile like the JIT would specialise these values (ints equal to 1 become constants, multiples of
    16 are marked divisible) and run ptxas -v on the PTX."""
    fn = kernel.fn
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name.endswith("_ptr"):
            signature[name] = "*fp32" if name == "dw_ptr" else "*bf16"
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
    return dict(regs=regs, spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else 0,
                shared_kb=shared / 1024, per_sm=per_sm)


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
