"""Perplexity of a model quantized by quantkit vs by bitsandbytes itself, nf4/fp4 × double quant.

usage: python tools/compare_bnb.py [MODEL] [--max-tokens N] [--markdown FILE]

For each setting the same linears are quantized twice: with quantkit's passes (run on
quantkit's ops/kernels) and with ``bitsandbytes.functional.quantize_4bit`` +
``dequantize_4bit`` written back into a plain copy of the model. Perplexity is taken on
the same windows of quantkit's shipped eval text. The packed bytes are also compared
(fp4 zero codes canonicalised, see docs/format.md).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import quantkit
from _report import emit
from quantkit.eval.perplexity import perplexity
from quantkit.models.text import default_text
from quantkit.nn import Lut4Linear
from quantkit.passes.targets import select_linears


def bnb_fake_quant(model, quant_type: str, double_quant: bool, blocksize: int = 64):
    """Copy of ``model`` whose target linears hold bnb-quantized-then-dequantized weights."""
    import bitsandbytes.functional as F

    m = copy.deepcopy(model)
    for _, lin in select_linears(m, ("re:.*",), ("lm_head",)):
        q, st = F.quantize_4bit(lin.weight.data, blocksize=blocksize, quant_type=quant_type,
                                compress_statistics=double_quant)
        lin.weight.data = F.dequantize_4bit(q, st).reshape(lin.weight.shape).to(lin.weight.dtype)
    return m


def packed_bytes_agree(ours, model, quant_type, double_quant) -> str:
    import bitsandbytes.functional as F

    same = total = 0
    for name, lin in select_linears(model, ("re:.*",), ("lm_head",)):
        mine: Lut4Linear = ours.get_submodule(name)
        q, _ = F.quantize_4bit(lin.weight.data, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
        a, b = q.flatten(), mine.weight.flatten()
        if quant_type == "fp4":  # both zero codes decode to 0
            a = torch.where((a >> 4) == 8, a & 0x0F, a)
            a = torch.where((a & 0x0F) == 8, a & 0xF0, a)
        same += int((a == b).sum())
        total += a.numel()
    return f"{same}/{total}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = quantkit.load_model(args.model)
    tok = base._quantkit_tokenizer
    text = default_text("eval")

    def ppl(m):
        return perplexity(m, tok, text, seq_len=args.seq_len, max_tokens=args.max_tokens, progress=False)

    fp = ppl(base)
    lines = ["| quantization | double quant | quantkit ppl | bitsandbytes ppl | packed bytes equal | quantkit time (s) |",
             "|---|---|---|---|---|---|", f"| fp32 (none) | — | {fp.ppl:.4f} | — | — | {fp.seconds:.1f} |"]
    for qt in ("nf4", "fp4"):
        for dq in (False, True):
            recipe = {"passes": [{"pass": qt, "double_quant": dq}]}
            t0 = time.perf_counter()
            ours = quantkit.compress(base, recipe, progress=False)
            ours_ppl = ppl(ours)
            elapsed = time.perf_counter() - t0
            theirs_ppl = ppl(bnb_fake_quant(base, qt, dq))
            agree = packed_bytes_agree(ours, base, qt, dq)
            lines.append(f"| {qt} | {'on' if dq else 'off'} | {ours_ppl.ppl:.4f} | {theirs_ppl.ppl:.4f} | {agree} | "
                         f"{elapsed:.1f} |")
            del ours
    table = "\n".join(lines) + (f"\n\n{args.model}, {fp.n_tokens} tokens of the shipped eval excerpt, seq_len "
                                f"{args.seq_len}, fp32 activations, {torch.get_num_threads()} threads; "
                                f"kernels: {quantkit._ops.native_status()}")
    emit(table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
