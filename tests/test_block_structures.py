"""Facts specific to the block-diagonal, Monarch and Kronecker structures (the properties every structure
shares are in test_structures.py): layouts, the optimality of their projections, FLOP counts."""

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mmm
from mmm.structures._lowrank_math import _iteration_pays, best_rank_factors

from conftest import rel_err


def structure(cfg, in_features, out_features, dtype=torch.float64, device=None):
    return mmm.StructuredLinear(in_features, out_features, cfg, bias=False, dtype=dtype, device=device).structure


def counted_flops(module, x):
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


# --- block-diagonal ---------------------------------------------------------------------------------


def test_blockdiag_layout():
    s = structure(mmm.BlockDiagConfig(nblocks=3), 6, 9)  # blocks of [3, 2]
    assert s.weight.shape == (3, 3, 2)
    x = torch.randn(5, 6, dtype=torch.float64)
    y = s(x)
    dense = s.to_dense()
    for k in range(3):
        assert rel_err(y[:, 3 * k : 3 * k + 3], x[:, 2 * k : 2 * k + 2] @ s.weight[k].T) < 1e-14
        for j in range(3):
            block = dense[3 * k : 3 * k + 3, 2 * j : 2 * j + 2]
            assert torch.equal(block, s.weight[k]) if j == k else not block.any()


def test_blockdiag_projection_keeps_diagonal_blocks():
    w = torch.randn(8, 12, dtype=torch.float64)
    layer = mmm.project(w, mmm.BlockDiagConfig(nblocks=4))
    mask = torch.block_diag(*[torch.ones(2, 3, dtype=torch.bool)] * 4)
    assert torch.equal(layer.to_dense(), torch.where(mask, w, 0.0))
    assert abs(layer.projection_error - float(w[~mask].norm() / w.norm())) < 1e-14


# --- Monarch ----------------------------------------------------------------------------------------


def test_monarch_block_rank_1_is_classic_square_monarch():
    """With c = 1 and b*b = n: M = blockdiag(R) @ P @ blockdiag(L), P the perfect shuffle (transpose of a
    b x b grid), every (l, k) block rank 1 and 2 * n * sqrt(n) parameters (Dao et al., 2022)."""
    n, b = 16, 4
    s = structure(mmm.MonarchConfig(nblocks=b, block_rank=1), n, n)
    assert structure(mmm.MonarchConfig(nblocks=b), n, n).block_rank == 1  # also the default here
    assert s.L.shape == s.R.shape == (b, b, b) and s.num_params == 2 * n * b
    shuffle = torch.zeros(n, n, dtype=torch.float64)
    for l in range(b):
        for k in range(b):
            shuffle[l * b + k, k * b + l] = 1.0
    classic = torch.block_diag(*s.R) @ shuffle @ torch.block_diag(*s.L)
    assert rel_err(s.to_dense(), classic) < 1e-14
    x = torch.randn(3, n, dtype=torch.float64)
    assert rel_err(s(x), x @ classic.T) < 1e-14
    blocks = classic.view(b, b, b, b).permute(0, 2, 1, 3)
    assert (torch.linalg.matrix_rank(blocks) == 1).all()


def test_monarch_dense_block_formula():
    b, c, p, s_ = 3, 2, 4, 5
    s = structure(mmm.MonarchConfig(nblocks=b, block_rank=c), b * p, b * s_)
    dense = s.to_dense()
    for l in range(b):
        for k in range(b):
            expected = s.R[l][:, k * c : (k + 1) * c] @ s.L[k][l * c : (l + 1) * c, :]
            assert rel_err(dense[l * s_ : (l + 1) * s_, k * p : (k + 1) * p], expected) < 1e-14


@pytest.mark.parametrize(
    "in_features,out_features,b,c",
    [(16, 24, 4, 2), (30, 12, 3, 1), (16, 16, 2, 3), (8, 6, 2, 5)],  # the last: c > block size, exact
)
def test_monarch_projection_error_is_discarded_singular_values(in_features, out_features, b, c):
    w = torch.randn(out_features, in_features, dtype=torch.float64)
    layer = mmm.project(w, mmm.MonarchConfig(nblocks=b, block_rank=c))
    blocks = w.view(b, out_features // b, b, in_features // b).permute(0, 2, 1, 3)
    sv = torch.linalg.svdvals(blocks)
    assert abs(layer.projection_error - float(sv[..., c:].pow(2).sum().sqrt() / w.norm())) < 1e-12
    # The singular values are split evenly: R's column and L's row for chunk (l, k, t) both have
    # norm sqrt(sigma_t) of block (l, k).
    s = layer.structure
    r_norms = s.R.view(b, -1, b, c).norm(dim=1)  # [l, k, t]
    l_norms = s.L.view(b, b, c, -1).norm(dim=-1).transpose(0, 1)  # [l, k, t]
    kept = torch.cat([sv, sv.new_zeros(b, b, max(0, c - sv.shape[-1]))], dim=-1)[..., :c]
    assert torch.allclose(r_norms, kept.sqrt(), atol=1e-10) and torch.allclose(l_norms, kept.sqrt(), atol=1e-10)


def test_monarch_default_is_two_over_b_of_dense():
    for n, b in [(64, 4), (256, 8)]:
        s = structure(mmm.MonarchConfig(nblocks=b), n, n)
        assert s.flops(10) * b == 2 * (2 * 10 * n * n)


# --- Kronecker --------------------------------------------------------------------------------------


def test_kronecker_factor_auto_choice():
    s = structure(mmm.KroneckerConfig(), 12, 20)
    assert s.in_factors == (3, 4) and s.out_factors == (4, 5)
    assert s.A.shape == (1, 4, 3) and s.B.shape == (1, 5, 4)
    assert structure(mmm.KroneckerConfig(terms=2), 64, 64).in_factors == (8, 8)
    assert structure(mmm.KroneckerConfig(), 13, 16).in_factors == (1, 13)  # a prime has only the trivial pair
    s = structure(mmm.KroneckerConfig(in_factors=(2, 6), out_factors=(10, 2)), 12, 20)
    assert s.A.shape == (1, 10, 2) and s.B.shape == (1, 2, 6)


@pytest.mark.parametrize("in_factors,out_factors,b_first", [((2, 8), (8, 2), True), ((8, 2), (2, 8), False)])
def test_kronecker_both_contraction_orders(in_factors, out_factors, b_first):
    s = structure(mmm.KroneckerConfig(terms=3, in_factors=in_factors, out_factors=out_factors), 16, 16)
    assert s._b_first() == b_first
    dense = sum(torch.kron(s.A[j], s.B[j]) for j in range(3))
    assert rel_err(s.to_dense(), dense) < 1e-14
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    xm = x.view(2, 5, *in_factors)
    ref = sum(s.A[j] @ xm @ s.B[j].T for j in range(3)).reshape(2, 5, 16)
    assert rel_err(s(x), ref) < 1e-14
    (i1, i2), (o1, o2) = in_factors, out_factors
    orders = [2 * 10 * 3 * i1 * o2 * (i2 + o1), 2 * 10 * 3 * o1 * i2 * (i1 + o2)]
    assert s.flops(10) == min(orders) < max(orders)


def test_kronecker_projection_is_rearranged_svd():
    (o1, i1), (o2, i2), r = (4, 3), (5, 4), 2
    w = torch.randn(o1 * o2, i1 * i2, dtype=torch.float64)
    layer = mmm.project(w, mmm.KroneckerConfig(terms=r, in_factors=(i1, i2), out_factors=(o1, o2)))
    rearranged = torch.stack([w[a * o2 : (a + 1) * o2, c * i2 : (c + 1) * i2].flatten() for a in range(o1) for c in range(i1)])
    sv = torch.linalg.svdvals(rearranged)
    assert abs(layer.projection_error - float(sv[r:].pow(2).sum().sqrt() / w.norm())) < 1e-12


# --- shared -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,in_features,out_features",
    [
        (mmm.BlockDiagConfig(nblocks=4), 16, 32),
        (mmm.MonarchConfig(nblocks=4), 32, 48),
        (mmm.MonarchConfig(nblocks=2, block_rank=3), 10, 6),
        (mmm.KroneckerConfig(terms=3, in_factors=(2, 8), out_factors=(8, 2)), 16, 16),
        (mmm.KroneckerConfig(terms=2, in_factors=(8, 2), out_factors=(2, 8)), 16, 16),
    ],
)
def test_flops_match_a_count(cfg, in_features, out_features):
    s = structure(cfg, in_features, out_features)
    assert counted_flops(s, torch.randn(7, 3, in_features, dtype=torch.float64)) == s.flops(21)


@pytest.mark.parametrize(
    "cfg,in_features,out_features,match",
    [
        (mmm.MonarchConfig(nblocks=3), 16, 16, "values that work: 1, 2, 4, 8, 16"),
        (mmm.BlockDiagConfig(nblocks=5), 12, 12, r"nblocks=5.*in_features=12.*values that work: 1, 2, 3, 4, 6, 12"),
        (mmm.KroneckerConfig(terms=5), 4, 4, "at most|more than"),
    ],
)
def test_shape_errors_list_what_works(cfg, in_features, out_features, match):
    with pytest.raises(ValueError, match=match):
        mmm.StructuredLinear(in_features, out_features, cfg)


@pytest.mark.parametrize(
    "cfg",
    [mmm.MonarchConfig(nblocks=4), mmm.MonarchConfig(nblocks=16), mmm.MonarchConfig(nblocks=32), mmm.KroneckerConfig(terms=4)],
    ids=lambda c: c.describe(),
)
def test_projection_of_512_matrix(cfg):
    """Big enough that a per-block python loop or a dense SVD of the wrong matrix would show in the
    test time (no timing assertion: speed belongs to `mmm bench`); the result is still optimal."""
    w = torch.randn(512, 512, dtype=torch.float64)
    layer = mmm.project(w, cfg)
    if isinstance(cfg, mmm.MonarchConfig):
        b, c = cfg.nblocks, layer.structure.block_rank
        sv = torch.linalg.svdvals(w.view(b, 512 // b, b, 512 // b).permute(0, 2, 1, 3))[..., c:]
    else:
        (i1, i2), (o1, o2) = layer.structure.in_factors, layer.structure.out_factors
        sv = torch.linalg.svdvals(w.view(o1, o2, i1, i2).permute(0, 2, 1, 3).reshape(o1 * i1, o2 * i2))[cfg.terms :]
    assert abs(layer.projection_error - float(sv.pow(2).sum().sqrt() / w.norm())) < 1e-10


def decaying_matrices(*shape):
    """Random matrices whose singular values fall off like 1/i (closer to trained weights than noise)."""
    *batch, m, n = shape
    u = torch.linalg.qr(torch.randn(*batch, m, m, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(*batch, n, n, dtype=torch.float64))[0]
    k = min(m, n)
    return (u[..., :k] / torch.arange(1, k + 1, dtype=torch.float64)) @ v[..., :k].mT


@pytest.mark.parametrize("shape,rank", [((6, 40, 24), 3), ((2, 3, 24, 40), 1), ((60, 50), 12)])
def test_best_rank_factors_iterative_matches_exact(shape, rank):
    a = decaying_matrices(*shape) + 1e-3 * torch.randn(*shape, dtype=torch.float64)
    best = torch.linalg.svdvals(a)[..., rank:].pow(2).sum()
    for method in ("exact", "iterative"):
        left, right = best_rank_factors(a, rank, method)
        assert left.shape == (*shape[:-1], rank) and right.shape == (*shape[:-2], rank, shape[-1])
        err = (a - left @ right).pow(2).sum()
        assert float(err - best) <= 1e-12 * float(a.pow(2).sum()), method


@pytest.mark.parametrize("method", ["exact", "iterative"])
def test_best_rank_factors_rank_deficient_and_oversized(method):
    a = torch.randn(5, 30, 2, dtype=torch.float64) @ torch.randn(5, 2, 20, dtype=torch.float64)  # rank 2
    left, right = best_rank_factors(a, 3, method)
    assert rel_err(left @ right, a) < 1e-12
    assert left[..., 2].abs().max() < 1e-6 and right[..., 2, :].abs().max() < 1e-6
    left, right = best_rank_factors(a[..., :4], 6, method)  # rank above min(m, n) = 4: zero padding
    assert rel_err(left @ right, a[..., :4]) < 1e-12 and not left[..., 4:].any() and not right[..., 4:, :].any()
    with pytest.raises(ValueError, match="method"):
        best_rank_factors(a, 1, "svd")


def test_auto_method_rule():
    assert _iteration_pays(batch=16384, n=128, width=9, on_cuda=True)  # classic Monarch of a 16384 layer
    assert not _iteration_pays(batch=16384, n=128, width=9, on_cuda=False)
    assert not _iteration_pays(batch=16, n=4096, width=2048, on_cuda=True)  # nblocks=4: large rank, exact
    assert not _iteration_pays(batch=1024, n=32, width=9, on_cuda=True)  # torch's eigh is batched here
    assert _iteration_pays(batch=1, n=16384, width=9, on_cuda=False)  # Kronecker of a 16384 layer
    assert not _iteration_pays(batch=1, n=512, width=9, on_cuda=True)


# --- GPU (run with: python -m pytest tests/test_block_structures.py -m gpu -s) --------------------------

CUDA_CASES = [
    (mmm.BlockDiagConfig(nblocks=4), 256, 512),
    (mmm.MonarchConfig(nblocks=16), 1024, 1024),
    (mmm.MonarchConfig(nblocks=8, block_rank=3), 512, 256),
    (mmm.KroneckerConfig(terms=3), 1024, 768),
]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg,in_features,out_features", CUDA_CASES, ids=lambda v: getattr(v, "describe", lambda: str(v))())
def test_cuda_forward_backward_and_projection_match_cpu(cfg, in_features, out_features):
    ref = structure(cfg, in_features, out_features)
    x = torch.randn(4, 33, in_features, dtype=torch.float64)
    y_ref = ref(x)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        s = structure(cfg, in_features, out_features, dtype=dtype, device="cuda")
        s.load_state_dict(ref.state_dict())
        xc = x.to("cuda", dtype).requires_grad_()
        y = s(xc)
        torch_err = rel_err(xc.detach() @ ref.to_dense().to("cuda", dtype).T, y_ref.cuda())
        assert rel_err(y, y_ref.cuda()) <= (1e-12 if dtype == torch.float64 else 4 * torch_err + 1e-5)
        y.float().pow(2).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in s.parameters()) and torch.isfinite(xc.grad).all()
    # CUDA takes the iterative route where CPU takes the exact one; both must reach the optimum.
    w = torch.randn(out_features, in_features, dtype=torch.float64)
    assert abs(mmm.project(w.cuda(), cfg).projection_error - mmm.project(w, cfg).projection_error) < 1e-10


@pytest.mark.gpu
@pytest.mark.parametrize(
    "cfg",
    [mmm.MonarchConfig(nblocks=4), mmm.MonarchConfig(nblocks=16), mmm.MonarchConfig(nblocks=128),
     mmm.KroneckerConfig(terms=1), mmm.KroneckerConfig(terms=8), mmm.LowRankConfig(rank=2048)],
    ids=lambda c: c.describe(),
)
def test_cuda_projection_16384(cfg):
    """Projects a 16384 x 16384 fp32 weight with singular values like a trained layer's; prints the time
    (no timing assertion) and checks optimality on a sample of Monarch blocks."""
    n = 16384
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, n, device="cuda", generator=g) / n**0.5
    w = w + (torch.randn(n, 64, device="cuda", generator=g) @ torch.randn(64, n, device="cuda", generator=g)) / n
    torch.cuda.synchronize()
    start = time.perf_counter()
    layer = mmm.project(w, cfg)
    torch.cuda.synchronize()
    print(f"\n{cfg.describe()}: projection of {n}x{n} took {time.perf_counter() - start:.2f} s, "
          f"error {layer.projection_error:.6f}")
    if isinstance(cfg, mmm.MonarchConfig):
        b, c = cfg.nblocks, layer.structure.block_rank
        sample = torch.randperm(b * b, device="cuda", generator=g)[:16]
        blocks = w.double().view(b, n // b, b, n // b).permute(0, 2, 1, 3).reshape(b * b, n // b, n // b)[sample]
        approx = layer.to_dense().double().view(b, n // b, b, n // b).permute(0, 2, 1, 3).reshape(b * b, n // b, n // b)[sample]
        best = torch.linalg.svdvals(blocks)[..., c:].pow(2).sum(-1)
        got = (blocks - approx).pow(2).sum((-2, -1))
        assert ((got - best).abs() <= 1e-5 * blocks.pow(2).sum((-2, -1))).all()
