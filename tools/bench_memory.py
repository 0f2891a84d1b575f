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
                                 [--layers N] [--dtype float16|float32] [--max-shard-size SIZE]
                                 [--timeline FILE]

--workdir: where the checkpoint and output go (default: a new temporary folder); a
checkpoint already there with the same shape is reused. --keep: leave the files.
--layers: that many decoder layers (instead of what --size-gb gives). --dtype: the
checkpoint's dtype (default float16). --max-shard-size: passed to ``quantkit compress``
(default: its own, 2GB). --timeline: write every sample (seconds, RssAnon, RSS) as CSV.

Besides RSS, the peak of RssAnon (anonymous memory: heap, torch tensors, Python objects;
from /proc/PID/status, polled every 20 ms with VmRSS) is reported: unlike RSS it does not
count resident pages of memory-mapped files (the shards read, the unit files copied),
which the kernel can drop at any time.
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
from typing import Optional

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


DTYPES = {"float16": ("F16", 2), "float32": ("F32", 4)}


def plan_model(size_gb: float, h: int, inter: int, vocab: int, layers: int = 0,
               itemsize: int = 2) -> tuple[int, list]:
    """(layers, [(name, shape)]) of a Llama of at least ``size_gb`` GB with ``itemsize``-byte
    weights, or of exactly ``layers`` layers if given."""
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    outside = 2 * vocab * h + h
    if not layers:
        layers = max(1, math.ceil((size_gb * 1e9 / itemsize - outside) / per_layer))
    names = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        names += layer_tensors(i, h, inter)
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return layers, names


def build_checkpoint(folder: Path, layers: int, tensors: list, h: int, inter: int, vocab: int,
                     shard_bytes: int = 2_000_000_000, dtype: str = "float16") -> None:
    """config.json + shards (fp16 or fp32) + index, one tensor in memory at a time."""
    import torch
    from transformers import LlamaConfig

    from quantkit.io import shards

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=h // 128, num_key_value_heads=h // 128, max_position_embeddings=4096,
                tie_word_embeddings=False, dtype=dtype).save_pretrained(folder)
    st_name, itemsize = DTYPES[dtype]
    torch_dtype = getattr(torch, dtype)
    entries = [shards.TensorEntry(n, st_name, s, itemsize * math.prod(s), None) for n, s in tensors]
    groups = shards.plan_shards(entries, shard_bytes)
    names = shards.shard_names(len(groups))
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for name, group in zip(names, groups):
        header = shards.header_bytes(group, {"format": "pt"})  # one dtype: file order == this order
        with open(folder / name, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for e in group:
                if e.name.endswith("norm.weight"):
                    t = torch.ones(e.shape, dtype=torch_dtype)
                else:
                    t = (torch.randn(e.shape, generator=gen) * 0.02).to(torch_dtype)
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


def proc_status_bytes(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) of ``pid`` in bytes, from /proc/PID/status ((0, 0) if unreadable)."""
    anon = rss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return anon, rss


def run_and_watch(cmd: list, log: Path, timeline: Optional[Path] = None) -> tuple[int, float, int, int, int, dict]:
    """(return code, wall seconds, peak RSS by polling, ru_maxrss bytes, peak RssAnon by
    polling, {"user", "sys" CPU seconds, "minflt" minor page faults}) of ``cmd``; with
    ``timeline``, every sample goes there as CSV."""
    import psutil

    peak = peak_anon = 0
    samples: list = []
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
        ps = psutil.Process(proc.pid)
        stop = threading.Event()

        def poll():
            nonlocal peak, peak_anon
            while not stop.is_set():
                try:
                    procs = [ps] + ps.children(recursive=True)
                    rss = sum(p.memory_info().rss for p in procs)
                    peak = max(peak, rss)
                    anon = sum(proc_status_bytes(p.pid)[0] for p in procs)
                    peak_anon = max(peak_anon, anon)
                    if timeline is not None:
                        samples.append((time.perf_counter() - t0, anon, rss))
                except psutil.Error:
                    pass
                stop.wait(0.02)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        code = proc.wait()
        stop.set()
        watcher.join()
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # (only this child has been waited for)
    maxrss = usage.ru_maxrss * 1024  # KiB on Linux
    cpu = {"user": usage.ru_utime, "sys": usage.ru_stime, "minflt": usage.ru_minflt}
    if timeline is not None:
        with open(timeline, "w") as f:
            f.write("seconds,rss_anon_bytes,rss_bytes\n")
            f.writelines(f"{t:.3f},{a},{r}\n" for t, a, r in samples)
    return code, wall, peak, maxrss, peak_anon, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=6.5, help="checkpoint size on disk (default 6.5)")
    ap.add_argument("--recipe", default="nf4", help="recipe to compress with (default nf4)")
    ap.add_argument("--workdir", type=Path, help="folder for checkpoint and output (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoint and output when done")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers", type=int, default=0, help="number of decoder layers (overrides --size-gb)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="checkpoint dtype (default float16)")
    ap.add_argument("--max-shard-size", metavar="SIZE", help="passed to quantkit compress (default: its 2GB)")
    ap.add_argument("--timeline", type=Path, help="write every memory sample (s, RssAnon, RSS) to this CSV")
    args = ap.parse_args()
    st_name, itemsize = DTYPES[args.dtype]

    work = args.workdir or Path(tempfile.mkdtemp(prefix="quantkit-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "model", work / f"model-{Path(args.recipe).stem}"
    layers, tensors = plan_model(args.size_gb, args.hidden, args.intermediate, args.vocab, args.layers, itemsize)
    shape_tag = {"layers": layers, "hidden": args.hidden, "intermediate": args.intermediate, "vocab": args.vocab}
    if args.dtype != "float16":  # (fp16 tags as before, so existing checkpoints are reused)
        shape_tag["dtype"] = args.dtype
    tag_file = src / "bench_shape.json"
    try:
        if not (tag_file.is_file() and json.loads(tag_file.read_text()) == shape_tag):
            shutil.rmtree(src, ignore_errors=True)
            print(f"building a {layers}-layer synthetic Llama in {src}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            build_checkpoint(src, layers, tensors, args.hidden, args.intermediate, args.vocab, dtype=args.dtype)
            tag_file.write_text(json.dumps(shape_tag))
            print(f"  built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if not (src / "tokenizer.json").is_file():
            write_tokenizer(src, args.vocab)
        shutil.rmtree(out, ignore_errors=True)
        in_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        cmd = [sys.executable, "-m", "quantkit.cli", "compress", str(src), "--recipe", args.recipe, "-o", str(out)]
        if args.max_shard_size:
            cmd += ["--max-shard-size", args.max_shard_size]
        print("running: " + " ".join(cmd), file=sys.stderr, flush=True)
        code, wall, peak, maxrss, peak_anon, cpu = run_and_watch(cmd, work / "compress.log", args.timeline)
        if code:
            print((work / "compress.log").read_text()[-3000:], file=sys.stderr)
            print(f"compress failed with exit code {code}", file=sys.stderr)
            return 1
        out_bytes = folder_bytes(out)
        block_params = 4 * args.hidden ** 2 + 3 * args.hidden * args.intermediate + 2 * args.hidden
        gib = 2 ** 30
        print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {layers} layers, hidden {args.hidden}, "
              f"intermediate {args.intermediate}, vocab {args.vocab}; largest block "
              f"{itemsize * block_params / 1e9:.3f} GB {args.dtype} on disk ({4 * block_params / 1e9:.3f} GB as fp32); "
              f"--max-shard-size {args.max_shard_size or 'default'}")
        if args.dtype == "float16":  # the table as before
            print("| model (fp16, on disk) | recipe | output | peak RSS (polled) | ru_maxrss | wall |")
            print("|---|---|---|---|---|---|")
            print(f"| synthetic Llama {layers}x{args.hidden}, {in_bytes / 1e9:.2f} GB | {Path(args.recipe).stem} | "
                  f"{out_bytes / 1e9:.2f} GB | {peak / 1e9:.2f} GB | {maxrss / 1e9:.2f} GB | {wall:.0f} s |")
        print(f"| blocks | model ({args.dtype}, on disk) | recipe | output | peak RssAnon | peak RSS | ru_maxrss "
              f"| wall | CPU user + sys | minor faults |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {layers} | {in_bytes / gib:.2f} GiB | {Path(args.recipe).stem} | {out_bytes / gib:.2f} GiB | "
              f"{peak_anon / gib:.3f} GiB | {peak / gib:.3f} GiB | {maxrss / gib:.3f} GiB | {wall:.0f} s | "
              f"{cpu['user']:.0f} + {cpu['sys']:.0f} s | {cpu['minflt'] / 1e6:.2f} M |")
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
