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

import contextlib
import inspect
import os

import torch
from torch.library import wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:
    from triton import knobs
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # CPU installs without triton or CUDA: FastLaunch is never used there
    knobs = _raw_stream = None

try:
    from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
except ImportError:  # older torch: wrap_triton launched directly outside tracing anyway
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
    torch.library ops while tracing), else `fast_launch(kernel)`."""
    return wrap_triton(kernel) if is_wrap_triton_enabled() else fast_launch(kernel)


def fast_launch(kernel):
    """The kernel behind its `FastLaunch`, for launches outside any tracing (eager bodies, and the
    bodies of torch.library.custom_op, which tracing does not enter)."""
    fast = _FAST_LAUNCHERS.get(kernel)
    if fast is None:
        fast = _FAST_LAUNCHERS[kernel] = FastLaunch(kernel)
    return fast


# FastLaunch's switch, read at every launch (MMM_FAST_LAUNCH=0 at import turns it off, or `fast_launches`).
# On by default since its GPU test passed on an H100 (every fused op, aligned and misaligned inputs, the
# direct path against Triton's) and it halved the host time per launch there (57.5 -> 28.7 us through
# an autotuner; results/h100/2026-12-06-s11-*). The bench's "[triton launch]" rows time it off.
_SWITCH = os.environ.get("MMM_FAST_LAUNCH", "1").strip()
if _SWITCH not in ("0", "1"):
    raise ValueError(f"MMM_FAST_LAUNCH must be 0 (off) or 1 (on, the default), got {_SWITCH!r}")
FAST_LAUNCH = _SWITCH == "1"
_FAST_LAUNCHERS: dict = {}


@contextlib.contextmanager
def fast_launches(enabled: bool = True):
    """FastLaunch on (or off) inside the block."""
    global FAST_LAUNCH
    before, FAST_LAUNCH = FAST_LAUNCH, enabled
    try:
        yield
    finally:
        FAST_LAUNCH = before


def direct_launch_count() -> int:
    """Launches that took FastLaunch's direct path so far, over all kernels (the bench reports it per call)."""
    return sum(fast.direct_launches for fast in _FAST_LAUNCHERS.values())


def _arg_class(a):
    """What Triton specializes a kernel argument on, or a finer split of it (splitting more is safe:
    each class gets its own cache entry, filled by a launch through Triton's own path). Tensors: dtype
    and 16-byte alignment; ints: == 1 (a constant), divisible by 16, int32 / int64 / uint64; None for an
    argument the fast path does not know (then it is not used)."""
    t = type(a)
    if t is torch.Tensor or t is torch.nn.Parameter:
        return a.dtype, a.data_ptr() % 16 == 0
    if t is int:
        return a == 1, a % 16 == 0, -0x80000000 <= a <= 0x7FFFFFFF, a < 1 << 63  # 1, 16 | a, i32, i64 / u64
    if t is float or t is bool:
        return t
    return None


def _hook_set(hook) -> bool:
    """Whether a Triton launch hook would do anything: triton 3.6 keeps each as a HookChain (never None),
    empty unless a profiler added to it."""
    return hook is not None and bool(getattr(hook, "calls", True))


class FastLaunch:
    """`kernel[grid](*args, **kwargs)` for CUDA tensors without Triton's per-launch binding: the first
    launch of each key (the `_arg_class` of every runtime argument, the value of every constexpr, the
    autotuning key, the device) goes through Triton (autotuning and compiling as usual) and leaves its
    compiled kernel and tuned config here; later launches with that key call the compiled kernel's
    launcher directly.

    Why: on the bench machines Triton's launch path (Autotuner.run, then JITFunction.run binding and
    specializing ~20 arguments) costs more host time than these kernels take on the GPU at the bench
    shapes (scripts/gpu_launch_paths.py measures it). Not used for CPU tensors (the interpreter),
    while a launch hook is set, or for configs with pre-hooks, or with FAST_LAUNCH off (below)."""

    MAX_ENTRIES = 4096  # distinct keys kept per kernel (then the cache starts over)

    def __init__(self, kernel):
        self.kernel = kernel
        self.names = None  # set at the first CUDA launch (the interpreter's functions lack .params)
        self.entries: dict = {}
        self.direct_launches = 0  # launches that took the direct path (tests and diagnosis read it)

    def _setup(self):
        kernel = self.kernel
        self.tuned = hasattr(kernel, "configs")  # an Autotuner (its .fn is the JITFunction)
        jit = kernel.fn if self.tuned else kernel
        self.names = tuple(p.name for p in jit.params)
        self.runtime = frozenset(p.name for p in jit.params if not p.is_constexpr)
        self.defaults = {p.name: p.default for p in jit.params if p.default is not inspect.Parameter.empty}
        # where each autotuning key's value comes from: a positional index, else (keyword or default) its name
        self.tune_keys = tuple((self.names.index(k), k) for k in kernel.keys) if self.tuned else ()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _key(self, args, kwargs, device):
        classes = tuple(map(_arg_class, args))
        # keyword values count whole, except runtime arguments': constexprs and options (num_warps, ...)
        named = tuple((k, _arg_class(v) if k in self.runtime else v) for k, v in kwargs.items())
        if None in classes or any(c is None for _, c in named):
            return None
        n = len(args)
        tune = tuple([args[i] if i < n else kwargs[k] if k in kwargs else self.defaults.get(k)
                      for i, k in self.tune_keys])
        return classes, named, tune, device

    def launch(self, grid, args, kwargs):
        first = args[0] if args else None
        if (not FAST_LAUNCH or type(first) is not torch.Tensor or not first.is_cuda
                or _hook_set(knobs.runtime.launch_enter_hook)):
            return self.kernel[grid](*args, **kwargs)
        if self.names is None:
            self._setup()
        device = torch.cuda.current_device()
        key = self._key(args, kwargs, device)
        entry = self.entries.get(key) if key is not None else None
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if hasattr(compiled, "result"):  # Triton's async compile mode hands back a future
                compiled = compiled.result()
            config = self.kernel.best_config if self.tuned else None
            fixed = {**self.defaults, **(config.kwargs if config is not None else {})}
            names_known = all(n in kwargs or n in fixed for n in self.names[len(args):])
            no_pre_hook = config is None or config.pre_hook is None
            if compiled is not None and key is not None and names_known and no_pre_hook:
                if len(self.entries) >= self.MAX_ENTRIES:
                    self.entries.clear()
                self.entries[key] = (compiled, fixed)
            return compiled
        compiled, fixed = entry
        full = [*args, *[kwargs[n] if n in kwargs else fixed[n] for n in self.names[len(args):]]]
        if callable(grid):
            grid = grid(dict(zip(self.names, full)))
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        self.direct_launches += 1
        exit_hook = knobs.runtime.launch_exit_hook
        compiled.run(grid[0], g1, g2, _raw_stream(device), compiled.function, compiled.packed_metadata, None,
                     None, exit_hook if _hook_set(exit_hook) else None, *full)
        return compiled


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
