#!/usr/bin/env python
"""What merging a trained LoRA adapter into a packed SmolLM2-135M costs, per base format.

    python tools/lora_merge_error.py [--adapter out/qlora-smollm2-nf4] [--formats nf4,fp4,int4,bf16]

The adapter is the one tools/qlora_example.py trains (on the nf4 base) and saves. For each
base it is loaded with ``PeftModel.from_pretrained`` and merged with ``merge_adapter()``
(re-packing W + delta in the base's format), then reported:

    held-out loss  on 8 x 128 tokens of the shipped evaluation text: base alone, base +
                   adapter unmerged, merged
    logits         |merged - unmerged| max / mean on 2 of those windows
    kept           share of the weight change that survived re-packing, 1 - |repacked -
                   (W + delta)| / |delta| per layer (mean, min over the 210 layers)

Bases: nf4 / fp4 = recipes/nf4.yaml / fp4.yaml (int8 embedding and head); int4 =
recipes/qat-int4.yaml compressed without training (round-to-nearest on the LSQ grid,
per-row step); bf16 = every decoder linear a DenseLinear in bf16. The adapter was trained
on nf4, so on the other bases the unmerged loss is that of a transplanted adapter; the merge
columns compare merged with unmerged on the same base.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = {"nf4": "nf4.yaml", "fp4": "fp4.yaml", "int4": "qat-int4.yaml"}


def base_model(fmt: str):
    import torch

    import quantkit
    from quantkit.nn import DenseLinear

    fp = quantkit.load_model("smollm2-135m")
    if fmt in RECIPES:
        return quantkit.compress(fp, ROOT / "recipes" / RECIPES[fmt], inplace=True, progress=False)
    for layer in fp.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    setattr(parent, name, DenseLinear.from_weight(lin.weight.data, "bfloat16", lin.bias))
    return fp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default=str(ROOT / "out" / "qlora-smollm2-nf4"))
    ap.add_argument("--formats", default="nf4,fp4,int4,bf16")
    a = ap.parse_args()

    import warnings

    import torch
    from peft import PeftModel

    import quantkit  # noqa: F401  (registers the packed layers with peft)
    from qlora_example import held_out_loss, windows
    from quantkit.integrations._peft_layer import PackedLoraLinear

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    print("| base | held-out loss: base | + adapter | merged | logits |merged - unmerged| max / mean | "
          "kept (mean / min over layers) |")
    print("|---|---|---|---|---|---|")
    for fmt in a.formats.split(","):
        base = base_model(fmt)
        ids = windows(base._quantkit_tokenizer, "eval", 128, n=8)
        base_loss = held_out_loss(base, ids)
        model = PeftModel.from_pretrained(base, a.adapter).eval()
        unmerged = held_out_loss(model, ids)
        with torch.no_grad():
            want = model(input_ids=ids[:2]).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.merge_adapter()
        kept = torch.tensor([m.merge_kept for m in model.modules() if isinstance(m, PackedLoraLinear)])
        merged = held_out_loss(model, ids)
        with torch.no_grad():
            diff = (model(input_ids=ids[:2]).logits - want).abs()
        print(f"| {fmt} | {base_loss:.4f} | {unmerged:.4f} | {merged:.4f} | {diff.max():.3g} / {diff.mean():.3g} | "
              f"{kept.mean():.1%} / {kept.min():.1%} |", flush=True)


if __name__ == "__main__":
    main()
