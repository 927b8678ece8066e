"""Monarch product in plain PyTorch: the ground truth the Triton kernels are tested against.

L [b, b*c, p], R [b, s, b*c], c = block rank, x [..., b*p] read as [N, b, p]:
  stage 1  y[:, k, :] = x[:, k, :] @ L[k]^T                      -> [N, b, b*c]
  shuffle  z[:, l, k*c + t] = y[:, k, l*c + t]                   (z = y.view(N, b, b, c).transpose(1, 2))
  stage 2  out[:, l, :] = z[:, l, :] @ R[l]^T                    -> [N, b, s], flattened to [..., b*s]
"""

from __future__ import annotations

import torch


def monarch_matmul(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, block_rank: int) -> torch.Tensor:
    b, m, p = L.shape
    s = R.shape[1]
    c = block_rank
    lead = x.shape[:-1]
    xb = x.reshape(-1, b, p).transpose(0, 1)  # [b, N, p]
    y = torch.bmm(xb, L.transpose(1, 2))  # [k, N, l*c + t]
    n = y.shape[1]
    z = y.view(b, n, b, c).permute(2, 1, 0, 3).reshape(b, n, m)  # [l, N, k*c + t]
    out = torch.bmm(z, R.transpose(1, 2))  # [l, N, s]
    return out.transpose(0, 1).reshape(*lead, b * s)
