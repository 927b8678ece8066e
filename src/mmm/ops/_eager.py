"""Host-side helpers for the eager path of the Triton-backed ops (block-diagonal, Monarch, Kronecker, linear
attention).

At the H200 bench shapes these layers are launch-bound: Monarch b=128 needs ~1.8 ms of host time to
issue one forward+backward whose kernels take 0.86 ms (results/h200/2026-12-05-*). So every call avoids
what is cheap to avoid:

- `plain_eager`: where it holds, the ops run their bodies through an autograd.Function twin
  (`eager_twin`) instead of the torch.library op (custom-op dispatch and register_autograd's generated
  Function: ~60 us per forward+backward on the CI CPU). Anything that traces or intercepts
  (torch.compile, compiled autograd, fake tensors, dispatch modes, functorch transforms, tensor
  subclasses) gets the op.
- The twin's forward takes ctx (no separate setup_context: with one, Function.apply binds its
  arguments through inspect.signature on every call) and launches with wrap_triton off.
- `launcher`, `cdiv`, `next_power_of_2`, `cuda_sm_count`: launch-side arithmetic without Triton's
  constexpr_function wrappers (~2 us a call outside a kernel) or per-call device queries.
"""

from __future__ import annotations

import torch
from torch.library import wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:
    from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
except ImportError:  # older torch: wrap_triton launched directly outside tracing anyway
    import contextlib

    def is_wrap_triton_enabled() -> bool:
        return True

    def set_wrap_triton_enabled(enabled: bool):
        return contextlib.nullcontext()


def _untraced() -> bool:
    """Nothing records this call: not torch.compile, no dispatch mode (FakeTensor, functionalization,
    op loggers)."""
    return not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None


def plain_eager(*tensors: torch.Tensor) -> bool:
    """Whether an op may run its eager twin: nothing traces or intercepts the call, the tensors are plain
    tensors or Parameters (no subclasses such as DTensor), and no functorch transform is active (the
    twin's forward takes ctx, which those transforms do not accept)."""
    return (_untraced() and all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)
            and not torch._C._are_functorch_transforms_active())


def _direct_launches(body, *args):
    """body(*args) with wrap_triton off where nothing traces the call (compiled autograd may trace a
    backward, a dispatch mode must see the launches)."""
    if not _untraced():
        return body(*args)
    with set_wrap_triton_enabled(False):
        return body(*args)


def eager_twin(name: str, forward, setup_context, backward) -> type[torch.autograd.Function]:
    """An autograd.Function running an op's forward body and its setup_context (the one the op registers,
    `setup_context(ctx, inputs, output)`), and a backward `backward(ctx, *grads)` that calls the op's
    backward body. Launches go straight to Triton (wrap_triton off, as triton_op does for eager calls):
    through the higher-order operator each launch cost ~1000x more on the H200 (torch 2.11)."""

    def fwd(ctx, *inputs):
        output = _direct_launches(forward, *inputs)
        setup_context(ctx, inputs, output)
        return output

    def bwd(ctx, *grads):
        return _direct_launches(backward, ctx, *grads)

    return type(name, (torch.autograd.Function,), dict(forward=staticmethod(fwd), backward=staticmethod(bwd)))


def launcher(kernel):
    """`kernel` as the op bodies launch it: traceable through wrap_triton when that is on (inside the
    torch.library ops while tracing), the kernel itself otherwise (wrap_triton would return it too, after
    a few us of imports and type checks)."""
    return wrap_triton(kernel) if is_wrap_triton_enabled() else kernel


def cdiv(a, b):
    """ceil(a / b) (plain operators: also for SymInts)."""
    return (a + b - 1) // b


def next_power_of_2(n):
    """The smallest power of two >= n (n >= 1)."""
    if type(n) is int and n >= 1:
        return 1 << (n - 1).bit_length()
    import triton  # SymInts (tracing): Triton's bit operations; triton is there whenever kernels launch

    return triton.next_power_of_2(n)


_SM_COUNTS: dict[int, int] = {}


def cuda_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, queried once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SM_COUNTS.get(index)
    if count is None:
        count = _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count
