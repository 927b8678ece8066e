"""Fused operators, one folder each: naive.py (PyTorch ground truth), kernels.py (Triton),
op.py (torch.library op, autograd, dispatch).

`reference_only()` turns every fused kernel off in its block, so the same layers run their plain
PyTorch reference (used by `mmm bench` to time `torch.compile` of the reference side by side).
`_eager.py` holds what the ops' plain eager calls share (their autograd.Function twins).
"""

from __future__ import annotations

import contextlib


_kernels_enabled = True


def kernels_enabled() -> bool:
    return _kernels_enabled


@contextlib.contextmanager
def reference_only():
    global _kernels_enabled
    previous, _kernels_enabled = _kernels_enabled, False
    try:
        yield
    finally:
        _kernels_enabled = previous
