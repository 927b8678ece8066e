"""The cuBLAS paths of block-diagonal and Monarch products (src/mmm/ops/{blockdiag,monarch}/cublas.py), the
dispatch between them and the Triton kernels (blockdiag/dispatch.py), and the fused-backward variants.

CPU: the cuBLAS paths are plain torch.bmm, so they run here in fp64 against the naive references on odd
shapes, 1 and 0 tokens; a TorchDispatchMode records every aten op they issue, to check that they copy
nothing where they claim not to and that every bmm operand has strides cuBLAS takes as they are.
`gpu` tests: bf16 error <= 2x PyTorch's own, opcheck, torch.compile(fullgraph=True), and the profiler.
"""

import json
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import grads, rel_err
from mmm.ops.blockdiag import cublas as bc
from mmm.ops.blockdiag import dispatch
from mmm.ops.blockdiag import kernels as bk
from mmm.ops.blockdiag import naive as bd_naive
from mmm.ops.blockdiag import op as bd_op
from mmm.ops.monarch import cublas as mc
from mmm.ops.monarch import kernels as mo_kernels
from mmm.ops.monarch import naive as mo_naive
from mmm.ops.monarch import op as mo_op


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(bc, "POISON_OUTPUTS", True)
    monkeypatch.setattr(bk, "POISON_OUTPUTS", True)


def monarch_inputs(N, b, p, s, c, dtype=torch.float64, device="cpu"):
    x = torch.randn(N, b * p, dtype=dtype, device=device)
    L = torch.randn(b, b * c, p, dtype=dtype, device=device) / p**0.5
    R = torch.randn(b, s, b * c, dtype=dtype, device=device) / (b * c) ** 0.5
    return x, L, R


def assert_close_to_reference(fn, ref_fn, inputs, g, tol):
    got = grads(fn, inputs, g)
    ref = grads(ref_fn, [t.double() for t in inputs], g.double())
    for name, a, r in zip(["out"] + [f"grad{i}" for i in range(len(inputs))], got, ref):
        assert a.shape == r.shape and a.dtype == inputs[0].dtype, name
        assert torch.isfinite(a).all(), f"{name}: NaN (an unwritten output element)"
        if r.numel():
            assert rel_err(a, r) < tol, f"{name}: rel err {rel_err(a, r):.2e}"


MONARCH_CASES = [  # N, b, p, s, c
    (1, 2, 3, 5, 1),
    (7, 3, 5, 7, 2),
    (9, 1, 4, 6, 3),  # one block
    (6, 4, 2, 3, 5),  # block rank above p and s
    (0, 2, 3, 5, 2),  # no tokens
]


@pytest.mark.parametrize("path", ["cublas", "cublas_copy"])
@pytest.mark.parametrize("N,b,p,s,c", MONARCH_CASES)
def test_monarch_cublas_matches_reference(N, b, p, s, c, path):
    x, L, R = monarch_inputs(N, b, p, s, c)
    g = torch.randn(N, b * s, dtype=torch.float64)
    assert mo_op.choose_path("monarch", x, b * p, b * s, b, c, path) == (path if N else "reference")
    assert_close_to_reference(lambda x, L, R: mo_op.monarch_matmul(x, L, R, c, path=path),
                              lambda x, L, R: mo_naive.monarch_matmul(x, L, R, c), [x, L, R], g, 1e-12)


@pytest.mark.parametrize("shuffle", ["split", "copy"])
@pytest.mark.parametrize("N", [0, 1, 5])
def test_monarch_cublas_op_directly_and_against_dense(N, shuffle):
    """The op itself (also at 0 tokens, which monarch_matmul sends to the reference), and its output
    against the dense matrix of the same Monarch (independent of the bmm/permute reference)."""
    b, p, s, c = 3, 4, 2, 2
    x, L, R = monarch_inputs(N, b, p, s, c)
    dense = torch.einsum("lskt,kltp->lskp", R.view(b, s, b, c), L.view(b, b, c, p)).reshape(b * s, b * p)
    g = torch.randn(N, b * s, dtype=torch.float64)
    got = grads(lambda x, L, R: mc.monarch_cublas_fwd(x, L, R, c, shuffle)[0], [x, L, R], g)
    ref = grads(lambda x, L, R: mo_naive.monarch_matmul(x, L, R, c), [x, L, R], g)
    for a, r in zip(got, ref):
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-12)
    if N:
        assert rel_err(got[0], x @ dense.T) < 1e-12


def test_monarch_cublas_strided_inputs_and_batch_dims():
    b, p, s, c = 4, 3, 5, 2
    _, L, R = monarch_inputs(1, b, p, s, c)
    x = torch.randn(2, 5, 2 * b * p, dtype=torch.float64)[..., ::2]  # feature stride 2: copied once
    g = torch.randn(b * s, 2, 5, dtype=torch.float64).permute(1, 2, 0)  # non-contiguous output gradient
    Lt = L.transpose(1, 2).contiguous().transpose(1, 2)
    for path in ("cublas", "cublas_copy"):
        assert_close_to_reference(lambda x, L, R: mo_op.monarch_matmul(x, L, R, c, path=path),
                                  lambda x, L, R: mo_naive.monarch_matmul(x, L, R, c), [x, Lt, R], g, 1e-12)


@pytest.mark.parametrize("N,b,p,s", [(1, 2, 3, 5), (7, 3, 5, 2), (5, 1, 4, 4), (0, 2, 3, 3)])
def test_blockdiag_cublas_matches_reference(N, b, p, s):
    x = torch.randn(N, b * p, dtype=torch.float64)
    w = torch.randn(b, s, p, dtype=torch.float64)
    g = torch.randn(N, b * s, dtype=torch.float64)
    assert_close_to_reference(lambda x, w: bd_op.blockdiag_matmul(x, w, path="cublas"), bd_naive.blockdiag_matmul,
                              [x, w], g, 1e-12)
    got = grads(bc.blockdiag_cublas_fwd, [x, w], g)  # the op itself, 0 tokens included
    ref = grads(bd_naive.blockdiag_matmul, [x, w], g)
    for a, r in zip(got, ref):
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-12)


def test_blockdiag_cublas_strided_and_batched():
    x = torch.randn(3, 2, 2 * 12, dtype=torch.float64)[..., 1::2]
    w = torch.randn(3, 4, 5, dtype=torch.float64).transpose(1, 2)  # [3, 5, 4] with other strides
    g = torch.randn(3, 2, 15, dtype=torch.float64)
    assert_close_to_reference(lambda x, w: bd_op.blockdiag_matmul(x, w, path="cublas"), bd_naive.blockdiag_matmul,
                              [x, w], g, 1e-12)


# ---------------------------------------------------------------------------------------------------
# no copies
# ---------------------------------------------------------------------------------------------------

VIEWS_AND_ALLOCATIONS = {"view", "transpose", "slice", "select", "new_empty", "empty", "empty_like", "unflatten"}


class AtenLog(TorchDispatchMode):
    """Every aten op issued, and for each bmm the operands cuBLAS would copy (bc.bmm_copies)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.bmm_copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[func.overloadpacket.__name__] += 1
        result = func(*args, **kwargs)
        if func.overloadpacket is torch.ops.aten.bmm:
            self.bmm_copies.append(bc.bmm_copies(args[0], args[1], kwargs.get("out", result)))
        return result

    def other_ops(self):
        return {k: v for k, v in self.ops.items() if k not in VIEWS_AND_ALLOCATIONS}


@pytest.mark.parametrize("shuffle", ["split", "copy"])
def test_monarch_cublas_copies_only_where_it_says(monkeypatch, shuffle):
    monkeypatch.setattr(bc, "POISON_OUTPUTS", False)  # the NaN fill is a test aid, not part of the path
    N, b, p, s, c = 6, 3, 4, 5, 2
    x, L, R = monarch_inputs(N, b, p, s, c, dtype=torch.float32)
    g = torch.randn(N, b * s)
    # the one permute copy per direction: the Triton swap kernel where Triton runs (stood in for here by
    # one aten copy_, as the interpreter's own tensor traffic would show up in the log), else aten's copy_
    swaps = []

    def swap_stand_in(src, dst, b, c):
        swaps.append(1)
        dst.view(src.shape[0], b, b, c).copy_(src.view(src.shape[0], b, b, c).transpose(1, 2))

    monkeypatch.setattr(mo_kernels, "swap_blocks", swap_stand_in)
    by_triton = bd_op.triton_can_run(x)
    copies = {"copy_": 1} if shuffle == "copy" else {}
    with AtenLog() as fwd:
        out, z = mc.forward(x, L, R, c, shuffle)
    assert fwd.other_ops() == {"bmm": b + 1 if shuffle == "split" else 2, **copies}
    with AtenLog() as bwd:
        mc.backward(g, x, z, L, R, c, shuffle)
    assert bwd.other_ops() == {"bmm": b + 3 if shuffle == "split" else 4, **copies}
    assert len(swaps) == (2 if shuffle == "copy" and by_triton else 0)
    assert all(not cp for cp in fwd.bmm_copies + bwd.bmm_copies), fwd.bmm_copies + bwd.bmm_copies


@pytest.mark.parametrize("N,b,c", [(5, 4, 3), (130, 2, 64), (1, 8, 1), (33, 3, 17), (3, 2, 300)])
def test_swap_blocks_kernel_is_the_shuffle(N, b, c):
    if not bd_op.triton_can_run(torch.empty(1)):
        pytest.skip("needs triton (CPU interpreter or CUDA)")
    src = torch.randn(N, b, b * c)
    dst = torch.full_like(src, float("nan"))
    mo_kernels.swap_blocks(src, dst, b, c)
    want = src.view(N, b, b, c).transpose(1, 2).reshape(N, b, b * c)
    assert torch.equal(dst, want)
    back = torch.full_like(src, float("nan"))
    mo_kernels.swap_blocks(dst, back, b, c)  # its own inverse
    assert torch.equal(back, src)


def test_blockdiag_cublas_makes_no_copies(monkeypatch):
    monkeypatch.setattr(bc, "POISON_OUTPUTS", False)
    x, w, g = torch.randn(5, 12), torch.randn(3, 2, 4), torch.randn(5, 6)
    with AtenLog() as log:
        bc.backward(g, x, w)
        bc.forward(x, w)
    assert log.other_ops() == {"bmm": 3}
    assert all(not cp for cp in log.bmm_copies)


def test_non_contiguous_gradient_is_copied_once(monkeypatch):
    """A stride-0 (expanded) output gradient cannot be a cuBLAS operand: exactly one copy, then none."""
    monkeypatch.setattr(bc, "POISON_OUTPUTS", False)
    x, w = torch.randn(5, 12), torch.randn(3, 2, 4)
    g = torch.randn(1, 6).expand(5, 6)
    with AtenLog() as log:
        bc.backward(g, x, w)
    assert log.other_ops() == {"bmm": 2, "clone": 1}
    assert all(not cp for cp in log.bmm_copies)


def test_bmm_copies_restates_the_cuda_rule():
    x = torch.randn(8, 3 * 4)
    xb = bc.blocks(x, 3)  # [3, 8, 4] strides (4, 12, 1): a strided batch cuBLAS takes
    w = torch.randn(3, 5, 4)
    assert bc.bmm_copies(xb, w.mT, torch.empty(3, 8, 5)) == []
    assert bc.bmm_copies(xb, w.mT, bc.blocks(torch.empty(8, 15), 3)) == []
    # no unit stride in the last two dims: copied
    xs = torch.randn(8, 24)[:, ::2]
    assert bc.bmm_copies(xs.unflatten(1, (3, 4)).transpose(0, 1), w.mT, torch.empty(3, 8, 5)) == ["a"]
    assert bc.bmm_copies(xb, w.mT, torch.empty(3, 16, 10)[:, ::2, ::2]) == ["out"]
    # a leading dimension smaller than the matrix (rows overlap) cannot be passed either
    assert bc.bmm_copies(torch.randn(3, 1, 4).expand(3, 8, 4), w.mT, torch.empty(3, 8, 5)) == ["a"]


# ---------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------

def test_token_bucket():
    assert [dispatch.token_bucket(n) for n in (0, 1, 2, 3, 8192, 8193)] == [1, 1, 2, 4, 8192, 16384]


def test_default_rule():
    assert dispatch.default_path("monarch", 16384, 16384, 128, 1) == "triton"  # blocks of 128
    assert dispatch.default_path("monarch", 16384, 16384, 4, 1024) == "cublas"  # rank >= 512: split
    assert dispatch.default_path("monarch", 16384, 16384, 16, 64) == "cublas_copy"
    assert dispatch.default_path("monarch", 4096, 16384, 8, 64) == "triton"  # in/b = 512
    assert dispatch.default_path("monarch", 32768, 32768, 32, 1) == "triton"  # middle width b*c = 32
    assert dispatch.default_path("blockdiag", 16384, 16384, 16, None) == "cublas"
    assert dispatch.default_path("blockdiag", 4096, 4096, 16, None) == "triton"


def write_table(tmp_path, entries):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"about": "test", "device": "test", "entries": entries}))
    return path


def entry(path, tokens, structure="monarch", d=4096, b=16, c=16, dtype="bfloat16"):
    return dict(structure=structure, in_features=d, out_features=d, nblocks=b, block_rank=c, dtype=dtype,
                tokens=tokens, path=path, ms={})


def test_table_lookup_nearest_bucket_within_reach(tmp_path):
    table = dispatch.load_table(write_table(tmp_path, [entry("cublas_copy", 8192), entry("triton", 512)]))
    args = ("monarch", 4096, 4096, 16, 16, torch.bfloat16)
    look = lambda n: dispatch.measured_path(*args, n, table=table)  # noqa: E731
    assert look(8192) == "cublas_copy" and look(5000) == "cublas_copy" and look(32768) == "cublas_copy"
    assert look(512) == "triton" and look(129) == "triton"
    assert look(2048) == "cublas_copy"  # 4x from both: the larger bucket wins the tie
    assert look(65536) is None and look(64) is None  # beyond BUCKET_REACH: the default rule decides
    assert dispatch.measured_path("monarch", 4096, 4096, 16, 16, torch.float16, 8192, table=table) is None
    assert dispatch.measured_path("monarch", 4096, 4096, 16, 8, torch.bfloat16, 8192, table=table) is None


def test_pick_uses_the_table_then_the_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "TABLE", dispatch.load_table(write_table(tmp_path, [entry("triton", 8192, d=16384, b=4, c=1024)])))
    assert dispatch.pick("monarch", 16384, 16384, 4, 1024, torch.bfloat16, 8192, triton_ok=True) == "triton"
    assert dispatch.pick("monarch", 16384, 16384, 4, 1024, torch.bfloat16, 8192, triton_ok=False) == "cublas"
    assert dispatch.pick("monarch", 16384, 16384, 4, 1024, torch.bfloat16, 2**20, triton_ok=True) == "cublas"  # rule
    assert dispatch.pick("monarch", 16384, 16384, 128, 1, torch.float64, 8192, triton_ok=False) == "cublas_copy"


def test_dispatch_traces_under_compile(tmp_path, monkeypatch):
    """The lookup runs inside torch.compile(fullgraph=True) (plain data, no file access, no graph break)."""
    monkeypatch.setattr(dispatch, "TABLE", dispatch.load_table(write_table(tmp_path, [entry("triton", 8, d=8192, b=4, c=512)])))

    def f(x):
        path = dispatch.pick("monarch", 8192, 8192, 4, 512, x.dtype, x.shape[0], triton_ok=True)
        return x + {"triton": 1.0, "cublas": 2.0, "cublas_copy": 3.0}[path]

    x = torch.zeros(8, dtype=torch.bfloat16)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), x + 1.0)  # measured
    x = torch.zeros(1024, dtype=torch.bfloat16)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), x + 2.0)  # rule: rank 512 splits


def test_table_entries_are_validated(tmp_path):
    with pytest.raises(ValueError, match="path 'cublas_copy'"):
        dispatch.load_table(write_table(tmp_path, [entry("cublas_copy", 8192, structure="blockdiag", c=None)]))


def test_packaged_table_loads():
    table = dispatch.load_table(dispatch.TABLE_FILE)
    assert table == dispatch.TABLE
    for (structure, *_), buckets in table.items():
        assert set(buckets.values()) <= set(dispatch.PATHS[structure])


def test_choose_path_on_cpu():
    x = torch.randn(5, 8)
    assert bd_op.choose_path("blockdiag", x, 8, 8, 2) == ("triton" if bd_op.use_kernel(x) else "reference")
    assert bd_op.choose_path("blockdiag", x.double(), 8, 8, 2) == "reference"
    assert bd_op.choose_path("blockdiag", x[:0], 8, 8, 2, path="cublas") == "reference"
    assert bd_op.choose_path("monarch", x.double(), 8, 8, 2, 1, path="cublas_copy") == "cublas_copy"
    with pytest.raises(ValueError, match="path must be None"):
        bd_op.choose_path("blockdiag", x, 8, 8, 2, path="cublas_copy")
    with pytest.raises(ValueError, match="path='triton' needs"):
        bd_op.choose_path("blockdiag", x.double(), 8, 8, 2, path="triton")


# ---------------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------------

def test_opcheck_cublas_ops():
    x, L, R = monarch_inputs(6, 2, 3, 4, 2)
    for t in (x, L, R):
        t.requires_grad_()
    for shuffle in ("split", "copy"):
        torch.library.opcheck(torch.ops.mmm.monarch_cublas_fwd.default, (x, L, R, 2, shuffle))
    out, z = mc.monarch_cublas_fwd(x.detach(), L.detach(), R.detach(), 2, "split")
    torch.library.opcheck(torch.ops.mmm.monarch_cublas_bwd.default,
                          (torch.randn_like(out), x.detach(), z, L.detach(), R.detach(), 2, "split"))
    w = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.mmm.blockdiag_cublas_fwd.default, (x, w))
    torch.library.opcheck(torch.ops.mmm.blockdiag_cublas_bwd.default,
                          (torch.randn(6, 10, dtype=torch.float64), x.detach(), w.detach()))


def test_compile_fullgraph_traces_the_cublas_ops():
    x, L, R = monarch_inputs(7, 2, 4, 4, 2)
    w = torch.randn(2, 3, 4, dtype=torch.float64)

    def f(x, L, R, w):
        return bd_op.blockdiag_matmul(mo_op.monarch_matmul(x, L, R, 2, path="cublas"), w, path="cublas")

    g = torch.randn(7, 6, dtype=torch.float64)
    eager = grads(f, [x, L, R, w], g)
    compiled = grads(torch.compile(f, fullgraph=True, backend="aot_eager"), [x, L, R, w], g)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-12


# ---------------------------------------------------------------------------------------------------
# fused backward variants (Triton, interpreter on CPU)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not bd_op.HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("N,b,p,s,c", [(33, 4, 8, 8, 1), (17, 2, 32, 16, 8), (9, 3, 5, 7, 2)])
def test_fused_backward_variants_match_reference(N, b, p, s, c, variant, monkeypatch):
    monkeypatch.setattr(bk, "FUSED_BACKWARD_VARIANT", variant)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, L, R = monarch_inputs(N, b, p, s, c, dtype=torch.float32, device=device)
    g = torch.randn(N, b * s, device=device)
    assert_close_to_reference(lambda x, L, R: mo_op.monarch_matmul(x, L, R, c, path="triton"),
                              lambda x, L, R: mo_naive.monarch_matmul(x, L, R, c), [x, L, R], g, 1e-5)
    w = torch.randn(b, s, p, device=device)
    assert_close_to_reference(lambda x, w: bd_op.blockdiag_matmul(x, w, path="triton"), bd_naive.blockdiag_matmul,
                              [x, w], g, 1e-5)


def test_unknown_fused_variant_is_a_clear_error(monkeypatch):
    if not bd_op.HAVE_TRITON or not bd_op.use_kernel(torch.randn(2, 4)):
        pytest.skip("needs the Triton kernels (interpreter or GPU)")
    monkeypatch.setattr(bk, "FUSED_BACKWARD_VARIANT", "v9")
    x = torch.randn(3, 4, requires_grad=True)
    y = bd_op.blockdiag_matmul(x, torch.randn(2, 2, 2), path="triton")
    with pytest.raises(ValueError, match="FUSED_BACKWARD_VARIANT must be"):
        y.sum().backward()


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------

def _errors(fn, ref_fn, inputs, g):
    ref = grads(ref_fn, [t.double() for t in inputs], g.double())
    return [(rel_err(a, r), rel_err(t, r)) for a, t, r in zip(grads(fn, inputs, g), grads(ref_fn, inputs, g), ref)]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["cublas", "cublas_copy"])
@pytest.mark.parametrize("N,b,p,s,c", [(1000, 4, 256, 256, 64), (999, 8, 128, 64, 16), (1, 4, 1024, 512, 256)])
def test_gpu_monarch_cublas_bf16_error_at_most_twice_torch(N, b, p, s, c, path):
    x, L, R = monarch_inputs(N, b, p, s, c, dtype=torch.bfloat16, device="cuda")
    g = torch.randn(N, b * s, device="cuda", dtype=torch.bfloat16)
    errs = _errors(lambda x, L, R: mo_op.monarch_matmul(x, L, R, c, path=path),
                   lambda x, L, R: mo_naive.monarch_matmul(x, L, R, c), [x, L, R], g)
    for name, (ours, theirs) in zip(["out", "dx", "dL", "dR"], errs):
        assert ours <= 2 * theirs + 1e-6, f"{name}: {ours:.2e} vs torch {theirs:.2e}"


@pytest.mark.gpu
def test_gpu_blockdiag_cublas_bf16_error_at_most_twice_torch():
    x = torch.randn(1000, 4 * 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16) / 16
    g = torch.randn(1000, 4 * 128, device="cuda", dtype=torch.bfloat16)
    for name, (ours, theirs) in zip(["out", "dx", "dw"], _errors(lambda x, w: bd_op.blockdiag_matmul(x, w, path="cublas"),
                                                                 bd_naive.blockdiag_matmul, [x, w], g)):
        assert ours <= 2 * theirs + 1e-6, f"{name}: {ours:.2e} vs torch {theirs:.2e}"


@pytest.mark.gpu
def test_gpu_cublas_path_launches_no_copy_kernels():
    """On the GPU the strided views reach cuBLAS as they are: no aten copy inside bmm either."""
    x, L, R = monarch_inputs(512, 4, 1024, 1024, 256, dtype=torch.bfloat16, device="cuda")
    inputs = [t.requires_grad_() for t in (x, L, R)]
    g = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    torch.autograd.grad(mo_op.monarch_matmul(*inputs, 256, path="cublas"), inputs, g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(mo_op.monarch_matmul(*inputs, 256, path="cublas"), inputs, g)
    names = [e.name for e in prof.events()]
    assert names.count("aten::bmm") == 2 * 4 + 4  # stage 1 (b calls), stage 2; dR, dy (b calls), dx, dL
    assert not [n for n in names if n in ("aten::copy_", "aten::clone", "aten::contiguous")]


@pytest.mark.gpu
def test_gpu_compile_fullgraph_with_dispatch():
    """Default dispatch (cuBLAS for 1024-wide blocks, Triton for small ones) inside one compiled graph."""
    x, L, R = monarch_inputs(300, 4, 1024, 1024, 256, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(64, 64, 64, device="cuda", dtype=torch.bfloat16)

    def f(x, L, R, w):
        return bd_op.blockdiag_matmul(mo_op.monarch_matmul(x, L, R, 256), w)

    g = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    eager = grads(f, [x, L, R, w], g)
    compiled = grads(torch.compile(f, fullgraph=True), [x, L, R, w], g)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-2
