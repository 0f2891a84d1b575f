"""ONNX export of the formats beyond nf4/fp4 (issue #7): int4 as com.microsoft::MatMulNBits,
other int-k, DB-LLM dual-binary and BitStack as standard-op graphs. ONNX Runtime (CPU) runs
each exported tiny model with the weights still packed in the file and matches quantkit's
logits.

Tolerance as in test_export_onnx.py (1e-4 of max |logits|): every graph decodes the same
stored bits with the same fp32 formula as quantkit's reference, so the weights are equal
and only fp32 summation order differs.
"""

import numpy as np
import pytest
import torch

import quantkit
from quantkit.io.artifact import read_metadata

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

REL_TOL = 1e-4


def _qat(bits, quantizer):
    return {"version": 1, "name": f"w{bits}", "passes": [{"pass": "qat", "bits": bits, "quantizer": quantizer,
                                                          "targets": ["re:.*"], "ignore": ["lm_head"]}]}


def _dualbin_model(model):
    """Every decoder linear FDB-initialised (no training): the packed format is what matters here."""
    from quantkit.nn import DualBinLinear
    from quantkit.passes.targets import replace_module

    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            replace_module(model, name, DualBinLinear.from_linear(mod, group=64, init="absmax"))
    return model


@pytest.fixture(scope="module")
def artifacts(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-formats")
    out = {}
    for name, recipe in {"int4": _qat(4, "lsq"), "int3": _qat(3, "lsq"), "w2seq": _qat(2, "seq")}.items():
        out[name] = quantkit.save(quantkit.compress(str(tiny_llama_dir), recipe, progress=False), root / name)
    model = _dualbin_model(quantkit.load_model(tiny_llama_dir))
    out["dualbin"] = quantkit.save(model, root / "dualbin")
    bitstack = {"version": 1, "name": "bs", "passes": [{"pass": "bitstack", "n_blocks": 3, "rank": 4,
                                                         "calib_samples": 2, "calib_seq_len": 32, "val_seq_len": 32,
                                                         "order": "proxy"}]}
    out["bitstack"] = quantkit.save(quantkit.compress(quantkit.load_model(tiny_llama_dir), bitstack,
                                                      progress=False), root / "bitstack")
    bitstack["passes"][0]["factor_dtype"] = "int8"
    out["bitstack_int8"] = quantkit.save(quantkit.compress(quantkit.load_model(tiny_llama_dir), bitstack,
                                                           progress=False), root / "bitstack_int8")
    return out


@pytest.mark.parametrize("name,contrib", [("int4", "MatMulNBits"), ("int3", None), ("w2seq", None),
                                          ("dualbin", None), ("bitstack", None), ("bitstack_int8", None)])
def test_ort_matches_quantkit(artifacts, tmp_path, name, contrib):
    out = artifacts[name]
    info = read_metadata(out)
    dest = quantkit.export(out, to="onnx", dest=tmp_path / "onnx")
    proto = onnx.load(str(dest / "model.onnx"))
    ops = [(n.domain, n.op_type) for n in proto.graph.node]
    if contrib:
        assert ops.count(("com.microsoft", contrib)) == len(info["modules"])
    else:
        assert not [o for o in ops if o[0] == "com.microsoft"]
    # weights stay packed: no initializer is a dense fp32 matrix of a packed layer's shape
    shapes = {(s["out_features"], s["in_features"]) for s in info["modules"].values()}
    for t in proto.graph.initializer:
        assert not (len(t.dims) == 2 and tuple(t.dims) in shapes and t.data_type == onnx.TensorProto.FLOAT), t.name
    model = quantkit.load(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    sess = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": ids.numpy()})[0]
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= REL_TOL * float(np.abs(ref).max())


def test_nbits_layout_decodes_to_the_intk_weight():
    """MatMulNBits' re-blocked layout (padding included, odd K) decodes to the int-k weight."""
    from quantkit._ops import intk_dequantize_reference
    from quantkit.io.onnx_export import NBITS_BLOCK, matmul_nbits, nbits_layout

    g = torch.Generator().manual_seed(0)
    for n, k in [(5, 77), (3, 64), (2, 33)]:
        codes = torch.randint(0, 16, (n, k), generator=g)
        packed = torch.zeros(n, (k + 1) // 2, dtype=torch.uint8)
        packed |= codes[:, 0::2].to(torch.uint8)
        packed[:, : k // 2] |= (codes[:, 1::2].to(torch.uint8) << 4)
        scale = torch.rand(n, generator=g) + 0.1
        b, scales = nbits_layout(packed, scale, k)
        assert b.shape == (n, -(-k // NBITS_BLOCK), NBITS_BLOCK // 2)
        eye = torch.eye(k)
        w = matmul_nbits(eye, b, scales, None, k, n, NBITS_BLOCK).T
        assert torch.equal(w, intk_dequantize_reference(packed, scale, 4, 8.0, n, k))


def test_graph_decoders_equal_the_references():
    """The export-friendly decoders in onnx_graphs compute exactly the ops' references."""
    from quantkit import _ops
    from quantkit.io import onnx_graphs as G

    g = torch.Generator().manual_seed(0)
    n, k = 6, 70
    for bits, offset in [(3, 4.0), (2, 1.5), (1, 0.5), (8, 128.0)]:
        packed = torch.randint(0, 256, (n, -(-k * bits // 8)), dtype=torch.uint8, generator=g)
        scale = torch.rand(n, generator=g)
        assert torch.equal(G._intk_weight(packed, scale, bits, offset, n, k),
                           _ops.intk_dequantize_reference(packed, scale, bits, offset, n, k))
    group, gcount = 64, 2
    p1, p2 = (torch.randint(0, 256, (n, gcount * group // 8), dtype=torch.uint8, generator=g) for _ in range(2))
    a1, a2 = (torch.randn(n, gcount, generator=g).half() for _ in range(2))
    assert torch.equal(G._dualbin_weight(p1, p2, a1, a2, group, n, 100),
                       _ops.dualbin_dequantize_reference(p1, p2, a1, a2, group, n, 100))
    signs = torch.randint(0, 256, (3, n, -(-k // 8)), dtype=torch.uint8, generator=g)
    u, v = torch.randn(3, n, 4, generator=g).half(), torch.randn(3, 4, k, generator=g).half()
    torch.testing.assert_close(G._bitstack_weight(signs, u, v), _ops.bitstack_dequantize_reference(signs, u, v),
                               atol=0, rtol=0)


def test_bitstack_export_under_a_memory_budget_keeps_only_the_loaded_blocks(artifacts, tmp_path):
    from quantkit.io.artifact import budget_plan

    out = artifacts["bitstack"]
    plan = budget_plan(out)
    dest = quantkit.export(out, to="onnx", dest=tmp_path / "min", memory_budget=plan.minimum)
    proto = onnx.load(str(dest / "model.onnx"))
    signs = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 3]
    n_layers = len(read_metadata(out)["modules"])
    assert len(signs) == n_layers and all(t.dims[0] == 1 for t in signs)  # one block each at the minimum
    model = quantkit.load(out, memory_budget=plan.minimum)
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    got = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input_ids": ids.numpy()})[0]
    assert float(np.abs(got - ref).max()) <= REL_TOL * float(np.abs(ref).max())
    with pytest.raises(quantkit.QuantkitError, match="memory budget applies to onnx"):
        quantkit.export(out, to="hf-bnb", dest=tmp_path / "hf", memory_budget="1GB")
