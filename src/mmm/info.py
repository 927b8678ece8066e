"""`mmm info`: what this machine offers the library (versions, GPU, whether Triton kernels run)."""

from __future__ import annotations

import os
import platform


def triton_status() -> str:
    """How Triton kernels will run here: 'gpu', 'interpreter' or why not at all."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"unavailable ({type(exc).__name__}: {exc})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter (TRITON_INTERPRET=1, CPU, fp32 only)"
    import torch

    if torch.cuda.is_available():
        return "gpu"
    return "not on this machine (no CUDA device); set TRITON_INTERPRET=1 to run kernels on CPU for testing"


def collect() -> dict[str, str]:
    import torch

    out = {
        "mmm": __import__("mmm").__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    for mod in ("triton", "transformers", "safetensors", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = f"{props.name} x{torch.cuda.device_count()}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
        out["cuda"] = str(torch.version.cuda)
    else:
        out["gpu"] = "none"
    out["triton kernels"] = triton_status()
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, GPU, and whether Triton kernels will run")
    p.set_defaults(func=lambda args: print("\n".join(f"{k:>15}: {v}" for k, v in collect().items())))
