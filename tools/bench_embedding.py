#!/usr/bin/env python
"""CPU benchmark of the packed embedding lookup and the packed output head (not a test).

For each table V x D (SmolLM2-135M 49152x576, Gemma-3-270M 262144x640 by default) it
times, median of many calls after warm-up, in one run:
  lookup   ids of T tokens -> rows: F.embedding on the fp32 table (what the model did before)
           vs torch.ops.quantkit.intk_embedding (int8) and lut4_embedding (nf4), native kernels,
           vs "dequantize all + gather" (what a lookup without a row kernel would cost)
  head     x [m, D] @ table.T at m = 1 (decode) and m = 64: F.linear fp32 vs the int8 and nf4
           packed heads (intk_linear / lut4_linear)
and prints a markdown table with the ratios measured in the same run and the 1-minute load
average before and after (compare rows of one run only on a shared machine).

    python tools/bench_embedding.py [--threads 2] [--tables 49152x576,262144x640] [--tokens 1,512]
                                    [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import quantkit._ops as ops  # noqa: E402
from _report import bench, cpu_model, emit  # noqa: E402
from quantkit.formats import intk, lut4  # noqa: E402


def _tables(v: int, d: int):
    w = torch.randn(v, d) * 0.02
    q8 = intk.quantize_rows(w, 8)
    q4 = lut4.quantize(w, "nf4", 64, True)
    a8 = (q8.packed, q8.scale, 8, q8.state.offset, v, d)
    a4 = (q4.packed.reshape(-1), q4.absmax, q4.quant_map, 64, v, d, q4.nested_quant_map, q4.nested_absmax,
          float(q4.state.nested_offset), 256)
    return w, a8, a4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tables", default="49152x576,262144x640")
    ap.add_argument("--tokens", default="1,512", help="lookup sizes (tokens per call)")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per cell")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not ops.has_native_cpu_kernel("intk_embedding"):
        print(f"native kernels not loaded ({ops.native_status()}); timing the references", file=sys.stderr)
    load0 = os.getloadavg()[0]
    rows = ["| table | what | n | fp32 (ms) | int8 (ms) | nf4 (ms) | int8 vs fp32 | nf4 vs fp32 |",
            "|---|---|---|---|---|---|---|---|"]
    for spec in args.tables.split(","):
        v, d = map(int, spec.split("x"))
        w, a8, a4 = _tables(v, d)
        for t in map(int, args.tokens.split(",")):
            ids = torch.randint(0, v, (1, t))
            f = bench(lambda: F.embedding(ids, w), budget_s=args.budget)
            i8 = bench(lambda: torch.ops.quantkit.intk_embedding(ids, *a8), budget_s=args.budget)
            n4 = bench(lambda: torch.ops.quantkit.lut4_embedding(ids, *a4), budget_s=args.budget)
            rows.append(f"| {v}x{d} | lookup | {t} tokens | {f * 1e3:.3f} | {i8 * 1e3:.3f} | {n4 * 1e3:.3f} | "
                        f"{f / i8:.2f}x | {f / n4:.2f}x |")
        full8 = bench(lambda: torch.ops.quantkit.intk_dequantize(*a8)[ids], min_reps=3, budget_s=args.budget)
        rows.append(f"| {v}x{d} | dequantize all + gather (int8) | {ids.numel()} tokens | | {full8 * 1e3:.3f} | | | |")
        for m in (1, 64):
            x = torch.randn(m, d)
            f = bench(lambda: F.linear(x, w), budget_s=args.budget)
            i8 = bench(lambda: torch.ops.quantkit.intk_linear(x, *a8[:4], v, d, None), budget_s=args.budget)
            n4 = bench(lambda: torch.ops.quantkit.lut4_linear(x, a4[0], a4[1], a4[2], 64, v, d, None, *a4[6:]),
                       budget_s=args.budget)
            rows.append(f"| {v}x{d} | head x @ W.T | m={m} | {f * 1e3:.3f} | {i8 * 1e3:.3f} | {n4 * 1e3:.3f} | "
                        f"{f / i8:.2f}x | {f / n4:.2f}x |")
    head = (f"\n{cpu_model()}, {args.threads} threads, torch {torch.__version__}, {ops.native_status()}; "
            f"1-min load {load0:.1f} -> {os.getloadavg()[0]:.1f}\n")
    emit(head + "\n".join(rows) + "\n", args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
