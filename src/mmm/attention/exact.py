"""Exact softmax attention through PyTorch's scaled_dot_product_attention (SDPA).

o_i = sum_j softmax_j(q_i . k_j / sqrt(d) + mask_ij) v_j, mask_ij = -inf for j > i when causal.
SDPA picks a backend (cuDNN, flash, memory-efficient, math); `exact_backend` says which one it picks
for given inputs and `exact_backends_available` which ones could run them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BACKEND_NAMES = {-1: "none", 0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def _sdpa_args(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None):
    """[B, T, H, D] -> SDPA's [B, H, T, D] (k, v default to q's shape)."""
    k = q if k is None else k
    v = k if v is None else v
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), q.shape[2] != k.shape[2]


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Softmax attention, [B, T, H, D] in and out (inputs already checked by `mmm.attention`)."""
    qt, kt, vt, gqa = _sdpa_args(q, k, v)
    o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
    return o.transpose(1, 2)


def exact_backend(q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, causal: bool = True) -> str:
    """The SDPA backend PyTorch would pick for these [B, T, H, D] inputs: 'cudnn', 'flash',
    'efficient' or 'math' (on CPU 'flash' is PyTorch's CPU flash kernel), 'none' if none can run them."""
    qt, kt, vt, gqa = _sdpa_args(q, k, v)
    choice = torch._fused_sdp_choice(qt, kt, vt, None, 0.0, causal, enable_gqa=gqa)
    return _BACKEND_NAMES.get(int(choice), f"backend {int(choice)}")


def exact_backends_available(q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, causal: bool = True) -> list[str]:
    """Every SDPA backend that could run these inputs (CUDA: asks each backend; CPU: the picked one and math)."""
    qt, kt, vt, gqa = _sdpa_args(q, k, v)
    if not qt.is_cuda:
        return sorted({exact_backend(q, k, v, causal), "math"})
    params = torch.backends.cuda.SDPAParams(qt, kt, vt, None, 0.0, causal, gqa)
    checks = {
        "cudnn": torch.backends.cuda.can_use_cudnn_attention,
        "flash": torch.backends.cuda.can_use_flash_attention,
        "efficient": torch.backends.cuda.can_use_efficient_attention,
    }
    return [name for name, can_use in checks.items() if can_use(params, False)] + ["math"]
