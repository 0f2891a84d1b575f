#!/usr/bin/env python
"""Plot perplexity vs memory from tools/bitstack_sweep.py JSON lines (docs/bitstack_ppl_vs_memory.png).

    python tools/plot_bitstack.py --series "proxy order=sweep_proxy.jsonl" \
        --series "ppl order=sweep_pplorder.jsonl" --fp32 18.174 -o docs/bitstack_ppl_vs_memory.png

Rows labelled other than "bitstack" (nf4, fp4, ...) are drawn as single points. The top axis
is bits/weight of the decoder-layer linears, 8 · (bytes − bytes outside them) / weights, a
linear map because every model here keeps the same embeddings, norms and head.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", action="append", required=True, help="LABEL=FILE.jsonl")
    ap.add_argument("--fp32", type=float, default=None, help="fp32 perplexity (horizontal line)")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    points, conv = {}, None
    for item in args.series:
        label, path = item.split("=", 1)
        rows = [json.loads(l) for l in open(path) if l.strip()]
        bs = sorted((r for r in rows if r["label"] == "bitstack"), key=lambda r: r["memory_bytes"])
        if bs:
            ax.plot([r["memory_mb"] for r in bs], [r["ppl"] for r in bs], "o-", label=f"BitStack, {label}")
            r = bs[0]
            n_w = 8 * (r["memory_bytes"] - r["outside_bytes"]) / r["bits_per_weight_linears"]
            conv = (r["outside_bytes"], n_w)
        for r in rows:
            if r["label"] != "bitstack":
                points[r["label"]] = r
    markers = {"nf4": "s", "fp4": "^", "dbllm": "D", "dbllm_round1": "d"}
    names = {"dbllm": "DB-LLM 2-bit (mean of 2 seeds)", "dbllm_round1": "DB-LLM 2-bit before issue #16"}
    for label, r in points.items():
        name = names.get(label, label)
        ax.plot([r["memory_mb"]], [r["ppl"]], markers.get(label, "x"), markersize=9, label=name)
        # nf4 and fp4 share one memory, as do the two DB-LLM points: keep their labels apart
        offset = (8, -12) if label in ("nf4", "dbllm") else (8, 4)
        ax.annotate(f"{name} {r['ppl']:.2f}", (r["memory_mb"], r["ppl"]), textcoords="offset points", xytext=offset)
    if args.fp32:
        ax.axhline(args.fp32, color="gray", linestyle="--", linewidth=1, label=f"fp32 {args.fp32:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("model memory, MB (10^6 bytes; every parameter and buffer, quantkit's accounting)")
    ax.set_ylabel("perplexity (eval excerpt, 8176 tokens, seq 512; log scale)")
    ax.set_title("SmolLM2-135M: BitStack perplexity vs memory (one artifact, loaded per budget)")
    ax.grid(True, which="both", alpha=0.3)
    if conv:
        outside, n_w = conv
        sec = ax.secondary_xaxis("top", functions=(lambda mb: 8 * (mb * 1e6 - outside) / n_w,
                                                   lambda bpw: (bpw * n_w / 8 + outside) / 1e6))
        sec.set_xlabel("bits/weight of the decoder-layer linears")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
