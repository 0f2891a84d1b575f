"""docs/format.md's dualbin key table describes a real artifact (keys, dtypes, shapes, spec fields)."""

import math
import re
from pathlib import Path

import torch
from torch import nn

import quantkit
from quantkit.io.artifact import read_metadata
from quantkit.nn import DualBinLinear
from quantkit.passes.targets import replace_module

DOC = Path(__file__).resolve().parents[2] / "docs" / "format.md"
ST_DTYPES = {"U8": "uint8", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def test_doc_keys_exist_in_real_artifact(tiny_llama_dir, tmp_path):
    model = quantkit.load_model(str(tiny_llama_dir))
    P = "model.layers.0.self_attn.q_proj"
    replace_module(model, P, DualBinLinear.from_linear(model.get_submodule(P)))
    info = read_metadata(quantkit.save(model, tmp_path / "a"))
    spec = info["modules"][P]
    N, K, group = spec["out_features"], spec["in_features"], spec["group"]
    G = math.ceil(K / group)
    rows = re.findall(r"^\|\s*`(L\.[^`]+)`(.*)$", DOC.read_text(encoding="utf-8"), flags=re.M)
    assert {r[0] for r in rows} == {"L.weight.plane1", "L.weight.plane2", "L.weight.alpha1", "L.weight.alpha2",
                                    "L.bias"}
    for template, row in rows:
        key = P + template[1:]
        if template == "L.bias":
            assert key not in info["tensors"]  # the tiny Llama has no biases
            continue
        t = info["tensors"][key]
        assert ST_DTYPES[t["dtype"]] in row
        shape = re.findall(r"`(\[[^`\]]*\])`", row)[0]
        assert t["shape"] == list(eval(shape, {"N": N, "G": G, "group": group})), (key, t["shape"], shape)
    doc = DOC.read_text(encoding="utf-8")
    for field in spec:
        assert f'"{field}"' in doc
