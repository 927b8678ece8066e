"""CUDA-graph twins of bench variants: the same work replayed from captured graphs, so the time is the
GPU's alone, without the host's Python, dispatch and launch cost. Launch-bound rows (the "host f+b ms"
column close to "fwd+bwd ms") show there what their kernels take; a user gets it by capturing the
training step (torch.cuda.graph) or with torch.compile(mode="reduce-overhead"). CUDA only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from .registry import Variant, Workload
from .timing import without_grad

WARMUP_CALLS = 3  # autotuning and caches run here, outside the capture (they synchronize)


def _capture(fn: Callable[[], object], grads: Sequence[torch.Tensor]) -> torch.cuda.CUDAGraph:
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
        forward = _capture(without_grad(work.forward), work.grad_to_none)
        both = _capture(work.forward_backward, work.grad_to_none) if work.forward_backward else None
        info = dict(work.info, cuda_graph=True)
        return dataclasses.replace(work, forward=forward.replay, forward_backward=both and both.replay,
                                   grad_to_none=(), info=info)

    return Variant(f"{variant.label} [cuda graph]", build, baseline=False)
