"""QAT on DB-LLM's dual-binary grid (quantizer: dualbin): the fake-quant weight equals the
converted DualBinLinear's weight exactly, the initialisation is the DB-LLM pass's, gradients
reach the scales and the latent weight, and prepare/step/convert/save/load work end to end."""

import pytest
import torch

import quantkit
import quantkit.qat as qat
from quantkit.formats import dualbin
from quantkit.nn import DualBinLinear
from quantkit.qat.quantizers import DualBinFakeQuant


def _weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,k", [(8, 64), (5, 100), (3, 200)])  # K not a multiple of the group: padded
def test_fake_quant_equals_the_packed_weight_after_training_moves_the_scales(n, k):
    w = _weight(n, k)
    q = DualBinFakeQuant(n, k, group=64)
    q.init_scale(w)
    with torch.no_grad():  # scales as training would leave them: apart from the 2-bit grid
        q.alpha.mul_(1 + 0.1 * torch.randn(q.alpha.shape, generator=torch.Generator().manual_seed(1)))
    w2 = w + 0.05 * _weight(n, k, seed=2)
    fake = q(w2)
    packed = DualBinLinear.from_packed(q.pack(w2))
    assert torch.equal(fake, packed.dequantized_weight())
    assert torch.equal(fake, dualbin.dequantize(q.pack(w2)))


def test_initialisation_is_the_dbllm_init():
    w = _weight(16, 192)
    q = DualBinFakeQuant(16, 192)
    q.init_scale(w)
    ref = dualbin.dequantize(dualbin.quantize(w, 64, "mse"))
    got = q(w).detach()
    # the same fp16 scales; bits may differ only on exact midpoint ties, which random weights avoid
    assert torch.equal(q.alpha[0].half(), dualbin.quantize(w, 64, "mse").alpha1)
    assert torch.equal(got, ref)


def test_gradients_reach_scales_and_weight():
    w = _weight(4, 128).requires_grad_()
    q = DualBinFakeQuant(4, 128)
    q.init_scale(w)
    x = torch.randn(3, 128)
    (x @ q(w).T).pow(2).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert q.alpha.grad is not None and q.alpha.grad.shape == (2, 4, 2) and q.alpha.grad.abs().sum() > 0


def test_recipe_validation():
    from quantkit.errors import RecipeError
    from quantkit.recipe import load_recipe

    with pytest.raises(RecipeError, match="quantizer 'dualbin' takes bits 2"):
        load_recipe({"version": 1, "name": "x", "passes": [{"pass": "qat", "quantizer": "dualbin", "bits": 4}]})


def test_prepare_train_convert_save_load(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    recipe = {"version": 1, "name": "w2-dualbin", "passes": [{"pass": "qat", "quantizer": "dualbin", "bits": 2,
                                                              "start": 0, "targets": ["re:.*mlp.*"]}]}
    model = qat.prepare(model, recipe, plan=qat.plan(n_params=10**6, total_tokens=10**4, bits=2, total_steps=4))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mods = qat.qat_modules(model)
    alpha0 = next(iter(mods.values())).quantizer.alpha.detach().clone()
    for step in range(4):
        qat.step(model, step)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(next(iter(mods.values())).quantizer.alpha.detach(), alpha0)  # scales trained
    model.eval()
    with torch.no_grad():
        fake = model(ids).logits
    qat.convert(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, DualBinLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    with torch.no_grad():
        converted = model(ids).logits
    # same weights; the dualbin kernel sums in another order than F.linear
    torch.testing.assert_close(converted, fake, rtol=1e-4, atol=1e-4)
    out = quantkit.save(model, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(quantkit.load(out)(ids).logits, converted)
