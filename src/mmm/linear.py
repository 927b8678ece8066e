"""`StructuredLinear`: a drop-in `nn.Linear` whose weight is a structure, and `project`, which turns
a dense weight into one."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_finite, check_finite_activations, check_float_tensor, check_last_dim, check_matches
from .configs import DenseConfig, StructureConfig
from .structures.base import build_structure, structure_class


class StructuredLinear(nn.Module):
    """y = x @ W.T + b with W a structured matrix (`config` says which).

    `projection_error` is ||W - W_hat||_F / ||W||_F when the layer came from a dense weight
    (`from_linear` / `project`), else None.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: StructureConfig | None = None,
        bias: bool = True,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        config = DenseConfig() if config is None else config
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.structure = build_structure(in_features, out_features, config, device=device, dtype=dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)
        self.projection_error: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x)
        check_last_dim("x", x, self.in_features)
        # one clear error for every structure and device (the plain-PyTorch products raised the matmul's
        # own error, the FFT ones computed in x's dtype); autocast, as for nn.Linear, takes mixed dtypes
        check_matches("x", x, next(iter(self.structure._parameters.values())), "the layer's parameters")
        check_finite_activations(x=x)
        y = self.structure(x)
        if self.bias is not None:
            y = y + self.bias
        return y

    def to_dense(self) -> torch.Tensor:
        """The [out, in] weight this layer multiplies by (built on demand; for inspection and tests)."""
        return self.structure.to_dense()

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self, num_tokens: int) -> int:
        """Forward FLOPs over num_tokens rows, bias included."""
        return self.structure.flops(num_tokens) + (num_tokens * self.out_features if self.bias is not None else 0)

    @classmethod
    def from_linear(cls, linear: nn.Module, config: StructureConfig) -> "StructuredLinear":
        """Project an `nn.Linear` (or a Hugging Face GPT-2 style `Conv1D`) onto `config`'s structure."""
        weight, bias = dense_weight_of(linear)
        return project(weight, config, bias=bias)

    @classmethod
    def _wrap(cls, structure: nn.Module, bias: torch.Tensor | None) -> "StructuredLinear":
        """A layer around an existing structure (skips the random initialisation of __init__)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = structure.in_features, structure.out_features
        layer.config = structure.config
        layer.structure = structure
        layer.bias = None if bias is None else nn.Parameter(bias)
        layer.projection_error = None
        return layer

    def extra_repr(self) -> str:
        err = "" if self.projection_error is None else f", projection_error={self.projection_error:.4g}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{err}"


def dense_weight_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The [out, in] weight and the bias of an `nn.Linear` or a transformers `Conv1D` (which stores [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2:
        return module.weight.t(), module.bias
    raise TypeError(f"expected an nn.Linear or a transformers Conv1D, got {type(module).__name__}")


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F, computed in fp64 (0 when both are zero)."""
    w = weight.detach().double()
    diff = torch.linalg.matrix_norm(w - approx.detach().double())
    norm = torch.linalg.matrix_norm(w)
    if float(norm) == 0.0:
        return 0.0 if float(diff) == 0.0 else math.inf
    return float(diff / norm)


def project(weight: torch.Tensor, config: StructureConfig, bias: torch.Tensor | None = None) -> StructuredLinear:
    """Nearest structured layer to a dense [out, in] `weight` (Frobenius norm), with `bias` copied.

    Closed-form and optimal for low rank, block-diagonal, Monarch, Kronecker sums, circulant and
    Toeplitz; best effort for LDR (see `mmm.structures.ldr`). The returned layer has the weight's
    dtype and device and reports `projection_error`.
    """
    check_float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [out_features, in_features] matrix, got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    check_finite("weight", weight)
    out_features, in_features = weight.shape
    if bias is not None:
        check_float_tensor("bias", bias)
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},) to match weight, got {tuple(bias.shape)}")
    weight = weight.detach()
    structure = structure_class(config).from_dense(weight, config)
    layer = StructuredLinear._wrap(structure, None if bias is None else bias.detach().clone())
    with torch.no_grad():
        layer.projection_error = relative_error(weight, structure.to_dense())
    return layer
