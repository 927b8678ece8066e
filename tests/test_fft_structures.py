"""Circulant, Toeplitz and LDR: agreement with their textbook definitions, the known special cases
that tie them together, projections of known matrices, and that the forward really is O(n log n)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mmm
from mmm.structures import LDR, Circulant, Toeplitz
from mmm.structures._fft import fast_len
from mmm.linear import relative_error

from conftest import rel_err

f64 = torch.float64


# --- references built entry by entry from the definitions --------------------------------------
def f_circulant(v: torch.Tensor, f: float) -> torch.Tensor:
    """Z_f(v): first column v, each column the one before shifted down, f times the entry wrapped to the top."""
    n = v.numel()
    m = torch.zeros(n, n, dtype=v.dtype)
    for r in range(n):
        for s in range(n):
            m[r, s] = v[r - s] if r >= s else f * v[n + r - s]
    return m


def toeplitz_reference(t: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    return torch.tensor([[float(t[i - j + in_features - 1]) for j in range(in_features)] for i in range(out_features)], dtype=t.dtype)


def shift(n: int, f: float) -> torch.Tensor:
    return f_circulant(torch.eye(n, dtype=f64)[1] if n > 1 else torch.full((1,), 1.0, dtype=f64), f)


def random_structure(cls, shape, cfg):
    s = cls(shape[0], shape[1], cfg, dtype=f64)
    with torch.no_grad():
        for p in s.parameters():
            p.normal_()
    return s


# --- definitions ---------------------------------------------------------------------------------
def test_circulant_blocks_follow_the_definition():
    s = random_structure(Circulant, (6, 9), mmm.CirculantConfig(block_size=3))
    w = s.to_dense()
    for i in range(3):
        for j in range(2):
            assert torch.equal(w[3 * i : 3 * i + 3, 3 * j : 3 * j + 3], f_circulant(s.c[i, j].detach(), 1.0))


@pytest.mark.parametrize("shape", [(7, 13), (13, 7), (1, 6), (6, 1), (1, 1), (97, 31)])
def test_toeplitz_non_power_of_two_sizes(shape):
    s = random_structure(Toeplitz, shape, mmm.ToeplitzConfig())
    w = toeplitz_reference(s.t.detach(), shape[1], shape[0])
    assert torch.equal(s.to_dense(), w)
    x = torch.randn(4, shape[0], dtype=f64)
    assert rel_err(s(x), x @ w.T) < 1e-12
    assert s.fft_size >= shape[0] + shape[1] - 1


def test_fast_len_is_the_next_235_smooth_number():
    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 1100):
        m = fast_len(n)
        assert m >= n and smooth(m) and not any(smooth(k) for k in range(n, m)), n


def test_ldr_blocks_follow_the_definition_and_have_low_displacement_rank():
    r, g = 3, 7
    s = random_structure(LDR, (14, 21), mmm.LDRConfig(rank=r))
    w = s.to_dense().detach()
    z1, zm1 = shift(g, 1.0), shift(g, -1.0)
    for i in range(3):
        for j in range(2):
            G, H = s.G[i, j].detach(), s.H[i, j].detach()
            block = w[g * i : g * i + g, g * j : g * j + g]
            ref = sum(f_circulant(G[k], 1.0) @ f_circulant(H[k], -1.0) for k in range(r))
            assert rel_err(block, ref) < 1e-13
            displacement = z1 @ block - block @ zm1
            # The theory's generators: 2 sum_k g_k (J h_k)^T.
            assert rel_err(displacement, 2 * G.T @ H.flip(-1)) < 1e-12
            assert torch.linalg.matrix_rank(displacement) == r


# --- known special cases -------------------------------------------------------------------------
def test_ldr_rank_one_reproduces_a_circulant():
    n = 12
    circ = random_structure(Circulant, (n, n), mmm.CirculantConfig())
    ldr = LDR(n, n, mmm.LDRConfig(rank=1), dtype=f64)
    with torch.no_grad():
        ldr.G.copy_(circ.c.view(1, 1, 1, n))
        ldr.H.zero_()[..., 0] = 1.0  # Z_{-1}(e_0) = I
    x = torch.randn(5, n, dtype=f64)
    assert rel_err(ldr.to_dense(), circ.to_dense()) < 1e-13
    assert rel_err(ldr(x), circ(x)) < 1e-12


def test_ldr_rank_one_reproduces_a_skew_circulant_toeplitz():
    n = 10
    v = torch.randn(n, dtype=f64)
    ldr = LDR(n, n, mmm.LDRConfig(rank=1), dtype=f64)
    with torch.no_grad():
        ldr.G.zero_()[..., 0] = 1.0  # Z_1(e_0) = I
        ldr.H.copy_(v.view(1, 1, 1, n))
    # Z_{-1}(v) is Toeplitz with diagonals v[0..n-1] below and -v[1..n-1] above the main one.
    toe = Toeplitz(n, n, mmm.ToeplitzConfig(), dtype=f64)
    with torch.no_grad():
        toe.t.copy_(torch.cat([-v[1:], v]))
    x = torch.randn(5, n, dtype=f64)
    assert rel_err(ldr.to_dense(), toe.to_dense()) < 1e-13
    assert rel_err(ldr(x), toe(x)) < 1e-12


@pytest.mark.parametrize("n", [9, 16])
def test_ldr_projection_recovers_toeplitz_like_matrices(n):
    toe = random_structure(Toeplitz, (n, n), mmm.ToeplitzConfig()).to_dense().detach()
    toe = toe + n * torch.eye(n, dtype=f64)  # well conditioned, so its inverse is too
    circ = random_structure(Circulant, (n, n), mmm.CirculantConfig()).to_dense().detach()
    cases = [
        (toe, 2),  # Toeplitz: displacement only in the first row and last column
        (torch.linalg.inv(toe), 2),  # inverses keep the displacement rank (Pan)
        (toe + circ, 3),  # circulants add rank 1
        (torch.randn(n, n, dtype=f64), n),  # full displacement rank: every matrix
    ]
    for w, rank in cases:
        layer = mmm.project(w, mmm.LDRConfig(rank=rank))
        assert layer.projection_error < 1e-10, rank


def test_ldr_projection_recovers_blocks():
    w = random_structure(LDR, (8, 12), mmm.LDRConfig(rank=2, block_size=4)).to_dense().detach()
    assert mmm.project(w, mmm.LDRConfig(rank=2, block_size=4)).projection_error < 1e-10


def test_ldr_projection_of_a_generic_matrix_is_a_stationary_point():
    w = torch.randn(12, 12, dtype=f64)
    s = mmm.project(w, mmm.LDRConfig(rank=2)).structure
    loss = (s.to_dense() - w).pow(2).sum() / w.pow(2).sum()
    grads = torch.autograd.grad(loss, list(s.parameters()))
    assert 0.1 < loss.item() < 1  # a real approximation, neither exact nor worse than zero
    assert max(g.abs().max().item() for g in grads) < 1e-6


# --- projections of known matrices ---------------------------------------------------------------
def test_circulant_projection_of_lower_triangular_ones():
    # Wrapped diagonals of the 4x4 lower-triangular ones hold 4, 3, 2, 1 ones: means 1, 3/4, 1/2,
    # 1/4, squared residual 0 + 3/4 + 1 + 3/4 = 5/2 against ||W||^2 = 10.
    w = torch.tril(torch.ones(4, 4, dtype=f64))
    layer = mmm.project(w, mmm.CirculantConfig())
    assert torch.allclose(layer.structure.c.flatten(), torch.tensor([1, 0.75, 0.5, 0.25], dtype=f64))
    assert layer.projection_error == pytest.approx(0.5, abs=1e-14)


def test_toeplitz_projection_of_a_small_matrix():
    w = torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 6.0]], dtype=f64)
    layer = mmm.project(w, mmm.ToeplitzConfig())
    # t[d] for d = i - j + 2: d=0 -> 5, d=1 -> (2+6)/2, d=2 -> (1+4)/2, d=3 -> 3.
    assert torch.equal(layer.structure.t, torch.tensor([5.0, 4.0, 2.5, 3.0], dtype=f64))
    expected = math.sqrt((2 * 2**2 + 2 * 1.5**2) / float(w.pow(2).sum()))
    assert layer.projection_error == pytest.approx(expected, abs=1e-14)


@pytest.mark.parametrize(
    "cls,cfg,shape",
    [(Circulant, mmm.CirculantConfig(block_size=3), (12, 9)), (Circulant, mmm.CirculantConfig(), (10, 10)),
     (Toeplitz, mmm.ToeplitzConfig(), (7, 11))],
)
def test_closed_form_projections_are_orthogonal(cls, cfg, shape):
    """Optimality: the residual is orthogonal to every structured matrix, and projecting twice is once."""
    w = torch.randn(shape[1], shape[0], dtype=f64)
    proj = mmm.project(w, cfg).to_dense().detach()
    for _ in range(3):
        other = random_structure(cls, shape, cfg).to_dense().detach()
        assert abs(float(((w - proj) * other).sum())) < 1e-12 * float(w.norm() * other.norm())
    assert rel_err(mmm.project(proj, cfg).to_dense(), proj) < 1e-14
    assert relative_error(w, proj) < 1  # and it did not do something silly


# --- cost ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,cfg",
    [(Circulant, mmm.CirculantConfig()), (Toeplitz, mmm.ToeplitzConfig()), (LDR, mmm.LDRConfig(rank=4))],
)
def test_flops_grow_like_n_log_n(cls, cfg):
    ratios = []
    for n in [256, 1024, 4096, 16384]:
        s = cls(n, n, cfg, device="meta")
        ratios.append(s.flops(1) / (n * math.log2(n)))
        if n >= 4096:
            assert s.flops(1) < 2 * n * n / 10  # far below the dense 2 n^2
    assert max(ratios) / min(ratios) < 1.3


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(
    "cls,cfg",
    [(Circulant, mmm.CirculantConfig()), (Toeplitz, mmm.ToeplitzConfig()), (LDR, mmm.LDRConfig(rank=2))],
)
def test_4096_forward_and_backward_never_build_a_dense_matrix(cls, cfg):
    n = 4096
    s = cls(n, n, cfg)
    x = torch.randn(3, n, requires_grad=True)
    with _LargestTensor() as seen:
        s(x).square().sum().backward()
    assert seen.largest < n * n // 64
    assert x.grad.shape == x.shape and all(p.grad is not None for p in s.parameters())
    small = cls(256, 256, cfg)
    with _LargestTensor() as seen:  # the check can fail: building the matrix is seen
        small.to_dense()
    assert seen.largest >= 256 * 256


# --- dtypes --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,cfg", [(Circulant, mmm.CirculantConfig()), (Toeplitz, mmm.ToeplitzConfig()), (LDR, mmm.LDRConfig(rank=2))]
)
def test_dtypes(cls, cfg):
    s = cls(16, 16, cfg)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert s(torch.randn(2, 16, dtype=dtype)).dtype == dtype
    s64 = cls(16, 16, cfg, dtype=f64)
    x = torch.randn(2, 16, dtype=f64)
    assert s64(x).dtype == f64 and rel_err(s64(x), x @ s64.to_dense().T) < 1e-13


# --- GPU -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    "cls,cfg,shape",
    [(Circulant, mmm.CirculantConfig(), (768, 768)), (Circulant, mmm.CirculantConfig(block_size=256), (768, 3072)),
     (Toeplitz, mmm.ToeplitzConfig(), (768, 3000)), (LDR, mmm.LDRConfig(rank=4), (768, 768)),
     (LDR, mmm.LDRConfig(rank=2, block_size=256), (1024, 768))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_forward_backward_match_fp64_cpu(cls, cfg, shape, dtype):
    ref = cls(*shape, cfg, dtype=f64)
    s = cls(*shape, cfg, device="cuda", dtype=dtype)
    s.load_state_dict(ref.state_dict())
    x64 = torch.randn(4, 33, shape[0], dtype=f64)
    g64 = torch.randn(4, 33, shape[1], dtype=f64)
    x = x64.to("cuda", dtype).requires_grad_(True)
    y = s(x)
    (y * g64.to("cuda", dtype)).sum().backward()
    w = ref.to_dense().detach()
    x_ref = x64.clone().requires_grad_(True)
    (x_ref @ w.T * g64).sum().backward()
    dense_err = rel_err((x64.to(dtype) @ w.to(dtype).T), x64 @ w.T)  # PyTorch's own error in this dtype
    tol = 1e-5 if dtype == torch.float32 else 4 * dense_err + 1e-3
    assert y.dtype == dtype and rel_err(y.cpu(), x64 @ w.T) <= tol
    assert rel_err(x.grad.cpu(), x_ref.grad) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize(
    "cfg", [mmm.CirculantConfig(block_size=64), mmm.ToeplitzConfig(), mmm.LDRConfig(rank=2, block_size=64)]
)
def test_cuda_projection_recovers(cfg):
    cls = {mmm.CirculantConfig: Circulant, mmm.ToeplitzConfig: Toeplitz, mmm.LDRConfig: LDR}[type(cfg)]
    w = random_structure(cls, (256, 512), cfg).to_dense().detach().cuda()
    layer = mmm.project(w, cfg)
    assert layer.structure.to_dense().device.type == "cuda"
    assert layer.projection_error < 1e-8
