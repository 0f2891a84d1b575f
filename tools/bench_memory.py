#!/usr/bin/env python
"""Peak memory of `quantkit compress` on a model larger than we want to hold (not a test).

Builds a synthetic Llama-architecture checkpoint of about --size-gb on disk (random fp16
weights, std 0.02; Llama-2-7B layer shapes: hidden 4096, intermediate 11008, 32 heads,
vocab 32000, untied head), written shard by shard and tensor by tensor, so the generator
never holds more than one tensor. Then runs `python -m quantkit.cli compress` on it in a
subprocess and reports the subprocess's peak RSS (psutil polling every 20 ms, and the
kernel's ru_maxrss from getrusage(RUSAGE_CHILDREN)), wall time, input and output size,
as one markdown table row.

RSS counts resident pages of memory-mapped shard files too, so the number includes what
safetensors' mmap touches, not just Python/torch allocations.

The folder also gets a small byte-level BPE tokenizer (trained in a second on the shipped
calibration excerpt; its ids are < --vocab), so calibrated recipes run on it too: e.g.
``--recipe tools/recipes/bitstack-stream-bench.yaml`` (BitStack, proxy order) streams block
by block with the calibration activations carried between blocks.

    python tools/bench_memory.py [--size-gb 6.5] [--recipe nf4|PATH] [--workdir DIR] [--keep]
                                 [--hidden 4096] [--intermediate 11008] [--vocab 32000]

--workdir: where the checkpoint and output go (default: a new temporary folder); a
checkpoint already there with the same shape is reused. --keep: leave the files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def layer_tensors(i: int, h: int, inter: int) -> list:
    p = f"model.layers.{i}"
    return [(f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (h, h)),
            (f"{p}.self_attn.v_proj.weight", (h, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
            (f"{p}.mlp.down_proj.weight", (h, inter))]


def plan_model(size_gb: float, h: int, inter: int, vocab: int) -> tuple[int, list]:
    """(layers, [(name, shape)]) of an fp16 Llama of at least ``size_gb`` GB."""
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    outside = 2 * vocab * h + h
    layers = max(1, math.ceil((size_gb * 1e9 / 2 - outside) / per_layer))
    names = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        names += layer_tensors(i, h, inter)
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return layers, names


def build_checkpoint(folder: Path, layers: int, tensors: list, h: int, inter: int, vocab: int,
                     shard_bytes: int = 2_000_000_000) -> None:
    """config.json + fp16 shards + index, one tensor in memory at a time."""
    import torch
    from transformers import LlamaConfig

    from quantkit.io import shards

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=h // 128, num_key_value_heads=h // 128, max_position_embeddings=4096,
                tie_word_embeddings=False, dtype="float16").save_pretrained(folder)
    entries = [shards.TensorEntry(n, "F16", s, 2 * math.prod(s), None) for n, s in tensors]
    groups = shards.plan_shards(entries, shard_bytes)
    names = shards.shard_names(len(groups))
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for name, group in zip(names, groups):
        header = shards.header_bytes(group, {"format": "pt"})  # all F16: file order == this order
        with open(folder / name, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for e in group:
                if e.name.endswith("norm.weight"):
                    t = torch.ones(e.shape, dtype=torch.float16)
                else:
                    t = (torch.randn(e.shape, generator=gen) * 0.02).to(torch.float16)
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                del t
        weight_map.update({e.name: name for e in group})
        print(f"  wrote {name} ({(folder / name).stat().st_size / 1e9:.2f} GB)", file=sys.stderr, flush=True)
    if len(names) > 1:
        shards.write_json(folder / shards.INDEX_NAME,
                          {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map})


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE of at most ``vocab_size`` ids trained on the shipped calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from quantkit.models.text import default_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 2000), special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([default_text("calib")], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_and_watch(cmd: list, log: Path) -> tuple[int, float, int, int]:
    """(return code, wall seconds, peak RSS by polling, ru_maxrss bytes) of ``cmd``."""
    import psutil

    peak = 0
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
        ps = psutil.Process(proc.pid)
        stop = threading.Event()

        def poll():
            nonlocal peak
            while not stop.is_set():
                try:
                    rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                    peak = max(peak, rss)
                except psutil.Error:
                    pass
                stop.wait(0.02)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        code = proc.wait()
        stop.set()
        watcher.join()
    wall = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return code, wall, peak, maxrss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=6.5, help="checkpoint size on disk (default 6.5)")
    ap.add_argument("--recipe", default="nf4", help="recipe to compress with (default nf4)")
    ap.add_argument("--workdir", type=Path, help="folder for checkpoint and output (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoint and output when done")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="quantkit-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "model", work / f"model-{Path(args.recipe).stem}"
    layers, tensors = plan_model(args.size_gb, args.hidden, args.intermediate, args.vocab)
    shape_tag = {"layers": layers, "hidden": args.hidden, "intermediate": args.intermediate, "vocab": args.vocab}
    tag_file = src / "bench_shape.json"
    try:
        if not (tag_file.is_file() and json.loads(tag_file.read_text()) == shape_tag):
            shutil.rmtree(src, ignore_errors=True)
            print(f"building a {layers}-layer synthetic Llama in {src}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            build_checkpoint(src, layers, tensors, args.hidden, args.intermediate, args.vocab)
            tag_file.write_text(json.dumps(shape_tag))
            print(f"  built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if not (src / "tokenizer.json").is_file():
            write_tokenizer(src, args.vocab)
        shutil.rmtree(out, ignore_errors=True)
        in_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        cmd = [sys.executable, "-m", "quantkit.cli", "compress", str(src), "--recipe", args.recipe, "-o", str(out)]
        print("running: " + " ".join(cmd), file=sys.stderr, flush=True)
        code, wall, peak, maxrss = run_and_watch(cmd, work / "compress.log")
        if code:
            print((work / "compress.log").read_text()[-3000:], file=sys.stderr)
            print(f"compress failed with exit code {code}", file=sys.stderr)
            return 1
        out_bytes = folder_bytes(out)
        largest_block = 2 * (4 * args.hidden ** 2 + 3 * args.hidden * args.intermediate)  # fp16 on disk
        print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {layers} layers, hidden {args.hidden}, "
              f"intermediate {args.intermediate}, vocab {args.vocab}; largest block {largest_block / 1e9:.2f} GB "
              f"fp16 ({2 * largest_block / 1e9:.2f} GB as fp32)")
        print("| model (fp16, on disk) | recipe | output | peak RSS (polled) | ru_maxrss | wall |")
        print("|---|---|---|---|---|---|")
        print(f"| synthetic Llama {layers}x{args.hidden}, {in_bytes / 1e9:.2f} GB | {Path(args.recipe).stem} | "
              f"{out_bytes / 1e9:.2f} GB | {peak / 1e9:.2f} GB | {maxrss / 1e9:.2f} GB | {wall:.0f} s |")
        return 0
    finally:
        if not args.keep:
            if args.workdir:  # only what we made there
                for p in (src, out, work / "compress.log"):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            else:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
