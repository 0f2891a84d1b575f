#!/usr/bin/env python
"""Peak memory of LoRA training steps on a 4-bit SmolLM2-135M: quantkit nf4 vs bitsandbytes nf4.

Each variant runs in its own fresh subprocess (so one's heap never counts in another's peak):

    quantkit-nf4        decoder linears nf4 (block 64, double quant), fp32 embedding + tied
                        head: the same layers bitsandbytes packs
    quantkit-nf4-recipe recipes/nf4.yaml as shipped: also the embedding and tied head int8
    bnb-nf4             decoder linears bitsandbytes Linear4bit (nf4, compress_statistics,
                        fp32 compute; its CPU backend), fp32 embedding + tied head

then the same peft LoRA on all seven projections of every block (r, alpha 2r, no dropout),
AdamW on the adapters, fp32 activations, ``--steps`` steps of
``--batch`` x ``--seq`` tokens of the shipped calibration text. Reported from
/proc/self/status: VmRSS once the model and adapters are built (fp32 weights freed, heap
trimmed), then the peak (VmHWM, reset through /proc/self/clear_refs right before the
first step) over the steps, and the seconds per step. ``--checkpointing``: transformers'
gradient checkpointing (activations kept at block boundaries only, so what the weights'
handling costs is a larger share of the peak).

RSS counts heap pages glibc keeps after a free; ``MALLOC_MMAP_THRESHOLD_=1048576`` in the
environment (a glibc tunable, inherited by every variant) serves allocations of 1 MiB and
more by mmap, so they go back to the kernel when freed and the peak follows live memory.

    python tools/bench_lora_memory.py [--steps 5] [--batch 2] [--seq 128] [--r 8] [--checkpointing]
                                      [--variants quantkit-nf4,quantkit-nf4-recipe,bnb-nf4]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("quantkit-nf4", "quantkit-nf4-recipe", "bnb-nf4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4_LINEARS = {"version": 1, "name": "nf4-linears", "description": "nf4 decoder linears only",
               "passes": [{"pass": "nf4", "targets": ["re:.*"], "ignore": ["lm_head"], "blocksize": 64,
                           "double_quant": True}]}


def _status(key: str) -> int:
    """Bytes of a /proc/self/status field (VmRSS, VmHWM, RssAnon)."""
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def _bnb_nf4(model):
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
                setattr(parent, name, q.to("cpu"))  # .to() quantizes
    model.is_loaded_in_4bit = True  # what peft's bnb dispatch looks for
    return model


def child(variant: str, steps: int, batch: int, seq: int, r: int, checkpointing: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    import quantkit
    from quantkit.heap import return_freed_memory
    from quantkit.models.text import default_text

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    model = quantkit.load_model("smollm2-135m")
    tok = model._quantkit_tokenizer
    if variant == "bnb-nf4":
        model = _bnb_nf4(model)
    else:
        recipe = "nf4" if variant == "quantkit-nf4-recipe" else NF4_LINEARS
        model = quantkit.compress(model, recipe, inplace=True, progress=False)
    gc.collect()
    return_freed_memory()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    ids = torch.tensor(tok(default_text("calib"))["input_ids"][: steps * batch * seq]).view(steps, batch, seq)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gc.collect()
    return_freed_memory()
    built = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        loss = model(input_ids=ids[step], labels=ids[step]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    wall = time.perf_counter() - t0
    return {"variant": variant, "built": built, "peak": _status("VmHWM"), "s_per_step": wall / steps,
            "losses": losses, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.steps, a.batch, a.seq, a.r, a.checkpointing)), flush=True)
        return
    rows = []
    for v in a.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        cmd = [sys.executable, __file__, "--child", v, "--steps", str(a.steps), "--batch", str(a.batch),
               "--seq", str(a.seq), "--r", str(a.r)] + (["--checkpointing"] if a.checkpointing else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            raise SystemExit(f"{v} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"{v}: done", file=sys.stderr, flush=True)
    mib = 2 ** 20
    print(f"SmolLM2-135M, peft LoRA r={a.r} on {len(TARGETS)} projections x 30 blocks, {a.steps} steps of "
          f"batch {a.batch} x seq {a.seq}{', gradient checkpointing' if a.checkpointing else ''}; {platform.processor() or platform.machine()}, "
          f"torch threads {os.environ.get('BENCH_THREADS', '2')}\n")
    print("| base | RSS built | peak RSS over the steps | peak - built | s/step | losses |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['built'] / mib:.0f} MiB | {r['peak'] / mib:.0f} MiB | "
              f"{(r['peak'] - r['built']) / mib:.0f} MiB | {r['s_per_step']:.2f} | {r['losses']} |")


if __name__ == "__main__":
    main()
