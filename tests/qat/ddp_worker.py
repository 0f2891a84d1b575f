"""One rank of tests/qat/test_ddp.py (run as a script: RANK, WORLD_SIZE, MASTER_ADDR/PORT set).

    python ddp_worker.py OUT_DIR {ddp|fsdp}

Trains a tiny Llama for a few steps (gloo, CPU) with QAT switching on mid-run, under
DistributedDataParallel or FSDP2 (``fully_shard`` on each decoder layer and the root), then
rank 0 converts and saves the model and writes reference logits next to it. DDP: checks
every parameter is identical on all ranks. FSDP2: gathers the full state dict to rank 0,
loads it into a freshly prepared model and converts that (how a training script would).
"""

import os
import sys

import torch
import torch.distributed as dist

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "qat-w2.yaml")


def _model_and_plan(world: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    import quantkit.qat as qat

    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    steps, batch, seq = 6, 4, 16
    plan = qat.plan(n_params=sum(p.numel() for p in model.parameters()), total_tokens=steps * batch * seq * world,
                    bits=2, tokens_per_step=batch * seq * world, qat_fraction=0.5, peak_lr=3e-3, warmup_steps=1)
    return qat.prepare(model, RECIPE, plan=plan), plan, batch, seq


def _check_identical_across_ranks(model, rank: int, world: int) -> None:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    for other in gathered[1:]:
        if not torch.equal(gathered[0], other):
            raise SystemExit(f"rank {rank}: parameters differ across ranks by {(other - gathered[0]).abs().max()}")


def main(out_dir: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    import quantkit
    import quantkit.qat as qat

    model, plan, batch, seq = _model_and_plan(world)
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(qat.param_groups(model, 0.1), lr=plan.peak_lr)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for step in range(plan.total_steps):
        active = qat.step(wrapped, step)
        assert active == (step >= plan.qat_start)
        for group in opt.param_groups:
            group["lr"] = plan.lr(step)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        loss = wrapped(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(bool(m.quantizer.initialized) for m in qat.qat_modules(model).values())
    if mode == "ddp":
        _check_identical_across_ranks(model, rank, world)
        final = model
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        final = None
        if rank == 0:
            final, _, _, _ = _model_and_plan(world)
            final.load_state_dict(full)
            qat.step(final, plan.total_steps - 1)
    if rank == 0:
        n_alpha = len(qat.qat_modules(final))
        qat.convert(final)
        quantkit.save(final, out_dir)
        ids = torch.arange(24).reshape(2, 12) % final.config.vocab_size
        with torch.no_grad():
            torch.save({"ids": ids, "logits": final(ids).logits, "n_alpha": n_alpha},
                       os.path.join(out_dir, "..", f"reference-{mode}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Skip interpreter teardown: with torch 2.13 + gloo a background C++ thread can still be
    # joinable when the runtime is destroyed, and the process then aborts ("terminate called
    # without an active exception", exit -6) after all the work above succeeded. Seen once in
    # ~14 CI runs; every check this worker makes has run by now.
    sys.stderr.flush()
    os._exit(0)
