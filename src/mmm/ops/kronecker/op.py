"""Kronecker-sum product as torch.library ops backed by the Triton kernels, with autograd, and the
public `kron_matmul` that checks its inputs and dispatches (same policy as the block ops:
Triton on CUDA or under TRITON_INTERPRET=1, the PyTorch reference otherwise)."""

from __future__ import annotations

import torch

from ..._checks import check_float_tensor
from .._eager import eager_twin, plain_eager
from ..blockdiag.op import HAVE_TRITON, autocast_inputs, check_input, use_kernel
from . import naive

if HAVE_TRITON:
    from torch.library import triton_op

    from . import kernels
    from .kernels import kron_apply, kron_bwd_one_pass, kron_dx_and_da, kron_factor_grad, supported

    def _kron_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """x [N, i1*i2], A [r, o1, i1], B [r, o2, i2] -> y [N, o1*o2]."""
        N = x.shape[0]
        _, o1, i1 = A.shape
        _, o2, i2 = B.shape
        y = torch.empty((N, o1 * o2), device=x.device, dtype=x.dtype)
        kron_apply(x.view(N, i1, i2), A, B, y.view(N, o1, o2))
        return y

    def _kron_backward(dy: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of kron_fwd: (dx, [dA, dB] flattened into one tensor). The factor gradients share one
        buffer (summed into it in fp32, cast together: one cast launch instead of two, none for fp32), and
        an op's outputs may not alias each other: autograd gets views of it (`_split_factor_grads`)."""
        N = x.shape[0]
        _, o1, i1 = A.shape
        _, o2, i2 = B.shape
        dY = dy.view(N, o1, o2)
        X = x.view(N, i1, i2)
        dx = torch.empty_like(x)
        grads = torch.empty(A.numel() + B.numel(), device=x.device, dtype=torch.float32)
        dA, dB = _split_factor_grads(grads, A, B)
        if kernels.ONE_PASS_BWD and A.shape[0] == 1:  # dx, dA and dB from one read of dy and x
            kron_bwd_one_pass(dY, X, A, B, dx.view(N, i1, i2), out=(dA, dB))
        else:
            if kernels.FUSED_DX_DA and A.shape[0] == 1:
                kron_dx_and_da(dY, X, A, B, dx.view(N, i1, i2), out=dA)
            else:
                # dX_n = sum_j A_j^T dY_n B_j: the forward kernel with transposed factors (views, no copies)
                kron_apply(dY, A.transpose(1, 2), B.transpose(1, 2), dx.view(N, i1, i2))
                kron_factor_grad(dY, B, X, out=dA)                                 # sum_n dY_n B_j X_n^T
            kron_factor_grad(dY.transpose(1, 2), A, X.transpose(1, 2), out=dB)     # sum_n dY_n^T A_j X_n
        return dx, grads.to(A.dtype)

    def _split_factor_grads(dAB: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nA = A.numel()
        return dAB[:nA].view(A.shape), dAB[nA:].view(B.shape)

    def _setup(ctx, inputs, output):
        x, A, B = inputs
        ctx.save_for_backward(x, A, B)

    def _gradients(backward):
        def grads(ctx, dy):
            x, A, B = ctx.saved_tensors
            dx, dAB = backward(dy.contiguous(), x, A, B)
            return dx, *_split_factor_grads(dAB, A, B)

        return grads

    # the ops (torch.compile, fake tensors, dispatch modes) and their plain-eager twin (see plain_eager)
    kron_fwd = triton_op("mmm::kron_fwd", mutates_args=())(_kron_forward)
    kron_bwd = triton_op("mmm::kron_bwd", mutates_args=())(_kron_backward)
    kron_fwd.register_autograd(_gradients(kron_bwd), setup_context=_setup)
    _EagerKron = eager_twin("_EagerKron", _kron_forward, _setup, _gradients(_kron_backward))


def kernel_applies(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether kron_matmul runs the Triton kernels for these tensors (dtype, device, factor sizes)."""
    return HAVE_TRITON and use_kernel(x) and supported(A, B)


def kron_matmul(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """y = x @ (sum_j kron(A[j], B[j]))^T for x [..., i1*i2], A [r, o1, i1], B [r, o2, i2] -> [..., o1*o2].
    Differentiable in x, A and B."""
    check_float_tensor("x", x)
    for name, f in (("A", A), ("B", B)):
        check_float_tensor(name, f)
        if f.dim() != 3:
            raise ValueError(f"{name} must be 3-D [terms, out_factor, in_factor], got shape {tuple(f.shape)}")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"A and B must have the same number of terms, got {A.shape[0]} and {B.shape[0]}")
    x, A, B = autocast_inputs(x, A, B)
    in_features = A.shape[2] * B.shape[2]
    check_input(x, in_features, {"A": A, "B": B})
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if kernel_applies(x2, A, B):
        args = (x2.contiguous(), A.contiguous(), B.contiguous())
        y = (_EagerKron.apply if plain_eager(*args) else kron_fwd)(*args)
    else:
        y = naive.kron_matmul(x2, A, B)
    return y.reshape(*lead, A.shape[1] * B.shape[1])
