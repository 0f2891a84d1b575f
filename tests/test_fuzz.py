"""Fuzzing the readers of untrusted input (issue #8): safetensors headers, artifact metadata,
index files and recipes. Nothing may escape but quantkit's own errors, and hostile headers
must be refused without allocating what they claim.

Bounded for the normal test run: fixed example counts, derandomized (the same examples every
run, so CI is reproducible), no example database; together under 10 s.
"""

import json
import os
import shutil
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantkit.errors import CheckpointError, QuantkitError, RecipeError
from quantkit.io.safetensors_check import DTYPE_BITS, validate_safetensors

# QUANTKIT_FUZZ_EXAMPLES=N fuzzes longer, with fresh random examples (not for CI)
_N = int(os.environ.get("QUANTKIT_FUZZ_EXAMPLES", "0") or 0)
FUZZ = settings(max_examples=_N or 300, deadline=None, derandomize=not _N, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FEW = settings(FUZZ, max_examples=_N // 2 or 150)


def _file(data: bytes) -> Path:
    f = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
    f.write(data)
    f.close()
    return Path(f.name)


def _with_header(header, data: bytes = b"", length=None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def _validate_bounded(data: bytes, limit: int = 4 << 20):
    """validate_safetensors on ``data``: returns the header or the CheckpointError, and checks
    the Python heap never grows by more than ``limit`` bytes while doing it."""
    path = _file(data)
    tracemalloc.start()
    try:
        try:
            result = validate_safetensors(path)
        except CheckpointError as e:
            result = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        path.unlink()
    assert peak < limit + 20 * len(data), f"validation allocated {peak} bytes for a {len(data)}-byte file"
    return result


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)

dims = st.integers(min_value=-2, max_value=2**64) | st.sampled_from([0, 1, 2, 3, 4, 7])
entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(sorted(DTYPE_BITS)) | st.text(max_size=5),
     "shape": st.lists(dims, max_size=4) | json_values,
     "data_offsets": st.lists(st.integers(min_value=-5, max_value=2**66) | st.sampled_from([0, 4, 8, 12, 16]),
                              min_size=0, max_size=3) | json_values})
headers = st.dictionaries(st.text(max_size=8), entries | json_values, max_size=5) | st.builds(lambda m, d: {"__metadata__": m, **d},
                             st.dictionaries(st.text(max_size=5), st.text(max_size=5) | json_values, max_size=3),
                             st.dictionaries(st.text(max_size=8), entries, max_size=3))


# ----------------------------------------------------------------------------- safetensors headers

@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(data):
    _validate_bounded(data)


@FUZZ
@given(headers, st.binary(max_size=40), st.none() | st.integers(min_value=0, max_value=2**64 - 1))
def test_structured_headers(header, data, length):
    result = _validate_bounded(_with_header(header, data, length))
    if isinstance(result, dict):  # accepted: then it really tiles the data section
        spans = sorted(tuple(v["data_offsets"]) for k, v in result.items() if k != "__metadata__")
        pos = 0
        for begin, end in spans:
            assert begin == pos
            pos = end
        assert pos == len(data)


@pytest.fixture(scope="module")
def valid_file_bytes(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    save_file({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
               "c": torch.zeros(3, dtype=torch.uint8)}, str(path), metadata={"format": "pt"})
    return path.read_bytes()


@FUZZ
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=255)),
                max_size=6), st.none() | st.integers(min_value=0, max_value=10**6))
def test_mutated_real_file(valid_file_bytes, flips, cut):
    data = bytearray(valid_file_bytes)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    _validate_bounded(bytes(data))


@pytest.mark.parametrize("data", [
    _with_header(b"{}", length=2**64 - 1),                                               # huge header length
    _with_header(b"{}", length=99_000_000),                                              # below the cap, beyond the file
    _with_header({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 2**82]}}),  # huge tensor
    _with_header({"w": {"dtype": "F64", "shape": [2**62] * 8, "data_offsets": [0, 8]}}, bytes(8)),
    _with_header(b"[" * 200_000 + b"]" * 200_000),                                       # deep nesting
])
def test_hostile_headers_are_refused_cheaply(data):
    result = _validate_bounded(data, limit=1 << 20)
    assert isinstance(result, CheckpointError)


def test_hostile_header_through_compress(tmp_path, tiny_llama_dir, capsys):
    """The whole CLI refuses a claimed 2**80-byte tensor quickly (nothing is allocated for it)."""
    from quantkit.cli import main

    d = Path(shutil.copytree(tiny_llama_dir, tmp_path / "m"))
    (d / "model.safetensors").write_bytes(
        _with_header({"model.embed_tokens.weight": {"dtype": "F32", "shape": [2**39, 2**39],
                                                    "data_offsets": [0, 2**80]}}))
    code = main(["compress", str(d), "--recipe", "nf4", "-o", str(tmp_path / "o"), "--quiet"])
    assert code == 1 and "truncated" in capsys.readouterr().err


# ----------------------------------------------------------------------------- artifact metadata

@pytest.fixture(scope="module")
def artifact_parts(tiny_llama_dir, tmp_path_factory):
    """(header dict, data bytes) of a real nf4 artifact's model.safetensors."""
    import quantkit

    out = tmp_path_factory.mktemp("art") / "a"
    quantkit.save(quantkit.compress(str(tiny_llama_dir), "nf4", progress=False), out)
    raw = (out / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


META_KEYS = ["quantkit.format_version", "quantkit.modules", "quantkit.tied", "quantkit.recipe", "quantkit.version"]


def _mutate_json_text(text: str, draw) -> str:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.text(max_size=20))
    if choice == 1:
        return json.dumps(draw(json_values))
    try:
        value = json.loads(text)
    except ValueError:  # already mutated into non-JSON text
        return text[::-1]
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        if choice == 2:
            value[key] = draw(json_values)
        elif isinstance(value[key], dict) and value[key]:
            inner = draw(st.sampled_from(sorted(value[key])))
            value[key][inner] = draw(json_values)
    return json.dumps(value)


@FUZZ
@given(st.data())
def test_read_metadata_on_mutated_metadata(artifact_parts, data):
    from quantkit.cli import inspect_artifact
    from quantkit.io.artifact import read_metadata

    header, payload = artifact_parts
    header = json.loads(json.dumps(header))
    meta = header["__metadata__"]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(META_KEYS))
        if data.draw(st.booleans()) and key in meta:
            meta[key] = _mutate_json_text(meta[key], data.draw)
        elif data.draw(st.booleans()):
            meta.pop(key, None)
        else:
            meta[key] = data.draw(st.text(max_size=10))
    folder = Path(tempfile.mkdtemp())
    try:
        (folder / "model.safetensors").write_bytes(_with_header(json.dumps(header).encode(), payload))
        try:
            read_metadata(folder)
            inspect_artifact(folder)  # everything downstream of a header that validated
        except QuantkitError:
            pass
    finally:
        shutil.rmtree(folder)


@FEW
@given(st.one_of(st.text(max_size=40), json_values.map(json.dumps),
                 st.dictionaries(st.text(max_size=6), json_values, max_size=3).map(
                     lambda d: json.dumps({"weight_map": d}))))
def test_index_files(index_text):
    from quantkit.io.shards import INDEX_NAME, read_index

    folder = Path(tempfile.mkdtemp())
    try:
        (folder / INDEX_NAME).write_text(index_text)
        try:
            read_index(folder)
        except CheckpointError:
            pass
    finally:
        shutil.rmtree(folder)


# ----------------------------------------------------------------------------- recipes

pass_keys = st.sampled_from(["pass", "targets", "ignore", "blocksize", "double_quant"]) | st.text(max_size=6)
pass_values = st.sampled_from(["nf4", "fp4", "re:.*", "re:(", "re:a{4294967296}", "lm_head", 64, 3, True]) | json_values
recipe_dicts = st.fixed_dictionaries(
    {}, optional={"version": st.sampled_from([1, 2]) | json_values, "name": st.text(max_size=5) | json_values,
                  "description": json_values,
                  "passes": st.lists(st.dictionaries(pass_keys, pass_values | st.lists(pass_values, max_size=3),
                                                     max_size=5) | json_values, max_size=3) | json_values}
) | json_values


@FUZZ
@given(recipe_dicts)
def test_recipe_from_random_dicts(data):
    from quantkit.recipe import Recipe

    try:
        recipe = Recipe.from_dict(data, "fuzz")
    except RecipeError:
        return
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe  # what validates round-trips


@FEW
@given(st.text(alphabet=st.sampled_from(list("passe:nf4-[]{}:!&*?|>'\"#\n 0123456789.tTruefalse")), max_size=80)
       | st.sampled_from(["a: 2001-13-45", "a: !!float x", "[" * 5000, "? [a]\n: 1", "a: !!python/object:os.system x"]))
def test_recipe_from_random_yaml(text):
    from quantkit.recipe import Recipe

    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    f.write(text)
    f.close()
    try:
        Recipe.from_yaml(f.name)
    except RecipeError:
        pass
    finally:
        Path(f.name).unlink()
