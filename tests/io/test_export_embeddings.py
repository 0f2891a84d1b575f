"""Export of the embeddings pass's tables: ONNX keeps them packed (lookup = Gather of the
packed rows + decode; a tied head reads the same initializers, stored once), hf-bnb writes
their decoded fp32 values. Logits as quantkit's within 1e-4 x max|logit| (the tolerance of
tests/io/test_export_onnx.py and test_export_hf_bnb.py)."""

import numpy as np
import pytest
import torch

import quantkit

REL_TOL = 1e-4


def _artifact(src, tmp_path, embed, head):
    recipe = {"version": 1, "name": "emb", "passes": [{"pass": "nf4", "targets": ["re:.*"], "ignore": ["lm_head"]},
                                                      {"pass": "embeddings", "embed": embed, "head": head}]}
    return quantkit.save(quantkit.compress(str(src), recipe, progress=False), tmp_path / "art")


@pytest.mark.parametrize("embed,head", [("int8", "int8"), ("nf4", "nf4"), ("bfloat16", "bfloat16"),
                                        ("fp4", "int8"), ("int8", "float16")])
def test_onnx_runs_packed_tables(tiny_llama_dir, tmp_path, embed, head):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    out = _artifact(tiny_llama_dir, tmp_path, embed, head)
    dest = quantkit.export(out, to="onnx", dest=tmp_path / "onnx")
    proto = onnx.load(str(dest / "model.onnx"))
    v, d = 320, 64  # the tiny Llama's table
    tables = [t for t in proto.graph.initializer if list(t.dims) in ([v, d], [v * d // 2])]
    # the table is in the file once (tied head and lookup share it) and not as fp32
    assert len(tables) == (1 if embed == head else 2)
    assert all(t.data_type != onnx.TensorProto.FLOAT for t in tables)
    model = quantkit.load(out)
    sess = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, v, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    got = sess.run(None, {"input_ids": ids.numpy()})[0]
    assert np.abs(got - ref).max() <= REL_TOL * np.abs(ref).max()


@pytest.mark.parametrize("embed,head", [("int8", "int8"), ("keep", "int8"), ("nf4", "keep")])
def test_hf_bnb_writes_decoded_tables(tiny_llama_dir, tmp_path, embed, head):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out = _artifact(tiny_llama_dir, tmp_path, embed, head)
    dest = quantkit.export(out, to="hf-bnb", dest=tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(dest, device_map="cpu").eval()
    for m in hf.modules():  # bnb's AVX512-BF16 repack re-quantizes the scales (see test_export_hf_bnb.py)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model = quantkit.load(out)
    assert type(hf.lm_head) is torch.nn.Linear and hf.lm_head.weight.dtype == torch.float32
    if embed != "keep":
        assert torch.equal(hf.model.embed_tokens.weight.detach(), model.model.embed_tokens.dequantized_weight())
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(ids).logits, hf(ids).logits
    assert (got - ref).abs().max() <= REL_TOL * ref.abs().max()
