"""Plain eager calls of the fused ops go through an autograd.Function twin of their torch.library op (less
host time per call); anything that traces or intercepts ops (torch.compile, fake tensors, dispatch modes)
gets the op. Both run the same launches: outputs and gradients must be bitwise equal. (The linear-attention
op has the same tests in test_linear_attention_kernel.py.)"""

import pytest
import torch

from conftest import OpNames, autograd_node_names
from mmm.ops.blockdiag import op as blockdiag_op
from mmm.ops.kronecker import op as kron_op
from mmm.ops.monarch import op as monarch_op

# the kernels run on CUDA, or on CPU under the interpreter (conftest sets it when there is no GPU)
pytestmark = pytest.mark.skipif(not blockdiag_op.HAVE_TRITON or not (torch.cuda.is_available() or blockdiag_op.INTERPRET),
                                reason="needs triton with CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {
    # name: (module, public function, op name, twin, make(inputs))
    "blockdiag": (blockdiag_op, lambda x, w: blockdiag_op.blockdiag_matmul(x, w, path="triton"), "blockdiag_fwd",
                  "_EagerBlockdiag", lambda: (torch.randn(7, 12, device=DEV), torch.randn(3, 5, 4, device=DEV))),
    "monarch": (monarch_op, lambda x, L, R: monarch_op.monarch_matmul(x, L, R, 2, path="triton"), "monarch_fwd",
                "_EagerMonarch", lambda: tuple(torch.randn(*s, device=DEV) for s in ((7, 12), (3, 6, 4), (3, 5, 6)))),
    "kronecker": (kron_op, kron_op.kron_matmul, "kron_fwd", "_EagerKron",
                  lambda: tuple(torch.randn(*s, device=DEV) for s in ((7, 12), (2, 5, 3), (2, 4, 4)))),
}


def _run(fn, inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(torch.ones_like(y) + torch.arange(y.numel()).view_as(y) / y.numel())
    return y, [y.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_twin_and_op_agree_exactly_and_each_is_used_where_it_should(name, monkeypatch):
    module, fn, op_name, twin, make = CASES[name]
    inputs = make()
    y, eager = _run(fn, inputs)
    assert f"{twin}Backward" in autograd_node_names(y), autograd_node_names(y)  # a plain call takes the twin
    with OpNames() as log:
        _run(fn, inputs)
    assert op_name in log.names  # under a dispatch mode, the op (the mode sees it, not its launches)
    monkeypatch.setattr(module, "plain_eager", lambda *t: False)
    y, op = _run(fn, inputs)
    assert f"{twin}Backward" not in autograd_node_names(y)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


def test_eager_twins_launch_triton_directly():
    """The eager twins run their bodies with wrap_triton off (as triton_op does for eager calls): left on,
    every launch is dispatched as a higher-order operator, which made the Monarch and Kronecker twins
    ~1000x slower on the H200. Under a dispatch mode the launches must stay visible to the mode."""
    from torch._library.triton import is_wrap_triton_enabled

    from mmm.ops._eager import eager_twin

    seen = []

    def forward(x):
        seen.append(is_wrap_triton_enabled())
        return x * 2

    def backward(ctx, g):
        seen.append(is_wrap_triton_enabled())
        return g * 2

    twin = eager_twin("_Twice", forward, lambda ctx, inputs, output: None, backward)
    x = torch.randn(3, requires_grad=True)
    twin.apply(x).sum().backward()
    assert seen == [False, False]
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    with OpNames():
        twin.apply(x)
    assert seen[-1] is True
