#!/usr/bin/env python
"""BitStack error-feedback signs on SmolLM2-135M: the two studies behind the recipe's settings.

    # every decoder linear at b blocks (no order), perplexity on the first --tokens eval tokens
    python tools/bitstack_feedback_study.py uniform --blocks 2,3,4 [--no-feedback] [--damp 0.3] [--calib 48]
                                                    [--factor-dtype int8] [--sign-sweeps 1] [--calib-text FILE]
    # per linear of some layers: output error of feedback / reference blocks on the calibration
    # Gram and on the Gram of unseen text (8 x 512 tokens of the eval excerpt)
    python tools/bitstack_feedback_study.py layers --layers 3,29 [--damp 0.3] [--calib 48]

Both fold the activation scales exactly as the pass does and decompose with
``quantkit.formats.bitstack.quantize`` (rank 4, exact SVD by default); "uniform" also prints
Σ tr(E H Eᵀ) / Σ tr(W H Wᵀ) over all layers on the calibration Gram. Results: docs/benchmarks.md
(BitStack, round 3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _setup(calib_windows: int, pattern: str, calib_text: str | None = None):
    import quantkit
    from quantkit.calibration import calib_source
    from quantkit.passes import bitstack as P
    from quantkit.passes.targets import select_linears

    model = quantkit.load_model("smollm2-135m")
    model.eval()
    chosen = dict(select_linears(model, (pattern,), ("lm_head",), ""))
    watch = P._watch_points(model, chosen)
    stats = P._calibrate(model, set(watch.values()), calib_source(model, _read(calib_text)).batches(calib_windows, 512, seed=0),
                         gram=True, progress=False)
    return model, chosen, watch, stats


def _read(path: str | None) -> str | None:
    return None if path is None else open(path, encoding="utf-8").read()


def uniform(args) -> None:
    from quantkit.eval.perplexity import perplexity
    from quantkit.formats import bitstack
    from quantkit.models.text import default_text
    from quantkit.passes import bitstack as P

    model, chosen, watch, stats = _setup(args.calib, "re:.*", args.calib_text)
    scales = {n: stats.norm_sum[watch[n]] / stats.samples + P.SCALE_EPS for n in chosen}
    applied = {}
    for layer in P._llama_layers(model):
        applied.update(P._fold_layer(model, P._name_of(model, layer), layer, scales, chosen))
    t = time.perf_counter()
    recon, num, den = {}, {b: 0.0 for b in args.blocks}, 0.0
    for name, lin in chosen.items():
        w = lin.weight.data.float()
        h = stats.hessian(watch[name], 1.0 / applied[name] if name in applied else None)
        q = bitstack.quantize(w, max(args.blocks), args.rank, args.svd,
                              hessian=None if args.no_feedback else h, damp=args.damp,
                              factor_dtype=args.factor_dtype, sign_sweeps=0 if args.no_feedback else args.sign_sweeps)
        recon[name] = {b: bitstack.reconstruct(q, b) for b in args.blocks}
        den += float(((w @ h) * w).sum())
        for b in args.blocks:
            e = w - recon[name][b]
            num[b] += float(((e @ h) * e).sum())
    decompose_s = time.perf_counter() - t
    text = default_text("eval")
    for b in args.blocks:
        for name, lin in chosen.items():
            lin.weight.data.copy_(recon[name][b])
        r = perplexity(model, model._quantkit_tokenizer, text, seq_len=512, max_tokens=args.tokens, progress=False)
        print(json.dumps(dict(feedback=not args.no_feedback, damp=args.damp, calib_windows=args.calib, rank=args.rank,
                              factor_dtype=args.factor_dtype, sign_sweeps=args.sign_sweeps,
                              blocks=b, ppl=round(r.ppl, 3), calib_rel_out_err=num[b] / den,
                              decompose_s=round(decompose_s, 1))), flush=True)


def layers(args) -> None:
    from quantkit.calibration import CalibSource
    from quantkit.formats import bitstack
    from quantkit.models.text import default_text
    from quantkit.passes import bitstack as P

    pattern = r"re:model\.layers\.(" + "|".join(str(i) for i in args.layers) + r")\..*"
    model, chosen, watch, cal = _setup(args.calib, pattern, args.calib_text)
    unseen = CalibSource(model._quantkit_tokenizer, default_text("eval")).batches(8, 512, seed=1)
    ev = P._calibrate(model, set(watch.values()), unseen, gram=True, progress=False)
    for name, lin in chosen.items():
        s = cal.norm_sum[watch[name]] / cal.samples + P.SCALE_EPS
        w = lin.weight.data.float() * s[None, :]
        h_cal, h_ev = cal.hessian(watch[name], 1 / s), ev.hessian(watch[name], 1 / s)
        plain = bitstack.quantize(w, 4, args.rank, args.svd)
        fed = bitstack.quantize(w, 4, args.rank, args.svd, hessian=h_cal, damp=args.damp)
        cells = []
        for b in (1, 2, 3, 4):
            ep, ef = w - bitstack.reconstruct(plain, b), w - bitstack.reconstruct(fed, b)
            err = lambda e, h: float(((e @ h) * e).sum())
            cells.append(f"b{b} calib {err(ef, h_cal) / err(ep, h_cal):.2f} unseen {err(ef, h_ev) / err(ep, h_ev):.2f}")
        print(name.replace("model.layers.", ""), "|", " | ".join(cells), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="study", required=True)
    for name in ("uniform", "layers"):
        p = sub.add_parser(name)
        p.add_argument("--calib", type=int, default=48, help="calibration windows of 512 tokens (shipped excerpt: <= 52)")
        p.add_argument("--calib-text", help="calibration text file (default: the shipped excerpt)")
        p.add_argument("--damp", type=float, default=0.3)
        p.add_argument("--rank", type=int, default=4)
        p.add_argument("--svd", default="exact", choices=("exact", "lowrank"))
        p.add_argument("--threads", type=int, default=2)
        if name == "uniform":
            p.add_argument("--blocks", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3, 4])
            p.add_argument("--tokens", type=int, default=1024, help="eval tokens (1024: the first 2 windows)")
            p.add_argument("--no-feedback", action="store_true", help="the reference's sign(residual)")
            p.add_argument("--factor-dtype", default="float16", choices=("float16", "int8"))
            p.add_argument("--sign-sweeps", type=int, default=0, help="coordinate-descent sweeps after the feedback")
        else:
            p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[3, 29])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"uniform": uniform, "layers": layers}[args.study](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
