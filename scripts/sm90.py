"""What the sm_90 (H100 / H200) compiler says of a Triton kernel, on any machine: no GPU is needed,
Triton's own ptxas assembles the PTX. Registers, spill bytes, shared memory and resident programs per
SM (the fewest of 65536 registers, 228 KB of shared memory and 2048 threads an SM holds).

    python scripts/sm90.py                          every kernel of tests/test_kernels_compile.py (~1 min)
    python scripts/sm90.py spectral_mix_kernel spectral_mix_kernel:forward      some of them

Each kernel is compiled with the pointer dtypes and constexprs that test lists for it (its variants
too, "kernel:variant"). scripts/fused_bwd_ptxas.py and scripts/kron_bwd_ptxas.py use `compile_and_assemble`
for configs and launch values of their own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile the GPU configs
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "src"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def assemble(compiled, num_warps: int) -> dict:
    """ptxas -v on a compiled kernel's PTX: regs, spill_bytes (stores + loads), shared_kb, per_sm, ptx."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = log.stdout + log.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    shared = compiled.metadata.shared
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256
    per_sm = min(65536 // (regs_per_warp * num_warps), (228 * 1024) // (shared + 1024), 2048 // (32 * num_warps))
    return dict(regs=regs, spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else 0,
                shared_kb=shared / 1024, per_sm=per_sm, ptx=ptx)


def compile_and_assemble(kernel, values: dict, constants: dict, num_warps: int, num_stages: int,
                         fp32_ptrs=frozenset()) -> dict:
    """Compile `kernel` (a JITFunction or an Autotuner) as the JIT would specialise these launch values
    (ints equal to 1 become constants, multiples of 16 are marked divisible; pointers bf16, those named in
    fp32_ptrs fp32), then `assemble` it."""
    fn = getattr(kernel, "fn", kernel)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_ptrs else "*bf16"
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
    return assemble(compiled, num_warps)


def main(names: list[str]) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_kernels_compile as listed

    names = names or list(listed.KERNELS) + list(listed.VARIANTS)
    for name in names:
        compiled, num_warps = listed.compile_for_sm90(name)
        r = assemble(compiled, num_warps)
        print(f"{name:34s} warps {num_warps}: {r['regs']:3d} regs  spills {r['spill_bytes']:5d} B  "
              f"smem {r['shared_kb']:6.1f} KB  {r['per_sm']} per SM", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
