"""Streaming compress holds the same memory after every block (issue #20, part 3): no
tensor, and no resident heap, left behind by one block adds up over the next ones.

Not timing tests: each compresses an 8-block fp32 Llama, records what is alive right after
each block (``_process_unit`` wrapped) and compares block k with block 2: the live CPU
tensors and their bytes (in process), and RssAnon (in a fresh interpreter).
"""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantkit import streaming

N_BLOCKS = 8
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def eight_block_dir(tmp_path_factory):
    """An 8-block fp32 Llama (hidden 768, intermediate 2048: 28 MB per block, linears of
    2.25 and 6 MiB, large enough for glibc to serve the quantizers' temporaries from its
    heap), one file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("eight-blocks")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=768, intermediate_size=2048, num_hidden_layers=N_BLOCKS,
                      num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=128,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _live_cpu_tensors() -> tuple[int, int]:
    """(number of gc-visible CPU tensors, bytes of their distinct storages)."""
    import warnings

    gc.collect()
    count, storages = 0, {}
    with warnings.catch_warnings():  # isinstance() on torch's deprecated module proxies warns
        warnings.simplefilter("ignore", FutureWarning)
        objects = gc.get_objects()
        tensors = [o for o in objects if isinstance(o, torch.Tensor)]
    del objects
    for obj in tensors:
        try:
            if obj.device.type != "cpu":
                continue
            s = obj.untyped_storage()
            ptr, nbytes = s.data_ptr(), s.nbytes()
        except Exception:  # noqa: BLE001 -- tensor subclasses (FakeTensor left by opcheck) refuse storage access
            continue
        count += 1
        storages[ptr] = nbytes
    return count, sum(storages.values())


def _compress_probing(src, out, monkeypatch, probe) -> dict:
    """Compress ``src`` with nf4 block by block; {block index: probe()} right after each block."""
    seen = {}
    process = streaming._process_unit

    def wrapped(plan, recipe, index, *args, **kwargs):
        entry = process(plan, recipe, index, *args, **kwargs)
        unit = plan.units[index]
        if unit.is_block:
            seen[int(unit.name.rsplit(".", 1)[1])] = probe()
        return entry

    monkeypatch.setattr(streaming, "_process_unit", wrapped)
    streaming.compress_to_dir(src, "nf4", out, progress=False, max_shard_bytes=20_000_000)
    assert sorted(seen) == list(range(N_BLOCKS))
    return seen


def test_live_tensors_do_not_grow_with_blocks(eight_block_dir, tmp_path, monkeypatch):
    """After block k exactly the tensors alive after block 2 are alive: nothing of a block
    (its read tensors, packed weights, state dict, tie map) outlives it."""
    seen = _compress_probing(eight_block_dir, tmp_path / "out", monkeypatch, _live_cpu_tensors)
    count2, bytes2 = seen[2]
    block_bytes = 4 * (4 * 768 * 768 + 3 * 768 * 2048)
    assert bytes2 < block_bytes / 4, seen  # (and no block is still held after it is written)
    for k in range(3, N_BLOCKS):
        count, nbytes = seen[k]
        assert count <= count2 + 2 and nbytes <= bytes2 + 64 * 1024, (k, seen)


_PROBE_RSS_ANON = """
import json, sys
from quantkit import streaming

def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

seen = {}
process = streaming._process_unit

def wrapped(plan, recipe, index, *args, **kwargs):
    entry = process(plan, recipe, index, *args, **kwargs)
    if plan.units[index].is_block:
        seen[int(plan.units[index].name.rsplit(".", 1)[1])] = rss_anon()
    return entry

streaming._process_unit = wrapped
streaming.compress_to_dir(sys.argv[1], "nf4", sys.argv[2], progress=False, max_shard_bytes=20_000_000)
print(json.dumps(seen))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status")
def test_resident_heap_does_not_grow_with_blocks(eight_block_dir, tmp_path):
    """Anonymous resident memory after block k is what it was after block 2 (within 2 MiB):
    freed heap memory is given back after each unit (``heap.return_freed_memory``), so it does
    not pile up block after block. Run in a fresh interpreter, so the heap's history is the
    compress alone (without the fix it grew by ~24 MiB from block 2 to block 7 here)."""
    run = subprocess.run([sys.executable, "-c", _PROBE_RSS_ANON, str(eight_block_dir), str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    seen = {int(k): v for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}
    assert sorted(seen) == list(range(N_BLOCKS))
    growth = {k: round((seen[k] - seen[2]) / 2**20, 1) for k in range(3, N_BLOCKS)}
    assert max(growth.values()) < 2.0, f"RssAnon after block k minus after block 2, MiB: {growth}"


def test_cli_compress_serves_large_allocations_by_mmap(monkeypatch, tiny_llama_dir, tmp_path):
    """``quantkit compress`` fixes glibc's mmap threshold before anything large is allocated
    (quantkit/heap.py); QUANTKIT_MMAP_THRESHOLD=0 leaves the allocator alone."""
    from quantkit import heap
    from quantkit.cli import main

    calls = []
    real = heap.use_mmap_for_large_allocations
    monkeypatch.setattr(heap, "use_mmap_for_large_allocations", lambda *a: calls.append(a) or 0)
    assert main(["compress", str(tiny_llama_dir), "--recipe", "nf4", "-o", str(tmp_path / "o"), "--quiet"]) == 0
    assert calls == [()]
    monkeypatch.setenv(heap.THRESHOLD_ENV, "0")
    assert real() == 0
    monkeypatch.setenv(heap.THRESHOLD_ENV, "")
    if sys.platform.startswith("linux"):  # glibc accepts it (in a child: the setting lasts for the process)
        code = "from quantkit import heap; print(heap.use_mmap_for_large_allocations(8 << 20))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert out.stdout.strip() == str(8 << 20), out.stderr[-2000:]
