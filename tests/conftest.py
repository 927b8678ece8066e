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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def grads(fn, inputs, g):
    """(fn(*inputs), d<fn . g>/d input for every input), on fresh leaf copies of the inputs."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    y = fn(*inputs)
    return (y, *torch.autograd.grad(y, inputs, g))
