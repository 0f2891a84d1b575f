"""`import quantkit` is lean: no CUDA initialisation, no transformers, works without _C."""

import os
import subprocess
import sys

CHECK = """
import sys, torch, quantkit
assert not torch.cuda.is_initialized(), "CUDA was initialised"
heavy = [m for m in ("transformers", "bitsandbytes", "gguf") if m in sys.modules]
assert not heavy, heavy
print(quantkit._ops.native_status())
"""


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_import_is_lean():
    r = _run(CHECK)
    assert r.returncode == 0, r.stderr


def test_reference_kernels_when_native_disabled():
    code = CHECK + """
from torch import nn
from quantkit.nn import Lut4Linear
assert not quantkit._ops.has_native_cpu_kernel()
lin = nn.Linear(64, 8)
q = Lut4Linear.from_linear(lin)
x = torch.randn(2, 64)
assert (q(x) - lin(x)).abs().max() < 0.5
"""
    r = _run(code, QUANTKIT_KERNEL="torch")
    assert r.returncode == 0, r.stderr
    assert "pure-torch reference" in r.stdout


def test_bad_kernel_mode_is_a_clear_error():
    r = _run("import quantkit", QUANTKIT_KERNEL="fast")
    assert r.returncode != 0 and "QUANTKIT_KERNEL='fast'" in r.stderr
