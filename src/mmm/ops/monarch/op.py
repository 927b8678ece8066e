"""Monarch product as torch.library ops backed by the Triton kernels, with autograd, and the public
`monarch_matmul` that checks its inputs and dispatches.

Ops: mmm::monarch_fwd(x, L, R, block_rank) -> (out, mid) and
     mmm::monarch_bwd(dout, x, mid, L, R, block_rank) -> (dx, dw), dw = [dR, dL] flattened.
`mid` is the token-minor middle buffer (see kernels.py); it is an output only so that autograd can keep
it for backward. dR and dL come as one tensor: they share one buffer (one reduction and one cast for
both) and an op's outputs may not alias each other; autograd gets views of it. Both are `triton_op`s,
so torch.compile(fullgraph=True) traces through them.
Dispatch is `choose_path` (shared with the block-diagonal op): the Triton op, or on CUDA the cuBLAS op
(cublas.py) where dispatch.py says it is faster.
"""

from __future__ import annotations

import torch

from ..blockdiag.op import (
    HAVE_TRITON,
    autocast_inputs,
    check_input,
    check_weight_rank,
    choose_path,
    merged_dense_max_tokens,
    prefer_merged_dense,
    use_kernel,
)
from .._eager import eager_twin, plain_eager
from . import naive
from .cublas import monarch_cublas_fwd
from ..._checks import check_float_tensor

if HAVE_TRITON:
    from torch.library import triton_op

    from .kernels import monarch_backward, monarch_forward, split_weight_grads

    @triton_op("mmm::monarch_fwd", mutates_args=())
    def monarch_fwd(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, block_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, b*p], L [b, b*c, p], R [b, s, b*c] -> (out [N, b*s], mid [b, b*c, N])."""
        return monarch_forward(x, L, R, block_rank)

    @triton_op("mmm::monarch_bwd", mutates_args=())
    def monarch_bwd(dout: torch.Tensor, x: torch.Tensor, mid: torch.Tensor, L: torch.Tensor, R: torch.Tensor,
                    block_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of monarch_fwd's `out`: (dx, [dR, dL] flattened into one tensor)."""
        return monarch_backward(dout, x, mid, L, R, block_rank)

    def _setup(ctx, inputs, output):
        x, L, R, block_rank = inputs
        _, mid = output
        ctx.mark_non_differentiable(mid)
        ctx.set_materialize_grads(False)  # mid's gradient is never used; don't allocate zeros for it
        ctx.save_for_backward(x, L, R, mid)
        ctx.block_rank = block_rank

    def _gradients(backward):
        def grads(ctx, dout, _dmid):
            x, L, R, mid = ctx.saved_tensors
            if dout is None:
                return None, None, None, None
            dx, dw = backward(dout, x, mid, L, R, ctx.block_rank)
            return dx, *split_weight_grads(dw, L, R), None

        return grads

    monarch_fwd.register_autograd(_gradients(monarch_bwd), setup_context=_setup)
    # the same launches for plain eager calls, without the ops' dispatch (see mmm.ops._eager)
    _EagerMonarch = eager_twin("_EagerMonarch", monarch_forward, _setup, _gradients(monarch_backward))


def check_monarch(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, block_rank: int) -> None:
    if isinstance(block_rank, bool) or not isinstance(block_rank, int) or block_rank < 1:
        raise ValueError(f"block_rank must be a positive int, got {block_rank!r}")
    check_weight_rank("L", L, "[nblocks, nblocks*block_rank, in_features/nblocks]")
    check_weight_rank("R", R, "[nblocks, out_features/nblocks, nblocks*block_rank]")
    b, m, _ = L.shape
    if m != b * block_rank:
        raise ValueError(
            f"L must have shape [nblocks, nblocks*block_rank, in/nblocks] = [{b}, {b * block_rank}, ...] "
            f"for nblocks={b}, block_rank={block_rank}; got {tuple(L.shape)}")
    if R.shape[0] != b or R.shape[2] != m:
        raise ValueError(
            f"R must have shape [nblocks, out/nblocks, nblocks*block_rank] = [{b}, ..., {m}] to match "
            f"L {tuple(L.shape)}; got {tuple(R.shape)}")


def monarch_matmul(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, block_rank: int,
                   path: str | None = None) -> torch.Tensor:
    """Monarch product of x [..., b*p] with L [b, b*c, p] and R [b, s, b*c] (c = block_rank), giving
    [..., b*s]; the layout is spelled out in naive.py. Differentiable in x, L and R.
    path: None chooses (see blockdiag.op.choose_path); "triton", "cublas", "cublas_copy" or "reference"
    forces one."""
    check_float_tensor("x", x)
    check_monarch(x, L, R, block_rank)
    x, L, R = autocast_inputs(x, L, R)
    b, m, p = L.shape
    s = R.shape[1]
    check_input(x, b * p, {"L": L, "R": R})
    lead = x.shape[:-1]
    x2 = x.reshape(-1, b * p)
    path = choose_path("monarch", x2, b * p, b * s, b, block_rank, path)
    if path == "triton":
        out = (_EagerMonarch.apply if plain_eager(x2, L, R) else monarch_fwd)(x2, L, R, block_rank)[0]
    elif path in ("cublas", "cublas_copy"):
        out = monarch_cublas_fwd(x2, L, R, block_rank, "split" if path == "cublas" else "copy")[0]
    else:
        out = naive.monarch_matmul(x2, L, R, block_rank)
    return out.reshape(*lead, b * s)


__all__ = ["monarch_matmul", "check_monarch", "choose_path", "use_kernel", "merged_dense_max_tokens",
           "prefer_merged_dense"]
