"""Fake quantizers: grids, straight-through/LSQ gradients, initial scales, and that the
fake-quant forward equals the converted (packed) module's forward for every quantizer."""

import math

import pytest
import torch
from torch import nn

import quantkit.qat as qat
from quantkit.nn import IntKLinear, Lut4Linear
from quantkit.qat.quantizers import IntFakeQuant, Lut4FakeQuant, levels, step_size

ALL = [("lsq", 2), ("lsq", 3), ("lsq", 4), ("lsq", 8), ("sign", 1), ("seq", 2), ("ternary", 2), ("nf4", 4),
       ("fp4", 4)]


def _recipe(grid, bits, start=0, **extra):
    return {"passes": [{"pass": "qat", "bits": bits, "quantizer": grid, "start": start, "ignore": [], **extra}]}


@pytest.mark.parametrize("grid,bits", ALL)
@pytest.mark.parametrize("bias", [False, True])
def test_fake_quant_forward_equals_converted(grid, bits, bias):
    torch.manual_seed(bits)
    model = nn.Sequential(nn.Linear(70, 33, bias=bias))
    qat.prepare(model, _recipe(grid, bits))
    qat.step(model, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):  # move W and α away from their initial values
        opt.zero_grad()
        model(torch.randn(8, 70)).square().mean().backward()
        opt.step()
    x = torch.randn(5, 70)
    with torch.no_grad():
        w_fake = model[0].quantized_weight()
        y_fake = model(x)
    qat.convert(model)
    packed = model[0]
    assert isinstance(packed, Lut4Linear if grid in ("nf4", "fp4") else IntKLinear)
    assert torch.equal(packed.dequantized_weight(), w_fake)  # bit-identical weights
    torch.testing.assert_close(packed(x), y_fake, rtol=1e-5, atol=1e-6)  # only the summation order differs


@pytest.mark.parametrize("grid,bits,expected", [
    ("lsq", 2, [-2, -1, 0, 1]), ("lsq", 3, [-4, -3, -2, -1, 0, 1, 2, 3]), ("sign", 1, [-1, 1]),
    ("seq", 2, [-0.75, -0.25, 0.25, 0.75]), ("ternary", 2, [-2 / 3, 0, 2 / 3]),
])
def test_grid_levels_in_units_of_alpha(grid, bits, expected):
    w = torch.linspace(-5, 5, 2001).reshape(1, -1)
    alpha = torch.ones(1, 1)
    t, _ = levels(w, alpha, grid, bits)
    got = sorted(set((t * step_size(alpha, grid, bits)).reshape(-1).tolist()))
    assert got == pytest.approx(expected)


def test_lsq_gradients_match_the_ste_formula():
    torch.manual_seed(0)
    q = IntFakeQuant(3, "lsq", 4)
    w = (torch.randn(3, 50) * 2).requires_grad_()
    with torch.no_grad():
        q.alpha.copy_(torch.tensor([[0.1], [0.2], [0.3]]))
    g = torch.randn(3, 50)
    (q(w) * g).sum().backward()
    v = w.detach() / q.alpha.detach()
    inside = (v >= -8) & (v <= 7)
    assert torch.equal(w.grad, g * inside)
    t = torch.clamp(torch.round(v), -8, 7)
    expected = ((g * (t - torch.where(inside, v, 0.0))).sum(1, keepdim=True)) / math.sqrt(150 * 7)
    torch.testing.assert_close(q.alpha.grad, expected)
    assert (~inside).any() and inside.any()  # both branches were exercised


def test_seq_gradients_clip_mask_and_alpha():
    q = IntFakeQuant(1, "seq", 2)
    with torch.no_grad():
        q.alpha.fill_(1.0)
    w = torch.tensor([[-2.0, -0.6, -0.1, 0.3, 0.995, 1.5]], requires_grad=True)
    q(w).sum().backward()
    assert w.grad.tolist() == [[0, 1, 1, 1, 0, 0]]
    t = torch.tensor([-1.5, -1.5, -0.5, 0.5, 1.5, 1.5])
    inside = torch.tensor([0, 1, 1, 1, 0, 0], dtype=torch.bool)
    d = t / 2 - torch.where(inside, w.detach()[0], 0.0)
    torch.testing.assert_close(q.alpha.grad, d.sum().reshape(1, 1) / math.sqrt(6))


def test_sign_is_identity_ste_and_alpha_gets_signs():
    q = IntFakeQuant(1, "sign", 1)
    w = torch.tensor([[-3.0, -0.1, 0.0, 2.0]], requires_grad=True)
    with torch.no_grad():
        q.alpha.fill_(0.5)
    out = q(w)
    assert out.tolist() == [[-0.5, -0.5, 0.5, 0.5]]
    out.sum().backward()
    assert w.grad.tolist() == [[1, 1, 1, 1]]
    assert q.alpha.grad.item() == pytest.approx((-1 - 1 + 1 + 1) / 2)


def test_init_scales():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    s = IntFakeQuant(16, "sign", 1)
    s.init_scale(w)
    torch.testing.assert_close(s.alpha, w.abs().mean(1, keepdim=True))
    for grid, bits in [("lsq", 4), ("seq", 2), ("ternary", 2)]:
        q = IntFakeQuant(16, grid, bits)
        q.init_scale(w)
        err = (q(w) - w).square().sum(1)
        # the MSE search beats (or ties) the max-abs scale on every row
        qmax = IntFakeQuant(16, grid, bits)
        n = {"lsq": 1.0, "seq": 2.0, "ternary": 1.5}[grid]
        top = {"lsq": 7.0, "seq": 1.5, "ternary": 1.0}[grid] / n
        with torch.no_grad():
            qmax.alpha.copy_(w.abs().amax(1, keepdim=True) / top)
        assert (err <= (qmax(w) - w).square().sum(1) + 1e-6).all()
    q8 = IntFakeQuant(16, "lsq", 8)
    q8.init_scale(w)
    assert ((q8(w) - w).abs().max(1).values <= w.abs().amax(1) / 127).all()  # at most one step


def test_quantization_error_falls_with_bits():
    torch.manual_seed(1)
    w = torch.randn(32, 512)
    errs = []
    for grid, bits in [("sign", 1), ("seq", 2), ("lsq", 3), ("lsq", 4), ("lsq", 8)]:
        q = IntFakeQuant(32, grid, bits)
        q.init_scale(w)
        errs.append(((q(w) - w).square().mean() / w.square().mean()).item())
    assert errs == sorted(errs, reverse=True)
    assert errs[0] < 0.4 and errs[3] < 0.015 and errs[4] < 1e-4  # sign: 1 - 2/pi = 0.36 for Gaussians


def test_nf4_fake_quant_is_the_ptq_grid_with_identity_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(128, 16)
    q = Lut4FakeQuant("nf4", 64, True)
    w = lin.weight.detach().clone().requires_grad_()
    out = q(w)
    assert torch.equal(out, Lut4Linear.from_linear(lin, "nf4", 64, True).dequantized_weight())
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
