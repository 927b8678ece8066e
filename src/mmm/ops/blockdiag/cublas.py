"""Block-diagonal product through cuBLAS: each GEMM is one torch.bmm on strided views, no copies.

The blocks of a [N, b*w] activation are the strided batch `blocks(t, b)` = [b, N, w] with strides
(w, row stride, 1): one unit stride and a leading dimension >= w, which is what PyTorch's CUDA bmm passes
to cublasGemmStridedBatched as it is (aten/src/ATen/native/cuda/Blas.cpp, prepare_batch_matrix_for_cublas;
`bmm_copies` below restates that rule so the tests can check every call). Outputs are written through
the same views with `out=`, so the result is already in the [N, b*s] layout:

    forward   y_k  = x_k @ W_k^T     bmm(blocks(x), W^T,           out=blocks(y))
    backward  dx_k = dy_k @ W_k      bmm(blocks(dy), W,            out=blocks(dx))
              dW_k = dy_k^T @ x_k    bmm(blocks(dy)^T, blocks(x))

The ops mmm::blockdiag_cublas_fwd / mmm::blockdiag_cublas_bwd are torch.library custom ops with autograd
and fake implementations, so torch.compile(fullgraph=True) keeps them as single nodes.
"""

from __future__ import annotations

import torch

# Tests set this to fill every output with NaN before the GEMMs write it, so an unwritten element shows.
POISON_OUTPUTS = False


def empty(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """An output buffer that the GEMMs will fill (NaN-filled when POISON_OUTPUTS is set)."""
    out = like.new_empty(shape)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def feature_major(t: torch.Tensor) -> torch.Tensor:
    """t [N, F] as is when its features are contiguous and rows do not overlap (the layout cuBLAS takes
    without a copy); else a contiguous copy (e.g. the stride-0 gradient of a sum)."""
    if t.stride(1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1]):
        return t
    return t.contiguous()


def blocks(t: torch.Tensor, b: int) -> torch.Tensor:
    """[N, b*w] with unit feature stride -> the view [b, N, w] (block k = columns k*w .. k*w + w - 1)."""
    return t.unflatten(1, (b, t.shape[1] // b)).transpose(0, 1)


def bmm_copies(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> list[str]:
    """Which of the operands of torch.bmm(a, b, out=out) PyTorch's CUDA path would copy before calling
    cublasGemmStridedBatched (a restatement of baddbmm_out_cuda_impl's stride tests). [] = none."""
    copied = []
    rs, rz = out.stride(), out.shape
    if rs[1] == 1 and (rz[2] == 1 or rs[2] >= max(1, rz[1])):
        transpose_result = False
    elif rs[2] == 1 and (rz[1] == 1 or rs[1] >= max(1, rz[2])):
        transpose_result = True
    else:
        transpose_result = False
        copied.append("out")
    lead = 1 if transpose_result else 2
    m = rz[2 if transpose_result else 1]
    n = rz[lead]
    k = (b if transpose_result else a).shape[lead]

    def copies(t: torch.Tensor, rows: int, cols: int) -> bool:
        fast, slow = (2, 1) if transpose_result else (1, 2)
        if t.stride(fast) == 1 and t.stride(slow) >= max(1, rows):
            return False
        if t.stride(slow) == 1 and t.stride(fast) >= max(1, cols):
            return False
        return not (t.is_contiguous() and t.stride(1) != 0 and t.stride(2) != 0)

    first, second = (b, a) if transpose_result else (a, b)
    if copies(first, m, k):
        copied.append("b" if transpose_result else "a")
    if copies(second, k, n):
        copied.append("a" if transpose_result else "b")
    return copied


def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, b*p], w [b, s, p] -> y [N, b*s]."""
    b, s, _ = w.shape
    x = feature_major(x)
    y = empty(x, x.shape[0], b * s)
    torch.bmm(blocks(x, b), w.mT, out=blocks(y, b))
    return y


def backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx [N, b*p], dw [b, s, p]) of forward given dy [N, b*s]."""
    b, _, p = w.shape
    dy, x = feature_major(dy), feature_major(x)
    dx = empty(x, x.shape[0], b * p)
    dyb = blocks(dy, b)
    torch.bmm(dyb, w, out=blocks(dx, b))
    dw = torch.bmm(dyb.mT, blocks(x, b))
    return dx, dw


@torch.library.custom_op("mmm::blockdiag_cublas_fwd", mutates_args=())
def blockdiag_cublas_fwd(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, b*p], weight [b, s, p] -> y [N, b*s] (cuBLAS strided batched GEMM)."""
    return forward(x, weight)


@blockdiag_cublas_fwd.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0] * weight.shape[1])


@torch.library.custom_op("mmm::blockdiag_cublas_bwd", mutates_args=())
def blockdiag_cublas_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of blockdiag_cublas_fwd: (dx [N, b*p], dweight [b, s, p])."""
    return backward(dy, x, weight)


@blockdiag_cublas_bwd.register_fake
def _(dy, x, weight):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup(ctx, inputs, output):
    x, weight = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    return blockdiag_cublas_bwd(dy, x, weight)


blockdiag_cublas_fwd.register_autograd(_backward, setup_context=_setup)
