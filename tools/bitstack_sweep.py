#!/usr/bin/env python
"""Perplexity vs memory of one BitStack artifact over many budgets (+ reference artifacts).

For each budget: quantkit.load(OUT, memory_budget=...) (timed), the bytes the model holds
(quantkit's accounting, docs/format.md), bits/weight of the decoder-layer linears
(8 · (held − bytes outside those linears) / their weight count) and perplexity with the
skeleton's protocol (shipped eval text, seq 512, 8192 tokens -> 8176 predicted). Reference
artifacts (nf4, fp4, ...) are measured the same way without a budget. Writes JSON lines.

    python tools/bitstack_sweep.py OUT --n 10 --max-bits 4.6 [--ref nf4=DIR ...] --jsonl FILE
    python tools/bitstack_sweep.py OUT --budgets 150MB,160MB --jsonl FILE
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def linear_weights(model) -> tuple[int, int]:
    """(#weights of decoder-layer linears, bytes the model holds outside them)."""
    from quantkit.io.bitstack_budget import model_memory_bytes
    from quantkit.nn import PACKED_MODULES

    kinds = (torch.nn.Linear, *PACKED_MODULES.values())
    n_w, inside, seen = 0, 0, set()
    for name, mod in model.named_modules():
        if isinstance(mod, kinds) and ".layers." in name:
            n_w += mod.in_features * mod.out_features
            for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                if t is not None and id(t) not in seen and not name.endswith("bias"):
                    seen.add(id(t))
                    inside += t.numel() * t.element_size()
    return n_w, model_memory_bytes(model) - inside


def measure(path, budget, tok_text, label):
    import quantkit
    from quantkit.eval.perplexity import perplexity
    from quantkit.io import artifact

    t0 = time.perf_counter()
    model = quantkit.load(path, memory_budget=budget)
    t_load = time.perf_counter() - t0
    tok = artifact.load_tokenizer(path)
    n_w, outside = linear_weights(model)
    held = model._quantkit_memory_bytes
    ppl = perplexity(model, tok, tok_text, seq_len=512, max_tokens=8192, progress=False)
    return {"label": label, "budget": budget, "memory_bytes": held, "memory_mb": held / 1e6,
            "bits_per_weight_linears": 8 * (held - outside) / n_w, "outside_bytes": outside,
            "ppl": ppl.ppl, "tokens": ppl.n_tokens, "load_s": t_load, "eval_s": ppl.seconds,
            "load1": os.getloadavg()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--budgets", default=None, help="comma list of budgets (default: --n evenly spaced)")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--max-bits", type=float, default=4.6, help="top budget: bits/weight of the linears")
    ap.add_argument("--ref", action="append", default=[], help="LABEL=ARTIFACT measured without a budget")
    ap.add_argument("--only", default=None, help="comma list of indices into the evenly spaced budgets")
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import quantkit
    from quantkit.io import artifact
    from quantkit.models.text import default_text

    text = default_text("eval")
    if args.budgets:
        budgets = args.budgets.split(",")
    else:
        plan = artifact.budget_plan(args.out)
        probe = quantkit.load(args.out, memory_budget=plan.minimum)
        n_w, outside = linear_weights(probe)
        del probe
        top = min(plan.maximum, int(outside + args.max_bits * n_w / 8))
        budgets = [int(plan.minimum + i * (top - plan.minimum) / (args.n - 1)) for i in range(args.n)]
        if args.only:
            budgets = [budgets[int(i)] for i in args.only.split(",")]
    with open(args.jsonl, "a") as f:
        for label_path in args.ref:
            label, path = label_path.split("=", 1)
            row = measure(path, None, text, label)
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
        for b in budgets:
            row = measure(args.out, b, text, "bitstack")
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
            f.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
