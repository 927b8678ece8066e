import math
import os

import pytest
import torch

# Triton kernels run on CPU through the interpreter when there is no GPU. It must be set before any
# kernel module is imported, hence here, at collection start.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def autograd_node_names(y: torch.Tensor) -> set[str]:
    """Names of the autograd nodes that produced y."""
    names, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node.name() not in names:
            names.add(node.name())
            todo += [n for n, _ in node.next_functions]
    return names


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (complex128 when either is complex: both parts count)."""
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    a, b = a.detach().to(wide), b.detach().to(wide)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def grads(fn, inputs, g):
    """(fn(*inputs), d<fn . g>/d input for every input), on fresh leaf copies of the inputs."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    y = fn(*inputs)
    return (y, *torch.autograd.grad(y, inputs, g))


class OpNames:
    """Context manager recording the name of every aten / custom op dispatched inside it (in order)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names = self.names = []

        class _Mode(TorchDispatchMode):
            # on CUDA, wrap_triton launches reach the mode as a higher-order operator
            # (triton_kernel_wrapper_mutation), which has no overload packet: record it by name
            supports_higher_order_operators = True

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                packet = getattr(func, "overloadpacket", None)
                names.append(packet.__name__ if packet is not None else func.name())
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every buffer the op allocates with torch.empty / empty_like starts as NaN, so an element a kernel
    fails to write shows up as NaN instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(math.nan)

    def empty_like(*args, **kwargs):
        return real_empty_like(*args, **kwargs).fill_(math.nan)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
