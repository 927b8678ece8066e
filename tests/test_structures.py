"""Properties every structure must have, checked on several shapes each (square, rectangular and
non-power-of-two where the structure allows)."""

import pytest
import torch

import mmm
from mmm.structures import structure_class

from conftest import rel_err

# (config, [(in_features, out_features), ...])
CASES = [
    (mmm.DenseConfig(), [(8, 8), (12, 20), (20, 7)]),
    (mmm.LowRankConfig(rank=3), [(8, 8), (12, 20), (20, 7)]),
    (mmm.BlockDiagConfig(nblocks=4), [(8, 8), (12, 20), (20, 12)]),
    (mmm.BlockDiagConfig(nblocks=3), [(9, 15)]),
    (mmm.MonarchConfig(nblocks=4), [(16, 16), (16, 32), (32, 12)]),
    (mmm.MonarchConfig(nblocks=3), [(9, 18), (18, 18)]),
    (mmm.MonarchConfig(nblocks=2, block_rank=3), [(8, 6)]),
    (mmm.KroneckerConfig(terms=2), [(12, 20), (16, 16), (18, 6)]),
    (mmm.KroneckerConfig(terms=1, in_factors=(2, 6), out_factors=(4, 5)), [(12, 20)]),
    (mmm.CirculantConfig(), [(16, 16), (12, 18), (10, 10)]),
    (mmm.CirculantConfig(block_size=3), [(12, 18)]),
    (mmm.ToeplitzConfig(), [(16, 16), (12, 20), (20, 7)]),
    (mmm.LDRConfig(rank=2), [(16, 16), (12, 18), (10, 10)]),
]
PARAMS = [pytest.param(cfg, shape, id=f"{cfg.describe()}-{shape[0]}x{shape[1]}") for cfg, shapes in CASES for shape in shapes]


def make(cfg, shape, dtype=torch.float64, bias=True):
    layer = mmm.StructuredLinear(shape[0], shape[1], cfg, bias=bias, dtype=dtype)
    with torch.no_grad():  # parameters away from their init, so nothing special about them
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("cfg,shape", PARAMS)
def test_forward_matches_dense_fp64(cfg, shape):
    layer = make(cfg, shape)
    for lead in [(), (5,), (2, 3)]:
        x = torch.randn(*lead, shape[0], dtype=torch.float64)
        y = layer(x)
        assert y.shape == (*lead, shape[1])
        ref = x @ layer.to_dense().T + layer.bias
        assert rel_err(y, ref) < 1e-12


@pytest.mark.parametrize("cfg,shape", PARAMS)
def test_gradients_match_dense_autograd(cfg, shape):
    layer = make(cfg, shape)
    x = torch.randn(4, 3, shape[0], dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, shape[1], dtype=torch.float64)
    params = [x] + list(layer.parameters())
    got = torch.autograd.grad((layer(x) * g).sum(), params)
    ref = torch.autograd.grad(((x @ layer.to_dense().T + layer.bias) * g).sum(), params)
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], got, ref):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("cfg,shape", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp64(cfg, shape, dtype):
    layer64 = make(cfg, shape)
    layer = make(cfg, shape, dtype=dtype)
    layer.load_state_dict(layer64.state_dict())
    x64 = torch.randn(6, shape[0], dtype=torch.float64)
    y = layer(x64.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    ref = layer64(x64)
    # PyTorch's own error in this dtype for the same product, dense, as the yardstick.
    w = layer64.to_dense()
    torch_err = rel_err(x64.to(dtype) @ w.to(dtype).T + layer64.bias.to(dtype), ref)
    tol = 1e-5 if dtype == torch.float32 else 4 * torch_err + 1e-3
    assert rel_err(y, ref) <= tol


@pytest.mark.parametrize("cfg,shape", PARAMS)
def test_projection_recovers_structured_matrix(cfg, shape):
    w = make(cfg, shape).to_dense().detach()
    layer = mmm.project(w, cfg)
    assert layer.projection_error < 1e-8
    assert rel_err(layer.to_dense(), w) < 1e-8


@pytest.mark.parametrize("cfg,shape", PARAMS)
def test_projection_beats_gradient_descent_from_it(cfg, shape):
    w = torch.randn(shape[1], shape[0], dtype=torch.float64)
    layer = mmm.project(w, cfg)
    err0 = layer.projection_error
    structure = layer.structure
    opt = torch.optim.Adam(structure.parameters(), lr=1e-3)
    for _ in range(100):
        opt.zero_grad()
        loss = (structure.to_dense() - w).pow(2).sum()
        loss.backward()
        opt.step()
    err_gd = rel_err(structure.to_dense(), w)
    assert err0 <= err_gd + 1e-9


@pytest.mark.parametrize("cfg,shape", PARAMS)
def test_counts(cfg, shape):
    layer = mmm.StructuredLinear(shape[0], shape[1], cfg, bias=False)
    s = layer.structure
    assert layer.num_params == sum(p.numel() for p in layer.parameters()) > 0
    assert s.flops(10) > 0 and s.flops(20) == 2 * s.flops(10)
    assert s.bytes_moved(10) > 0


@pytest.mark.parametrize("cfg,shape", PARAMS)
def test_init_scale_like_nn_linear(cfg, shape):
    """A fresh layer's dense weight has about nn.Linear's scale, so swapping one in trains alike."""
    torch.manual_seed(1)
    stds = [mmm.StructuredLinear(shape[0], shape[1], cfg, bias=False).to_dense().std().item() for _ in range(20)]
    ref = (1.0 / (3 * shape[0])) ** 0.5
    mean = sum(stds) / len(stds)
    assert 0.25 * ref < mean < 4 * ref


@pytest.mark.parametrize("cfg,shape", PARAMS[::3])
def test_bad_input(cfg, shape):
    layer = mmm.StructuredLinear(shape[0], shape[1], cfg)
    with pytest.raises(ValueError, match="last dimension"):
        layer(torch.randn(3, shape[0] + 1))
    with pytest.raises(TypeError, match="float"):
        layer(torch.ones(3, shape[0], dtype=torch.int64))
    with pytest.raises(TypeError, match="complex"):
        layer(torch.randn(3, shape[0], dtype=torch.complex64))
    w = torch.randn(shape[1], shape[0])
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mmm.project(w, cfg)
    with pytest.raises(ValueError, match="2-D"):
        mmm.project(torch.randn(3, *shape), cfg)
    # another dtype or device than the parameters': one error for every structure (autocast excepted)
    with pytest.raises(TypeError, match="x is torch.float64 but the layer's parameters are torch.float32"):
        layer(torch.randn(3, shape[0], dtype=torch.float64))
    with pytest.raises(ValueError, match="x is on meta but the layer's parameters are on cpu"):
        layer(torch.randn(3, shape[0], device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(layer(torch.randn(3, shape[0]).bfloat16())).all()


@pytest.mark.parametrize("cfg,shape", PARAMS[::3])
def test_finite_checks_name_the_bad_input_only_when_on(cfg, shape):
    layer = mmm.StructuredLinear(shape[0], shape[1], cfg)
    x = torch.randn(3, shape[0])
    x[1, 0] = float("inf")
    assert not torch.isfinite(layer(x)).all()  # off by default: no pass over x, no host sync
    with mmm.finite_checks():
        with pytest.raises(ValueError, match="x contains 1 NaN/inf"):
            layer(x)
        with mmm.finite_checks(False):  # nested: off inside, back on after
            layer(x)
        with pytest.raises(ValueError, match="x contains"):
            layer(x)
    layer(x)


@pytest.mark.parametrize("cfg,shape", PARAMS[::2])
def test_empty_batch(cfg, shape):
    layer = mmm.StructuredLinear(shape[0], shape[1], cfg)
    assert layer(torch.randn(0, shape[0])).shape == (0, shape[1])


def test_every_config_has_a_structure():
    for cls in [mmm.DenseConfig, mmm.LowRankConfig, mmm.BlockDiagConfig, mmm.MonarchConfig, mmm.KroneckerConfig,
                mmm.CirculantConfig, mmm.ToeplitzConfig, mmm.LDRConfig]:
        assert structure_class(cls()).config_cls is cls


def test_config_round_trip():
    for cfg, _ in CASES:
        assert mmm.config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "cfg,shape,match",
    [
        (mmm.MonarchConfig(nblocks=5), (16, 16), "values that work: 1, 2, 4, 8, 16"),
        (mmm.BlockDiagConfig(nblocks=3), (12, 16), "must divide out_features=16 .and the other dimension.; values that work: 1, 2, 4"),
        (mmm.LowRankConfig(rank=9), (8, 16), "at most"),
        (mmm.KroneckerConfig(in_factors=(3, 5)), (16, 16), "pairs that work"),
        (mmm.CirculantConfig(block_size=5), (12, 18), "values that work: 1, 2, 3, 6"),
    ],
)
def test_shape_errors_say_what_works(cfg, shape, match):
    with pytest.raises(ValueError, match=match):
        mmm.StructuredLinear(shape[0], shape[1], cfg)


def test_from_linear_and_bias():
    lin = torch.nn.Linear(12, 20)
    layer = mmm.StructuredLinear.from_linear(lin, mmm.DenseConfig())
    x = torch.randn(3, 12)
    assert layer.projection_error == 0.0
    assert rel_err(layer(x), lin(x)) < 1e-6
    layer = mmm.StructuredLinear.from_linear(lin, mmm.LowRankConfig(rank=4))
    assert 0 < layer.projection_error < 1
    assert torch.equal(layer.bias, lin.bias)


def test_config_errors():
    with pytest.raises(ValueError, match="nblocks must be a positive int"):
        mmm.MonarchConfig(nblocks=0)
    with pytest.raises(TypeError, match="StructureConfig"):
        mmm.StructuredLinear(4, 4, "monarch")
