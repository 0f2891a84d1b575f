"""validate_safetensors: header-only checks, each failure a CheckpointError naming the file."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from quantkit.errors import CheckpointError
from quantkit.io.safetensors_check import MAX_HEADER_BYTES, validate_safetensors


def _raw(path, header, data=b"", length=None):
    """Write a safetensors-shaped file from a header (dict, or raw bytes) and data bytes."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    n = len(blob) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def _entry(dtype="F32", shape=(2, 3), offsets=(0, 24)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _expect(path, *fragments):
    with pytest.raises(CheckpointError) as exc:
        validate_safetensors(path)
    msg = str(exc.value)
    assert str(path) in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_valid_file_roundtrip(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(4, 8), "b": torch.ones(3, dtype=torch.bfloat16),
               "c": torch.zeros(0, 5, dtype=torch.int8)}, str(path), metadata={"k": "v"})
    header = validate_safetensors(path)
    assert header["__metadata__"] == {"k": "v"}
    assert header["a"] == {"dtype": "F32", "shape": [4, 8], "data_offsets": header["a"]["data_offsets"]}
    assert header["b"]["dtype"] == "BF16" and header["c"]["shape"] == [0, 5]
    assert set(header) == {"__metadata__", "a", "b", "c"}


def test_valid_handwritten_without_metadata(tmp_path):
    path = _raw(tmp_path / "x.safetensors", {"w": _entry()}, bytes(24))
    assert validate_safetensors(path) == {"w": _entry()}


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.safetensors", "cannot be read")


def test_shorter_than_8_bytes(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    _expect(path, "3 bytes")


def test_header_length_larger_than_file(tmp_path):
    path = _raw(tmp_path / "h.safetensors", {"w": _entry()}, bytes(24), length=10_000)
    _expect(path, "header length 10000")


def test_hostile_header_length_is_capped(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    _expect(path, str(MAX_HEADER_BYTES))


def test_header_not_utf8(tmp_path):
    _expect(_raw(tmp_path / "u.safetensors", b'{"\xff\xfe": 1}'), "UTF-8")


def test_header_not_json(tmp_path):
    _expect(_raw(tmp_path / "j.safetensors", b'{"w": [1, 2'), "not valid JSON")


def test_header_not_object(tmp_path):
    _expect(_raw(tmp_path / "l.safetensors", b"[1, 2, 3]"), "not an object")


def test_metadata_not_strings(tmp_path):
    _expect(_raw(tmp_path / "m.safetensors", {"__metadata__": {"a": 1}}), "__metadata__")


def test_entry_missing_keys(tmp_path):
    _expect(_raw(tmp_path / "k.safetensors", {"w": {"dtype": "F32"}}), "'w'", "shape", "data_offsets")


def test_unknown_dtype(tmp_path):
    _expect(_raw(tmp_path / "d.safetensors", {"w": _entry(dtype="F13")}, bytes(24)), "'w'", "F13")


@pytest.mark.parametrize("shape", [[2, -3], "2x3", [2, 3.0], [True, 3]])
def test_bad_shape(tmp_path, shape):
    entry = {"dtype": "F32", "shape": shape, "data_offsets": [0, 24]}
    _expect(_raw(tmp_path / "s.safetensors", {"w": entry}, bytes(24)), "'w'", "shape")


@pytest.mark.parametrize("offsets", [[0], [0, 24, 48], ["0", "24"], [-24, 0], [24, 0]])
def test_bad_data_offsets(tmp_path, offsets):
    entry = {"dtype": "F32", "shape": [2, 3], "data_offsets": offsets}
    _expect(_raw(tmp_path / "o.safetensors", {"w": entry}, bytes(24)), "'w'", "data_offsets")


def test_size_does_not_match_shape(tmp_path):
    path = _raw(tmp_path / "n.safetensors", {"w": _entry(offsets=(0, 20))}, bytes(20))
    _expect(path, "'w'", "20 bytes", "needs 24")


def test_overlapping_tensors(tmp_path):
    header = {"a": _entry(offsets=(0, 24)), "b": _entry(offsets=(16, 40))}
    _expect(_raw(tmp_path / "ov.safetensors", header, bytes(40)), "overlap", "'a'", "'b'")


def test_gap_between_tensors(tmp_path):
    header = {"a": _entry(offsets=(0, 24)), "b": _entry(offsets=(32, 56))}
    _expect(_raw(tmp_path / "gap.safetensors", header, bytes(56)), "unused bytes", "'b'")


def test_offsets_beyond_data_section(tmp_path):
    header = {"a": _entry(offsets=(0, 24)), "b": _entry(offsets=(24, 48))}
    _expect(_raw(tmp_path / "beyond.safetensors", header, bytes(30)), "truncated", "48")


def test_truncated_real_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    _expect(path, "truncated")


def test_trailing_bytes_rejected_like_safetensors(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "tail.safetensors"
    save_file({"a": torch.randn(8)}, str(path))
    path.write_bytes(path.read_bytes() + b"junk")
    _expect(path, "after the last tensor")
    with pytest.raises(Exception):  # the library itself refuses such a file too
        with safe_open(str(path), framework="pt") as f:
            f.get_tensor("a")
