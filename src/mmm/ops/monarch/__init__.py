"""Monarch product: naive.py (PyTorch reference), kernels.py (stages on the shared Triton kernels),
op.py (op, autograd, dispatch)."""

from .op import monarch_matmul, use_kernel

__all__ = ["monarch_matmul", "use_kernel"]
