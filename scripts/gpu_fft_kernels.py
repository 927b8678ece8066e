"""Times the two spectral kernels of the FFT structures (mmm/ops/fft/kernels.py): spectral_mix (twice per
forward + backward) and spectral_corr (the kernel's gradient), on one GPU, with the default tiles and a
few alternatives, at N = 8192 tokens and H = 8192 (d = 16384, one block: q = p = 1), for fp16 spectra
(the bf16 "packed16" path, with row scales) and fp32 ones (the "packed" path):

    PYTHONPATH=src python scripts/gpu_fft_kernels.py          (H200: well under a minute)
    TRITON_INTERPRET=1 PYTHONPATH=src python scripts/gpu_fft_kernels.py --smoke   (CPU dry run, tiny sizes)

A row per variant: tiles (BT rows x BF frequencies, rows per program, warps; "pipelined" = the default
tiles with both row loops software-pipelined by Triton, num_stages=3, a copy of kernels.py patched here),
median ms (triton.testing.do_bench), GB/s = the spectra's bytes read + written / time (mix: read z, write
Zin; corr: read both spectra; the kernel, twiddles and per-chunk partials are not counted), that as a
share of a device-to-device copy timed in the same run, and the output's relative L2 difference from the
default's (mix: the same arithmetic per element, ~0; corr: another summation order, ~1e-7).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

NAMES = {"mix": ("BT_MIX", "BF_MIX", "MIX_ROWS", "WARPS_MIX"), "corr": ("BT_CORR", "BF_CORR", "CORR_ROWS", "WARPS_CORR")}
# None: the module's tiles; "pipelined": those, with the row loops pipelined
VARIANTS = {"mix": [None, (16, 32, 64, 4), (32, 32, 128, 8), (64, 32, 256, 8), (32, 32, 32, 4), "pipelined"],
            "corr": [None, (32, 32, 256, 8), (16, 32, 256, 4), (8, 32, 64, 4), (32, 32, 128, 4), "pipelined"]}


def pipelined_copy(kernels):
    """kernels.py with both row loops as tl.range(..., num_stages=3), loaded as a module of its own."""
    with open(kernels.__file__) as f:
        src, n = re.subn(r"for t0 in range\(0, ROWS, BT\):", "for t0 in tl.range(0, ROWS, BT, num_stages=3):", f.read())
    assert n == 2, "the row loops of kernels.py have changed: update pipelined_copy"
    path = os.path.join(tempfile.mkdtemp(), "fft_kernels_pipelined.py")
    with open(path, "w") as f:
        f.write(src)
    # named inside mmm.ops.fft so that the copy's relative imports (from .._eager ...) resolve
    spec = importlib.util.spec_from_file_location("mmm.ops.fft.kernels_pipelined", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(fn) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--half", type=int, default=8192, help="H = L/2, the length of the packed complex rows (d = 2H)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1: checks that the script runs")
    args = ap.parse_args()
    N, H = (40, 64) if args.smoke else (args.tokens, args.half)
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    from mmm.ops.fft import kernels

    pipelined = pipelined_copy(kernels)
    print(f"{torch.cuda.get_device_name() if dev == 'cuda' else 'CPU (interpreter)'}, N = {N}, H = {H}, q = p = 1", flush=True)
    table = []
    for dtype in (torch.float16, torch.float32):
        g = torch.Generator(device=dev).manual_seed(0)
        zx, zdy = (torch.randn(N, 1, H, 2, device=dev, generator=g).to(dtype) for _ in range(2))
        kernel_ri = torch.randn(1, 1, H + 1, 2, device=dev, generator=g)
        gain = torch.ones(1, device=dev)
        scales = [torch.exp2(torch.randint(-3, 4, (N,), device=dev, generator=g).float()) for _ in range(2)]
        sx, sdy = scales if dtype == torch.float16 else (None, None)
        spectrum_bytes = zx.numel() * zx.element_size()
        copy_ms = bench(lambda: zx.clone())
        copy_gbs = 2 * spectrum_bytes / copy_ms / 1e6
        table.append(("copy", str(dtype)[6:], "z.clone()", copy_ms, copy_gbs, 1.0, 0.0))
        calls = {"mix": lambda m: m.spectral_mix(zx, kernel_ri, gain, False), "corr": lambda m: m.spectral_corr(zx, zdy, sx, sdy, 2 * zx.shape[2])}
        for kind, call in calls.items():
            reference = None
            for variant in VARIANTS[kind]:
                module = pipelined if variant == "pipelined" else kernels
                saved = [getattr(module, n) for n in NAMES[kind]]
                if isinstance(variant, tuple):
                    for n, v in zip(NAMES[kind], variant):
                        setattr(module, n, v)
                label = variant if variant == "pipelined" else str(tuple(getattr(module, n) for n in NAMES[kind]))
                try:
                    out = torch.view_as_real(call(module)) if kind == "corr" else call(module)
                    ms = bench(lambda: call(module))
                finally:
                    for n, v in zip(NAMES[kind], saved):
                        setattr(module, n, v)
                reference = out.float() if reference is None else reference
                diff = float((out.float() - reference).norm() / reference.norm())
                gbs = 2 * spectrum_bytes / ms / 1e6
                table.append((kind, str(dtype)[6:], label, ms, gbs, gbs / copy_gbs, diff))
                print(f"  {kind} {str(dtype)[6:]} {label}: {ms:.3f} ms", flush=True)
    print(f"\n{'kernel':6} {'spectra':8} {'tiles (BT, BF, rows, warps)':28} {'ms':>8} {'GB/s':>7} {'/copy':>6} {'rel.diff':>9}  check")
    for kind, dt, label, ms, gbs, share, diff in table:
        print(f"{kind:6} {dt:8} {label:28} {ms:8.3f} {gbs:7.0f} {share:6.2f} {diff:9.1e}  {'ok' if diff < 1e-5 else 'DIFFERS'}")


if __name__ == "__main__":
    main()
