"""docs/format.md's key tables for intk, dualbin and bitstack describe real artifacts: each
"## Format `X`" section's `L.` rows name keys that exist in an artifact of that format with
the dtype and shape the doc gives, and every field of the module spec is mentioned
(issue #7, "safetensors"). The lut4 table is checked in test_format_doc.py."""

import math
import re
from pathlib import Path

import pytest
import torch

import quantkit
from quantkit.io.artifact import read_metadata
from quantkit.passes.targets import replace_module

DOC = Path(__file__).resolve().parents[2] / "docs" / "format.md"
ST_DTYPES = {"U8": "uint8", "I8": "int8", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
P = "model.layers.0.self_attn.q_proj"  # a 64x64 layer of the tiny Llama


def _section(fmt: str) -> str:
    doc = DOC.read_text(encoding="utf-8")
    m = re.search(rf"^## Format `{fmt}`.*?(?=^## )", doc, flags=re.M | re.S)
    assert m, f"docs/format.md has no section for format {fmt}"
    return m.group(0)


def _artifact(fmt, tiny_llama_dir, tmp_path):
    model = quantkit.load_model(str(tiny_llama_dir))
    lin = model.get_submodule(P)
    if fmt == "dualbin":
        from quantkit.nn import DualBinLinear
        mod = DualBinLinear.from_linear(lin)
    elif fmt.startswith("bitstack"):
        from quantkit.nn import BitStackLinear
        mod = BitStackLinear.from_weight(lin.weight.data, None, n_blocks=3, rank=4,
                                         factor_dtype="int8" if fmt == "bitstack-int8" else "float16")
        mod.order = [0, 1]
    else:
        from quantkit.formats import intk
        from quantkit.nn import IntKLinear
        w = lin.weight.data
        scale = w.abs().amax(1) / 7
        codes = torch.clamp(torch.round(w / scale[:, None]), -8, 7).long() + 8
        mod = IntKLinear.from_packed(intk.from_codes(codes, scale, 4, 8.0, "lsq"))
    replace_module(model, P, mod)
    return read_metadata(quantkit.save(model, tmp_path / fmt))


@pytest.mark.parametrize("fmt", ["intk", "dualbin", "bitstack", "bitstack-int8"])
def test_doc_keys_exist_in_real_artifact(fmt, tiny_llama_dir, tmp_path):
    info = _artifact(fmt, tiny_llama_dir, tmp_path)
    spec = info["modules"][P]
    assert spec["format"] == fmt.split("-")[0]
    N, K = spec["out_features"], spec["in_features"]
    names = {"N": N, "K": K, "m": N, "n": K, "bits": spec.get("bits"), "group": spec.get("group"),
             "G": math.ceil(K / spec["group"]) if spec.get("group") else None,
             "B": spec.get("n_blocks"), "k": spec.get("rank"), "ceil": math.ceil}
    section = _section(spec["format"])
    rows = re.findall(r"^\|\s*`(L\.[^`]+)`(.*)$", section, flags=re.M)
    if fmt == "bitstack":  # fp16 factors: the int8-only rows are not stored
        rows = [(t, r) for t, r in rows if "int8 factors only" not in r]
    assert len(rows) >= 2
    stored = {k[len(P) + 1:] for k in info["tensors"] if k.startswith(P + ".")}
    assert stored == {t[2:] for t, _ in rows if t != "L.bias"}, (stored, rows)
    for template, row in rows:
        if template == "L.bias":
            continue
        t = info["tensors"][P + template[1:]]
        assert ST_DTYPES[t["dtype"]] in row, (template, t["dtype"], row)
        shape = re.findall(r"`(\[[^`\]]*\])`", row)[0].replace("·", "*")
        assert t["shape"] == list(eval(shape, dict(names))), (template, t["shape"], shape)
    doc = DOC.read_text(encoding="utf-8")
    for field in spec:
        assert f'"{field}"' in doc, f"spec field {field!r} of format {fmt} is not documented"
