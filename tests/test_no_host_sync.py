"""GPU: a forward+backward of every structured layer and of linear attention never waits for the GPU
(no device-to-host read, no copy from pageable host memory): in a training loop such a wait idles the
GPU while the host issues the rest of the step. The FFT backward had one (an item assignment).
Run on a CUDA machine: pytest -m gpu tests/test_no_host_sync.py"""

import pytest
import torch

import mmm
from mmm.bench.cases_linear import structured_configs
from mmm.linear import StructuredLinear

pytestmark = pytest.mark.gpu


def assert_no_sync(step):
    step()  # first call: autotuning, caches (may synchronize)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


CONFIGS = structured_configs(1024, 1024)


@pytest.mark.parametrize("config", [c for _, c in CONFIGS], ids=[label for label, _ in CONFIGS])
def test_structured_layer_forward_backward_never_synchronizes(config):
    layer = StructuredLinear(1024, 1024, config, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    assert_no_sync(lambda: layer(x).backward(g))


@pytest.mark.parametrize("method", ["linear", "window", "hybrid"])
def test_attention_forward_backward_never_synchronizes(method):
    q, k, v = (torch.randn(1, 2048, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 2048, 4, 64, device="cuda", dtype=torch.bfloat16)
    assert_no_sync(lambda: mmm.attention(q, k, v, method, window=256).backward(g))
