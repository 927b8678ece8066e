"""The ways `best_rank_factors` finds a best rank-r approximation ("exact", "iterative", "mixed") reach the
same optimum; "mixed" (fp32 eigh refined in fp64, the GPU route for large Gram matrices) is checked against
"exact" and against the singular values on the spectra that stress it: decaying, flat (Gaussian: singular
values clustered at the cut), rank-deficient, zero, and beyond what fp32 resolves."""

import pytest
import torch

import mmm
from mmm.structures import _lowrank_math
from mmm.structures._lowrank_math import _auto_method, best_rank_factors

from conftest import rel_err


def with_singular_values(s: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Random matrices [..., m, n] with the given singular values s[..., min(m, n)] and random vectors."""
    u = torch.linalg.qr(torch.randn(*s.shape[:-1], m, m, dtype=torch.float64, device=s.device))[0]
    v = torch.linalg.qr(torch.randn(*s.shape[:-1], n, n, dtype=torch.float64, device=s.device))[0]
    k = s.shape[-1]
    return (u[..., :k] * s[..., None, :]) @ v[..., :k].mT


def decaying(*shape, power=1.0, device=None):
    *batch, m, n = shape
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64, device=device) ** -power
    return with_singular_values(s.expand(*batch, -1), m, n)


def captured(a, left, right):
    """Energy ||left @ right||_F^2 of the approximation."""
    return (left @ right).pow(2).sum((-2, -1))


def optimum(a, rank):
    """The most energy any rank-`rank` matrix captures: the top singular values squared (Eckart-Young)."""
    return torch.linalg.svdvals(a)[..., :rank].pow(2).sum(-1)


def assert_optimal(a, rank, left, right, tol=1e-10):
    total = a.pow(2).sum((-2, -1))
    # Energy captured equals the optimum, and the approximation is the orthogonal projection A V V^T
    # (so the error is total - captured): both follow from Eckart-Young for an optimal answer.
    assert ((captured(a, left, right) - optimum(a, rank)).abs() <= tol * total).all()
    err = (a - left @ right).pow(2).sum((-2, -1))
    assert ((err - (total - optimum(a, rank))).abs() <= tol * total).all()


CASES = {
    "decaying, batched": (lambda: decaying(6, 96, 64), 8),
    "decaying, tall, 4-D batch": (lambda: decaying(2, 3, 120, 40), 5),
    "decaying, wide": (lambda: decaying(1, 48, 160), 12),
    "decaying, 768x512 (fp32 alone is 2e-9 off)": (lambda: decaying(1, 768, 512), 96),
    "gaussian, batched (flat at the cut)": (lambda: torch.randn(8, 128, 128, dtype=torch.float64), 16),
    "gaussian, wide, large rank": (lambda: torch.randn(3, 100, 200, dtype=torch.float64), 60),
    "gaussian, rank above min(m, n)": (lambda: torch.randn(4, 9, 5, dtype=torch.float64), 7),
    "rank 3, asked for 10": (lambda: torch.randn(5, 80, 3, dtype=torch.float64) @ torch.randn(5, 3, 70, dtype=torch.float64), 10),
    "zero": (lambda: torch.zeros(3, 50, 40, dtype=torch.float64), 6),
    "orthogonal (all singular values equal)": (lambda: torch.linalg.qr(torch.randn(2, 96, 96, dtype=torch.float64))[0], 12),
}


@pytest.fixture
def redone(monkeypatch):
    """The batch shapes of the matrices "mixed" hands over to the exact eigh."""
    shapes = []
    exact = _lowrank_math._top_right_vectors_exact
    monkeypatch.setattr(_lowrank_math, "_top_right_vectors_exact", lambda g, keep: shapes.append(g.shape[:-2]) or exact(g, keep))
    return shapes


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_matches_exact(case, redone):
    make, rank = CASES[case]
    a = make()
    mixed = best_rank_factors(a, rank, "mixed")
    assert not redone  # the fp64 refinement alone reached the optimum
    exact = best_rank_factors(a, rank, "exact")
    total = a.pow(2).sum((-2, -1))
    assert mixed[0].shape == exact[0].shape == (*a.shape[:-1], rank)
    assert mixed[1].shape == exact[1].shape == (*a.shape[:-2], rank, a.shape[-1])
    assert ((captured(a, *mixed) - captured(a, *exact)).abs() <= 1e-10 * total).all()
    assert_optimal(a, rank, *mixed)
    keep = min(rank, *a.shape[-2:])
    assert not mixed[0][..., keep:].any() and not mixed[1][..., keep:, :].any()  # rank beyond min(m, n): zeros


@pytest.mark.parametrize("shape,rank", [((4, 96, 64), 8), ((70, 150), 10)])
def test_mixed_factors_are_the_truncated_svd(shape, rank):
    """Where singular values are distinct (here 1/i), the factors are U_r sqrt(S_r) and sqrt(S_r) V_r^T
    themselves, up to the sign of each pair."""
    a = decaying(*shape) if len(shape) == 3 else decaying(1, *shape)[0]
    left, right = best_rank_factors(a, rank, "mixed")
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    root = s[..., :rank].sqrt()
    sign = torch.sign((left * u[..., :rank]).sum(-2))  # [..., rank]
    assert rel_err(left, u[..., :rank] * root[..., None, :] * sign[..., None, :]) < 1e-9
    assert rel_err(right, root[..., :, None] * vh[..., :rank, :] * sign[..., :, None]) < 1e-9
    assert rel_err(left @ right, (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]) < 1e-10


def test_mixed_redoes_what_fp32_cannot_resolve(redone):
    """Singular values 1/i^2 down to 1/40^2: the kept eigenvalues of A^T A span 1/40^4 ~ 4e-7 of the
    largest, below fp32's resolution, so the refinement cannot fix the subspace; those matrices (and only
    those) are redone exactly, and the answer stays optimal."""
    hard = decaying(2, 128, 128, power=2.0)
    easy = torch.randn(3, 128, 128, dtype=torch.float64)
    a = torch.cat([easy[:1], hard[:1], easy[1:], hard[1:]])  # hard ones at 1 and 4
    left, right = best_rank_factors(a, 40, "mixed")
    assert redone == [(2,)]
    assert_optimal(a, 40, left, right, tol=1e-12)
    left, right = best_rank_factors(hard[0], 40, "mixed")  # one matrix, no batch dimension
    assert redone == [(2,), (1,)]
    assert_optimal(hard[0], 40, left, right, tol=1e-12)


def test_iterative_matches_mixed_on_a_decaying_spectrum():
    a = decaying(3, 200, 160)
    for method in ("iterative", "mixed", "exact"):
        assert_optimal(a, 6, *best_rank_factors(a, 6, method), tol=1e-12)


def test_auto_rule():
    # The 16384 x 16384 layer of the GPU test: Monarch b=4 (16 Gram matrices of 4096, keep 1024) and b=16
    # (256 of 1024, keep 64) take "mixed" on a GPU; classic Monarch b=128 (keep 1) and Kronecker (one
    # 16384 Gram, keep 8) iterate; low rank d/8 (one 16384 Gram, keep 2048) is "mixed".
    assert _auto_method(16, 4096, 1024, on_cuda=True) == "mixed"
    assert _auto_method(256, 1024, 64, on_cuda=True) == "mixed"
    assert _auto_method(16384, 128, 1, on_cuda=True) == "iterative"
    assert _auto_method(1, 16384, 8, on_cuda=True) == "iterative"
    assert _auto_method(1, 16384, 2048, on_cuda=True) == "mixed"
    # Small Gram matrices, or keeping nearly all of n: "exact" (fp32 would save little).
    assert _auto_method(4, 256, 64, on_cuda=True) == "exact"
    assert _auto_method(4, 1024, 900, on_cuda=True) == "exact"
    # CPU: "mixed" only from n = 2048, where it measured faster; below, the same as before.
    assert _auto_method(1, 2048, 256, on_cuda=False) == "mixed"
    assert _auto_method(16, 1024, 64, on_cuda=False) == "exact"
    with pytest.raises(ValueError, match="method must be one of 'auto', 'exact', 'iterative', 'mixed'"):
        best_rank_factors(torch.randn(4, 3), 1, "svd")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lowrank_projection_is_the_truncated_svd(dtype):
    """Low rank goes through best_rank_factors: optimal to fp64 precision even for an fp32 weight."""
    w = decaying(1, 90, 150)[0] + 1e-3 * torch.randn(90, 150, dtype=torch.float64)
    layer = mmm.project(w.to(dtype), mmm.LowRankConfig(rank=12))
    assert layer.structure.U.dtype == dtype
    w = w.to(dtype).double()  # the weight that was projected
    best = float(torch.linalg.svdvals(w)[12:].pow(2).sum().sqrt() / w.norm())
    u, v = layer.structure.U.detach().double(), layer.structure.V.detach().double()
    got = float((w - u @ v).norm() / w.norm())
    assert abs(got - best) < (1e-12 if dtype == torch.float64 else 1e-6)
    # Singular values split evenly between U's columns and V's rows.
    assert torch.allclose(u.norm(dim=0), v.norm(dim=1), rtol=1e-5 if dtype == torch.float32 else 1e-10)


# --- GPU (run with: python -m pytest tests/test_projection_methods.py -m gpu -s) --------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch,n,rank",
    [(64, 1024, 64), (4, 4096, 1024), (1, 8192, 1024)],  # Monarch b=16 and b=4 blocks of a 16384 layer; low rank n/8
)
def test_cuda_mixed_matches_exact(batch, n, rank):
    """cuSOLVER's fp32 eigh, refined: the same optimum as the fp64 eigh on Gaussian (flat) and 1/i
    (decaying) blocks. Prints both times (no timing assertion; `auto` picks "mixed" for these shapes)."""
    import time

    torch.manual_seed(0)
    a = torch.randn(batch, n, n, device="cuda", dtype=torch.float64)
    a[: batch // 2] = decaying(batch // 2, n, n, device="cuda")
    assert _auto_method(batch, n, rank, on_cuda=True) == "mixed"
    total = a.pow(2).sum((-2, -1))
    energies = {}
    for method in ("mixed", "exact"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        left, right = best_rank_factors(a, rank, method)
        torch.cuda.synchronize()
        print(f"\n{batch} x {n}x{n}, rank {rank}: {method} {time.perf_counter() - start:.2f} s")
        energies[method] = captured(a, left, right)
    assert ((energies["mixed"] - energies["exact"]).abs() <= 1e-10 * total).all()
