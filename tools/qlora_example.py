#!/usr/bin/env python
"""QLoRA-style fine-tune of a quantkit nf4 SmolLM2-135M with transformers.Trainer + peft.

    python tools/qlora_example.py [--steps 20] [--batch 2] [--seq 128] [--r 8] [--lr 1e-3]
                                  [--out out/qlora-smollm2-nf4]

1. base: ``quantkit.compress(quantkit.load_model("smollm2-135m"), "recipes/nf4.yaml")`` (nf4
   linears, int8 embedding + tied head), packed and frozen throughout;
2. adapters: peft LoRA (r, alpha 2r, dropout 0.05) on the seven projections of every block,
   fp32; nothing but ``import quantkit`` is needed for peft to accept the packed layers;
3. data: windows of ``--seq`` tokens of the shipped calibration text
   (``quantkit.models.text.default_text("calib")``); held-out loss on 8 windows of the
   shipped evaluation text before and after;
4. ``transformers.Trainer`` on the CPU, constant learning rate, one log line per step;
5. the adapter is saved (``save_pretrained``) to ``--out``, reloaded onto a fresh base with
   ``PeftModel.from_pretrained`` (same logits) and merged with ``merge_and_unload()`` (nf4
   re-packed): the merged model's logit difference and held-out loss are printed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def windows(tokenizer, split: str, seq: int, n: int = None):
    import torch

    from quantkit.models.text import default_text

    ids = tokenizer(default_text(split))["input_ids"]
    count = len(ids) // seq if n is None else min(n, len(ids) // seq)
    return torch.tensor(ids[:count * seq]).view(count, seq)


class Windows:
    """A torch-style dataset of causal-LM examples (labels = input_ids; the model shifts them)."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def held_out_loss(model, ids, batch: int = 4) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=ids[i:i + batch], labels=ids[i:i + batch]).loss.item()
                  for i in range(0, ids.shape[0], batch)]
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(ROOT / "out" / "qlora-smollm2-nf4"))
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    import quantkit

    torch.manual_seed(0)
    t0 = time.perf_counter()
    base = quantkit.compress(quantkit.load_model("smollm2-135m"), ROOT / "recipes" / "nf4.yaml", progress=False)
    tok = base._quantkit_tokenizer
    fresh_base = copy.deepcopy(base)  # for the reload check (packed: ~100 MB)
    print(f"base: nf4 SmolLM2-135M compressed in {time.perf_counter() - t0:.0f} s")

    train = Windows(windows(tok, "calib", a.seq))
    held_out = windows(tok, "eval", a.seq, n=8)
    model = get_peft_model(base, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.05, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))
    # (peft's print_trainable_parameters counts nn.Parameters only, and the packed weights are buffers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    packed_mb = sum(b.numel() * b.element_size() for b in model.buffers()) / 1e6
    print(f"adapters: {trainable:,} trainable fp32 parameters; base: {packed_mb:.0f} MB of packed, frozen buffers")
    before = held_out_loss(model, held_out)
    print(f"held-out loss before: {before:.4f}")

    args = TrainingArguments(output_dir=str(Path(a.out) / "trainer"), max_steps=a.steps,
                             per_device_train_batch_size=a.batch, learning_rate=a.lr, lr_scheduler_type="constant",
                             warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"train loss per step ({a.steps} steps, batch {a.batch} x seq {a.seq}, {train_s:.0f} s):")
    print("  " + " ".join(f"{x:.3f}" for x in losses))
    k = max(1, len(losses) // 4)
    print(f"  mean of the first {k}: {sum(losses[:k]) / k:.3f}   mean of the last {k}: {sum(losses[-k:]) / k:.3f}")
    after = held_out_loss(model, held_out)
    print(f"held-out loss after: {after:.4f} (before {before:.4f})")

    model.save_pretrained(a.out)
    with torch.no_grad():
        want = model(input_ids=held_out[:2]).logits
        got = PeftModel.from_pretrained(fresh_base, a.out).eval()(input_ids=held_out[:2]).logits
    print(f"adapter saved to {a.out}; reloaded onto a fresh base: logits identical: {torch.equal(got, want)}")

    merged = model.merge_and_unload()  # nf4 re-packed with the deltas
    with torch.no_grad():
        diff = (merged(input_ids=held_out[:2]).logits - want).abs()
    print(f"merge_and_unload (nf4 re-packed): |logits - unmerged logits| max {diff.max():.3g} mean {diff.mean():.3g}; "
          f"held-out loss merged {held_out_loss(merged, held_out):.4f} (unmerged {after:.4f}, base {before:.4f})")


if __name__ == "__main__":
    main()
