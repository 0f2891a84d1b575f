"""Run the dbllm pass on a model with recipe overrides, then evaluate perplexity.

    python tools/run_dbllm.py --recipe recipes/dbllm-w2g64.yaml --set steps=0 init=absmax \
        --json out/dbllm-rtn.json [--save OUT] [--threads 1]

Prints and writes (JSON): the overrides, tokens trained on, wall time of the compress
(init + training + packing), the per-step loss history, and perplexity with the skeleton's
protocol (shipped eval text, seq 512, 8192 tokens -> 8176 scored), as `quantkit eval` does.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _value(text: str):
    import yaml
    return yaml.safe_load(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="recipes/dbllm-w2g64.yaml")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override keys of the dbllm pass")
    ap.add_argument("--json", required=True, help="where to write the result")
    ap.add_argument("--save", default=None, help="also save the compressed artifact here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    import torch

    import quantkit
    from quantkit.eval.perplexity import perplexity
    from quantkit.models.text import default_text
    from quantkit.recipe import load_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe).to_dict()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    for k, v in overrides.items():
        recipe["passes"][0][k] = _value(v)
    model = quantkit.load_model(args.model)
    tokenizer = model._quantkit_tokenizer
    history: list = []
    from quantkit.passes import dbllm
    from quantkit.recipe import Recipe
    rec = Recipe.from_dict(recipe, where="run_dbllm")
    cfg = rec.passes[0].config
    from quantkit.calibration import calib_source
    calib = calib_source(model).for_config(cfg)  # the recipe's default_calib_text, as quantkit.compress
    import resource
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    dbllm.apply(model, cfg, progress=True, calib=calib, history=history)
    compress_s = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds of the compress: on a contended machine, the wall time it would take alone
    # at this thread count is close to this divided by the threads.
    compress_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    model._quantkit_recipe = rec
    if args.save:
        quantkit.save(model, args.save, overwrite=True)
    ppl = perplexity(model, tokenizer, default_text("eval"), seq_len=512, max_tokens=8192, progress=False)
    out = {"model": args.model, "recipe": args.recipe, "overrides": overrides,
           "tokens_trained": cfg.steps * cfg.batch_size * cfg.seq_len, "compress_seconds": round(compress_s, 1),
           "compress_cpu_seconds": round(compress_cpu, 1),
           "threads": torch.get_num_threads(), "ppl": ppl.ppl, "eval_tokens": ppl.n_tokens,
           "load_avg_end": os.getloadavg()[0], "history": history}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "history"}))


if __name__ == "__main__":
    main()
