"""Monarch as two block stages of the shared kernels (../blockdiag/kernels.py), with the shuffle in the
addressing: no permute copy in forward or backward.

The middle activations live in one buffer `mid` [b, b*c, N] (c = block rank) holding
    mid[k, l*c + t, n] = y[n, k, l*c + t] = z[n, l, k*c + t],
i.e. *token-minor*: tokens are the contiguous dimension. Why not store z itself (token-major, as the
PyTorch reference does)? Stage 1 (one program per input block k) writes y_k, stage 2 (one per output
block l) reads z_l; the two meet only along the token axis. Row-major z makes one of them touch runs of
just c elements, which for the rank-1 blocks of large b (c = 1 at d = 16384, b = 128) means 2-byte
scattered accesses, ~16x the memory transactions. With tokens contiguous, every program reads and
writes runs of a whole token tile (BM elements) for any c:
  stage 1 writes  y_k[n, j]        at k*(b*c*N) + j*N + n                        (plain column stride N)
  stage 2 reads   z_l[n, k*c + t]  at k*(b*c*N) + l*(c*N) + t*N + n              (split column: k, t)
Backward uses the same two views of a second buffer dmid: stage 2's data gradient dz_l is written
through the split view (that is the inverse shuffle) and stage 1 reads dy_k through the plain one.

mid is written by the forward anyway, so autograd keeps it: recomputing it in backward would cost an
extra read of x and write of mid (2 x the bytes of mid) to save nothing but memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._eager import cdiv, fast_launch, next_power_of_2
from ..blockdiag.kernels import Operand, new_output, rows_of, stage_backward, stage_forward, weight_grad_splits


def mid_by_input_block(mid: torch.Tensor) -> Operand:
    """y_k [N, b*c] for input block k (the plain view)."""
    _, m, N = mid.shape
    return Operand(mid, m * N, 1, N)


def mid_by_output_block(mid: torch.Tensor, block_rank: int) -> Operand:
    """z_l [N, b*c] for output block l: column k*c + t sits at k*(b*c*N) + t*N (the split view)."""
    _, m, N = mid.shape
    return Operand(mid, block_rank * N, 1, N, sc_hi=m * N, split=block_rank)


def monarch_forward(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, block_rank: int):
    """x [N, b*p] -> (out [N, b*s], mid [b, b*c, N])."""
    N = x.shape[0]
    b, m, p = L.shape
    s = R.shape[1]
    mid = new_output((b, m, N), x)
    out = new_output((N, b * s), x)
    stage_forward(rows_of(x, p), L, mid_by_input_block(mid), N)
    stage_forward(mid_by_output_block(mid, block_rank), R, rows_of(out, s), N)
    return out, mid


def monarch_backward(dout: torch.Tensor, x: torch.Tensor, mid: torch.Tensor, L: torch.Tensor,
                     R: torch.Tensor, block_rank: int):
    """Gradients of monarch_forward given dout [N, b*s]: (dx, dw) with dw = [dR, dL] flattened into one
    tensor (split it with `split_weight_grads`)."""
    N = x.shape[0]
    b, m, p = L.shape
    s = R.shape[1]
    dmid = new_output(mid.shape, mid)
    dx = new_output((N, b * p), x)
    stage2 = rows_of(dout, s), mid_by_output_block(mid, block_rank), R, mid_by_output_block(dmid, block_rank), N
    stage1 = mid_by_input_block(dmid), rows_of(x, p), L, rows_of(dx, p), N
    splits = weight_grad_splits(R, N)[0]
    if weight_grad_splits(L, N)[0] != splits:  # (only where P or Q > FUSED_BACKWARD_MAX)
        return dx, torch.cat((stage_backward(*stage2).flatten(), stage_backward(*stage1).flatten()))
    # Both stages split their weight-gradient reduction alike (always in the fused backward: equal
    # block counts), so one buffer takes both: dR and dL directly for one split, else their fp32
    # partial sums, added and cast together (two launches instead of four: the launch-bound H200 runs
    # pay host time for each).
    nR = R.numel()
    lead = () if splits == 1 else (splits,)
    buf = new_output((*lead, nR + L.numel()), x, None if splits == 1 else torch.float32)
    stage_backward(*stage2, slots=buf[..., :nR].view(*lead, *R.shape))
    stage_backward(*stage1, slots=buf[..., nR:].view(*lead, *L.shape))
    return dx, (buf if splits == 1 else buf.sum(0).to(R.dtype))


def split_weight_grads(dw: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL, dR) as views of monarch_backward's flat dw. (The op returns one tensor: outputs of a
    torch.library op may not alias each other.)"""
    nR = R.numel()
    return dw[nR:].view(L.shape), dw[:nR].view(R.shape)


# ------------------------------------------------------------------------------------------------------
# The shuffle as one copy, for the cuBLAS "copy" path (../monarch/cublas.py): dst[n, l, k*c + t] =
# src[n, k, l*c + t] on [N, b, b*c] buffers. PyTorch's copy_ of the transposed [N, b, b, c] view ran at
# ~1.5 TB/s of the H200's 4.2 (scripts/gpu_block_paths.py, c = 64); here each program moves one [BN, c]
# tile whose rows are c contiguous elements on both sides, so every access is a full run of c.
SWAP_TILE = 8192  # elements a program moves (BN rows x BC columns)


@triton.jit
def swap_blocks_kernel(src_ptr, dst_ptr, N, b, c, BN: tl.constexpr, BC: tl.constexpr):
    """One [BN, c] tile of the (k, l) block pair: program (i, k * b + l)."""
    pid_kl = tl.program_id(1)
    k = pid_kl // b
    l = pid_kl % b
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)  # int64: N * b * b * c may pass 2^31
    cols = tl.arange(0, BC)
    m = b * c
    mask = (rows < N)[:, None] & (cols < c)[None, :]
    row_base = rows[:, None] * (b * m)
    x = tl.load(src_ptr + row_base + (k * m + l * c) + cols[None, :], mask=mask)
    tl.store(dst_ptr + row_base + (l * m + k * c) + cols[None, :], x, mask=mask)


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, b: int, c: int) -> None:
    """dst[n, l, k*c + t] = src[n, k, l*c + t]; src and dst contiguous [N, b, b*c], not overlapping."""
    N = src.shape[0]
    BC = next_power_of_2(c)
    BN = min(128, max(1, SWAP_TILE // BC))
    fast_launch(swap_blocks_kernel)[(cdiv(N, BN), b * b)](src, dst, N, b, c, BN=BN, BC=BC, num_warps=4)
