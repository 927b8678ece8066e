"""Argument checks shared across the library. Each raises an error that names the argument and
what was expected, so a user sees the problem at the call that caused it."""

from __future__ import annotations

import contextlib
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, t: object) -> torch.Tensor:
    """A real floating-point tensor (fp16, bf16, fp32 or fp64)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            + (" (complex tensors are not supported)" if t.is_complex() else "")
        )
    return t


def check_finite(name: str, t: torch.Tensor) -> None:
    """No NaN or inf (costs a pass over the tensor: use on weights, not on every activation)."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN/inf value(s); expected only finite values")


# Whether the public entry points check their activations for NaN/inf (`finite_checks`). Off by default:
# each check is a pass over the tensor and a host sync, which the default path never makes
# (tests/test_no_host_sync.py); on for a whole process with MMM_CHECK_FINITE=1.
_CHECK_ACTIVATIONS = os.environ.get("MMM_CHECK_FINITE", "0") == "1"


@contextlib.contextmanager
def finite_checks(enabled: bool = True):
    """Within the block (enabled=True), StructuredLinear's forward, mmm.attention (with attention_error and
    decode's prefill and step) raise a ValueError naming the input that holds NaN or inf, before computing
    anything; the default path does not look, and a NaN input gives NaN outputs. For debugging: each
    check costs a pass over the input and a host sync, and under torch.compile a graph break.
    MMM_CHECK_FINITE=1 turns the checks on for a whole process. Not thread-local."""
    global _CHECK_ACTIVATIONS
    saved, _CHECK_ACTIVATIONS = _CHECK_ACTIVATIONS, bool(enabled)
    try:
        yield
    finally:
        _CHECK_ACTIVATIONS = saved


def check_finite_activations(**tensors: torch.Tensor) -> None:
    """check_finite on each named tensor, only inside `finite_checks` (or with MMM_CHECK_FINITE=1)."""
    if _CHECK_ACTIVATIONS:
        for name, t in tensors.items():
            check_finite(name, t)


def check_matches(name: str, t: torch.Tensor, like: torch.Tensor, what: str) -> None:
    """t on `like`'s device and, outside torch.autocast on that device, of its dtype (`what` names `like`)."""
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {what} are on {like.device}; move one of them")
    if t.dtype != like.dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(f"{name} is {t.dtype} but {what} are {like.dtype}; cast one of them, or run under "
                        f"torch.autocast")


def check_last_dim(name: str, t: torch.Tensor, size: int) -> None:
    if t.dim() == 0 or t.shape[-1] != size:
        raise ValueError(f"{name} must have last dimension {size} (in_features), got shape {tuple(t.shape)}")
