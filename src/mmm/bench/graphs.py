"""Twins of bench variants for launch-bound rows (the "host f+b ms" column close to "fwd+bwd ms"):

- `graphed`: the same work replayed from captured CUDA graphs, so the time is the GPU's alone, without
  the host's Python, dispatch and launch cost; a user gets it by capturing the training step
  (torch.cuda.graph) or with torch.compile(mode="reduce-overhead"). CUDA only.
- `triton_launched`: the same eager work with mmm's FastLaunch off (mmm.ops._eager: by default Triton
  kernels are launched without Triton's per-launch argument binding), the side-by-side measure of what
  FastLaunch saves.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from ..ops._eager import fast_launches
from .registry import Variant, Workload
from .timing import without_grad

WARMUP_CALLS = 3  # autotuning and caches run here, outside the capture (they synchronize)


def capture(fn: Callable[[], object], grads: Sequence[torch.Tensor]) -> torch.cuda.CUDAGraph:
    """A graph of one call of fn, after warmup calls on a side stream (as torch.cuda.graph requires).
    Gradients are dropped first, so the captured backward allocates them in the graph's own pool and
    every replay overwrites them rather than accumulating."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            for t in grads:
                t.grad = None
            fn()
    torch.cuda.current_stream().wait_stream(side)
    for t in grads:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graphed(variant: Variant) -> Variant:
    """`variant` replayed from CUDA graphs (forward under no_grad, and forward+backward), labelled
    "<label> [cuda graph]". Building it fails (and the bench records the error) where the work cannot be
    captured, e.g. if it synchronizes with the host."""

    def build() -> Workload:
        work = variant.build()
        forward = capture(without_grad(work.forward), work.grad_to_none)
        both = capture(work.forward_backward, work.grad_to_none) if work.forward_backward else None
        info = dict(work.info, cuda_graph=True)
        return dataclasses.replace(work, forward=forward.replay, forward_backward=both and both.replay,
                                   grad_to_none=(), info=info)

    return Variant(f"{variant.label} [cuda graph]", build, baseline=False)


def triton_launched(variant: Variant) -> Variant:
    """`variant` with FastLaunch off in every call (and while it is built): every kernel goes through
    Triton's own launch path. Labelled "<label> [triton launch]"."""

    def switched(fn):
        def call():
            with fast_launches(False):
                return fn()
        return call

    def build() -> Workload:
        with fast_launches(False):
            work = variant.build()
        both = work.forward_backward and switched(work.forward_backward)
        return dataclasses.replace(work, forward=switched(work.forward), forward_backward=both,
                                   info=dict(work.info, fast_launch=False))

    return Variant(f"{variant.label} [triton launch]", build, baseline=False)
