"""Eager dispatch of the Triton-backed linear ops (mmm.ops._eager): plain eager calls run the op bodies
through an autograd.Function twin, anything that traces gets the torch.library op. Both must give the
same outputs and gradients (bitwise: the same launches), matching the fp64 reference, in every backward
variant: the weight-gradient buffers shared by Monarch's dR and dL (one buffer for a single token range,
fp32 partial sums for several, concatenated where the stages split differently) and Kronecker's dA and
dB, and gradients accumulated into the views of those buffers. (tests/test_eager_fast_path.py checks
the twins' names and dispatch modes on one shape each.)"""

import pytest
import torch

from conftest import OpNames, autograd_node_names, rel_err
from mmm.ops import _eager
from mmm.ops.blockdiag import kernels as block_kernels
from mmm.ops.blockdiag import naive as block_naive
from mmm.ops.blockdiag import op as blockdiag_op
from mmm.ops.kronecker import kernels as kron_kernels
from mmm.ops.kronecker import naive as kron_naive
from mmm.ops.kronecker import op as kron_op
from mmm.ops.monarch import naive as monarch_naive
from mmm.ops.monarch import op as monarch_op

pytestmark = pytest.mark.skipif(not blockdiag_op.HAVE_TRITON or not (torch.cuda.is_available() or blockdiag_op.INTERPRET),
                                reason="needs triton with CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _monarch(c):
    return (lambda x, L, R: monarch_op.monarch_matmul(x, L, R, c, path="triton"),
            lambda x, L, R: monarch_naive.monarch_matmul(x, L, R, c))


# name: (module whose plain_eager picks the path, twin, (kernel path, reference), shapes of x and the weights,
#        kernel module settings). Under the interpreter the block ops count 2 SMs: the weight-gradient token
#        reduction splits in 2 for one or two blocks once N > 16, not at all for 4 blocks or N <= 16.
CASES = {
    "blockdiag split": (blockdiag_op, "_EagerBlockdiag",
                        (lambda x, w: blockdiag_op.blockdiag_matmul(x, w, path="triton"), block_naive.blockdiag_matmul),
                        ((40, 12), (2, 5, 6)), {}),
    "blockdiag two-launch": (blockdiag_op, "_EagerBlockdiag",
                             (lambda x, w: blockdiag_op.blockdiag_matmul(x, w, path="triton"), block_naive.blockdiag_matmul),
                             ((40, 12), (2, 5, 6)), {"FUSED_BACKWARD_MAX": 0}),
    # shared fp32 partial sums (2 ranges), one sum and one cast for dR and dL
    "monarch split": (monarch_op, "_EagerMonarch", _monarch(2), ((40, 12), (2, 4, 6), (2, 5, 4)), {}),
    # one range: both stages write dR and dL straight into one buffer
    "monarch one range": (monarch_op, "_EagerMonarch", _monarch(1), ((7, 16), (4, 4, 4), (4, 3, 4)), {}),
    "monarch two-launch": (monarch_op, "_EagerMonarch", _monarch(2), ((40, 12), (2, 4, 6), (2, 5, 4)),
                           {"FUSED_BACKWARD_MAX": 0}),
    # stage 1 (L, 130 wide) takes the two-launch backward with one range, stage 2 the fused one with two:
    # the stages split differently and dR, dL are concatenated
    "monarch mixed": (monarch_op, "_EagerMonarch", _monarch(1), ((24, 260), (2, 2, 130), (2, 3, 2)), {}),
    "kronecker one pass": (kron_op, "_EagerKron", (kron_op.kron_matmul, kron_naive.kron_matmul),
                           ((9, 12), (1, 5, 3), (1, 4, 4)), {}),
    "kronecker dx+dA": (kron_op, "_EagerKron", (kron_op.kron_matmul, kron_naive.kron_matmul),
                        ((9, 12), (1, 5, 3), (1, 4, 4)), {"ONE_PASS_BWD": False}),
    "kronecker two terms": (kron_op, "_EagerKron", (kron_op.kron_matmul, kron_naive.kron_matmul),
                            ((9, 12), (2, 5, 3), (2, 4, 4)), {}),
}


@pytest.mark.parametrize("name, splits", [("monarch split", (2, 2)), ("monarch one range", (1, 1)),
                                          ("monarch two-launch", (2, 2)), ("monarch mixed", (2, 1))])
def test_the_monarch_cases_cover_each_weight_gradient_layout(name, splits, monkeypatch):
    """(token ranges of dR, of dL) for the shapes above: both split alike (shared fp32 partial sums or,
    with one range, dR and dL written into one buffer) or differently (concatenated)."""
    *_, shapes, settings = CASES[name]
    for key, value in settings.items():
        monkeypatch.setattr(block_kernels, key, value)
    (N, _), L, R = shapes
    L, R = torch.empty(L, device=DEV), torch.empty(R, device=DEV)
    assert (block_kernels.weight_grad_splits(R, N)[0], block_kernels.weight_grad_splits(L, N)[0]) == splits


def _forward_backward(fn, leaves, g, times=1):
    """y = fn(*leaves) and the leaves' .grad after `times` backward passes of <y, g> (accumulated)."""
    for t in leaves:
        t.grad = None
    for _ in range(times):
        y = fn(*leaves)
        y.backward(g)
    return y, [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("name", sorted(CASES))
def test_twin_and_op_agree_with_each_other_and_the_reference(name, monkeypatch):
    module, twin, (fn, ref), shapes, settings = CASES[name]
    kernel_module = kron_kernels if module is kron_op else block_kernels
    for key, value in settings.items():
        monkeypatch.setattr(kernel_module, key, value)
    leaves = [torch.randn(*s, device=DEV, requires_grad=True) for s in shapes]
    g = torch.randn_like(fn(*leaves))

    y_twin, grads_twin = _forward_backward(fn, leaves, g)
    assert f"{twin}Backward" in autograd_node_names(y_twin)
    # accumulating twice into the gradients (views of one shared buffer) doubles each, exactly
    _, twice = _forward_backward(fn, leaves, g, times=2)
    for a, b in zip(twice, grads_twin):
        assert torch.equal(a, 2 * b)

    with monkeypatch.context() as m:
        m.setattr(module, "plain_eager", lambda *t: False)  # what a traced call gets: the torch.library op
        y_op, grads_op = _forward_backward(fn, leaves, g)
    assert f"{twin}Backward" not in autograd_node_names(y_op)
    assert torch.equal(y_twin, y_op)
    for a, b in zip(grads_twin, grads_op):
        assert torch.equal(a, b)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref, grads_ref = _forward_backward(ref, ref_leaves, g.double())
    assert rel_err(y_twin, y_ref) < 1e-5
    for i, (a, b) in enumerate(zip(grads_twin, grads_ref)):
        assert rel_err(a, b) < 1e-5, f"gradient {i}"


def test_plain_eager_only_where_nothing_traces():
    """The twin only for plain eager calls: not while torch.compile traces, not under a functorch transform,
    not under a dispatch mode, not for tensor subclasses."""
    x = torch.randn(3)
    assert _eager.plain_eager(x)

    def pick(t):
        return t * 2 if _eager.plain_eager(t) else t * 3

    assert torch.equal(torch.compile(pick, fullgraph=True, backend="eager")(x), x * 3)
    seen = []
    torch.func.grad(lambda t: (seen.append(_eager.plain_eager(t)), t.sum())[1])(x)
    assert seen == [False]
    with OpNames():
        assert not _eager.plain_eager(x)
    assert not _eager.plain_eager(x.as_subclass(_Sub))
    assert _eager.plain_eager(torch.nn.Parameter(x))


class _Sub(torch.Tensor):
    pass


def test_the_op_runs_under_a_dispatch_mode():
    """Under a mode (as under tracing) the calls reach the torch.library ops, forward and backward."""
    x, L, R = (torch.randn(*s, device=DEV, requires_grad=True) for s in ((7, 12), (3, 6, 4), (3, 5, 6)))
    with OpNames() as log:
        monarch_op.monarch_matmul(x, L, R, 2, path="triton").sum().backward()
    assert "monarch_fwd" in log.names and "monarch_bwd" in log.names


def test_stage_backward_rejects_slots_of_the_wrong_layout():
    w = torch.randn(2, 5, 6, device=DEV)
    x, dy, dx = torch.randn(40, 12, device=DEV), torch.randn(40, 10, device=DEV), torch.empty(40, 12, device=DEV)
    args = (block_kernels.rows_of(dy, 5), block_kernels.rows_of(x, 6), w, block_kernels.rows_of(dx, 6), 40)
    splits = block_kernels.weight_grad_splits(w, 40)[0]
    assert splits == 2
    with pytest.raises(ValueError, match="slots must be torch.float32 \\[2, 2, 5, 6\\]"):
        block_kernels.stage_backward(*args, slots=torch.empty(2, 2, 5, 6, device=DEV, dtype=torch.float64))
    with pytest.raises(ValueError, match="slots must be"):
        block_kernels.stage_backward(*args, slots=torch.empty(2, 2, 6, 5, device=DEV).transpose(2, 3))
    slots = torch.full((splits, 2, 5, 6), float("nan"), device=DEV)
    assert block_kernels.stage_backward(*args, slots=slots) is None
    ref = torch.einsum("ngp,ngq->gpq", dy.view(40, 2, 5).double(), x.view(40, 2, 6).double())
    assert rel_err(slots.sum(0), ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["blockdiag split", "monarch split", "kronecker one pass"])
def test_gpu_compile_traces_the_ops(name):
    """torch.compile(fullgraph=True) puts the torch.library op in the graph (not the twin), and the
    compiled call's outputs and gradients equal the eager ones."""
    module, twin, (fn, _), shapes, _ = CASES[name]
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    leaves = [torch.randn(*s, device="cuda", requires_grad=True) for s in shapes]
    g = torch.randn_like(fn(*leaves))
    y, grads = _forward_backward(fn, leaves, g)
    y_c, grads_c = _forward_backward(torch.compile(fn, fullgraph=True, backend=backend), leaves, g)
    assert any(t.startswith("mmm.") and t.split(".")[1].endswith("_fwd") for t in targets), targets
    assert f"{twin}Backward" not in autograd_node_names(y_c)
    assert torch.equal(y, y_c)
    for a, b in zip(grads, grads_c):
        assert torch.equal(a, b)
