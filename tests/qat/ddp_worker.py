"""One rank of tests/qat/test_ddp.py (run as a script: RANK, WORLD_SIZE, MASTER_ADDR/PORT set).

Trains a tiny Llama for a few steps under DistributedDataParallel (gloo, CPU) with QAT
switching on mid-run, checks every parameter is identical on all ranks, then rank 0 converts
and saves the model and writes reference logits next to it.
"""

import os
import sys

import torch
import torch.distributed as dist


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM

    import quantkit
    import quantkit.qat as qat

    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    steps, batch, seq = 6, 4, 16
    plan = qat.plan(n_params=sum(p.numel() for p in model.parameters()), total_tokens=steps * batch * seq * world,
                    bits=2, tokens_per_step=batch * seq * world, qat_fraction=0.5, peak_lr=3e-3, warmup_steps=1)
    model = qat.prepare(model, os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "qat-w2.yaml"),
                        plan=plan)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(qat.param_groups(ddp.module, 0.1), lr=plan.peak_lr)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for step in range(plan.total_steps):
        active = qat.step(ddp, step)
        assert active == (step >= plan.qat_start)
        for group in opt.param_groups:
            group["lr"] = plan.lr(step)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        loss = ddp(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    for other in gathered[1:]:
        if not torch.equal(gathered[0], other):
            raise SystemExit(f"rank {rank}: parameters differ across ranks by {(other - gathered[0]).abs().max()}")
    alphas = [m.quantizer.alpha for m in qat.qat_modules(model).values()]
    assert all(bool(m.quantizer.initialized) for m in qat.qat_modules(model).values())
    if rank == 0:
        qat.convert(model)
        quantkit.save(model, out_dir)
        ids = torch.arange(24).reshape(2, 12) % cfg.vocab_size
        with torch.no_grad():
            torch.save({"ids": ids, "logits": model(ids).logits, "n_alpha": len(alphas)},
                       os.path.join(out_dir, "..", "reference.pt"))
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok")


if __name__ == "__main__":
    main(sys.argv[1])
