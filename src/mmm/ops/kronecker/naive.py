"""Plain PyTorch reference for the Kronecker-sum product (ground truth for the kernels).

x [N, i1*i2], A [r, o1, i1], B [r, o2, i2]:  y_n = sum_j A_j X_n B_j^T  with X_n = x_n.view(i1, i2),
which is x_n @ (sum_j kron(A_j, B_j))^T flattened to [N, o1*o2].
"""

import torch


def kron_matmul(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    X = x.reshape(n, A.shape[2], B.shape[2])
    return torch.einsum("jac,nce,jbe->nab", A, X, B).reshape(n, A.shape[1] * B.shape[1])
