#!/usr/bin/env python
"""CPU benchmark of the BitStack decode kernel (not a test).

For each weight m x n (out x in), number of loaded blocks b and batch rows t, times (median
of many calls after warmup):
  lookup     torch.ops.quantkit.bitstack_linear on the lookup-table path (no dense weight)
  rebuild    bitstack_dequantize (Ŵ = Σ S_i ⊙ u_i v_i, rebuilt every call, as the reference
             implementation's forward does) + F.linear
  dense fp32 F.linear on a dense fp32 weight of the same shape
  int8       the lookup path with int8 factors (factor_dtype "int8", format version 2), and
             its time over the fp16-factor lookup's
and prints a markdown table with the ratios measured in the same run. Blocks come from a
real decomposition (rank 16) of a random weight; the kernel's speed does not depend on values.

    python tools/bench_bitstack.py [--threads 2] [--shapes 576x576,1536x576] [--blocks 1,2,4,8]
                                   [--batches 1,4] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from _report import bench, cpu_model, emit

SHAPES = ["576x576", "1536x576", "576x1536", "192x576", "4096x4096"]




def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--blocks", default="1,2,4,8")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of timing per cell (default 0.5)")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    # the lookup path for every batch in the table (the op switches to rebuild above 4 rows)
    os.environ.setdefault("QUANTKIT_BITSTACK_GEMM_M", "64")
    import quantkit  # noqa: F401
    from quantkit import _C
    from quantkit.formats import bitstack

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    lines = [f"CPU: {cpu_model()}, {args.threads} threads, ISA {_C.bitstack_cpu_isa()}, 1-min load at start "
             f"{load:.2f}, rank {args.rank}; times in ms (median)", "",
             "| m x n | blocks | rows | lookup | rebuild + F.linear | dense fp32 | rebuild / lookup | dense / lookup "
             "| lookup, int8 factors | int8 / fp16 lookup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    max_b = max(int(b) for b in args.blocks.split(","))
    for shape in args.shapes.split(","):
        m, n = map(int, shape.split("x"))
        torch.manual_seed(0)
        w = torch.randn(m, n)
        q = bitstack.quantize(w, max_b, args.rank, svd="lowrank")
        q8 = bitstack.quantize(w, max_b, args.rank, svd="lowrank", factor_dtype="int8")
        dense = torch.randn(m, n)
        for b in map(int, args.blocks.split(",")):
            p = q.prefix(b)
            signs, u, v = p.signs.contiguous(), p.u.contiguous(), p.v.contiguous()
            p8 = q8.prefix(b)
            s8, u8, v8, sc8 = p8.signs.contiguous(), p8.u.contiguous(), p8.v.contiguous(), p8.scale.contiguous()
            for t in map(int, args.batches.split(",")):
                x = torch.randn(t, n)
                t_lookup = bench(lambda: torch.ops.quantkit.bitstack_linear(x, signs, u, v, None), budget_s=args.budget)
                t_rebuild = bench(lambda: F.linear(x, torch.ops.quantkit.bitstack_dequantize(signs, u, v)),
                                  budget_s=args.budget)
                t_dense = bench(lambda: F.linear(x, dense), budget_s=args.budget)
                t_int8 = bench(lambda: torch.ops.quantkit.bitstack_linear(x, s8, u8, v8, None, sc8),
                               budget_s=args.budget)
                lines.append(f"| {shape} | {b} | {t} | {t_lookup * 1e3:.3f} | {t_rebuild * 1e3:.3f} | "
                             f"{t_dense * 1e3:.3f} | {t_rebuild / t_lookup:.2f}x | {t_dense / t_lookup:.2f}x | "
                             f"{t_int8 * 1e3:.3f} | {t_int8 / t_lookup:.2f}x |")
                print(lines[-1], file=sys.stderr, flush=True)
    lines.append("")
    lines.append(f"1-min load at end {os.getloadavg()[0]:.2f}")
    emit("\n".join(lines), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
