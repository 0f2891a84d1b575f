#!/usr/bin/env python
"""CPU benchmark of quantkit's int-k intk_linear (QAT's packed format) vs dense torch (not a test).

For each weight N x K, bit width and batch m it times (median of many calls after warmup):
  ours       torch.ops.quantkit.intk_linear with the native CPU kernel (fp32 x)
  reference  the pure-torch reference of the same op (what runs without quantkit._C)
  torch fp32 F.linear on the dense fp32 weight
  torch bf16 F.linear on the dense bf16 weight (bf16 x): the bytes/s roof we compare against
  nf4        our lut4_linear on the same shape (nf4, block 64, double quant; fp32 x)
and prints a markdown table with the ratios measured in the same run, plus the 1-minute load
average before and after (the machine is shared; compare rows of one run only).

    python tools/bench_intk.py [--threads 2] [--shapes 4096x4096,576x1536] [--bits 2,4,8]
                               [--batches 1,8,64] [--markdown FILE]
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
from quantkit.formats import intk  # noqa: E402




def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="4096x4096,576x1536")
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per cell")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not ops.has_native_cpu_kernel("intk_linear"):
        print(f"no native int-k kernel: {ops.native_status()}", file=sys.stderr)
        return 1
    load0 = os.getloadavg()[0]
    lines = [f"int-k linear, {cpu_model()}, {args.threads} threads, torch {torch.__version__}",
             "", "| N x K | bits | m | ours ms | reference ms | torch fp32 ms | torch bf16 ms | nf4 ms | ours vs reference "
             "| ours vs fp32 | ours vs nf4 | ours GB/s | bf16 GB/s | ours % of bf16 GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k)
        wb = w.to(torch.bfloat16)
        from quantkit.formats import lut4

        nq = lut4.quantize(w, "nf4", 64, True)
        nargs = (nq.packed, nq.absmax, nq.quant_map, 64, n, k, None, nq.nested_quant_map, nq.nested_absmax,
                 nq.state.nested_offset, 256)
        for bits in (int(b) for b in args.bits.split(",")):
            g = torch.Generator().manual_seed(bits)
            grid, offset = ("sign", 0.5) if bits == 1 else ("lsq", float(2 ** (bits - 1)))
            q = intk.from_codes(torch.randint(0, 2**bits, (n, k), generator=g), torch.rand(n) * 0.01 + 1e-3, bits,
                                offset, grid)
            wargs = (q.packed, q.scale, bits, q.state.offset, n, k, None)
            for m in (int(b) for b in args.batches.split(",")):
                x = torch.randn(m, k)
                t_ours = bench(lambda: torch.ops.quantkit.intk_linear(x, *wargs), budget_s=args.budget)
                t_ref = bench(lambda: ops.intk_linear_reference(x, *wargs), min_reps=3, budget_s=args.budget)
                t_fp = bench(lambda: F.linear(x, w), budget_s=args.budget)
                xb = x.to(torch.bfloat16)
                t_bf = bench(lambda: F.linear(xb, wb), budget_s=args.budget)
                t_nf4 = bench(lambda: torch.ops.quantkit.lut4_linear(x, *nargs), budget_s=args.budget)
                gbs = (q.packed.numel() + 4 * n) / t_ours / 1e9  # codes + fp32 row scales
                gbs_bf = 2 * n * k / t_bf / 1e9
                lines.append(f"| {n}x{k} | {bits} | {m} | {t_ours * 1e3:.3f} | {t_ref * 1e3:.2f} | {t_fp * 1e3:.3f} "
                             f"| {t_bf * 1e3:.3f} | {t_nf4 * 1e3:.3f} | {t_ref / t_ours:.1f}x | {t_fp / t_ours:.2f}x "
                             f"| {t_nf4 / t_ours:.2f}x | {gbs:.1f} | {gbs_bf:.1f} | {100 * gbs / gbs_bf:.0f}% |")
    lines.append("")
    lines.append(f"1-min load average: {load0:.2f} before, {os.getloadavg()[0]:.2f} after")
    emit("\n".join(lines), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
