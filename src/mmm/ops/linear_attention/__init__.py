"""Causal (and non-causal) linear attention: fused Triton kernels with a PyTorch reference."""

from .naive import linear_attention_naive
from .op import SUPPORTED_HEAD_DIMS, linear_attention

__all__ = ["linear_attention", "linear_attention_naive", "SUPPORTED_HEAD_DIMS"]
