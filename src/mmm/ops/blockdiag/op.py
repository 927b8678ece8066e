"""Block-diagonal product as torch.library ops backed by the Triton kernels, with autograd, and the
public `blockdiag_matmul` that checks its inputs and dispatches.

Ops: mmm::blockdiag_fwd(x, weight) -> y and mmm::blockdiag_bwd(dy, x, weight) -> (dx, dweight).
They are `triton_op`s (kernels launched through `wrap_triton`), so torch.compile(fullgraph=True) traces
through them and sees the kernels; the fake (meta) implementation is the same Python run on fake tensors.

Dispatch (`choose_path`): on CUDA, the Triton op or the cuBLAS op (cublas.py), whichever dispatch.py
says is faster for the shape (a measured table, else a default rule); on CPU, the Triton op under
TRITON_INTERPRET=1 (`use_kernel`: fp16/bf16/fp32), else the naive PyTorch reference; the reference for
zero tokens and under `mmm.ops.reference_only()`. `path=` forces one of them.
"""

from __future__ import annotations

import torch

from ..._checks import check_float_tensor
from .. import kernels_enabled
from .._eager import eager_twin, plain_eager
from . import dispatch, naive
from .cublas import blockdiag_cublas_fwd

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:
    from torch.library import triton_op

    from .kernels import INTERPRET, new_output, rows_of, stage_backward, stage_forward

    HAVE_TRITON = True
except ImportError:  # CPU installs without triton use the reference
    HAVE_TRITON = False
    INTERPRET = False


def triton_can_run(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can take tensors like x (dtype, device, triton installed)."""
    if not HAVE_TRITON or x.dtype not in KERNEL_DTYPES:
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


def use_kernel(x: torch.Tensor) -> bool:
    """Whether tensors like x go to the Triton kernels on CPU (interpreter) or may on CUDA."""
    return kernels_enabled() and x.numel() > 0 and triton_can_run(x)


def choose_path(structure: str, x2: torch.Tensor, in_features: int, out_features: int, nblocks: int,
                block_rank: int | None = None, path: str | None = None) -> str:
    """"reference", "triton", "cublas" or (Monarch) "cublas_copy" for the [N, in_features] input x2.
    `path` forces one (checked); None chooses as the module docstring says."""
    if path is not None:
        allowed = dispatch.PATHS[structure]
        if path not in allowed:
            raise ValueError(f"path must be None (automatic) or one of {allowed}, got {path!r}")
        if x2.shape[0] == 0:
            return "reference"
        if path == "triton" and not triton_can_run(x2):
            raise ValueError(f"path='triton' needs triton and a float16/bfloat16/float32 tensor on CUDA (or on "
                             f"CPU under TRITON_INTERPRET=1); got {x2.dtype} on {x2.device}")
        return path
    if not kernels_enabled() or x2.shape[0] == 0:
        return "reference"
    if not x2.is_cuda:
        return "triton" if use_kernel(x2) else "reference"
    return dispatch.pick(structure, in_features, out_features, nblocks, block_rank, x2.dtype, x2.shape[0],
                         triton_ok=triton_can_run(x2))


# --------------------------------------------------------------------------------------------------
# When to multiply by the pre-merged dense matrix instead
# --------------------------------------------------------------------------------------------------
# For very few tokens a structured product is two or three kernel launches over tiny tensors, and a
# layer that keeps a dense copy of itself (inference) could do one GEMV instead. Whether that wins
# depends on the layer size: at d = 16384 the dense copy is 512 MB and reading it once (~120 us on an
# H200) costs far more than the structured launches (~10 us), while at d = 1024 (2 MB) it may save a
# launch. So the answer is measured, not guessed: scripts/gpu_block_paths.py measures the crossover
# and writes entries for this table ($OUT/merged_dense_table.json), keyed (structure, in, out, nblocks, dtype).
# A layer that is not in the table is never merged: merging also costs in*out memory, and without a
# measurement there is no evidence that it pays for it.
MERGED_DENSE_MAX_TOKENS: dict[tuple[str, int, int, int, str], int] = {}


def merged_dense_max_tokens(structure: str, in_features: int, out_features: int, nblocks: int,
                            dtype: torch.dtype) -> int:
    """Largest token count for which the pre-merged dense product measured faster (0: never)."""
    key = (structure, in_features, out_features, nblocks, str(dtype).removeprefix("torch."))
    return MERGED_DENSE_MAX_TOKENS.get(key, 0)


def prefer_merged_dense(num_tokens: int, structure: str, in_features: int, out_features: int,
                        nblocks: int, dtype: torch.dtype) -> bool:
    return num_tokens <= merged_dense_max_tokens(structure, in_features, out_features, nblocks, dtype)


# --------------------------------------------------------------------------------------------------
# checks shared with Monarch
# --------------------------------------------------------------------------------------------------

def check_weight_rank(name: str, w: torch.Tensor, layout: str) -> None:
    check_float_tensor(name, w)
    if w.dim() != 3:
        raise ValueError(f"{name} must be 3-D {layout}, got shape {tuple(w.shape)}")


def check_input(x: torch.Tensor, in_features: int, weights: dict[str, torch.Tensor]) -> None:
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension {in_features} (in_features), got shape {tuple(x.shape)}")
    for name, w in weights.items():
        if w.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {w.device}; move them to one device")
        if w.dtype != x.dtype:
            raise TypeError(f"x is {x.dtype} but {name} is {w.dtype}; use one dtype (or torch.autocast)")


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under torch.autocast, compute in the autocast dtype (as nn.Linear would)."""
    dev = tensors[0].device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return tuple(t.to(dt) if t.is_floating_point() else t for t in tensors)
    return tensors


# --------------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------------

if HAVE_TRITON:

    def _blockdiag_forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, b*p], weight [b, s, p] -> y [N, b*s]."""
        b, s, p = weight.shape
        N = x.shape[0]
        y = new_output((N, b * s), x)
        stage_forward(rows_of(x, p), weight, rows_of(y, s), N)
        return y

    def _blockdiag_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of blockdiag_fwd: (dx [N, b*p], dweight [b, s, p])."""
        b, s, p = weight.shape
        N = x.shape[0]
        dx = new_output((N, b * p), x)
        dw = stage_backward(rows_of(dy, s), rows_of(x, p), weight, rows_of(dx, p), N)
        return dx, dw

    def _setup(ctx, inputs, output):
        x, weight = inputs
        ctx.save_for_backward(x, weight)

    def _gradients(backward):
        def grads(ctx, dy):
            x, weight = ctx.saved_tensors
            return backward(dy, x, weight)

        return grads

    # the ops (torch.compile, fake tensors, dispatch modes) and their plain-eager twin (see plain_eager)
    blockdiag_fwd = triton_op("mmm::blockdiag_fwd", mutates_args=())(_blockdiag_forward)
    blockdiag_bwd = triton_op("mmm::blockdiag_bwd", mutates_args=())(_blockdiag_backward)
    blockdiag_fwd.register_autograd(_gradients(blockdiag_bwd), setup_context=_setup)
    _EagerBlockdiag = eager_twin("_EagerBlockdiag", _blockdiag_forward, _setup, _gradients(_blockdiag_backward))


def blockdiag_matmul(x: torch.Tensor, weight: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """y[..., k*s + j] = sum_i weight[k, j, i] * x[..., k*p + i]: x [..., b*p] times the block-diagonal
    matrix with blocks weight [b, s, p], giving [..., b*s]. Differentiable in x and weight.
    path: None chooses (see `choose_path`); "triton", "cublas" or "reference" forces one."""
    check_weight_rank("weight", weight, "[nblocks, out_features/nblocks, in_features/nblocks]")
    b, s, p = weight.shape
    check_float_tensor("x", x)
    x, weight = autocast_inputs(x, weight)
    check_input(x, b * p, {"weight": weight})
    lead = x.shape[:-1]
    x2 = x.reshape(-1, b * p)
    path = choose_path("blockdiag", x2, b * p, b * s, b, None, path)
    if path == "triton":
        y = (_EagerBlockdiag.apply if plain_eager(x2, weight) else blockdiag_fwd)(x2, weight)
    elif path == "cublas":
        y = blockdiag_cublas_fwd(x2, weight)
    else:
        y = naive.blockdiag_matmul(x2, weight)
    return y.reshape(*lead, b * s)
