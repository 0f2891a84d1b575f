#!/usr/bin/env python
"""Where a decode step's time goes: torch.profiler over N one-token steps of quantkit's runtime.

    python tools/profile_decode.py ARTIFACT_OR_MODEL [--runtime lean|static] [--threads 2] [--steps 32]

Prints wall ms per token (a generate call, no profiler), then, for N decode steps after
the same prompt (the prefill is not profiled), the ops by self CPU time per token (the
packed linears are ``quantkit::*``; everything else is the glue around them). The profiler
adds its own cost per op (~1-2 us), so read the split, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import sys

import torch

import quantkit
from quantkit.models.text import default_text
from quantkit.runtime import generate
from quantkit.runtime.decoder_plan import plan_decoder
from quantkit.runtime.generate import _lean_engine, _static_engine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--runtime", default="lean", choices=["lean", "static"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = quantkit.load_model(args.model)
    tok = model._quantkit_tokenizer
    ids = tok(default_text("eval"))["input_ids"][:args.prompt_tokens]
    kw = dict(prompt_ids=ids, max_new_tokens=args.steps + 1, ignore_eos=True, runtime=args.runtime)
    generate(model, tok, **kw)  # warm-up
    r = generate(model, tok, **kw)
    print(f"{args.runtime}: {1000 * r.decode_seconds / args.steps:.2f} ms per decode step "
          f"({r.decode_tokens_per_s:.1f} tok/s) after a {len(ids)}-token prompt, {args.threads} threads")
    # the same engine generate uses, driven by hand so that only the decode steps are profiled
    with torch.inference_mode():
        if args.runtime == "lean":
            engine = _lean_engine(model, plan_decoder(model), len(ids), args.steps + 1)
        else:
            engine = _static_engine(model, len(ids), args.steps + 1, False)
        prefill, step, _ = engine
        nxt = prefill(torch.tensor([ids])).argmax(-1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for i in range(args.steps):
                nxt = step(nxt, len(ids) + i).argmax(-1)
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{'op':48s} {'calls/token':>11s} {'self us/token':>13s} {'share':>6s}")
    for e in rows:
        print(f"{e.key[:48]:48s} {e.count / args.steps:11.1f} {e.self_cpu_time_total / args.steps:13.1f} "
              f"{100 * e.self_cpu_time_total / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
