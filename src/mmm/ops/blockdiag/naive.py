"""Block-diagonal product in plain PyTorch: the ground truth the Triton kernels are tested against.

weight [b, s, p] holds the blocks; x [..., b*p] is read as [N, b, p] and y[:, k, :] = x[:, k, :] @ weight[k]^T,
flattened block-major to [..., b*s].
"""

from __future__ import annotations

import torch


def blockdiag_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    b, s, p = weight.shape
    lead = x.shape[:-1]
    xb = x.reshape(-1, b, p).transpose(0, 1)  # [b, N, p]
    y = torch.bmm(xb, weight.transpose(1, 2))  # [b, N, s]
    return y.transpose(0, 1).reshape(*lead, b * s)
