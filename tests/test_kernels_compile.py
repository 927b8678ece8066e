"""Every Triton kernel of the package compiles for an H100/H200 (CUDA sm_90), on a machine without a GPU.

The CPU tests run the kernels under TRITON_INTERPRET=1, which executes their Python source directly and
so misses what only the compiler checks: a non-constexpr module global read inside a kernel (the H200
failed with "Cannot access global variable PI" while CI was green), a type or layout error, a shared
memory overflow. Here each kernel goes through triton.compile for sm_90 (AST -> TTIR -> TTGIR -> PTX ->
cubin, ptxas included) with the pointer dtypes, constexprs and first autotune config that the op
wrappers launch with on a GPU.

`triton.jit` itself reads TRITON_INTERPRET (it then returns an interpreter object, not a compilable
JITFunction), and the kernel modules pick their tiles and autotune configs from it at import; conftest.py
sets it for the whole CPU test process. So the compiling is done by this file run as a script, in two
subprocesses (one per core) with the variable unset, each compiling half of the kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# kernel -> (module under mmm.ops, pointer dtype, pointers of another dtype, constexprs the launcher passes;
# an upper-case string there is the name of the module constant the launcher passes). Autotuned kernels
# also get the kwargs, warps and stages of their first GPU config.
KERNELS = {
    # FFT path: bf16 x in, fp16 work rows (the scaled "packed16" mode), fp32 spectra, bf16 out
    "cast_in_kernel": ("fft", "*bf16", {"out_ptr": "*fp16", "scale_ptr": "*fp32"}, dict(SCALE=True, TWIST=False, BLOCK="CAST_BLOCK")),
    "spectral_mix_kernel": ("fft", "*fp16", {"k_ptr": "*fp32", "gain_ptr": "*fp32", "sx_ptr": "*fp32", "sdy_ptr": "*fp32",
                                             "part_ptr": "*fp32"},
                            dict(CONJ=True, CORR=True, HAS_SCALE=True, ODD=False, BT=16, BF="BF_MIX")),  # the fused backward (BT_MIX / 2)
    "spectral_corr_kernel": ("fft", "*fp16", {"sx_ptr": "*fp32", "sdy_ptr": "*fp32", "part_ptr": "*fp32"},
                             dict(HAS_SCALE=True, ODD=False, BT="BT_CORR", BF="BF_CORR")),
    "cast_out_kernel": ("fft", "*fp32", {"out_ptr": "*bf16"}, dict(ROWSCALE=True, TWIST=False, BLOCK="CAST_BLOCK")),
    "gains_kernel": ("fft", "*fp32", {}, dict(BLOCK="GAIN_BLOCK")),
    "corr_finish_kernel": ("fft", "*fp32", {}, dict(ODD=False, BLOCK="CAST_BLOCK")),
    # block-diagonal / Monarch stages, bf16 (the weight gradient's fp32 slots for dw)
    "block_gemm_kernel": ("blockdiag", "*bf16", {}, dict(SPLIT_A=1, SPLIT_B=False, SPLIT_C=True, UPCAST=False, FP32_IEEE=False)),
    "block_bwd_fused_kernel": ("blockdiag", "*bf16", {"dw_ptr": "*fp32"},
                               dict(SPLIT_X=True, UPCAST=False, FP32_IEEE=False, BP=64, BQ=64)),
    "block_bwd_fused_v2_kernel": ("blockdiag", "*bf16", {"dw_ptr": "*fp32"},
                                  dict(SPLIT_X=True, UPCAST=False, FP32_IEEE=False, BP=128, BQ=128)),
    # the Monarch shuffle copy (cuBLAS copy path), bf16, c = 64
    "swap_blocks_kernel": ("monarch", "*bf16", {}, dict(BN=128, BC=64)),
    # Kronecker factors 32 x 32 (d = 1024), bf16; fp32 partial sums
    "kron_apply_kernel": ("kronecker", "*bf16", {}, dict(R=1, BI1=32, BO1=32, BI2=32, PRECISION="ieee")),
    "kron_factor_grad_kernel": ("kronecker", "*bf16", {"out_ptr": "*fp32"}, dict(BP=32, BK1=32, BK2=32, PRECISION="ieee")),
    "kron_dx_da_kernel": ("kronecker", "*bf16", {"part_ptr": "*fp32"}, dict(BO1=32, BI1=32, BO2=32, PRECISION="ieee")),
    "kron_bwd_one_pass_kernel": ("kronecker", "*bf16", {"pa_ptr": "*fp32", "pb_ptr": "*fp32"},
                                 dict(BO1=32, BI1=32, BO2=32, BC=32, PRECISION="ieee")),
    # linear attention, bf16, DK = DV = 128, elu features, normalised, causal; fp32 states and row factors;
    # whole chunks (FULL_CHUNKS) in three of them, masked in dq/dk; the default path (ZDOT in chunk_state and dqdk: kernels.ZDOT_DEFAULT; gpu_linear_attention_configs.py --ir
    # compiles it both ways); each map's features written once (op.map_costs): chunk_state writes them,
    # the later kernels read them as they are (FEATURE_GIVEN = 3)
    "chunk_state_kernel": ("linear_attention", "*bf16", {"rden_ptr": "*fp32", "r_ptr": "*fp32", "drden_ptr": "*fp32",
                                                     "delta_ptr": "*fp32", "st_ptr": "*fp32"},
                           dict(DK=128, DV=128, FEATURE=1, NORMALIZE=True, BWD=True, HAS_DRDEN=True, HAS_DELTA=True, DOT_MODE=0,
                                ZDOT=True, HAS_LAG=False, FULL_CHUNKS=True, WRITE_F=True)),
    "scan_kernel": ("linear_attention", "*fp32", {}, dict(REVERSE=True, BLOCK="SCAN_BLOCK")),
    "fwd_kernel": ("linear_attention", "*bf16", {"rden_ptr": "*fp32", "st_ptr": "*fp32"},
                   dict(DK=128, DV=128, FEATURE=1, NORMALIZE=True, CAUSAL=True, DOT_MODE=0, ZDOT=False, HAS_LAG=False,
                        FULL_CHUNKS=True, PHI_K=3)),
    "bwd_dqdk_kernel": ("linear_attention", "*bf16", {"r_ptr": "*fp32", "st_ptr": "*fp32", "dst_ptr": "*fp32"},
                        dict(DK=128, DV=128, FEATURE=1, NORMALIZE=True, CAUSAL=True, DOT_MODE=0, PART=1, ZDOT=True,
                             HAS_LAG=True, FULL_CHUNKS=False, INTRA=True, PHI_Q=3, PHI_K=3, WRITE_F=False)),
    "bwd_dv_kernel": ("linear_attention", "*bf16", {"dst_ptr": "*fp32"},
                      dict(DK=128, DV=128, FEATURE=3, NORMALIZE=True, CAUSAL=True, DOT_MODE=0, HAS_LAG=True,
                           FULL_CHUNKS=True, INTRA=True)),
    # fused causal hybrid, bf16, DK = DV = 128, elu, window (chunk) 64, whole chunks; fp32 lse / row factors
    "hybrid_fwd_kernel": ("linear_attention.hybrid_kernels", "*bf16",
                          {"rfar_ptr": "*fp32", "lse_ptr": "*fp32", "st_ptr": "*fp32", "c_ptr": "*fp32"},
                          dict(DK=128, DV=128, FEATURE=1, DOT_MODE=0, FULL_CHUNKS=True, BLOCK=False, BT=64, W=64)),
    "band_dq_kernel": ("linear_attention.hybrid_kernels", "*bf16", {"lse_ptr": "*fp32", "delta_ptr": "*fp32"},
                       dict(DK=128, DV=128, DOT_MODE=0, BT=64, W=64)),
    "band_dkdv_kernel": ("linear_attention.hybrid_kernels", "*bf16", {"lse_ptr": "*fp32", "delta_ptr": "*fp32"},
                         dict(DK=128, DV=128, DOT_MODE=0, BT=64, W=64)),
    "band_diag_kernel": ("linear_attention.hybrid_kernels", "*bf16", {"lse_ptr": "*fp32"},
                         dict(DK=128, DV=128, DOT_MODE=0, BT=64)),
    # FFT as DFT GEMMs ("fft.dft_kernels": a module name with a dot is taken as is), 128 x 128 tiles, two
    # Toeplitz branches, bf16 rows, fp16 tables and scratch, fp32 spectrum, partial sums and stash
    "dft_conv_kernel": ("fft.dft_kernels", "*fp16",
                        {"x_ptr": "*bf16", "y_ptr": "*bf16", "u_ptr": "*bf16", "k_ptr": "*fp32", "gain_ptr": "*fp32",
                         "part_ptr": "*fp32", "stash_ptr": "*fp32"},
                        dict(N1=128, N2=128, NB=2, BK=32, BN=128, KC=32, CORR=True, BOUND=2.0**14, PREC="tf32",
                             num_warps=8)),
    "dft_corr_kernel": ("fft.dft_kernels", "*fp16",
                        {"x_ptr": "*bf16", "dy_ptr": "*bf16", "part_ptr": "*fp32", "stash_ptr": "*fp32"},
                        dict(N1=128, N2=128, BK=32, KC=32, BOUND=2.0**14, PREC="tf32", num_warps=8)),
}
# Variants compiled as well: "kernel:variant" -> constexprs that replace the kernel's entry in KERNELS.
# block: the block hybrid (hybrid_op, window_shape='block'): its forward, and the unlagged far-part
# backward without the within-chunk terms, at its chunk of 64. writes_keys, zdot: see there.
VARIANTS = {
    "hybrid_fwd_kernel:block": dict(BLOCK=True),
    "bwd_dqdk_kernel:block": dict(HAS_LAG=False, INTRA=False),
    # the lagged backward's first launch (dk) writes the key features for the later ones
    "bwd_dqdk_kernel:writes_keys": dict(PART=2, PHI_K=1, WRITE_F=True),
    # fwd's ZDOT (off by default): the dots that stand in for the normalizer's sums
    "fwd_kernel:zdot": dict(ZDOT=True),
    "bwd_dv_kernel:block": dict(HAS_LAG=False, INTRA=False),
    "spectral_mix_kernel:forward": dict(CONJ=False, CORR=False, HAS_SCALE=False, BT="BT_MIX"),
    # fft_conv(odd=True) (LDR's skew-circulant step): twisted rows, odd-frequency pairs
    "cast_in_kernel:odd": dict(TWIST=True),
    "spectral_mix_kernel:odd": dict(ODD=True),
    "spectral_corr_kernel:odd": dict(ODD=True),
    "cast_out_kernel:odd": dict(TWIST=True, BLOCK=512),  # CAST_BLOCK // 4
    "corr_finish_kernel:odd": dict(ODD=True),
}
FLOAT_SCALARS = {"bound", "eps", "scale", "sm_scale"}  # every other non-constexpr argument is an int (i32)
# Kernels launched through torch.library ops: traced by torch.compile, inductor passes their float
# arguments as fp64 (an H100 run failed to compile fwd_kernel so: z, carried in the loop as fp32, became
# fp64). Compiled a second time with fp64 floats.
TRACED_WITH_FP64 = ["chunk_state_kernel", "fwd_kernel", "bwd_dqdk_kernel", "bwd_dv_kernel", "hybrid_fwd_kernel",
                    "band_dq_kernel", "band_dkdv_kernel", "band_diag_kernel"]
FP64_SUFFIX = ":fp64"


def compile_for_sm90(name: str):
    """Compiles one kernel of KERNELS (raises what the compiler raises); returns the compiled kernel and
    its warps (scripts/sm90.py reports its registers and spills). Needs TRITON_INTERPRET unset."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, fp64 = name.removesuffix(FP64_SUFFIX), name.endswith(FP64_SUFFIX)
    variant = VARIANTS.get(name, {})
    name = name.split(":")[0]
    module_name, ptr, ptr_overrides, consts = KERNELS[name]
    consts = {**consts, **variant}  # "num_warps" there is a launch option, not a constexpr
    module = importlib.import_module(f"mmm.ops.{module_name}" if "." in module_name else f"mmm.ops.{module_name}.kernels")
    kernel = getattr(module, name)
    options = dict(num_warps=consts.pop("num_warps", 4), num_stages=3)  # a plain launch's defaults
    if isinstance(kernel, triton.runtime.Autotuner):
        config = kernel.configs[0]  # the GPU list: this process imported the module without the interpreter
        consts = {**consts, **config.kwargs}
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        kernel = kernel.fn
    assert isinstance(kernel, triton.runtime.JITFunction), f"{name}: {type(kernel)} is not compilable (interpreter on?)"
    # an upper-case string names a constant of the kernel module (its tiles differ under the interpreter)
    consts = {a: getattr(module, v) if isinstance(v, str) and v.isupper() else v for a, v in consts.items()}
    sig = {}
    for a, p in zip(kernel.arg_names, kernel.params):
        if p.is_constexpr:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = ptr_overrides.get(a, ptr)
        else:
            sig[a] = ("fp64" if fp64 else "fp32") if a in FLOAT_SCALARS else "i32"
    missing = sorted(a for a, t in sig.items() if t == "constexpr" and a not in consts)
    assert not missing, f"{name}: no value for constexpr(s) {missing} in KERNELS"
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(a),): v for a, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names) if a.endswith("_ptr")})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options), options["num_warps"]


def _compile_all(names: list[str]) -> dict[str, str | None]:
    """name -> None if it compiled, else the error."""
    out = {}
    for name in names:
        try:
            compile_for_sm90(name)
            out[name] = None
        except Exception as e:  # reported by the test of that kernel, with its causes (the root is last)
            chain = []
            while e is not None:
                chain.append(f"{type(e).__name__}: {e}")
                e = e.__cause__
            out[name] = "\n-- caused by --\n".join(chain)
    return out


if __name__ == "__main__":  # the worker: python tests/test_kernels_compile.py NAME...
    print(json.dumps(_compile_all(sys.argv[1:])))
    sys.exit(0)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, str | None]:
    # without the interpreter, and without the switch that would let non-constexpr globals through
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # a real compile every run
    names = list(KERNELS) + list(VARIANTS) + [n + FP64_SUFFIX for n in TRACED_WITH_FP64]
    workers = [subprocess.Popen([sys.executable, __file__, *names[i::2]], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    results = {}
    for w in workers:
        stdout, stderr = w.communicate(timeout=600)
        assert w.returncode == 0, f"compile worker failed:\n{stderr[-4000:]}"
        results.update(json.loads(stdout.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("name", list(KERNELS) + list(VARIANTS) + [n + FP64_SUFFIX for n in TRACED_WITH_FP64])
def test_kernel_compiles_for_sm90(compiled, name):
    assert compiled[name] is None, f"{name} does not compile for sm_90:\n{compiled[name]}"


def test_every_kernel_is_listed():
    """A new kernel must be added to KERNELS (the modules are read as text: importing them here would
    give interpreter objects)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "mmm"
    found = set()
    for path in root.rglob("*.py"):
        # a kernel is a @triton.jit function not starting with "_" (those are helpers, compiled with the kernels)
        found |= set(re.findall(r"@triton\.jit(?:\([^)]*\))?\s*\ndef ([A-Za-z]\w*)\(", path.read_text()))
    assert found, "no @triton.jit kernel found: has the source layout changed?"
    assert found == set(KERNELS), f"not listed: {sorted(found - set(KERNELS))}; gone: {sorted(set(KERNELS) - found)}"
