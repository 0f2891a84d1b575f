"""Print the demo table: bits/weight, size, perplexity and decode speed of models/artifacts.

usage: python tools/demo_report.py MODEL_OR_OUT [MODEL_OR_OUT ...] [--max-tokens N] [--markdown FILE]

Each argument is anything `quantkit eval` accepts (smollm2-135m, an HF folder, a .gguf, or
a quantkit artifact). All rows use the same text (quantkit's shipped eval excerpt), the same
windows and the same thread count, so they compare directly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import quantkit
from _report import cpu_model, emit
from quantkit.cli import inspect_artifact
from quantkit.eval.perplexity import perplexity
from quantkit.eval.speed import decode_speed
from quantkit.models.text import default_text


def describe(spec: str, args) -> dict:
    t0 = time.perf_counter()
    model = quantkit.load_model(spec)
    load_s = time.perf_counter() - t0
    tok = model._quantkit_tokenizer
    path = Path(spec)
    if path.is_dir() and (path / "model.safetensors").exists() and _is_artifact(path):
        s = inspect_artifact(path)
        recipe = (s["recipe"] or {}).get("name", "?")
        bits = f"{s['bits_per_weight_packed']:.3f}"
        size_mb = s["file_bytes"] / 1e6
    else:
        recipe = "none (fp32)"
        n = sum(p.numel() for p in model.parameters())
        bits = "32"
        size_mb = n * 4 / 1e6
    text = default_text("eval")
    ppl = perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.max_tokens, progress=True)
    fp32_speed = decode_speed(model, tok, new_tokens=args.new_tokens).tokens_per_s
    bf16_speed = decode_speed(model.to(torch.bfloat16), tok, new_tokens=args.new_tokens).tokens_per_s
    return {"model": spec, "recipe": recipe, "bits": bits, "size_mb": size_mb, "ppl": ppl.ppl,
            "tokens": ppl.n_tokens, "tps_fp32": fp32_speed, "tps_bf16": bf16_speed, "load_s": load_s}


def _is_artifact(path: Path) -> bool:
    try:
        quantkit.io.artifact.read_metadata(path)
        return True
    except quantkit.QuantkitError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", help="append the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [describe(m, args) for m in args.models]
    header = ("| model | recipe | bits/weight (quantized layers) | size (MB) | perplexity | "
              "decode tok/s fp32 act | decode tok/s bf16 act |")
    lines = [header, "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['model']} | {r['recipe']} | {r['bits']} | {r['size_mb']:.1f} | {r['ppl']:.3f} | "
                     f"{r['tps_fp32']:.1f} | {r['tps_bf16']:.1f} |")
    cpu = cpu_model()
    foot = (f"\n{rows[0]['tokens']} eval tokens (shipped Python-docs excerpt), seq_len {args.seq_len}; "
            f"{args.new_tokens} greedy new tokens (quantkit runtime, `generate`'s default engine: the lean forward for Llama-family models; decode steps timed); "
            f"{torch.get_num_threads()} threads; {cpu}; torch {torch.__version__}; "
            f"kernels: {quantkit._ops.native_status()}")
    table = "\n".join(lines) + foot
    emit(table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
