"""Dense against structured linear maps at FFN shapes: x[n, d_in] -> y[n, d_out], no bias.

Two case sets, each over several d: `linear.square.d{d}` (d -> d) and `linear.up4x.d{d}` (d -> 4d, an
FFN up-projection). Full size: n = 8192, d in 4096..32768; quick: n = 256, d in 256, 512. The baseline
is a bias-free `nn.Linear` (one cuBLAS GEMM on CUDA); each structure runs through `StructuredLinear`,
i.e. whatever implementation the library currently dispatches to. Forward+backward is
`y.backward(grad)` with a fixed random grad, so it computes gradients for the input and the parameters.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..configs import (
    BlockDiagConfig,
    CirculantConfig,
    KroneckerConfig,
    LDRConfig,
    LowRankConfig,
    MonarchConfig,
    StructureConfig,
    ToeplitzConfig,
)
from ..linear import StructuredLinear
from ..ops import reference_only
from .graphs import graphed, triton_launched
from .registry import Variant, Workload, bench_case

FULL_TOKENS, FULL_DIMS = 8192, (4096, 8192, 16384, 32768)
QUICK_TOKENS, QUICK_DIMS = 256, (256, 512)
SHAPES = {"square": 1, "up4x": 4}  # d_out = multiplier * d_in
# square sizes that also time torch.compile of each structure's plain PyTorch version (compiling
# every variant at every size would take most of a GPU session)
COMPILED_REFERENCE_DIMS = (16384,)
# rows whose host time came close to their GPU time on the H200 (session 8): timed again through Triton's
# own launch path, beside the default FastLaunch (what it saves)
LAUNCH_BOUND_ROWS = ("blockdiag b=16", "monarch b=128", "kronecker 1 term", "circulant", "toeplitz")


def structured_configs(d_in: int, d_out: int) -> list[tuple[str, StructureConfig]]:
    """The structures benchmarked against dense, keeping only those this shape takes sensibly."""
    rank = max(1, min(d_in, d_out) // 8)
    candidates = [
        (f"lowrank r={rank}", LowRankConfig(rank=rank)),
        ("blockdiag b=4", BlockDiagConfig(nblocks=4)),
        ("blockdiag b=16", BlockDiagConfig(nblocks=16)),
        ("monarch b=4", MonarchConfig(nblocks=4)),
        ("monarch b=16", MonarchConfig(nblocks=16)),
        ("monarch b=128", MonarchConfig(nblocks=128)),
        ("kronecker 1 term", KroneckerConfig(terms=1)),
        ("circulant", CirculantConfig()),
        ("toeplitz", ToeplitzConfig()),
        ("ldr r=4", LDRConfig(rank=4)),
    ]
    kept = []
    for label, config in candidates:
        try:
            config.check_shape(d_in, d_out)
        except ValueError:
            continue
        # Monarch with b^2 > d would clamp block_rank at 1 and widen the middle to b^2 > d: more work
        # than dense, not a variant anyone would pick.
        if isinstance(config, MonarchConfig) and config.nblocks**2 > min(d_in, d_out):
            continue
        kept.append((label, config))
    return kept


def linear_variant(label: str, x: torch.Tensor, grad: torch.Tensor, config: StructureConfig | None = None,
                   *, baseline: bool = False, compile: bool = False, reference: bool = False) -> Variant:
    """A variant computing x @ W.T for W dense (`config=None`: `nn.Linear`) or structured (`config`),
    optionally through `torch.compile`, optionally with the fused kernels off (`reference`: the plain
    PyTorch version of the structure). `x` must require grad; `grad` is the output gradient."""
    mode = reference_only if reference else contextlib.nullcontext

    def build() -> Workload:
        (n, d_in), d_out = x.shape, grad.shape[-1]
        if config is None:
            layer = nn.Linear(d_in, d_out, bias=False, device=x.device, dtype=x.dtype)
            flops = 2 * n * d_in * d_out
        else:
            layer = StructuredLinear(d_in, d_out, config, bias=False, device=x.device, dtype=x.dtype)
            flops = layer.flops(n)
        params = list(layer.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        io = x.element_size() * n
        if compile:  # a fresh cache per variant: every StructuredLinear shares one forward code object,
            torch._dynamo.reset()  # and dynamo's recompile limit would silently fall back to eager
        compiled = torch.compile(layer) if compile else layer

        def fn(inp):
            with mode():
                return compiled(inp)

        def forward_backward() -> None:
            fn(x).backward(grad)

        return Workload(
            forward=lambda: fn(x),
            forward_backward=forward_backward,
            grad_to_none=[x, *params],
            flops=flops,
            bytes=io * (d_in + d_out) + param_bytes,  # read x and W, write y
            # backward costs two more products of the forward's size (grad wrt input and wrt weights);
            # it reads grad, x, W and writes grad_x, grad_W
            fwd_bwd_flops=3 * flops,
            fwd_bwd_bytes=io * (3 * d_in + 2 * d_out) + 3 * param_bytes,
            info={"params": sum(p.numel() for p in params),
                  "structure": "dense" if config is None else config.describe(),
                  "compiled": compile, "reference": reference},
        )

    return Variant(label, build, baseline)


def _linear_setup(n: int, d_in: int, d_out: int):
    def setup(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Variant]:
        x = torch.randn(n, d_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(n, d_out, device=device, dtype=dtype)
        variants = [linear_variant("dense nn.Linear", x, grad, baseline=True)]
        configs = structured_configs(d_in, d_out)
        variants += [linear_variant(label, x, grad, config) for label, config in configs]
        if device.type == "cuda" and d_in == d_out and d_in in COMPILED_REFERENCE_DIMS:
            # the same layers without host overhead: what their kernels take (launch-bound rows differ)
            variants += [graphed(linear_variant("dense nn.Linear", x, grad))]
            variants += [graphed(linear_variant(label, x, grad, config)) for label, config in configs]
            variants += [triton_launched(linear_variant(label, x, grad, config))
                         for label, config in configs if label in LAUNCH_BOUND_ROWS]
        if d_in == d_out and d_in in COMPILED_REFERENCE_DIMS:
            # what a user gets today without mmm's kernels: torch.compile of the plain PyTorch structure
            # (not LDR's: its per-term reference holds [tokens, r, d] complex intermediates, ~4 GB each here)
            variants += [linear_variant(f"{label} [compiled ref]", x, grad, config, compile=True, reference=True)
                         for label, config in configs if not isinstance(config, LDRConfig)]
        return variants

    return setup


def _register() -> None:
    for n, dims, quick in ((QUICK_TOKENS, QUICK_DIMS, True), (FULL_TOKENS, FULL_DIMS, False)):
        for shape, mult in SHAPES.items():
            for d in dims:
                description = f"x[{n}, {d}] -> [{n}, {mult * d}]"
                bench_case(f"linear.{shape}.d{d}", "linear", description, quick)(_linear_setup(n, d, mult * d))


_register()
