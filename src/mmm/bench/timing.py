"""Median wall time of a callable, in milliseconds.

Same protocol on both devices: one untimed call (allocation, lazy init, compilation), two calls to
estimate the cost, warmup up to `warmup_ms`, then at least `min_reps` timed calls (more if they fit in
`rep_ms`); the median is returned because it ignores the odd preempted run.

CUDA: CUDA events around each call, with the L2 cache overwritten before every call so each run reads
its operands from HBM, as a layer inside a large model does (the same idea as triton.testing.do_bench,
with a floor on the number of repeats so that slow calls still get a real median). CPU: perf_counter.
`host_ms` (CUDA only) is the time the host takes to issue one call, calls issued back to back with the
GPU running behind: when it is close to the CUDA-event time the call is launch-bound (Python, dispatch
and launch overhead), not kernel-bound, and only fewer launches or CUDA graphs make it faster.
Gradients listed in `grad_to_none` are dropped before every call, outside the timed region, so a
forward+backward callable measures a fresh backward rather than an accumulation into old gradients.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class TimerSettings:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 1000


FULL = TimerSettings()
QUICK = TimerSettings(warmup_ms=0.0, rep_ms=15.0, min_reps=3, max_reps=30)

_L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100/H200: 50-60 MB)
_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    return _flush_buffers[device]


def _drop_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def without_grad(fn: Callable[[], object]) -> Callable[[], object]:
    """fn called under torch.no_grad (how forward passes are timed: inference)."""

    def run():
        with torch.no_grad():
            return fn()

    return run


def _cuda_times(fn: Callable[[], object], n: int, device: torch.device, grad_to_none) -> list[float]:
    flush = _flush_buffer(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for start, end in zip(starts, ends):
        _drop_grads(grad_to_none)
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _cpu_times(fn: Callable[[], object], n: int, grad_to_none) -> list[float]:
    times = []
    for _ in range(n):
        _drop_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def canonical_device(device: torch.device | str) -> torch.device:
    """`device` with its index: "cuda" and a tensor's "cuda:0" name one GPU. The timers run on it, and
    every cache keyed on a device (the bench's trained real-input layer, its fitted maps) must see one
    key for it: keyed by both names, the bench trained two layers and judged its fits on the other one."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def median_ms(
    fn: Callable[[], object],
    device: torch.device | str,
    settings: TimerSettings = FULL,
    grad_to_none: Sequence[torch.Tensor] = (),
) -> float:
    """Median time of one call of `fn` on `device` (see the module docstring for the protocol)."""
    device = canonical_device(device)
    if device.type == "cuda":

        def times(n: int) -> list[float]:
            with torch.cuda.device(device):
                return _cuda_times(fn, n, device, grad_to_none)

    elif device.type == "cpu":

        def times(n: int) -> list[float]:
            return _cpu_times(fn, n, grad_to_none)

    else:
        raise ValueError(f"device must be 'cpu' or 'cuda[:index]', got {str(device)!r}")

    times(1)  # untimed: allocation, autotuning, compilation
    estimate = max(statistics.median(times(2)), 1e-4)  # these two calls count as warmup
    times(min(settings.max_reps, max(0, int(settings.warmup_ms / estimate) - 2)))
    n = min(settings.max_reps, max(settings.min_reps, int(settings.rep_ms / estimate)))
    return statistics.median(times(n))


def host_ms(fn: Callable[[], object], device: torch.device | str, reps: int = 10,
            grad_to_none: Sequence[torch.Tensor] = ()) -> float | None:
    """Host time to issue one call of `fn`, in ms (None off CUDA): `reps` calls issued back to back after
    a warm one, the GPU left to run behind (only the last waits for it), as in a training loop."""
    device = canonical_device(device)
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        _drop_grads(grad_to_none)
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            _drop_grads(grad_to_none)
            fn()
        issued = time.perf_counter() - t0
        torch.cuda.synchronize()
    return issued / reps * 1e3
