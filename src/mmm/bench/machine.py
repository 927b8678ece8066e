"""The header of every report: what ran the benchmark, and its two roofline rates measured now.

A time is only comparable with the rates of the same run, so both are measured at the start of each
`mmm bench` with the same timer as the cases: the matmul rate in the bench dtype (a square matmul big
enough to saturate the device) and the copy bandwidth (one large tensor copy: read + write).
"""

from __future__ import annotations

import datetime
import os
import platform

import torch

from .timing import FULL, QUICK, median_ms


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def versions(device: torch.device) -> dict[str, str | None]:
    import mmm

    out: dict[str, str | None] = {"mmm": mmm.__version__, "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # triton is optional
        out["triton"] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if device.type == "cuda" else None
    return out


def measure_rates(device: torch.device, dtype: torch.dtype, quick: bool) -> dict[str, float]:
    """Matmul TFLOP/s in `dtype` and copy GB/s on `device`, with the sizes used to get them."""
    settings = QUICK if quick else FULL
    if device.type == "cuda":
        m = 4096 if quick else 8192
        copy_numel = 2**26 if quick else 2**29
    else:
        m = 512 if quick else 1024
        copy_numel = 2**24
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    t_mm = median_ms(lambda: a @ b, device, settings)
    del a, b
    src = torch.randn(copy_numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    t_copy = median_ms(lambda: dst.copy_(src), device, settings)
    copy_bytes = 2 * copy_numel * src.element_size()  # read + write
    del src, dst
    return {
        "matmul_tflops": 2 * m**3 / (t_mm * 1e-3) / 1e12,
        "copy_gbps": copy_bytes / (t_copy * 1e-3) / 1e9,
        "matmul_size": m,
        "copy_bytes": copy_bytes,
    }


def machine_header(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "versions": versions(device),
        **measure_rates(device, dtype, quick),
    }
