"""Quantization quality vs full precision (kept apart from exactness and kernel tests).

Bounds: relative Frobenius error ||dq(W) - W|| / ||W|| of Gaussian 256x1024 weights at
block 64, measured over seeds 0-19 here: nf4 0.0917-0.0925, fp4 0.1217-0.1224, double
quant changing the 4th digit only. The bounds below sit ~5% above the worst seed; they
also agree with bnb's own Linear4bit output error on CPU (nf4 0.091, fp4 0.116, see
shared/reference/environment.md §3). nf4 must beat fp4 on Gaussian weights (its levels are
normal quantiles), and smaller blocks must not be worse.
"""

import pytest
import torch

from quantkit.formats import lut4

BOUND = {"nf4": 0.097, "fp4": 0.128}


def _rel_err(w, quant_type, blocksize, dq):
    return ((lut4.dequantize(lut4.quantize(w, quant_type, blocksize, dq)) - w).norm() / w.norm()).item()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_gaussian_error_bound(quant_type, double_quant):
    for seed in range(3):
        torch.manual_seed(seed)
        w = torch.randn(256, 1024)
        assert _rel_err(w, quant_type, 64, double_quant) < BOUND[quant_type]


def test_nf4_beats_fp4_and_small_blocks_help():
    torch.manual_seed(0)
    w = torch.randn(256, 1024) * torch.rand(1024) ** 2  # uneven column scales, like real weights
    assert _rel_err(w, "nf4", 64, True) < _rel_err(w, "fp4", 64, True)
    errs = [_rel_err(w, "nf4", bs, False) for bs in (32, 64, 256, 4096)]
    assert errs == sorted(errs)


def test_double_quant_costs_little():
    torch.manual_seed(0)
    w = torch.randn(512, 512)
    assert _rel_err(w, "nf4", 64, True) < 1.01 * _rel_err(w, "nf4", 64, False)
