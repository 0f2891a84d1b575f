#!/usr/bin/env python
"""CPU benchmark of the dualbin (DB-LLM, 2.5 bits/weight) kernel vs dense torch and our nf4 (not a test).

For each weight N x K and batch m it times (median of many calls after warmup), all fp32 x:
  dualbin     torch.ops.quantkit.dualbin_linear, group 64 (masked-add kernel; dequant+MKL above m=16)
  nf4         torch.ops.quantkit.lut4_linear, nf4, blocksize 64, double quant (our 4-bit kernel)
  torch fp32  F.linear on the dense fp32 weight
and prints a markdown table with the ratios measured in the same run and the effective GB/s of
weight bytes read by dualbin (planes + scales).

    python tools/bench_dualbin.py [--threads 2] [--shapes 4096x4096,576x1536] [--batches 1,4,16,32]
                                  [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from _report import bench, cpu_model, emit

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "576x576", "1536x576", "576x1536"]




def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of timing per cell (after 20 calls)")
    ap.add_argument("--markdown", default=None, help="append the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import quantkit._ops  # noqa: F401  (registers the ops)
    from quantkit import _C
    from quantkit.formats import dualbin, lut4

    rows = [f"dualbin CPU kernel ({_C.dualbin_cpu_isa()}) on {cpu_model()}, {args.threads} threads, "
            f"1-min load {os.getloadavg()[0]:.2f} at start; fp32 activations; ms per call (median)\n",
            "| N x K | m | dualbin ms | nf4 ms | torch fp32 ms | vs fp32 | vs nf4 | dualbin GB/s |",
            "|---|---|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        torch.manual_seed(0)
        w = torch.randn(n, k) * 0.02
        q = dualbin.quantize(w, 64, "absmax")
        l4 = lut4.quantize(w, "nf4", 64, True)
        dargs = (q.plane1, q.plane2, q.alpha1, q.alpha2, 64, n, k, None)
        largs = (l4.packed.view(-1), l4.absmax, l4.quant_map, 64, n, k, None, l4.nested_quant_map,
                 l4.nested_absmax, l4.state.nested_offset, 256)
        wbytes = sum(t.numel() * t.element_size() for t in (q.plane1, q.plane2, q.alpha1, q.alpha2))
        for m in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(m, k)
            t_db = bench(lambda: torch.ops.quantkit.dualbin_linear(x, *dargs), budget_s=args.budget, max_reps=1000)
            t_nf = bench(lambda: torch.ops.quantkit.lut4_linear(x, *largs), budget_s=args.budget)
            t_fp = bench(lambda: F.linear(x, w), budget_s=args.budget)
            rows.append(f"| {n}x{k} | {m} | {t_db * 1e3:.3f} | {t_nf * 1e3:.3f} | {t_fp * 1e3:.3f} | "
                        f"{t_fp / t_db:.2f}x | {t_nf / t_db:.2f}x | {wbytes / t_db / 1e9:.1f} |")
    rows.append(f"\n1-min load at end {os.getloadavg()[0]:.2f}")
    emit("\n".join(rows), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
