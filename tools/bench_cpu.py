#!/usr/bin/env python
"""CPU benchmark of quantkit's nf4 lut4_linear vs dense torch and bitsandbytes (not a test).

For each weight N x K and batch m it times (median of many calls after warmup):
  ours bf16 / ours fp32   torch.ops.quantkit.lut4_linear, nf4, blocksize 64, double quant
  torch fp32 / torch bf16 F.linear on the dense weight
  bnb bf16                bitsandbytes.matmul_4bit on CPU (same nf4 / 64 / double-quant config)
and prints a markdown table with speedups measured in the same run, the effective GB/s of
weight bytes (packed + scales for ours, 2*N*K for dense bf16) and our share of dense bf16's.

    python tools/bench_cpu.py [--quick] [--threads 2] [--shapes 4096x4096,576x576]
                              [--batches 1,8,32] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from _report import bench, cpu_model

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "576x576", "1536x576", "576x1536", "192x576"]
QUICK_SHAPES = ["4096x4096", "576x1536"]


def fmt_ms(t):
    return "n/a" if t is None else f"{t * 1e3:.3f}"


def ratio(other, ours):
    return "n/a" if other is None or ours is None else f"{other / ours:.2f}x"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--shapes", default=None, help="comma list of NxK (default: all, or the quick set)")
    ap.add_argument("--batches", default="1,8,32", help="comma list of batch sizes m (default 1,8,32)")
    ap.add_argument("--quick", action="store_true", help="two shapes, shorter timing budget")
    ap.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    ap.add_argument("--markdown", default=None, help="append the table to this file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    import quantkit._ops as ops
    from quantkit.formats import lut4

    shapes = (args.shapes.split(",") if args.shapes else (QUICK_SHAPES if args.quick else SHAPES))
    batches = [int(b) for b in args.batches.split(",")]
    budget = 0.3 if args.quick else 1.0
    min_reps = 10 if args.quick else 30

    bnb = bnbF = None
    if not args.no_bnb:
        try:
            import bitsandbytes as bnb  # noqa: F811
            import bitsandbytes.functional as bnbF  # noqa: F811
        except Exception as e:  # pragma: no cover - optional
            print(f"(bitsandbytes unavailable: {e})", file=sys.stderr)
            bnb = None

    isa = "n/a"
    if ops.NATIVE_AVAILABLE:
        from quantkit import _C
        isa = _C.cpu_isa()
    header = [
        f"CPU: {cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"quantkit kernels: {ops.native_status()} [{isa}]"
        + (f"; bitsandbytes {bnb.__version__}" if bnb is not None else ""),
        "",
        "nf4, blocksize 64, double quant. Times are medians in ms. Speedups are other/ours "
        "(ours bf16 vs torch bf16 and bnb; ours fp32 vs torch fp32). GB/s = weight bytes / time.",
        "",
        "| N x K | m | ours bf16 | ours fp32 | torch fp32 | torch bf16 | bnb bf16 | vs torch bf16 | "
        "vs torch fp32 | vs bnb | ours GB/s | dense bf16 GB/s | ours % of bf16 GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in header:
        print(line, flush=True)
    rows = []
    torch.manual_seed(0)
    for shape in shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(n, k) * 0.02
        q = lut4.quantize(w, "nf4", 64, double_quant=True)
        qargs = (q.packed, q.absmax, q.quant_map, 64, n, k, None, q.nested_quant_map, q.nested_absmax,
                 q.state.nested_offset, q.state.nested_blocksize)
        ours_bytes = q.packed.numel() + q.absmax.numel() * q.absmax.element_size() + q.nested_absmax.numel() * 4
        w_bf16 = w.to(torch.bfloat16)
        qw = st = None
        if bnb is not None:
            try:
                qw, st = bnbF.quantize_4bit(w_bf16, blocksize=64, quant_type="nf4", compress_statistics=True)
            except Exception as e:  # pragma: no cover
                print(f"(bnb quantize_4bit failed: {e})", file=sys.stderr)
        for m in batches:
            x32 = torch.randn(m, k)
            x16 = x32.to(torch.bfloat16)
            with torch.inference_mode():
                t_ours16 = bench(lambda: torch.ops.quantkit.lut4_linear(x16, *qargs), min_reps, budget)
                t_ours32 = bench(lambda: torch.ops.quantkit.lut4_linear(x32, *qargs), min_reps, budget)
                t_f32 = bench(lambda: F.linear(x32, w), min_reps, budget)
                t_b16 = bench(lambda: F.linear(x16, w_bf16), min_reps, budget)
                t_bnb = None
                if qw is not None:
                    try:
                        t_bnb = bench(lambda: bnb.matmul_4bit(x16, qw.t(), quant_state=st), min_reps, budget)
                    except Exception as e:  # pragma: no cover
                        print(f"(bnb matmul_4bit failed: {e})", file=sys.stderr)
            gbs_ours = ours_bytes / t_ours16 / 1e9
            gbs_dense = 2 * n * k / t_b16 / 1e9
            row = (f"| {n}x{k} | {m} | {fmt_ms(t_ours16)} | {fmt_ms(t_ours32)} | {fmt_ms(t_f32)} | "
                   f"{fmt_ms(t_b16)} | {fmt_ms(t_bnb)} | {ratio(t_b16, t_ours16)} | {ratio(t_f32, t_ours32)} | "
                   f"{ratio(t_bnb, t_ours16)} | {gbs_ours:.1f} | {gbs_dense:.1f} | {100 * gbs_ours / gbs_dense:.0f}% |")
            rows.append(row)
            print(row, flush=True)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n".join(header + rows) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
