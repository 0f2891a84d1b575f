"""The streaming safetensors writer, shard planning and the index reader (quantkit.io.shards)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantkit.errors import CheckpointError
from quantkit.io import shards
from quantkit.io.safetensors_check import validate_safetensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 7, generator=g),
        "b.codes": torch.randint(0, 255, (13, 1), dtype=torch.uint8, generator=g),
        "c.half": torch.randn(3, dtype=torch.bfloat16, generator=g),
        "d.flag": torch.tensor([True, False, True]),
        "e.empty": torch.zeros(0, 4),
        "f.scalar": torch.tensor(3.5, dtype=torch.float64),
        "g.idx": torch.arange(5, dtype=torch.int64),
        "h.f16": torch.randn(2, 3, dtype=torch.float16, generator=g),
    }


def test_writer_roundtrip_and_alignment(tmp_path):
    t = _tensors()
    path = tmp_path / "x.safetensors"
    digest = shards.write_safetensors(path, [shards.entry_from_tensor(k, v) for k, v in t.items()], {"k": "v"})
    header = validate_safetensors(path)  # tiles the data section exactly
    assert header["__metadata__"] == {"k": "v"}
    back = load_file(str(path))
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k
    for k, v in header.items():  # every tensor starts at a multiple of its element size
        if k != "__metadata__":
            assert v["data_offsets"][0] % t[k].element_size() == 0, k
    import hashlib
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0  # header padded to 8 bytes


def test_copy_from_another_file_is_byte_identical(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file(_tensors(), str(src))
    direct = tmp_path / "direct.safetensors"
    copied = tmp_path / "copied.safetensors"
    shards.write_safetensors(direct, [shards.entry_from_tensor(k, v) for k, v in _tensors().items()], {"m": "1"})
    shards.write_safetensors(copied, shards.entries_from_file(src), {"m": "1"})
    assert direct.read_bytes() == copied.read_bytes()


def test_plan_shards_keeps_order_and_limit():
    entries = [shards.entry_from_tensor(f"t{i}", torch.zeros(n, dtype=torch.uint8))
               for i, n in enumerate([40, 40, 30, 100, 5, 5])]
    groups = shards.plan_shards(entries, 80)
    assert [[e.name for e in g] for g in groups] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert shards.shard_names(1) == ["model.safetensors"]
    assert shards.shard_names(3)[2] == "model-00003-of-00003.safetensors"


def test_write_sharded_index_is_what_transformers_reads(tmp_path):
    t = {f"layer{i}.weight": torch.full((64,), float(i)) for i in range(5)}
    names = shards.write_sharded(tmp_path, [shards.entry_from_tensor(k, v) for k, v in t.items()], {"format": "pt"},
                                 max_shard_bytes=600)
    assert len(names) == 3 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / shards.INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 5 * 256
    weight_map, files = shards.read_index(tmp_path)
    assert set(weight_map) == set(t) and [f.name for f in files] == names
    for k, name in weight_map.items():
        with safe_open(str(tmp_path / name), "pt") as f:
            assert torch.equal(f.get_tensor(k), t[k])


def test_write_sharded_single_file_when_small(tmp_path):
    names = shards.write_sharded(tmp_path, [shards.entry_from_tensor("w", torch.zeros(4))], {"format": "pt"})
    assert names == ["model.safetensors"] and not (tmp_path / shards.INDEX_NAME).exists()


@pytest.mark.parametrize("index, fragment", [
    ("not json", "not a valid sharded-checkpoint index"),
    ('{"weight_map": []}', "not a valid sharded-checkpoint index"),
    ('{"weight_map": {"w": "../x.safetensors"}}', "bad shard file"),
    ('{"weight_map": {"w": 3}}', "bad shard file"),
    ('{"weight_map": {"w": "gone.safetensors"}}', "missing"),
])
def test_read_index_errors(tmp_path, index, fragment):
    (tmp_path / shards.INDEX_NAME).write_text(index)
    with pytest.raises(CheckpointError, match=fragment):
        shards.read_index(tmp_path)


def test_reserved_or_duplicate_names_are_refused(tmp_path):
    e = shards.entry_from_tensor("__metadata__", torch.zeros(1))
    with pytest.raises(ValueError):
        shards.write_safetensors(tmp_path / "x.safetensors", [e])
