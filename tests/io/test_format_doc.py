"""docs/format.md's lut4 key table describes a real artifact: every `P.weight...` row names
a key that exists, with the dtype and shape the doc gives (issue #7, "safetensors")."""

import math
import re
from pathlib import Path

import pytest

import quantkit
from quantkit.io.artifact import read_metadata

DOC = Path(__file__).resolve().parents[2] / "docs" / "format.md"
ST_DTYPES = {"U8": "uint8", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _doc_rows():
    """(key template, row text) for every table row whose first cell is `P.<something>`."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*`(P\.[^`]+)`(.*)", line)
        if m:
            rows.append((m.group(1), m.group(2)))
    return rows


def _shapes(row: str, n: int, nb: int, N: int, K: int, blob: int):
    """Every backticked `[...]` shape in the row, evaluated (n, nb, N, K, len)."""
    out = []
    for expr in re.findall(r"`(\[[^`\]]*\])`", row):
        py = expr.replace("ceil(", "_ceil(").replace("len", "blob")
        out.append(list(eval(py, {"_ceil": math.ceil, "n": n, "nb": nb, "N": N, "K": K, "blob": blob})))
    return out


def test_doc_lists_the_lut4_keys():
    keys = [k for k, _ in _doc_rows()]
    assert "P.weight" in keys and "P.weight.absmax" in keys and "P.bias" in keys
    assert any("quant_state.bitsandbytes__nf4" in k for k in keys)


@pytest.mark.parametrize("double_quant", [True, False])
def test_doc_keys_exist_in_real_artifact(tiny_llama_dir, tmp_path, double_quant):
    recipe = {"version": 1, "name": "doc", "passes": [
        {"pass": "nf4", "targets": ["re:.*"], "ignore": ["lm_head"], "blocksize": 64, "double_quant": double_quant}]}
    out = quantkit.save(quantkit.compress(str(tiny_llama_dir), recipe, progress=False), tmp_path / "a")
    info = read_metadata(out)
    P = "model.layers.0.self_attn.q_proj"  # the doc's own example
    spec = info["modules"][P]
    N, K, bs = spec["out_features"], spec["in_features"], spec["blocksize"]
    n, nb = N * K, -(-N * K // bs)
    checked = 0
    for template, row in _doc_rows():
        key = P + template[1:]
        optional = "double quant only" in row or "if the layer has a bias" in row
        if key not in info["tensors"]:
            nested_row = "double quant only" in row
            assert optional, f"docs/format.md lists {template} but the artifact has no {key}"
            assert (nested_row and not double_quant) or "bias" in template, key
            continue
        t = info["tensors"][key]
        dtype = ST_DTYPES[t["dtype"]]
        if template != "P.bias":  # the bias keeps the source dtype
            assert dtype in row, f"{key}: artifact dtype {dtype}, doc row says {row!r}"
        shapes = _shapes(row, n, nb, N, K, blob=t["shape"][0])
        assert t["shape"] in shapes, f"{key}: artifact shape {t['shape']}, doc says {shapes}"
        checked += 1
    assert checked >= (6 if double_quant else 4)
    # the module spec fields the doc lists are the ones written
    doc = DOC.read_text(encoding="utf-8")
    for field in spec:
        assert f'"{field}"' in doc, f"module spec field {field} is not documented"
