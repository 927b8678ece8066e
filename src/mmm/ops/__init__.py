"""Fused operators, one folder each: naive.py (PyTorch ground truth), kernels.py (Triton),
op.py (torch.library op, autograd, dispatch).

`reference_only()` turns every fused kernel off in its block, so the same layers run their plain
PyTorch reference (used by `mmm bench` to time `torch.compile` of the reference side by side).
`plain_eager(...)` says when an op may skip its torch.library layers (see linear_attention/op.py).
"""

from __future__ import annotations

import contextlib

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch.utils._python_dispatch import _get_current_dispatch_mode

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


def _untraced() -> bool:
    """Nothing records this call: not torch.compile, no dispatch mode (FakeTensor, functionalization,
    op loggers)."""
    return not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None


def plain_eager(*tensors: torch.Tensor) -> bool:
    """Whether a call runs in plain eager mode: not traced by torch.compile, no dispatch mode active
    (FakeTensor, functionalization, op loggers), plain tensors or Parameters (no subclasses such as
    DTensor). Only then may an op call its kernels through its `eager_function` twin instead of its
    torch.library op: the op's dispatch and generated autograd cost host time on every call (~100 us per
    forward+backward on the CI CPU), which kernels of ~0.1 ms cannot hide."""
    return (_untraced()
            and all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors))


def _direct_launches(body):
    """`body` with its wrap_triton launches going straight to Triton, as triton_op does for eager calls.
    Left on, each launch is dispatched as a higher-order operator: on the H200 (torch 2.11) that made
    the eager twins of the Monarch and Kronecker ops ~1000x slower (1.2 s per call). Only where nothing
    traces the call (compiled autograd may trace a backward)."""

    def run(*args):
        if not _untraced():
            return body(*args)
        with set_wrap_triton_enabled(False):
            return body(*args)

    return run


def eager_function(name: str, forward, setup_context, backward) -> type[torch.autograd.Function]:
    """A plain autograd.Function from an op's forward body (the launches, no torch.library layer), the
    setup_context its op registers, and a backward that calls the backward body directly."""
    methods = dict(forward=staticmethod(_direct_launches(forward)), setup_context=staticmethod(setup_context),
                   backward=staticmethod(_direct_launches(backward)))
    return type(name, (torch.autograd.Function,), methods)
