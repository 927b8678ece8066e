"""Argument checks shared across the library. Each raises an error that names the argument and
what was expected, so a user sees the problem at the call that caused it."""

from __future__ import annotations

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


def check_last_dim(name: str, t: torch.Tensor, size: int) -> None:
    if t.dim() == 0 or t.shape[-1] != size:
        raise ValueError(f"{name} must have last dimension {size} (in_features), got shape {tuple(t.shape)}")


def check_same_device(name: str, t: torch.Tensor, device: torch.device, what: str = "the layer's parameters") -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {what} are on {device}; move one of them")
