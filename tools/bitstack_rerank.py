#!/usr/bin/env python
"""Re-order an existing BitStack artifact's blocks with the reference's perplexity ranking.

Same decomposition, different model-wide order: loads OUT with every block, runs the pass's
level-major validation-perplexity ranking (quantkit/passes/bitstack.py ``_ppl_order``) for
levels 1..--levels on validation windows drawn exactly as the pass draws them (disjoint from
its calibration windows), keeps OUT's own relative order for the higher levels, and writes
DEST. Used to compare the two orders without decomposing twice (docs/benchmarks.md).

    python tools/bitstack_rerank.py OUT DEST --levels 2 --val-samples 1 --val-seq-len 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("dest")
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--val-samples", type=int, default=1)
    ap.add_argument("--val-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import quantkit
    from quantkit.calibration import calib_source
    from quantkit.io import artifact
    from quantkit.nn import BitStackLinear
    from quantkit.passes.bitstack import _ppl_order

    model = quantkit.load_model(args.out)
    recipe = model._quantkit_recipe_dict
    cfg = recipe["passes"][0]
    calib = calib_source(model)
    n_cal = cfg.get("calib_samples", 16)
    seq = max(cfg.get("calib_seq_len", 512), args.val_seq_len)
    val = calib.batches(n_cal + args.val_samples, seq, seed=cfg.get("seed", 0))[n_cal:, :args.val_seq_len]
    mods = {n: m for n, m in model.named_modules() if isinstance(m, BitStackLinear)}
    n_blocks = max(m.n_blocks for m in mods.values())
    t0 = time.perf_counter()
    order = _ppl_order(model, mods, val, args.levels, progress=True)
    seconds = time.perf_counter() - t0
    # levels above --levels: the artifact's own order, restricted to those blocks
    rest = sorted((p, n, i + 1) for n, m in mods.items() for i, p in enumerate(m.order) if i + 1 > args.levels)
    order += [(n, i) for _, n, i in rest]
    pos = {n: [] for n in mods}
    for p, (n, i) in enumerate(order):
        pos[n].append(p)
    for n, m in mods.items():
        m.order = pos[n]
    recipe_obj = quantkit.load_recipe({**recipe, "name": recipe["name"] + "-pplorder",
                                       "passes": [{**cfg, "order": "ppl", "ppl_levels": args.levels,
                                                   "val_samples": args.val_samples,
                                                   "val_seq_len": args.val_seq_len}]})
    model._quantkit_recipe = recipe_obj
    quantkit.save(model, args.dest, overwrite=True)
    print(json.dumps({"evaluations": args.levels * len(mods), "seconds": seconds, "n_blocks": n_blocks,
                      "val_tokens": int(val.numel())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
