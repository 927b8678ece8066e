"""Importing mmm (every subpackage) must not initialise CUDA: users import it before choosing devices,
and forked data-loader workers must not inherit a CUDA context."""

import subprocess
import sys

MODULES = ["mmm", "mmm.models", "mmm.train", "mmm.bench", "mmm.convert", "mmm.attention", "mmm.nn",
           "mmm.ops.blockdiag.op", "mmm.ops.monarch.op", "mmm.ops.kronecker", "mmm.ops.linear_attention", "mmm.cli"]


def test_import_does_not_initialise_cuda():
    code = (
        "import torch\n"
        "def refuse(*a, **k):\n"
        "    raise RuntimeError('CUDA initialised at import')\n"
        "torch.cuda._lazy_init = refuse\n"
        "torch.cuda.init = refuse\n"
        f"import importlib\nfor m in {MODULES!r}:\n    importlib.import_module(m)\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
