"""Export a quantkit artifact to ONNX and compare ONNX Runtime's logits with quantkit's.

Prints one markdown row: artifact, formats, ONNX op kinds used for the packed layers,
file sizes (model.onnx vs the artifact's safetensors), export seconds, and the max abs /
relative logit difference on a fixed batch of token ids (2 x 64, seed 0).

    python tools/check_onnx_export.py out/smollm2-nf4 [--memory-budget 120MB] [--keep DEST]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--keep", help="write the export here instead of a temporary folder")
    ap.add_argument("--memory-budget", help="export and compare the model as loaded under this budget (BitStack)")
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort

    import quantkit
    from quantkit.io.artifact import read_metadata

    out = Path(args.artifact)
    info = read_metadata(out)
    formats = collections.Counter(s["format"] for s in info["modules"].values())
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(args.keep) if args.keep else Path(tmp) / "onnx"
        t0 = time.perf_counter()
        quantkit.export(out, to="onnx", dest=dest, overwrite=bool(args.keep), memory_budget=args.memory_budget)
        secs = time.perf_counter() - t0
        proto = onnx.load(str(dest / "model.onnx"), load_external_data=False)
        kinds = collections.Counter(f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain)
        onnx_mb = sum(p.stat().st_size for p in dest.glob("model.onnx*")) / 1e6
        art_mb = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6
        model = quantkit.load(out, memory_budget=args.memory_budget)
        ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(ids).logits.numpy()
        sess = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"input_ids": ids.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    rel = diff / float(np.abs(ref).max())
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    ops = ", ".join(f"{k} x{v}" for k, v in kinds.items()) or "standard ops only"
    fmts = ", ".join(f"{k} x{v}" for k, v in formats.items())
    print("| artifact | formats | contrib ops | model.onnx MB | artifact MB | export s | max abs diff | rel | argmax agree |")
    print("|---|---|---|---|---|---|---|---|---|")
    name = out.name + (f" @ {args.memory_budget}" if args.memory_budget else "")
    print(f"| {name} | {fmts} | {ops} | {onnx_mb:.1f} | {art_mb:.1f} | {secs:.0f} | {diff:.2e} | {rel:.1e} | "
          f"{agree:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
