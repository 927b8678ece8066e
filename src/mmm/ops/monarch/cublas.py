"""Monarch through cuBLAS: every GEMM a torch.bmm on strided views (see ../blockdiag/cublas.py for the
views and the no-copy rule), for blocks large enough that cuBLAS beats the Triton kernels.

N tokens, b blocks, block rank c, m = b*c; the middle activations in two layouts, both [N, b, m]:
    z  "by output block":  z[n, l, k*c + t]  = y[n, k, l*c + t]   (stage 2 reads z_l = z[:, l, :])
    dy "by input block":   dy[n, k, l*c + t]                      (stage 1's output gradient)
    forward    z  = shuffle(x_k @ L_k^T)        out_l = z_l @ R_l^T
    backward   dy = shuffle^-1(dout_l @ R_l)    dR_l = dout_l^T @ z_l
               dx_k = dy_k @ L_k                dL_k = dy_k^T @ x_k
Four of the six GEMMs read or write the middle in its own layout and are single bmm calls. The shuffle
itself cannot live in the strides of a GEMM: stage 1's output columns (l, t) and stage 2's contraction
index (k, t) would both have to be one stride with t contiguous, i.e. stride(l) = stride(k) = c. So one
GEMM per direction (stage 1, and the data gradient of stage 2) meets the other layout, done either way:

  shuffle="split"  b calls, one per output chunk (l forward, k backward), each writing its c columns
                   straight into the other layout: no copy, no extra writes, but the other operand (x,
                   dout) is read b times. Expected to hide under the arithmetic when c is large (b=4,
                   c=1024 at d=16384: 3 extra reads of x, ~0.2 ms of traffic, inside ~1.5 ms of tensor-core
                   work); ruinous when c is small. scripts/gpu_block_paths.py measures both.
  shuffle="copy"   one bmm in the natural layout, then one permute copy (2 x |mid| bytes, ~0.13 ms at
                   N=8192, d=16384 on an H200).

Neither splits a contraction (which would read and write the output b times). z is saved for backward.
The ops mmm::monarch_cublas_fwd / mmm::monarch_cublas_bwd are torch.library custom ops with autograd.
"""

from __future__ import annotations

import torch

from ..blockdiag.cublas import blocks, empty, feature_major

SHUFFLES = ("split", "copy")
# The "copy" shuffle by the Triton tile copy (kernels.swap_blocks) rather than PyTorch's strided copy_;
# scripts/gpu_block_paths.py times both ("cublas shuffle copy alone" with this on and off).
SHUFFLE_BY_TRITON = True


def _check_shuffle(shuffle: str) -> None:
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")


def _swap_blocks(src: torch.Tensor, b: int, c: int) -> torch.Tensor:
    """[N, b, m] -> [N, b, m] with dst[n, l, k*c + t] = src[n, k, l*c + t] (its own inverse); one copy,
    by a Triton kernel where Triton runs (see kernels.swap_blocks: faster than PyTorch's strided copy)."""
    from ..blockdiag.op import triton_can_run  # here, not at import: this module must import without triton

    n = src.shape[0]
    dst = empty(src, *src.shape)
    if SHUFFLE_BY_TRITON and n and src.is_contiguous() and triton_can_run(src):
        from .kernels import swap_blocks

        swap_blocks(src, dst, b, c)
    else:
        dst.view(n, b, b, c).copy_(src.view(n, b, b, c).transpose(1, 2))
    return dst


def stage1(x: torch.Tensor, L: torch.Tensor, c: int, shuffle: str) -> torch.Tensor:
    """z [N, b, m] (by output block) from x [N, b*p]: z[n, l, k*c + t] = (x_k @ L_k^T)[n, l*c + t]."""
    b, m, _ = L.shape
    xb = blocks(feature_major(x), b)
    n = x.shape[0]
    if shuffle == "copy":
        y = empty(x, n, b, m)
        torch.bmm(xb, L.mT, out=y.transpose(0, 1))
        return _swap_blocks(y, b, c)
    z = empty(x, n, b, m)
    for l in range(b):
        # batch k: x_k [N, p] @ (rows l*c.. of L_k)^T -> z[:, l, k*c : k*c + c]
        torch.bmm(xb, L[:, l * c:(l + 1) * c, :].mT, out=blocks(z[:, l, :], b))
    return z


def stage2(z: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """out [N, b*s] from z [N, b, m]: out_l = z_l @ R_l^T."""
    b, s, _ = R.shape
    out = empty(z, z.shape[0], b * s)
    torch.bmm(z.transpose(0, 1), R.mT, out=blocks(out, b))
    return out


def grad_mid(dout: torch.Tensor, R: torch.Tensor, c: int, shuffle: str) -> torch.Tensor:
    """dy [N, b, m] (by input block): dy[n, k, l*c + t] = (dout_l @ R_l)[n, k*c + t]."""
    b, _, m = R.shape
    db = blocks(dout, b)
    n = dout.shape[0]
    if shuffle == "copy":
        dz = empty(dout, n, b, m)
        torch.bmm(db, R, out=dz.transpose(0, 1))
        return _swap_blocks(dz, b, c)
    dy = empty(dout, n, b, m)
    for k in range(b):
        # batch l: dout_l [N, s] @ R_l[:, k*c : k*c + c] -> dy[:, k, l*c : l*c + c]
        torch.bmm(db, R[:, :, k * c:(k + 1) * c], out=blocks(dy[:, k, :], b))
    return dy


def grad_R(dout: torch.Tensor, z: torch.Tensor, b: int) -> torch.Tensor:
    """dR_l = dout_l^T @ z_l  [b, s, m]."""
    return torch.bmm(blocks(dout, b).mT, z.transpose(0, 1))


def grad_x(dy: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """dx [N, b*p]: dx_k = dy_k @ L_k."""
    b, _, p = L.shape
    dx = empty(dy, dy.shape[0], b * p)
    torch.bmm(dy.transpose(0, 1), L, out=blocks(dx, b))
    return dx


def grad_L(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dL_k = dy_k^T @ x_k  [b, m, p]."""
    b = dy.shape[1]
    return torch.bmm(dy.transpose(0, 1).mT, blocks(feature_major(x), b))


def forward(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, c: int, shuffle: str):
    """x [N, b*p] -> (out [N, b*s], z [N, b, m])."""
    _check_shuffle(shuffle)
    z = stage1(x, L, c, shuffle)
    return stage2(z, R), z


def backward(dout: torch.Tensor, x: torch.Tensor, z: torch.Tensor, L: torch.Tensor, R: torch.Tensor, c: int,
             shuffle: str):
    """Gradients (dx, dL, dR) of forward given dout [N, b*s]."""
    _check_shuffle(shuffle)
    dout = feature_major(dout)
    dR = grad_R(dout, z, L.shape[0])
    dy = grad_mid(dout, R, c, shuffle)
    return grad_x(dy, L), grad_L(dy, x), dR


@torch.library.custom_op("mmm::monarch_cublas_fwd", mutates_args=())
def monarch_cublas_fwd(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, block_rank: int,
                       shuffle: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, b*p], L [b, b*c, p], R [b, s, b*c] -> (out [N, b*s], z [N, b, b*c])."""
    return forward(x, L, R, block_rank, shuffle)


@monarch_cublas_fwd.register_fake
def _(x, L, R, block_rank, shuffle):
    b, m, _ = L.shape
    return x.new_empty(x.shape[0], b * R.shape[1]), x.new_empty(x.shape[0], b, m)


@torch.library.custom_op("mmm::monarch_cublas_bwd", mutates_args=())
def monarch_cublas_bwd(dout: torch.Tensor, x: torch.Tensor, z: torch.Tensor, L: torch.Tensor, R: torch.Tensor,
                       block_rank: int, shuffle: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of monarch_cublas_fwd's `out`: (dx, dL, dR)."""
    return backward(dout, x, z, L, R, block_rank, shuffle)


@monarch_cublas_bwd.register_fake
def _(dout, x, z, L, R, block_rank, shuffle):
    return x.new_empty(x.shape), L.new_empty(L.shape), R.new_empty(R.shape)


def _setup(ctx, inputs, output):
    x, L, R, block_rank, shuffle = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)  # z's gradient is never used
    ctx.save_for_backward(x, L, R, z)
    ctx.block_rank, ctx.shuffle = block_rank, shuffle


def _backward(ctx, dout, _dz):
    x, L, R, z = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None
    dx, dL, dR = monarch_cublas_bwd(dout, x, z, L, R, ctx.block_rank, ctx.shuffle)
    return dx, dL, dR, None, None


monarch_cublas_fwd.register_autograd(_backward, setup_context=_setup)
