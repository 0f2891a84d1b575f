#!/usr/bin/env python
"""CPU benchmark of BitStack's compress-time sign choice (not a test).

For each weight m x n (out x in) times, per block (median of calls after warm-up):
  reference  the pure-torch _feedback_signs + one _refine_signs sweep (a Python loop over columns)
  native     torch.ops.quantkit.bitstack_feedback_signs + bitstack_refine_signs (C++ loop,
             csrc/ops/bitstack_sign_ops.cpp)
and prints a markdown table with the speed-up and the share of signs on which the two agree,
measured in the same run. Inputs: a random residual, rank-2 magnitudes and the damped Gram of
correlated random activations (the speed does not depend on the values).

    python tools/bench_bitstack_signs.py [--threads 2] [--shapes 576x576,1536x576,576x1536,192x576]
                                         [--markdown FILE]
"""

from __future__ import annotations

import argparse
import sys

import torch

from _report import bench, cpu_model, emit

SHAPES = ["576x576", "192x576", "1536x576", "576x1536", "4096x4096"]


def _problem(m: int, n: int, seed: int = 0):
    from quantkit.formats import bitstack

    g = torch.Generator().manual_seed(seed)
    r = torch.randn(m, n, generator=g)
    mag = r.abs().mean(1, keepdim=True) * torch.rand(1, n, generator=g) * 2
    x = torch.randn(2 * n + 8, 3, generator=g) @ torch.randn(3, n, generator=g) + 0.3 * torch.randn(2 * n + 8, n, generator=g)
    h, hinv_u = bitstack._damped_gram_and_hinv(x.T @ x, 0.1)
    return r, mag, h, hinv_u


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--markdown", default=None, help="also append the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import quantkit._ops as ops

    if not ops.has_native_cpu_kernel("bitstack_feedback_signs"):
        print(f"quantkit._C is not loaded ({ops.native_status()}); build it first", file=sys.stderr)
        return 1
    lines = [f"CPU: {cpu_model()}, {args.threads} threads; per block: error feedback + 1 sign sweep", "",
             "| m x n | reference (ms) | native (ms) | speed-up | signs agreeing |", "|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.lower().split("x"))
        r, mag, h, hu = _problem(m, n)

        def ref():
            s = ops.bitstack_feedback_signs_reference(r, mag, hu)
            return ops.bitstack_refine_signs_reference(r, mag, s, h, 1)

        def nat():
            s = torch.ops.quantkit.bitstack_feedback_signs(r, mag, hu)
            return torch.ops.quantkit.bitstack_refine_signs(r, mag, s, h, 1)

        agree = float((ref() == nat()).float().mean())
        t_ref = bench(ref, min_reps=3, budget_s=1.0)
        t_nat = bench(nat, min_reps=10, budget_s=1.0)
        lines.append(f"| {m}x{n} | {t_ref * 1e3:.1f} | {t_nat * 1e3:.2f} | {t_ref / t_nat:.1f}x | {agree:.4%} |")
    emit("\n".join(lines), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
