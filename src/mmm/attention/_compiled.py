"""Elementwise glue between kernels, compiled into one pass on CUDA: in eager PyTorch each of its ops is
a pass over [B, T, H, D] tensors (about 0.25 ms each at 128k tokens, 16 heads of 128 on an H200).

Dynamo keeps the compiled graphs of a function per code object, with a limit of 8 recompiles, after
which it silently runs that function eagerly for good. Everything but tensor shapes forces a recompile
(a function or bool argument, a float, a dtype, grad mode), and one bench process meets more than 8 such
kinds of call (feature maps x query/key x grad on/off x dtypes), so each kind gets its own copy of the
code (`code_copy`) and with it its own limit.
"""

from __future__ import annotations

import functools
import types
from typing import Callable

import torch

BACKEND = "inductor"  # tests trace with a recording backend instead


def code_copy(fn: Callable, tag: str) -> Callable:
    """fn with a code object of its own (named fn's name + tag): dynamo counts recompiles per code object."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _kind(args: tuple) -> tuple:
    """What forces a recompile, shapes aside: grad mode, the arguments' nesting, non-tensor values, and
    tensor dtypes, ranks and requires_grad. A plain recursion: torch's tree_flatten alone took ~17 us a
    call on the CI CPU, paid on every eager call of the glue; this takes ~3."""
    return torch.is_grad_enabled(), _static(args)


def _static(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.dim(), a.requires_grad
    if type(a) is list or type(a) is tuple:
        return (type(a), *map(_static, a))
    return a


def _first_tensor(a):
    if isinstance(a, torch.Tensor):
        return a
    if type(a) is list or type(a) is tuple:
        return next((t for t in map(_first_tensor, a) if t is not None), None)
    return None


def compiled_on_cuda(fn: Callable) -> Callable:
    """fn, through torch.compile (compiled on first use, dynamic shapes, one code copy per kind of call:
    see the module docstring) when its first tensor argument (lists searched too) is on CUDA and nothing
    is tracing already; plain fn otherwise (CPU, or inside an outer compile)."""
    compiled: dict[tuple, Callable] = {}

    @functools.wraps(fn)
    def run(*args):
        if not _first_tensor(args).is_cuda or torch.compiler.is_compiling():
            return fn(*args)
        return compiled_for(_kind(args))(*args)

    def compiled_for(kind: tuple) -> Callable:
        if kind not in compiled:
            compiled[kind] = torch.compile(code_copy(fn, str(len(compiled))), dynamic=True, backend=BACKEND)
        return compiled[kind]

    run.compiled_for = compiled_for  # tests reach the compiled path without a GPU
    return run
