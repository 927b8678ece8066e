"""Block-diagonal product: naive.py (PyTorch reference), kernels.py (Triton), op.py (op, autograd, dispatch)."""

from .op import blockdiag_matmul, merged_dense_max_tokens, prefer_merged_dense, use_kernel

__all__ = ["blockdiag_matmul", "use_kernel", "merged_dense_max_tokens", "prefer_merged_dense"]
